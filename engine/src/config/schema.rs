//! The merge configuration schema: mergekit 0.1.5's `MergeConfiguration`
//! (models or slices, base model, parameters, dtypes, tokenizer, chat template)
//! read from the YAML node tree, with every mistake reported at its key and line.

use std::fmt;
use std::path::Path;

use super::params::{ParamSetting, Scalar};
use super::{ConfigError, Spanned};
use crate::dtype::DType;
use crate::yaml::{key_text, Node, NodeKind, Span};

/// A parsed merge configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeConfig {
    /// The file name as the user gave it (for messages).
    pub file: String,
    /// The YAML text verbatim (written as mergekit_config.yml and in the model card).
    pub source: String,
    pub merge_method: Spanned<String>,
    pub base_model: Option<Spanned<ModelRef>>,
    pub inputs: ModelInputs,
    /// Global parameters (lowest precedence).
    pub parameters: Params,
    pub dtype: Option<Spanned<DType>>,
    pub out_dtype: Option<Spanned<DType>>,
    pub tokenizer_source: Option<Spanned<TokenizerSource>>,
    pub chat_template: Option<Spanned<String>>,
}

/// `models:` (whole-model merge) or `slices:` (layer ranges).
#[derive(Debug, Clone, PartialEq)]
pub enum ModelInputs {
    Models(Vec<InputModel>),
    Slices(Vec<OutputSlice>),
}

/// One entry of `models:`.
#[derive(Debug, Clone, PartialEq)]
pub struct InputModel {
    pub model: Spanned<ModelRef>,
    pub parameters: Params,
    /// e.g. `models[1]`.
    pub key_path: String,
}

/// One entry of `slices:`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSlice {
    pub sources: Vec<InputSlice>,
    pub base_model: Option<Spanned<ModelRef>>,
    pub parameters: Params,
    /// e.g. `slices[0]`.
    pub key_path: String,
    pub span: Span,
}

/// One entry of a slice's `sources:`.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSlice {
    pub model: Spanned<ModelRef>,
    /// `[start, end)`, with start < end.
    pub layer_range: Spanned<(u64, u64)>,
    pub parameters: Params,
    /// e.g. `slices[0].sources[1]`.
    pub key_path: String,
}

/// Parameter settings of one level, in YAML order; key_path is e.g. "models[0].parameters".
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Params {
    pub entries: Vec<(Spanned<String>, Spanned<ParamSetting>)>,
    pub key_path: String,
}

impl Params {
    pub fn get(&self, name: &str) -> Option<&Spanned<ParamSetting>> {
        self.entries
            .iter()
            .find(|(k, _)| k.value == name)
            .map(|(_, v)| v)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `path[@revision]`; equality by value like mergekit's ModelReference; Display gives back the string as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelRef {
    pub path: String,
    pub revision: Option<String>,
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Like mergekit's ModelPath.__str__: an empty revision is not shown.
        match self.revision.as_deref() {
            Some(rev) if !rev.is_empty() => write!(f, "{}@{rev}", self.path),
            _ => f.write_str(&self.path),
        }
    }
}

/// Where the output tokenizer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    Base,
    Model(ModelRef),
}

impl MergeConfig {
    /// Parses the YAML text of a config; `file` names it in messages.
    pub fn parse(file: &str, source: &str) -> Result<MergeConfig, ConfigError> {
        let root = Node::parse(file, source)?;
        Reader { file }.config(&root, source)
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<MergeConfig, ConfigError> {
        let file = path.display().to_string();
        let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key_path: String::new(),
            span: None,
            message: format!("cannot read the merge config: {e}"),
        })?;
        MergeConfig::parse(&file, &source)
    }

    /// Every model the config names, each once, in order of first appearance in the YAML
    /// (base_model at its own position in the file text order: use span order).
    ///
    /// Like mergekit's `referenced_models` this leaves out a tokenizer source;
    /// unlike it, a slice's own `base_model` is included (it is loaded too).
    pub fn referenced_models(&self) -> Vec<&Spanned<ModelRef>> {
        let mut all: Vec<&Spanned<ModelRef>> = self.base_model.iter().collect();
        match &self.inputs {
            ModelInputs::Models(models) => all.extend(models.iter().map(|m| &m.model)),
            ModelInputs::Slices(slices) => {
                for s in slices {
                    all.extend(s.base_model.iter());
                    all.extend(s.sources.iter().map(|src| &src.model));
                }
            }
        }
        // Stable sort: an alias keeps its own position, ties keep insertion order.
        all.sort_by_key(|m| (m.span.line, m.span.col));
        let mut unique: Vec<&Spanned<ModelRef>> = Vec::new();
        for m in all {
            if !unique.iter().any(|u| u.value == m.value) {
                unique.push(m);
            }
        }
        unique
    }
}

const TOP_KEYS: &[&str] = &[
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "modules",
];
const MODEL_KEYS: &[&str] = &["model", "parameters"];
const SLICE_KEYS: &[&str] = &["sources", "base_model", "parameters", "residual_weight"];
const SOURCE_KEYS: &[&str] = &["model", "layer_range", "parameters"];
const MODEL_REF_KEYS: &[&str] = &["model", "lora", "override_architecture"];
const MODEL_PATH_KEYS: &[&str] = &["path", "revision"];
const TOKENIZER_KEYS: &[&str] = &["source", "tokens", "pad_to_multiple_of"];
/// mergekit's `dtype_from_name` vocabulary (after stripping `torch.`).
const MERGEKIT_DTYPES: &[&str] = &["bfloat16", "float16", "float32", "float64", "int64"];

/// `parent.child`, or `child` at the top.
fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

