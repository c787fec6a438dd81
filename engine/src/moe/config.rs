//! mergekit-moe's YAML (`MoEMergeConfig` of mergekit 0.1.5, `mergekit/moe/config.py`):
//! `base_model`, `experts` (each `source_model`, `positive_prompts`,
//! `negative_prompts`, `noise_scale`, `residual_scale`), `gate_mode`, `dtype`,
//! `experts_per_token`, `shared_experts`, `architecture`; read from the node
//! tree of [`crate::yaml`] so that every mistake names its key and line, and
//! checked with mergekit-moe's rules (`is_bad_config`, and the shared experts'
//! "all or none have prompts" assertion) before any model is opened.

use crate::config::{ConfigError, MergeConfig, ModelRef, Spanned};
use crate::dtype::DType;
use crate::yaml::{key_text, Node, NodeKind, Span};
use std::path::Path;

const TOP_KEYS: &[&str] = &[
    "base_model",
    "experts",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "shared_experts",
    "architecture",
];
const EXPERT_KEYS: &[&str] = &[
    "source_model",
    "positive_prompts",
    "negative_prompts",
    "noise_scale",
    "residual_scale",
];

/// How the routers are initialised (`gate_mode`, mergekit's `moe/router.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateMode {
    /// The base model's hidden state at each layer's input, last position.
    Hidden,
    /// The same, averaged over every position.
    HiddenAvg,
    /// The same as `hidden` (mergekit's alias).
    HiddenLast,
    /// Token embeddings of the prompts, one vector for every layer.
    CheapEmbed,
    /// Standard normal.
    Random,
    /// Uniform in ±1/√hidden (torch.nn.Linear's initialisation).
    UniformRandom,
}

impl GateMode {
    pub const ALL: &'static [(&'static str, GateMode)] = &[
        ("hidden", GateMode::Hidden),
        ("hidden_avg", GateMode::HiddenAvg),
        ("hidden_last", GateMode::HiddenLast),
        ("cheap_embed", GateMode::CheapEmbed),
        ("random", GateMode::Random),
        ("uniform_random", GateMode::UniformRandom),
    ];

    pub fn name(self) -> &'static str {
        GateMode::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("?", |(n, _)| n)
    }

    /// The random modes need no prompts.
    pub fn is_random(self) -> bool {
        matches!(self, GateMode::Random | GateMode::UniformRandom)
    }
}

/// One entry of `experts:` or `shared_experts:`.
#[derive(Debug, Clone, PartialEq)]
pub struct Expert {
    pub source_model: Spanned<ModelRef>,
    pub positive_prompts: Option<Vec<String>>,
    pub negative_prompts: Option<Vec<String>>,
    pub noise_scale: Option<f64>,
    pub residual_scale: Option<f64>,
    /// e.g. `experts[2]`.
    pub key_path: String,
    pub span: Span,
}

impl Expert {
    fn prompts(&self) -> (&[String], &[String]) {
        (
            self.positive_prompts.as_deref().unwrap_or_default(),
            self.negative_prompts.as_deref().unwrap_or_default(),
        )
    }
}

/// A parsed mergekit-moe config.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// The file name as the user gave it (for messages).
    pub file: String,
    /// The YAML text verbatim (written as `mergekit_moe_config.yml`).
    pub source: String,
    pub base_model: Spanned<ModelRef>,
    pub experts: Vec<Expert>,
    pub experts_span: Span,
    /// Default `hidden`, as mergekit.
    pub gate_mode: Spanned<GateMode>,
    pub dtype: Option<Spanned<DType>>,
    /// Default 2.
    pub experts_per_token: Spanned<i64>,
    pub shared_experts: Vec<Expert>,
    pub shared_experts_span: Option<Span>,
    pub architecture: Option<Spanned<String>>,
}

/// Whether the YAML text is a mergekit-moe config (it has a top-level
/// `experts:` key) rather than a merge config.
pub fn is_moe_config(source: &str) -> bool {
    Node::parse("", source)
        .ok()
        .and_then(|n| {
            n.as_map()
                .map(|m| m.iter().any(|(k, _)| k.as_str() == Some("experts")))
        })
        .unwrap_or(false)
}

struct Reader<'a> {
    file: &'a str,
}

impl Reader<'_> {
    fn err(&self, key_path: &str, span: Span, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            key_path: key_path.to_string(),
            span: Some(span),
            message: message.into(),
        }
    }

    fn expected(&self, key_path: &str, node: &Node, what: &str) -> ConfigError {
        self.err(
            key_path,
            node.span,
            format!("expected {what}, got {}", node.describe()),
        )
    }

    /// The entries of a mapping whose keys are all in `allowed`.
    fn fields<'n>(
        &self,
        node: &'n Node,
        key_path: &str,
        allowed: &[&str],
        what: &str,
    ) -> Result<&'n [(Node, Node)], ConfigError> {
        let Some(entries) = node.as_map() else {
            return Err(self.expected(key_path, node, what));
        };
        for (k, _) in entries {
            match k.as_str() {
                Some(name) if allowed.contains(&name) => {}
                _ => {
                    let name = key_text(k);
                    return Err(self.err(
                        &join(key_path, &name),
                        k.span,
                        format!(
                            "unknown key '{name}' (allowed here: {})",
                            allowed.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(entries)
    }

    fn string(&self, node: &Node, key_path: &str) -> Result<String, ConfigError> {
        node.as_str()
            .map(str::to_string)
            .ok_or_else(|| self.expected(key_path, node, "a string"))
    }

    fn number(&self, node: &Node, key_path: &str) -> Result<f64, ConfigError> {
        match node.kind {
            NodeKind::Int(i) => Ok(i as f64),
            NodeKind::Float(f) if f.is_finite() => Ok(f),
            _ => Err(self.expected(key_path, node, "a finite number")),
        }
    }

    fn prompts(&self, node: &Node, key_path: &str) -> Result<Vec<String>, ConfigError> {
        let Some(items) = node.as_seq() else {
            return Err(self.expected(key_path, node, "a list of prompts (strings)"));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, n)| self.string(n, &format!("{key_path}[{i}]")))
            .collect()
    }

    fn expert(&self, node: &Node, key_path: &str) -> Result<Expert, ConfigError> {
        let entries = self.fields(
            node,
            key_path,
            EXPERT_KEYS,
            "an expert (a mapping with `source_model` and prompts)",
        )?;
        let get = |key: &str| {
            entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v)
                .filter(|v| !v.is_null())
        };
        let path = |key: &str| join(key_path, key);
        let Some(model) = get("source_model") else {
            return Err(self.err(
                &path("source_model"),
                node.span,
                "missing required key `source_model` (the dense model whose MLPs become this \
                 expert)",
            ));
        };
        let source_model = MergeConfig::model_reference(self.file, model, &path("source_model"))?;
        let scale = |key: &str| -> Result<Option<f64>, ConfigError> {
            get(key).map(|n| self.number(n, &path(key))).transpose()
        };
        Ok(Expert {
            source_model,
            positive_prompts: get("positive_prompts")
                .map(|n| self.prompts(n, &path("positive_prompts")))
                .transpose()?,
            negative_prompts: get("negative_prompts")
                .map(|n| self.prompts(n, &path("negative_prompts")))
                .transpose()?,
            noise_scale: scale("noise_scale")?,
            residual_scale: scale("residual_scale")?,
            key_path: key_path.to_string(),
            span: node.span,
        })
    }

    fn experts(&self, node: &Node, key: &str) -> Result<Vec<Expert>, ConfigError> {
        let Some(items) = node.as_seq() else {
            return Err(self.expected(key, node, "a list of experts"));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, n)| self.expert(n, &format!("{key}[{i}]")))
            .collect()
    }

    fn config(&self, root: &Node, source: &str) -> Result<MoeConfig, ConfigError> {
        let entries = self.fields(
            root,
            "",
            TOP_KEYS,
            "a mapping (base_model, experts, gate_mode, ...) at the top level",
        )?;
        let get = |key: &str| {
            entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v)
                .filter(|v| !v.is_null())
        };
        let Some(base) = get("base_model") else {
            return Err(self.err(
                "base_model",
                root.span,
                "missing required key `base_model` (the model that gives attention, norms and \
                 embeddings)",
            ));
        };
        let base_model = MergeConfig::model_reference(self.file, base, "base_model")?;
        let Some(experts_node) = get("experts") else {
            return Err(self.err(
                "experts",
                root.span,
                "missing required key `experts` (a list of {source_model, positive_prompts})",
            ));
        };
        let experts = self.experts(experts_node, "experts")?;
        let gate_mode = match get("gate_mode") {
            None => Spanned::new(GateMode::Hidden, root.span),
            Some(n) => {
                let name = self.string(n, "gate_mode")?;
                let mode = GateMode::ALL
                    .iter()
                    .find(|(m, _)| *m == name)
                    .map(|(_, m)| *m)
                    .ok_or_else(|| {
                        self.err(
                            "gate_mode",
                            n.span,
                            format!(
                                "unknown gate_mode '{name}' (one of: {})",
                                GateMode::ALL
                                    .iter()
                                    .map(|(m, _)| *m)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )
                    })?;
                Spanned::new(mode, n.span)
            }
        };
        let dtype = match get("dtype") {
            None => None,
            Some(n) => {
                let name = self.string(n, "dtype")?;
                let bare = name.strip_prefix("torch.").unwrap_or(&name);
                let d = match bare {
                    "bfloat16" => DType::BF16,
                    "float16" => DType::F16,
                    "float32" => DType::F32,
                    _ => {
                        return Err(self.err(
                            "dtype",
                            n.span,
                            format!("unsupported dtype '{name}' (bfloat16, float16 or float32)"),
                        ))
                    }
                };
                Some(Spanned::new(d, n.span))
            }
        };
        let experts_per_token = match get("experts_per_token") {
            None => Spanned::new(2, root.span),
            Some(n) => match n.kind {
                NodeKind::Int(i) => Spanned::new(i, n.span),
                _ => return Err(self.expected("experts_per_token", n, "an integer")),
            },
        };
        let shared = get("shared_experts");
        let shared_experts = match shared {
            Some(n) => self.experts(n, "shared_experts")?,
            None => Vec::new(),
        };
        let architecture = get("architecture")
            .map(|n| Ok::<_, ConfigError>(Spanned::new(self.string(n, "architecture")?, n.span)))
            .transpose()?;
        Ok(MoeConfig {
            file: self.file.to_string(),
            source: source.to_string(),
            base_model,
            experts_span: experts_node.span,
            experts,
            gate_mode,
            dtype,
            experts_per_token,
            shared_experts,
            shared_experts_span: shared.map(|n| n.span),
            architecture,
        })
    }
}

fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

impl MoeConfig {
    /// Parses the YAML text of a mergekit-moe config; `file` names it in messages.
    pub fn parse(file: &str, source: &str) -> Result<MoeConfig, ConfigError> {
        let root = Node::parse(file, source)?;
        Reader { file }.config(&root, source)
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<MoeConfig, ConfigError> {
        let file = path.display().to_string();
        let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key_path: String::new(),
            span: None,
            message: format!("cannot read the moe config: {e}"),
        })?;
        MoeConfig::parse(&file, &source)
    }

    fn err(&self, key_path: &str, span: Span, message: impl Into<String>) -> ConfigError {
        Reader { file: &self.file }.err(key_path, span, message)
    }

    /// mergekit-moe's checks (`is_bad_config`, and its shared-experts
    /// assertion), as errors at the key concerned. `allow_all_same`:
    /// `--i-understand-this-is-not-useful-without-training`.
    pub fn validate(&self, allow_all_same: bool) -> Result<(), ConfigError> {
        let k = self.experts_per_token.value;
        if k < 1 {
            return Err(self.err(
                "experts_per_token",
                self.experts_per_token.span,
                format!("Experts per token must be >= 1 (got {k})"),
            ));
        }
        if (self.experts.len() as i64) < k {
            return Err(self.err(
                "experts",
                self.experts_span,
                format!(
                    "Must include at least as many experts as experts_per_token ({} experts, \
                     experts_per_token {k})",
                    self.experts.len()
                ),
            ));
        }
        if self.gate_mode.value != GateMode::Random {
            for e in &self.experts {
                if e.positive_prompts.as_ref().is_none_or(Vec::is_empty) {
                    return Err(self.err(
                        &join(&e.key_path, "positive_prompts"),
                        e.span,
                        format!(
                            "Expert {} has no positive prompts (gate_mode {} routes by \
                             prompts; only `random` needs none)",
                            e.key_path
                                .trim_start_matches("experts[")
                                .trim_end_matches(']'),
                            self.gate_mode.value.name()
                        ),
                    ));
                }
            }
            let first = self.experts[0].prompts();
            if self.experts[1..].iter().all(|e| e.prompts() == first) {
                return Err(self.err(
                    "experts",
                    self.experts_span,
                    "Your positive and negative prompts are identical for all experts. This \
                     will not produce a functioning MoE. For each expert, `positive_prompts` \
                     must contain one or more example prompt reflecting what should be routed \
                     to that expert.",
                ));
            }
            let model = &self.experts[0].source_model.value;
            if !allow_all_same
                && self.experts[1..]
                    .iter()
                    .all(|e| &e.source_model.value == model)
            {
                return Err(self.err(
                    "experts",
                    self.experts_span,
                    "All of your expert models are the same. This will produce a model that \
                     uses more resources but gives the exact same output. If you plan to train \
                     the model after merging, proceed with the \
                     --i-understand-this-is-not-useful-without-training flag.",
                ));
            }
        }
        if let Some(span) = self.shared_experts_span {
            let with = self
                .shared_experts
                .iter()
                .filter(|e| e.positive_prompts.as_ref().is_some_and(|p| !p.is_empty()))
                .count();
            if with != 0 && with != self.shared_experts.len() {
                return Err(self.err(
                    "shared_experts",
                    span,
                    "Must specify prompts for all shared experts or none, not a mix",
                ));
            }
        }
        Ok(())
    }

    /// The shared experts get a router of their own (Qwen2-MoE's
    /// `shared_expert_gate`) when they have prompts or the mode is random
    /// (mergekit's `need_gates`).
    pub fn shared_gated(&self) -> bool {
        !self.shared_experts.is_empty()
            && (self.gate_mode.value.is_random()
                || self
                    .shared_experts
                    .iter()
                    .any(|e| e.positive_prompts.as_ref().is_some_and(|p| !p.is_empty())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "base_model: ./base\ngate_mode: cheap_embed\ndtype: bfloat16\nexperts:\n  \
                      - source_model: ./a\n    positive_prompts: [\"code\"]\n  \
                      - source_model: ./b+./lora\n    positive_prompts: [\"math\"]\n    \
                      negative_prompts: [\"poetry\"]\n    residual_scale: 0.5\n";

    fn fails(yaml: &str, allow_all_same: bool, key: &str, line: usize) -> String {
        let e = MoeConfig::parse("moe.yml", yaml)
            .and_then(|c| c.validate(allow_all_same).map(|()| c))
            .expect_err("must be refused");
        assert_eq!(e.key_path, key, "{e}");
        assert_eq!(e.span.map(|s| s.line), Some(line), "{e}");
        assert!(e.to_string().starts_with("moe.yml: "), "{e}");
        e.message
    }

    #[test]
    fn parses_every_key() {
        let c = MoeConfig::parse("moe.yml", OK).unwrap();
        c.validate(false).unwrap();
        assert_eq!(c.base_model.value.to_string(), "./base");
        assert_eq!(c.gate_mode.value, GateMode::CheapEmbed);
        assert_eq!(c.dtype.map(|d| d.value), Some(DType::BF16));
        assert_eq!(c.experts_per_token.value, 2);
        assert_eq!(c.experts.len(), 2);
        let b = &c.experts[1];
        assert_eq!(b.source_model.value.to_string(), "./b+./lora");
        assert!(b.source_model.value.lora.is_some());
        assert_eq!(
            b.negative_prompts.as_deref(),
            Some(&["poetry".to_string()][..])
        );
        assert_eq!(b.residual_scale, Some(0.5));
        assert_eq!(b.noise_scale, None);
        assert!(is_moe_config(OK));
        assert!(!is_moe_config(
            "merge_method: linear\nmodels:\n  - model: a\n"
        ));
    }

    #[test]
    fn mergekit_moe_rules() {
        let m = fails(
            &format!("{OK}experts_per_token: 0\n"),
            false,
            "experts_per_token",
            11,
        );
        assert!(m.contains("Experts per token must be >= 1"), "{m}");
        let m = fails(&format!("{OK}experts_per_token: 3\n"), false, "experts", 5);
        assert!(m.contains("at least as many experts"), "{m}");
        let no_prompts = "base_model: b\ngate_mode: hidden\nexperts:\n  - source_model: a\n    \
                          positive_prompts: [x]\n  - source_model: c\n";
        let m = fails(no_prompts, false, "experts[1].positive_prompts", 6);
        assert!(m.contains("Expert 1 has no positive prompts"), "{m}");
        // The default gate mode (hidden) needs prompts too; random does not.
        let m = fails(
            &no_prompts.replace("gate_mode: hidden\n", ""),
            false,
            "experts[1].positive_prompts",
            5,
        );
        assert!(m.contains("no positive prompts"), "{m}");
        MoeConfig::parse("f", &no_prompts.replace("hidden", "random"))
            .unwrap()
            .validate(false)
            .unwrap();
        let same = "base_model: b\ngate_mode: cheap_embed\nexperts:\n  - source_model: a\n    \
                    positive_prompts: [x]\n  - source_model: c\n    positive_prompts: [x]\n";
        let m = fails(same, false, "experts", 4);
        assert!(m.contains("identical for all experts"), "{m}");
        let same_model = same.replace("c\n", "a\n").replace("[x]\n", "[y]\n");
        let same_model = same_model.replacen("[y]", "[x]", 1);
        let m = fails(&same_model, false, "experts", 4);
        assert!(
            m.contains("--i-understand-this-is-not-useful-without-training"),
            "{m}"
        );
        MoeConfig::parse("f", &same_model)
            .unwrap()
            .validate(true)
            .unwrap();
        let mixed = format!(
            "{OK}shared_experts:\n  - source_model: ./s\n    positive_prompts: [z]\n  \
             - source_model: ./t\n"
        );
        let m = fails(&mixed, false, "shared_experts", 12);
        assert!(m.contains("all shared experts or none"), "{m}");
    }

    #[test]
    fn schema_errors_name_key_and_line() {
        let m = fails(
            "base_model: b\nexperts:\n  - source_modle: a\n",
            false,
            "experts[0].source_modle",
            3,
        );
        assert!(m.contains("unknown key 'source_modle'"), "{m}");
        let m = fails("experts: []\n", false, "base_model", 1);
        assert!(m.contains("missing required key `base_model`"), "{m}");
        let m = fails(&OK.replace("cheap_embed", "learned"), false, "gate_mode", 2);
        assert!(m.contains("unknown gate_mode 'learned'"), "{m}");
        let m = fails(&OK.replace("bfloat16", "int8"), false, "dtype", 3);
        assert!(m.contains("unsupported dtype 'int8'"), "{m}");
        let m = fails(
            &OK.replace("residual_scale: 0.5", "residual_scale: big"),
            false,
            "experts[1].residual_scale",
            10,
        );
        assert!(m.contains("expected a finite number"), "{m}");
        let m = fails(
            &OK.replace("[\"code\"]", "code"),
            false,
            "experts[0].positive_prompts",
            6,
        );
        assert!(m.contains("a list of prompts"), "{m}");
        let m = fails(
            &OK.replace("./b+./lora", "a+b+c"),
            false,
            "experts[1].source_model",
            7,
        );
        assert!(m.contains("more than one '+'"), "{m}");
    }
}