/// The entries of one mapping, already checked against the keys allowed there.
struct Fields<'n> {
    entries: &'n [(Node, Node)],
    span: Span,
    key_path: String,
}

impl<'n> Fields<'n> {
    /// The value of `key`, treating an explicit null like an absent key (as
    /// pydantic does for the optional fields).
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entry(key).map(|(_, v)| v).filter(|v| !v.is_null())
    }

    fn entry(&self, key: &str) -> Option<&'n (Node, Node)> {
        self.entries.iter().find(|(k, _)| k.as_str() == Some(key))
    }

    fn path(&self, key: &str) -> String {
        join(&self.key_path, key)
    }
}

/// Reading context: the file name for every error.
struct Reader<'f> {
    file: &'f str,
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

    /// Checks that `node` is a mapping whose keys are all in `allowed`.
    fn fields<'n>(
        &self,
        node: &'n Node,
        key_path: &str,
        allowed: &[&str],
        what: &str,
    ) -> Result<Fields<'n>, ConfigError> {
        let Some(entries) = node.as_map() else {
            return Err(self.expected(key_path, node, what));
        };
        for (k, _) in entries {
            match k.as_str() {
                Some(name) if allowed.contains(&name) => {}
                _ => return Err(self.unknown_key(key_path, k, allowed)),
            }
        }
        Ok(Fields {
            entries,
            span: node.span,
            key_path: key_path.to_string(),
        })
    }

    /// mergekit ignores unknown keys silently; here a typo is an error.
    fn unknown_key(&self, key_path: &str, key: &Node, allowed: &[&str]) -> ConfigError {
        let name = key_text(key);
        let hint = if key_path.is_empty() && name == "random_seed" {
            "; mergekit ignores random_seed in YAML; pass --random-seed on the command line"
                .to_string()
        } else {
            String::new()
        };
        self.err(
            &join(key_path, &name),
            key.span,
            format!(
                "unknown key '{name}' (allowed here: {}){hint}",
                allowed.join(", ")
            ),
        )
    }

    fn missing(&self, fields: &Fields, key: &str, what: &str) -> ConfigError {
        self.err(
            &fields.path(key),
            fields.span,
            format!("missing required key `{key}` ({what})"),
        )
    }

    fn config(&self, root: &Node, source: &str) -> Result<MergeConfig, ConfigError> {
        let top = self.fields(
            root,
            "",
            TOP_KEYS,
            "a mapping of settings (merge_method, models or slices, ...) at the top level",
        )?;
        if let Some((k, _)) = top.entry("modules") {
            return Err(self.err(
                "modules",
                k.span,
                "multi-module configs (`modules:`) are not supported yet; use `models:` or `slices:`",
            ));
        }
        let merge_method = match top.get("merge_method") {
            Some(n) => self.string(n, "merge_method")?,
            None => return Err(self.missing(&top, "merge_method", "e.g. `merge_method: linear`")),
        };
        let tokenizer_source = self.tokenizer_settings(&top)?;
        Ok(MergeConfig {
            file: self.file.to_string(),
            source: source.to_string(),
            merge_method,
            base_model: self.optional_model(&top, "base_model")?,
            inputs: self.inputs(&top)?,
            parameters: self.params(top.get("parameters"), "parameters")?,
            dtype: self.dtype(&top, "dtype")?,
            out_dtype: self.dtype(&top, "out_dtype")?,
            tokenizer_source,
            chat_template: top
                .get("chat_template")
                .map(|n| self.string(n, "chat_template"))
                .transpose()?,
        })
    }

    fn string(&self, node: &Node, key_path: &str) -> Result<Spanned<String>, ConfigError> {
        match node.as_str() {
            Some(s) => Ok(Spanned::new(s.to_string(), node.span)),
            None => Err(self.expected(key_path, node, "a string")),
        }
    }

    /// Exactly one non-empty `models:` or `slices:`; like mergekit, an empty
    /// list counts as absent.
    fn inputs(&self, top: &Fields) -> Result<ModelInputs, ConfigError> {
        let models = match top.get("models") {
            Some(n) => self.models(n)?,
            None => Vec::new(),
        };
        let slices = match top.get("slices") {
            Some(n) => self.slices(n)?,
            None => Vec::new(),
        };
        let exactly_one = "Exactly one of 'models', 'slices', or 'modules' must be present";
        match (models.is_empty(), slices.is_empty()) {
            (false, true) => Ok(ModelInputs::Models(models)),
            (true, false) => Ok(ModelInputs::Slices(slices)),
            (false, false) => {
                let span = top.entry("slices").map_or(top.span, |(k, _)| k.span);
                Err(self.err(
                    "slices",
                    span,
                    format!("{exactly_one} (this config has both `models` and `slices`)"),
                ))
            }
            (true, true) => Err(self.err(
                "",
                top.span,
                format!(
                    "{exactly_one} (this config has no non-empty `models:` or `slices:` list \
                     naming the models to merge)"
                ),
            )),
        }
    }

    fn list<'n>(
        &self,
        node: &'n Node,
        key_path: &str,
        what: &str,
    ) -> Result<&'n [Node], ConfigError> {
        node.as_seq()
            .ok_or_else(|| self.expected(key_path, node, what))
    }

    fn models(&self, node: &Node) -> Result<Vec<InputModel>, ConfigError> {
        let items = self.list(node, "models", "a list of models (`- model: PATH`)")?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| self.input_model(item, &format!("models[{i}]")))
            .collect()
    }

    fn input_model(&self, node: &Node, key_path: &str) -> Result<InputModel, ConfigError> {
        let what = "a mapping like `- model: PATH` (with optional `parameters:`)";
        let f = self.fields(node, key_path, MODEL_KEYS, what)?;
        let model = match f.get("model") {
            Some(n) => self.model_ref(n, &f.path("model"))?,
            None => return Err(self.missing(&f, "model", "the model path")),
        };
        Ok(InputModel {
            model,
            parameters: self.params(f.get("parameters"), &f.path("parameters"))?,
            key_path: key_path.to_string(),
        })
    }

    fn slices(&self, node: &Node) -> Result<Vec<OutputSlice>, ConfigError> {
        let items = self.list(node, "slices", "a list of slices (`- sources: [...]`)")?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| self.output_slice(item, &format!("slices[{i}]")))
            .collect()
    }

    fn output_slice(&self, node: &Node, key_path: &str) -> Result<OutputSlice, ConfigError> {
        let f = self.fields(
            node,
            key_path,
            SLICE_KEYS,
            "a slice mapping with `sources:`",
        )?;
        let Some(sources_node) = f.get("sources") else {
            return Err(self.missing(&f, "sources", "the list of input layer ranges"));
        };
        let sources_path = f.path("sources");
        let items = self.list(
            sources_node,
            &sources_path,
            "a list of sources (`- model: PATH`)",
        )?;
        if items.is_empty() {
            return Err(self.err(
                &sources_path,
                sources_node.span,
                "a slice needs at least one source",
            ));
        }
        let sources = items
            .iter()
            .enumerate()
            .map(|(i, item)| self.input_slice(item, &format!("{sources_path}[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        // Accepted and never used, exactly like mergekit; only its type is checked.
        if let Some(rw) = f.get("residual_weight") {
            let number = Scalar::from_node(rw).map(|s| s.to_number());
            if !matches!(number, Some(Ok(_))) {
                return Err(self.expected(&f.path("residual_weight"), rw, "a number"));
            }
        }
        Ok(OutputSlice {
            sources,
            base_model: self.optional_model(&f, "base_model")?,
            parameters: self.params(f.get("parameters"), &f.path("parameters"))?,
            key_path: key_path.to_string(),
            span: node.span,
        })
    }

    fn input_slice(&self, node: &Node, key_path: &str) -> Result<InputSlice, ConfigError> {
        let what = "a mapping like `- model: PATH` with `layer_range: [START, END]`";
        let f = self.fields(node, key_path, SOURCE_KEYS, what)?;
        let model = match f.get("model") {
            Some(n) => self.model_ref(n, &f.path("model"))?,
            None => return Err(self.missing(&f, "model", "the model path")),
        };
        let layer_range = match f.get("layer_range") {
            Some(n) => self.layer_range(n, &f.path("layer_range"))?,
            None => return Err(self.missing(&f, "layer_range", "`[START, END]`, END exclusive")),
        };
        Ok(InputSlice {
            model,
            layer_range,
            parameters: self.params(f.get("parameters"), &f.path("parameters"))?,
            key_path: key_path.to_string(),
        })
    }

    /// `[start, end)`: two non-negative integers with start < end.
    fn layer_range(&self, node: &Node, key_path: &str) -> Result<Spanned<(u64, u64)>, ConfigError> {
        let what = "a layer range `[START, END]` (END exclusive)";
        let items = self.list(node, key_path, what)?;
        let [start, end] = items else {
            return Err(self.err(
                key_path,
                node.span,
                format!("expected {what}: exactly two numbers, got {}", items.len()),
            ));
        };
        let start = self.layer_index(start, &format!("{key_path}[0]"))?;
        let end = self.layer_index(end, &format!("{key_path}[1]"))?;
        if start >= end {
            return Err(self.err(
                key_path,
                node.span,
                format!(
                    "the layer range [{start}, {end}] is empty: START must be less than END \
                     (END is exclusive, so [0, 4] means layers 0 to 3)"
                ),
            ));
        }
        Ok(Spanned::new((start, end), node.span))
    }

    /// A non-negative integer; an integral float such as `4.0` passes, as in
    /// pydantic's lax mode.
    fn layer_index(&self, node: &Node, key_path: &str) -> Result<u64, ConfigError> {
        let value = match node.kind {
            NodeKind::Int(i) => u64::try_from(i).ok(),
            NodeKind::Float(x) if x.fract() == 0.0 && (0.0..9.0e15).contains(&x) => Some(x as u64),
            _ => None,
        };
        value.ok_or_else(|| {
            self.expected(
                key_path,
                node,
                "a non-negative whole number (a layer index)",
            )
        })
    }

    fn optional_model(
        &self,
        f: &Fields,
        key: &str,
    ) -> Result<Option<Spanned<ModelRef>>, ConfigError> {
        f.get(key)
            .map(|n| self.model_ref(n, &f.path(key)))
            .transpose()
    }

    /// A model reference: `path[@revision]`, or mergekit's mapping form
    /// `{model: path[@revision]}` (also `{model: {path, revision}}`).
    fn model_ref(&self, node: &Node, key_path: &str) -> Result<Spanned<ModelRef>, ConfigError> {
        let what = "a model path (a string such as `org/model` or `./models/x`)";
        let model = match &node.kind {
            NodeKind::Str(s) => self.parse_model_string(s, node, key_path)?,
            NodeKind::Map(_) => self.model_ref_mapping(node, key_path)?,
            _ => return Err(self.expected(key_path, node, what)),
        };
        Ok(Spanned::new(model, node.span))
    }

    /// mergekit's string grammar `MODEL[@REV][+LORA[@REV]]`.
    fn parse_model_string(
        &self,
        s: &str,
        node: &Node,
        key_path: &str,
    ) -> Result<ModelRef, ConfigError> {
        match s.split('+').count() {
            1 => self.model_path(s, node, key_path),
            2 => Err(self.err(
                key_path,
                node.span,
                format!("'{s}': LoRA references (model+lora) are not supported yet"),
            )),
            _ => Err(self.err(
                key_path,
                node.span,
                format!("cannot parse the model reference '{s}' (more than one '+')"),
            )),
        }
    }

    /// `path[@revision]` (mergekit's ModelPath string form).
    fn model_path(&self, s: &str, node: &Node, key_path: &str) -> Result<ModelRef, ConfigError> {
        let mut parts = s.split('@');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(path), None, _) => Ok(ModelRef {
                path: path.to_string(),
                revision: None,
            }),
            (Some(path), Some(rev), None) => Ok(ModelRef {
                path: path.to_string(),
                revision: Some(rev.to_string()),
            }),
            _ => Err(self.err(
                key_path,
                node.span,
                format!(
                    "invalid model path '{s}': more than one '@' (write PATH or PATH@REVISION)"
                ),
            )),
        }
    }

    fn model_ref_mapping(&self, node: &Node, key_path: &str) -> Result<ModelRef, ConfigError> {
        let f = self.fields(node, key_path, MODEL_REF_KEYS, "a model reference")?;
        for unsupported in ["lora", "override_architecture"] {
            if let Some(n) = f.get(unsupported) {
                return Err(self.err(
                    &f.path(unsupported),
                    n.span,
                    format!("`{unsupported}` in a model reference is not supported yet"),
                ));
            }
        }
        let Some(model) = f.get("model") else {
            return Err(self.missing(&f, "model", "the model path"));
        };
        let path = f.path("model");
        match &model.kind {
            // The mapping form never splits on '+' (mergekit's ModelPath only splits '@').
            NodeKind::Str(s) => self.model_path(s, model, &path),
            NodeKind::Map(_) => self.model_path_mapping(model, &path),
            _ => Err(self.expected(&path, model, "a model path (a string)")),
        }
    }

    /// `{path: STR, revision: STR}`.
    fn model_path_mapping(&self, node: &Node, key_path: &str) -> Result<ModelRef, ConfigError> {
        let f = self.fields(node, key_path, MODEL_PATH_KEYS, "a model path")?;
        let Some(path) = f.get("path") else {
            return Err(self.missing(&f, "path", "the model path"));
        };
        let path = self.string(path, &f.path("path"))?.value;
        let revision = f
            .get("revision")
            .map(|n| self.string(n, &f.path("revision")))
            .transpose()?
            .map(|r| r.value);
        Ok(ModelRef { path, revision })
    }

    /// A `parameters:` mapping (absent or null: empty). Names are not checked
    /// here (the planner knows the method); only the shapes of the values.
    fn params(&self, node: Option<&Node>, key_path: &str) -> Result<Params, ConfigError> {
        let mut params = Params {
            entries: Vec::new(),
            key_path: key_path.to_string(),
        };
        let Some(node) = node else { return Ok(params) };
        let Some(entries) = node.as_map() else {
            return Err(self.expected(key_path, node, "a mapping of parameter names to values"));
        };
        for (k, v) in entries {
            let Some(name) = k.as_str() else {
                let path = join(key_path, &key_text(k));
                return Err(self.expected(&path, k, "a parameter name (a string)"));
            };
            let setting =
                ParamSetting::from_node(v, &join(key_path, name)).map_err(|e| ConfigError {
                    file: self.file.to_string(),
                    ..e
                })?;
            params
                .entries
                .push((Spanned::new(name.to_string(), k.span), setting));
        }
        Ok(params)
    }

    fn dtype(&self, top: &Fields, key: &str) -> Result<Option<Spanned<DType>>, ConfigError> {
        let Some(node) = top.get(key) else {
            return Ok(None);
        };
        let name = self.string(node, key)?;
        let bare = name.strip_prefix("torch.").unwrap_or(&name);
        // Only mergekit's names (a config fleetmerge accepts must also run in
        // mergekit), and for `out_dtype` FP8: re-quantized FP8 weights, which
        // mergekit cannot write (nor read).
        let fp8 = key == "out_dtype" && matches!(bare, "fp8" | "float8_e4m3fn");
        if bare == "int64" {
            // In mergekit's list, but merged weights are floats: mergekit would
            // truncate every weight to an integer; we refuse before any work.
            return Err(self.err(
                key,
                node.span,
                "int64 is not a float dtype: merged weights are written as bfloat16, \
                 float16, float32 or float64",
            ));
        }
        let dtype = if fp8 {
            Some(DType::F8_E4M3)
        } else {
            MERGEKIT_DTYPES
                .contains(&bare)
                .then(|| DType::from_torch_name(bare))
                .flatten()
        };
        match dtype {
            Some(d) => Ok(Some(Spanned::new(d, node.span))),
            None => Err(self.err(
                key,
                node.span,
                format!(
                    "unknown dtype '{}' (use one of bfloat16, float16, float32, float64{})",
                    name.value,
                    if key == "out_dtype" {
                        "; fp8 for FP8 weights re-quantized with block scales"
                    } else {
                        ""
                    }
                ),
            )),
        }
    }

    /// `tokenizer_source:` or the `tokenizer:` mapping (mutually exclusive).
    fn tokenizer_settings(
        &self,
        top: &Fields,
    ) -> Result<Option<Spanned<TokenizerSource>>, ConfigError> {
        let legacy = top.get("tokenizer_source");
        let modern = top.get("tokenizer");
        if let (Some(_), Some(t)) = (legacy, modern) {
            let span = top.entry("tokenizer").map_or(t.span, |(k, _)| k.span);
            return Err(self.err(
                "tokenizer",
                span,
                "Cannot specify both tokenizer_source and tokenizer",
            ));
        }
        if let Some(n) = legacy {
            return self.tokenizer_source(n, "tokenizer_source").map(Some);
        }
        modern.map(|n| self.tokenizer_mapping(n)).transpose()
    }

    /// `base`, `union` (not supported) or a model reference.
    fn tokenizer_source(
        &self,
        node: &Node,
        key_path: &str,
    ) -> Result<Spanned<TokenizerSource>, ConfigError> {
        let source = match node.as_str() {
            Some("base") => TokenizerSource::Base,
            Some("union") => {
                return Err(self.err(
                    key_path,
                    node.span,
                    "union is not supported yet; use base or a model path",
                ))
            }
            _ => match &node.kind {
                NodeKind::Str(_) | NodeKind::Map(_) => {
                    TokenizerSource::Model(self.model_ref(node, key_path)?.value)
                }
                _ => return Err(self.expected(key_path, node, "`base` or a model path")),
            },
        };
        Ok(Spanned::new(source, node.span))
    }

    /// `tokenizer: {source: base|MODEL}`; the rest of mergekit's tokenizer
    /// building is not implemented.
    fn tokenizer_mapping(&self, node: &Node) -> Result<Spanned<TokenizerSource>, ConfigError> {
        let f = self.fields(
            node,
            "tokenizer",
            TOKENIZER_KEYS,
            "a mapping with `source:`",
        )?;
        for unsupported in ["tokens", "pad_to_multiple_of"] {
            if let Some(n) = f.get(unsupported) {
                return Err(self.err(
                    &f.path(unsupported),
                    n.span,
                    format!("`tokenizer.{unsupported}` is not supported yet"),
                ));
            }
        }
        match f.get("source") {
            Some(n) => self.tokenizer_source(n, &f.path("source")),
            // mergekit's default source is `union`.
            None => Err(self.err(
                "tokenizer.source",
                f.span,
                "without `source`, mergekit builds a union tokenizer, which is not supported \
                 yet; set `source: base` or a model path",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> MergeConfig {
        match MergeConfig::parse("t.yaml", yaml) {
            Ok(c) => c,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    /// Parses `yaml`, expecting an error at `key_path` on `line`; returns the message.
    fn fails(yaml: &str, key_path: &str, line: usize) -> String {
        let e = match MergeConfig::parse("t.yaml", yaml) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e,
        };
        let shown = e.to_string();
        assert_eq!(e.key_path, key_path, "{shown}");
        assert_eq!(e.span.map(|s| s.line), Some(line), "{shown}");
        let head = if key_path.is_empty() {
            format!("t.yaml (line {line}, ")
        } else {
            format!("t.yaml: {key_path} (line {line}, ")
        };
        assert!(shown.starts_with(&head), "{shown}");
        e.message
    }

    fn mref(path: &str, revision: Option<&str>) -> ModelRef {
        ModelRef {
            path: path.into(),
            revision: revision.map(Into::into),
        }
    }

    // Verbatim copies of /work/shared/conformance/cases/*/config.yaml (tests do
    // not read /work/shared at run time).
    const SLERP_GRADIENT: &str = "slices:
  - sources:
      - model: ./models/llama-ft-a
        layer_range: [0, 6]
      - model: ./models/llama-ft-c
        layer_range: [0, 6]
merge_method: slerp
base_model: ./models/llama-ft-a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
out_dtype: bfloat16
";
    const TIES: &str = "models:
  - model: ./models/llama-ft-a
    parameters: {weight: 1.0, density: 0.5}
  - model: ./models/llama-ft-b
    parameters: {weight: 0.5, density: 0.7}
  - model: ./models/llama-ft-c
    parameters: {weight: 0.8, density: 0.3}
merge_method: ties
base_model: ./models/llama-base
parameters:
  normalize: true
dtype: float32
out_dtype: bfloat16
";
    const KARCHER: &str = "models:
  - model: ./models/llama-ft-a
  - model: ./models/llama-ft-b
  - model: ./models/llama-ft-c
merge_method: karcher
parameters:
  max_iter: 10
  tol: 1.0e-5
dtype: float32
out_dtype: bfloat16
";
    const ERR_LAYER_RANGE: &str = "slices:
  - sources:
      - model: ./models/llama-ft-a
        layer_range: [0, 9]
merge_method: passthrough
dtype: bfloat16
";
    const ERR_UNKNOWN_METHOD: &str = "models:
  - model: ./models/llama-ft-a
  - model: ./models/llama-ft-b
merge_method: averaging
dtype: float32
";

    #[test]
    fn conformance_configs_parse() {
        for yaml in [
            SLERP_GRADIENT,
            TIES,
            KARCHER,
            ERR_LAYER_RANGE,
            ERR_UNKNOWN_METHOD,
        ] {
            let c = parse(yaml);
            assert_eq!(c.source, yaml);
        }
    }

    #[test]
    fn slerp_gradient_structure() {
        let c = parse(SLERP_GRADIENT);
        assert_eq!(c.merge_method.value, "slerp");
        assert_eq!(c.merge_method.span, Span { line: 7, col: 15 });
        assert_eq!(
            c.base_model.as_ref().map(|b| b.value.clone()),
            Some(mref("./models/llama-ft-a", None))
        );
        assert_eq!(c.dtype.as_ref().map(|d| d.value), Some(DType::F32));
        assert_eq!(c.out_dtype.as_ref().map(|d| d.value), Some(DType::BF16));
        let ModelInputs::Slices(slices) = &c.inputs else {
            panic!("slices expected")
        };
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].key_path, "slices[0]");
        assert_eq!(slices[0].span.line, 2);
        let src = &slices[0].sources[1];
        assert_eq!(src.key_path, "slices[0].sources[1]");
        assert_eq!(src.layer_range.value, (0, 6));
        assert_eq!(src.layer_range.span.line, 6);
        assert_eq!(src.parameters.key_path, "slices[0].sources[1].parameters");
        let t = c.parameters.get("t").expect("t is set");
        assert_eq!(t.span.line, 11);
        let at = |name: &str, x: f64| t.evaluate_number(name, x).ok().flatten();
        assert!(at("model.layers.2.self_attn.q_proj.weight", 0.6)
            .is_some_and(|v| (v - 0.46).abs() < 1e-12));
        assert!(
            at("model.layers.2.mlp.up_proj.weight", 0.6).is_some_and(|v| (v - 0.54).abs() < 1e-12)
        );
        assert_eq!(at("model.norm.weight", 0.0), Some(0.5));
        assert_eq!(c.parameters.key_path, "parameters");
    }

    #[test]
    fn models_structure() {
        let c = parse(TIES);
        let ModelInputs::Models(models) = &c.inputs else {
            panic!("models expected")
        };
        assert_eq!(models.len(), 3);
        assert_eq!(models[1].key_path, "models[1]");
        assert_eq!(models[1].model.span.line, 4);
        assert_eq!(models[1].parameters.key_path, "models[1].parameters");
        let names: Vec<&str> = models[1]
            .parameters
            .entries
            .iter()
            .map(|(k, _)| k.value.as_str())
            .collect();
        assert_eq!(names, ["weight", "density"]);
        assert_eq!(
            models[1]
                .parameters
                .get("density")
                .map(|d| d.evaluate_number("x", 0.0)),
            Some(Ok(Some(0.7)))
        );
        assert!(models[1].parameters.get("gamma").is_none());
        assert!(!models[1].parameters.is_empty());
        assert!(parse(KARCHER).parameters.get("tol").is_some());
    }

    #[test]
    fn referenced_models_in_file_order() {
        let c = parse(TIES);
        let refs: Vec<String> = c
            .referenced_models()
            .iter()
            .map(|m| m.value.to_string())
            .collect();
        // base_model is written after the models
        assert_eq!(
            refs,
            [
                "./models/llama-ft-a",
                "./models/llama-ft-b",
                "./models/llama-ft-c",
                "./models/llama-base"
            ]
        );
        let c = parse(
            "merge_method: slerp\nbase_model: b\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n      \
             - {model: b, layer_range: [0, 2]}\n  - sources:\n      - {model: c, layer_range: [2, 4]}\n    \
             base_model: a\n",
        );
        let refs: Vec<String> = c
            .referenced_models()
            .iter()
            .map(|m| m.value.to_string())
            .collect();
        assert_eq!(refs, ["b", "a", "c"]);
        assert_eq!(c.referenced_models()[0].span.line, 2);
    }

    #[test]
    fn model_reference_forms() {
        let c = parse(
            "merge_method: linear\nmodels:\n  - model: org/m@v1.0\n  - model: {model: org/n}\n  \
             - model: {model: {path: ./p, revision: main}}\n",
        );
        let ModelInputs::Models(models) = &c.inputs else {
            panic!("models expected")
        };
        assert_eq!(models[0].model.value, mref("org/m", Some("v1.0")));
        assert_eq!(models[0].model.to_string(), "org/m@v1.0");
        assert_eq!(models[1].model.value, mref("org/n", None));
        assert_eq!(models[1].model.span.line, 4);
        assert_eq!(models[2].model.value, mref("./p", Some("main")));
        // equality by value: the same string names the same model
        let c = parse("merge_method: linear\nbase_model: x@r\nmodels:\n  - model: x@r\n  - model: {model: x@r}\n");
        assert_eq!(c.referenced_models().len(), 1);
    }

    #[test]
    fn model_reference_errors() {
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a+lora\n",
            "models[0].model",
            3,
        );
        assert!(
            m.contains("LoRA references (model+lora) are not supported yet"),
            "{m}"
        );
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a@b@c\n",
            "models[0].model",
            3,
        );
        assert!(m.contains("more than one '@'"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a+b+c\n",
            "models[0].model",
            3,
        );
        assert!(m.contains("cannot parse"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model:\n      model: a\n      lora: l\n",
            "models[0].model.lora",
            5,
        );
        assert!(m.contains("not supported yet"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: {model: a, override_architecture: X}\n",
            "models[0].model.override_architecture",
            3,
        );
        assert!(m.contains("not supported yet"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: 12\n",
            "models[0].model",
            3,
        );
        assert!(m.contains("expected a model path"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: {path: a}\n",
            "models[0].model.path",
            3,
        );
        assert!(m.contains("unknown key 'path'"), "{m}");
    }

    #[test]
    fn top_level_errors() {
        let m = fails("models:\n  - model: a\n", "merge_method", 1);
        assert!(m.contains("missing required key `merge_method`"), "{m}");
        let m = fails(
            "merge_method: 3\nmodels:\n  - model: a\n",
            "merge_method",
            1,
        );
        assert!(m.contains("expected a string, got the number 3"), "{m}");
        let m = fails("merge_method: linear\n", "", 1);
        assert!(
            m.contains("Exactly one of 'models', 'slices', or 'modules' must be present"),
            "{m}"
        );
        let m = fails("merge_method: linear\nmodels: []\n", "", 1);
        assert!(m.contains("Exactly one of"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 1]}\n",
            "slices",
            4,
        );
        assert!(m.contains("Exactly one of") && m.contains("both"), "{m}");
        let m = fails(
            "merge_method: linear\nmodules:\n  text: {models: [{model: a}]}\n",
            "modules",
            2,
        );
        assert_eq!(
            m,
            "multi-module configs (`modules:`) are not supported yet; use `models:` or `slices:`"
        );
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\nrandom_seed: 3\n",
            "random_seed",
            4,
        );
        assert!(
            m.contains(
                "mergekit ignores random_seed in YAML; pass --random-seed on the command line"
            ),
            "{m}"
        );
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\nmerge_methd: x\n",
            "merge_methd",
            4,
        );
        assert!(
            m.contains("unknown key 'merge_methd'")
                && m.contains("merge_method, base_model, models"),
            "{m}"
        );
        let m = fails("- a\n- b\n", "", 1);
        assert!(m.contains("expected a mapping"), "{m}");
        let m = fails("merge_method: linear\nmodels: a\n", "models", 2);
        assert!(m.contains("expected a list of models"), "{m}");
        // an empty `models:` next to `slices:` counts as absent, as in mergekit
        parse("merge_method: passthrough\nmodels: []\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 1]}\n");
    }

    #[test]
    fn models_entry_errors() {
        let m = fails("merge_method: linear\nmodels:\n  - a\n", "models[0]", 3);
        assert!(m.contains("expected a mapping like `- model: PATH`"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\n  - parameters: {weight: 1}\n",
            "models[1].model",
            4,
        );
        assert!(m.contains("missing required key `model`"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\n    weight: 1\n",
            "models[0].weight",
            4,
        );
        assert!(
            m.contains("unknown key 'weight' (allowed here: model, parameters)"),
            "{m}"
        );
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\n    parameters: [1]\n",
            "models[0].parameters",
            4,
        );
        assert!(m.contains("expected a mapping of parameter names"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n    parameters:\n      weight: [0.5, {value: 1}]\n",
            "models[1].parameters.weight[1]",
            6,
        );
        assert!(m.contains("all numbers"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight:\n",
            "models[0].parameters.weight",
            5,
        );
        assert!(m.contains("got nothing"), "{m}");
    }

    #[test]
    fn slice_errors() {
        let head = "merge_method: passthrough\nslices:\n";
        let m = fails(
            &format!("{head}  - base_model: a\n"),
            "slices[0].sources",
            3,
        );
        assert!(m.contains("missing required key `sources`"), "{m}");
        let m = fails(&format!("{head}  - sources: []\n"), "slices[0].sources", 3);
        assert!(m.contains("at least one source"), "{m}");
        let m = fails(
            &format!("{head}  - sources:\n      - model: a\n"),
            "slices[0].sources[0].layer_range",
            4,
        );
        assert!(m.contains("missing required key `layer_range`"), "{m}");
        let m = fails(
            &format!("{head}  - sources:\n      - model: a\n        layer_range: [4, 2]\n"),
            "slices[0].sources[0].layer_range",
            5,
        );
        assert!(m.contains("START must be less than END"), "{m}");
        let m = fails(
            &format!("{head}  - sources:\n      - model: a\n        layer_range: [0, 2, 4]\n"),
            "slices[0].sources[0].layer_range",
            5,
        );
        assert!(m.contains("exactly two"), "{m}");
        let m = fails(
            &format!("{head}  - sources:\n      - model: a\n        layer_range: [-1, 2]\n"),
            "slices[0].sources[0].layer_range[0]",
            5,
        );
        assert!(m.contains("non-negative whole number"), "{m}");
        let m = fails(
            &format!("{head}  - sources:\n      - model: a\n        layer_range: [0, x]\n"),
            "slices[0].sources[0].layer_range[1]",
            5,
        );
        assert!(m.contains("got the string 'x'"), "{m}");
        let m = fails(
            &format!("{head}  - sources:\n      - {{model: a, layer_range: [0, 2], weight: 1}}\n"),
            "slices[0].sources[0].weight",
            4,
        );
        assert!(
            m.contains("allowed here: model, layer_range, parameters"),
            "{m}"
        );
        let m = fails(
            &format!("{head}  - sources:\n      - {{model: a, layer_range: [0, 2]}}\n    residual_weight: big\n"),
            "slices[0].residual_weight",
            5,
        );
        assert!(m.contains("expected a number"), "{m}");
        let m = fails(&format!("{head}  - sorces: []\n"), "slices[0].sorces", 3);
        assert!(
            m.contains("allowed here: sources, base_model, parameters, residual_weight"),
            "{m}"
        );
        // residual_weight is accepted (and ignored); layer indices may be written 4.0
        let c = parse(&format!(
            "{head}  - sources:\n      - {{model: a, layer_range: [0, 4.0]}}\n    residual_weight: 0.5\n    base_model: b\n"
        ));
        let ModelInputs::Slices(s) = &c.inputs else {
            panic!("slices expected")
        };
        assert_eq!(s[0].sources[0].layer_range.value, (0, 4));
        assert_eq!(
            s[0].base_model.as_ref().map(|b| b.value.clone()),
            Some(mref("b", None))
        );
    }

    #[test]
    fn dtypes() {
        let base = "merge_method: linear\nmodels:\n  - model: a\n";
        let c = parse(&format!(
            "{base}dtype: torch.bfloat16\nout_dtype: float16\n"
        ));
        assert_eq!(c.dtype.map(|d| d.value), Some(DType::BF16));
        assert_eq!(c.out_dtype.map(|d| d.value), Some(DType::F16));
        assert_eq!(
            parse(&format!("{base}dtype: float64\n"))
                .dtype
                .map(|d| d.value),
            Some(DType::F64)
        );
        // FP8 only as out_dtype (re-quantized FP8 weights).
        for name in ["fp8", "float8_e4m3fn", "torch.float8_e4m3fn"] {
            let c = parse(&format!("{base}out_dtype: {name}\n"));
            assert_eq!(c.out_dtype.map(|d| d.value), Some(DType::F8_E4M3));
        }
        let m = fails(&format!("{base}dtype: fp8\n"), "dtype", 4);
        assert!(m.contains("unknown dtype 'fp8'"), "{m}");
        let m = fails(&format!("{base}out_dtype: float8_e5m2\n"), "out_dtype", 4);
        assert!(m.contains("fp8 for FP8 weights"), "{m}");
        let m = fails(&format!("{base}dtype: float8\n"), "dtype", 4);
        assert!(
            m.contains("unknown dtype 'float8' (use one of bfloat16, float16, float32, float64)"),
            "{m}"
        );
        // not a mergekit name, although fleetmerge knows what it means
        fails(&format!("{base}out_dtype: bf16\n"), "out_dtype", 4);
        // mergekit's list has int64; merged weights are floats (it used to
        // panic in the encoder and hang `run`).
        for key in ["dtype", "out_dtype"] {
            for name in ["int64", "torch.int64"] {
                let m = fails(&format!("{base}{key}: {name}\n"), key, 4);
                assert!(m.contains("int64 is not a float dtype"), "{m}");
            }
        }
        let m = fails(&format!("{base}dtype: 16\n"), "dtype", 4);
        assert!(m.contains("expected a string"), "{m}");
        assert!(parse(&format!("{base}dtype:\n")).dtype.is_none());
    }

    #[test]
    fn tokenizer_settings() {
        let base = "merge_method: linear\nmodels:\n  - model: a\n";
        let c = parse(&format!("{base}tokenizer_source: base\n"));
        assert_eq!(
            c.tokenizer_source.map(|t| t.value),
            Some(TokenizerSource::Base)
        );
        let c = parse(&format!("{base}tokenizer_source: org/tok\n"));
        assert_eq!(
            c.tokenizer_source.map(|t| t.value),
            Some(TokenizerSource::Model(mref("org/tok", None)))
        );
        let c = parse(&format!("{base}tokenizer:\n  source: base\n"));
        let t = c.tokenizer_source.expect("tokenizer source set");
        assert_eq!(t.value, TokenizerSource::Base);
        assert_eq!(t.span.line, 5);
        let c = parse(&format!("{base}tokenizer: {{source: ./m}}\n"));
        assert_eq!(
            c.tokenizer_source.map(|t| t.value),
            Some(TokenizerSource::Model(mref("./m", None)))
        );
        let m = fails(
            &format!("{base}tokenizer_source: union\n"),
            "tokenizer_source",
            4,
        );
        assert_eq!(m, "union is not supported yet; use base or a model path");
        let m = fails(
            &format!("{base}tokenizer: {{source: union}}\n"),
            "tokenizer.source",
            4,
        );
        assert!(m.contains("union is not supported yet"), "{m}");
        let m = fails(
            &format!("{base}tokenizer:\n  pad_to_multiple_of: 64\n  source: base\n"),
            "tokenizer.pad_to_multiple_of",
            5,
        );
        assert!(m.contains("not supported yet"), "{m}");
        let m = fails(
            &format!("{base}tokenizer:\n  source: base\n  tokens:\n    x: {{source: a}}\n"),
            "tokenizer.tokens",
            7,
        );
        assert!(m.contains("not supported yet"), "{m}");
        let m = fails(&format!("{base}tokenizer: {{}}\n"), "tokenizer.source", 4);
        assert!(m.contains("union"), "{m}");
        let m = fails(
            &format!("{base}tokenizer_source: base\ntokenizer:\n  source: base\n"),
            "tokenizer",
            5,
        );
        assert_eq!(m, "Cannot specify both tokenizer_source and tokenizer");
        let m = fails(
            &format!("{base}tokenizer_source: [a]\n"),
            "tokenizer_source",
            4,
        );
        assert!(m.contains("expected `base` or a model path"), "{m}");
    }

    #[test]
    fn chat_template() {
        let base = "merge_method: linear\nmodels:\n  - model: a\n";
        let c = parse(&format!("{base}chat_template: chatml\n"));
        assert_eq!(c.chat_template.map(|t| t.value), Some("chatml".to_string()));
        let m = fails(&format!("{base}chat_template: [x]\n"), "chat_template", 4);
        assert!(m.contains("expected a string, got a list"), "{m}");
    }

    #[test]
    fn parameter_errors_carry_file_and_path() {
        let e = MergeConfig::parse("cfg.yml", "merge_method: linear\nmodels:\n  - model: a\nparameters:\n  w: {filter: 1, value: 2}\n")
            .unwrap_err();
        assert_eq!(e.file, "cfg.yml");
        assert_eq!(e.key_path, "parameters.w.filter");
        assert_eq!(e.span.map(|s| s.line), Some(5));
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\nparameters:\n  1: 2\n",
            "parameters.1",
            5,
        );
        assert!(m.contains("parameter name"), "{m}");
    }

    #[test]
    fn yaml_errors_pass_through() {
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\n  - model: a\n    model: b\n",
            "models[1]",
            5,
        );
        assert!(m.contains("duplicate key 'model'"), "{m}");
    }

    #[test]
    fn load_reports_read_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.yaml");
        let e = MergeConfig::load(&missing).unwrap_err();
        assert_eq!(e.key_path, "");
        assert!(e.span.is_none());
        assert!(
            e.to_string()
                .starts_with(&format!("{}: cannot read", missing.display())),
            "{e}"
        );
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, KARCHER).expect("write");
        let c = MergeConfig::load(&path).expect("loads");
        assert_eq!(c.file, path.display().to_string());
        assert_eq!(c.source, KARCHER);
    }
}
