//! PEFT LoRA adapters (`model+adapter` references): an adapter folder's
//! `adapter_config.json` and weights, and how its tensors map onto the base
//! model's, as PEFT loads and merges them (`PeftModel.from_pretrained`, then
//! `merge_and_unload`).
//!
//! Keys are PEFT's saved names, `base_model.model.<module>.<what>`:
//! - `lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]` adapt the
//!   module's weight `<module>.weight`: `W + scale · B·A`, or `(B·A)ᵀ` for a
//!   layer that stores its weight `[in, out]` (GPT-2's `Conv1D`,
//!   `fan_in_fan_out`), told apart by the weight's shape and, for a square one,
//!   by `fan_in_fan_out`;
//! - `lora_embedding_A` `[r, vocab]` and `lora_embedding_B` `[dim, r]` adapt an
//!   embedding `[vocab, dim]`: `W + scale · (B·A)ᵀ`;
//! - any other key names a tensor the adapter replaces (`modules_to_save`,
//!   biases trained with `bias: all | lora_only`, embeddings saved with
//!   `save_embedding_layers`, `<module>.base_layer.weight`): the base must hold
//!   it with the same shape.
//!
//! `scale` is `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`;
//! `rank_pattern` and `alpha_pattern` override `r` and `lora_alpha` for the
//! modules whose name matches a pattern (PEFT's `get_pattern_key`: the first
//! key `K` for which `(.*\.)?(K)$` matches the module name). Adapters that are
//! not plain LoRA (another `peft_type`, DoRA, LoRA biases, trainable tokens,
//! target parameters, ...) are refused, naming the kind and the file; so is a
//! key that matches no base tensor.
//!
//! The weights are listed from `adapter_model.safetensors`, else from
//! `adapter_model.bin` (PEFT's `save_pretrained(safe_serialization=False)`, a
//! torch zip checkpoint read by [`super::read_torch`] without running its
//! pickle) ([`adapter_weights`]): either way a factor is a byte range of the
//! file, read like any other input.

use super::model::TensorLocation;
use super::safetensors::{read_header, short};
use super::CheckpointError;
use crate::storage::{Storage, StorageError};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_SAFETENSORS: &str = "adapter_model.safetensors";
pub const ADAPTER_BIN: &str = "adapter_model.bin";

/// The prefix PEFT's saved keys carry (`PeftModel.base_model.model`).
const KEY_PREFIX: &str = "base_model.model.";

/// The settings of `adapter_config.json` that decide the merged weights.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: u64,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub fan_in_fan_out: bool,
    /// `(pattern, r)` in file order.
    pub rank_pattern: Vec<(String, u64)>,
    /// `(pattern, lora_alpha)` in file order.
    pub alpha_pattern: Vec<(String, f64)>,
    pub modules_to_save: Vec<String>,
}

/// An opened adapter folder.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// The adapter folder, as given.
    pub location: String,
    pub config_file: String,
    pub weights_file: String,
    pub config: LoraConfig,
    /// The adapter's tensors by their saved key.
    pub tensors: BTreeMap<String, TensorLocation>,
}

/// What an adapter does to one base tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Adapted {
    /// `W + scale · B·A` (`transposed`: `(B·A)ᵀ`), with the factors' keys.
    Lora {
        a: String,
        b: String,
        rank: u64,
        alpha: f64,
        scale: f64,
        transposed: bool,
        /// An embedding's `lora_embedding_A/B` (rather than a layer's `lora_A/B`).
        embedding: bool,
    },
    /// The adapter's tensor `key` replaces the base's.
    Replaced { key: String },
}

impl Adapter {
    /// Opens the adapter folder at `location`: its config and its weights'
    /// headers.
    pub fn open(storage: &dyn Storage, location: &str) -> Result<Adapter, CheckpointError> {
        let config_file = storage.join(location, ADAPTER_CONFIG);
        let bytes = match storage.read_all(&config_file) {
            Ok(b) => b,
            Err(StorageError::NotFound { .. }) => {
                return Err(adapter_err(
                    &config_file,
                    "not found: a LoRA reference (MODEL+ADAPTER) names a PEFT adapter folder, \
                     with adapter_config.json and adapter_model.safetensors",
                ))
            }
            Err(e) => return Err(e.into()),
        };
        let config = match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => parse_config(&config_file, &map)?,
            Ok(other) => {
                return Err(adapter_err(
                    &config_file,
                    format!("expected a JSON object, found {}", short(&other)),
                ))
            }
            Err(e) => return Err(adapter_err(&config_file, format!("invalid JSON: {e}"))),
        };
        let (weights_file, tensors) = adapter_weights(storage, location)?;
        Ok(Adapter {
            location: location.to_string(),
            config_file,
            weights_file,
            config,
            tensors,
        })
    }

    /// Maps every adapter tensor onto the base checkpoint's `base` tensors:
    /// what happens to each base tensor the adapter touches, by base name.
    pub fn map_onto(
        &self,
        base: &BTreeMap<String, TensorLocation>,
    ) -> Result<BTreeMap<String, Adapted>, CheckpointError> {
        let err = |message: String| adapter_err(&self.weights_file, message);
        // Factors by module: (A key, B key, embedding).
        let mut factors: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
        let mut kinds: BTreeMap<String, bool> = BTreeMap::new();
        let mut out: BTreeMap<String, Adapted> = BTreeMap::new();
        for key in self.tensors.keys() {
            let name = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
            let factor = [
                (".lora_A.weight", 0, false),
                (".lora_B.weight", 1, false),
                (".lora_embedding_A", 0, true),
                (".lora_embedding_B", 1, true),
            ]
            .into_iter()
            .find_map(|(suffix, i, emb)| Some((name.strip_suffix(suffix)?, i, emb)));
            if let Some((module, i, embedding)) = factor {
                if kinds.insert(module.to_string(), embedding) == Some(!embedding) {
                    return Err(err(format!(
                        "module {module} has both lora_A/B and lora_embedding_A/B tensors"
                    )));
                }
                factors.entry(module.to_string()).or_default()[i] = Some(key.clone());
                continue;
            }
            if let Some(what) = unsupported_key(name) {
                return Err(err(format!("tensor {key}: {what} is not supported")));
            }
            // A tensor the adapter replaces; `<module>.base_layer.weight` is
            // how PEFT saves an adapted layer's own weight.
            let target = name.replace(".base_layer.", ".");
            let Some(b) = base.get(&target) else {
                return Err(err(format!(
                    "tensor {key} matches no tensor of the base model (it would replace {target})"
                )));
            };
            let t = &self.tensors[key];
            if t.info.shape != b.info.shape || !t.info.dtype.is_float() {
                return Err(err(format!(
                    "tensor {key} ({} {:?}) would replace {target}, which is {} {:?} in the \
                     base model",
                    t.info.dtype, t.info.shape, b.info.dtype, b.info.shape
                )));
            }
            out.insert(target, Adapted::Replaced { key: key.clone() });
        }
        for (module, [a, b]) in factors {
            let embedding = kinds[&module];
            let names = if embedding {
                ["lora_embedding_A", "lora_embedding_B"]
            } else {
                ["lora_A.weight", "lora_B.weight"]
            };
            let (Some(a), Some(b)) = (a, b) else {
                return Err(err(format!(
                    "module {module} has only one of {} and {}",
                    names[0], names[1]
                )));
            };
            let target = format!("{module}.weight");
            let Some(w) = base.get(&target) else {
                return Err(err(format!(
                    "tensor {a} adapts {target}, which the base model does not have"
                )));
            };
            let (ta, tb) = (&self.tensors[&a].info, &self.tensors[&b].info);
            let rank = self.rank(&module);
            let alpha = self.alpha(&module);
            let shape_err = |what: &str| {
                err(format!(
                    "{a} {:?} and {b} {:?} do not fit {target} {:?} with r {rank}: {what}",
                    ta.shape, tb.shape, w.info.shape
                ))
            };
            if !ta.dtype.is_float() || !tb.dtype.is_float() {
                return Err(err(format!(
                    "{a} is {} and {b} is {}: LoRA factors are floating-point",
                    ta.dtype, tb.dtype
                )));
            }
            if !(w.info.dtype.is_float() || w.info.dtype.is_fp8()) {
                return Err(err(format!(
                    "{a} adapts {target}, which is {} (not a floating-point weight)",
                    w.info.dtype
                )));
            }
            let two = |s: &[u64], what: &str| -> Result<[u64; 2], CheckpointError> {
                s.try_into().map_err(|_| shape_err(what))
            };
            let [ra, x] = two(&ta.shape, "LoRA factors are 2-D")?;
            let [y, rb] = two(&tb.shape, "LoRA factors are 2-D")?;
            let [rows, cols] = two(&w.info.shape, "only 2-D weights are adapted")?;
            if ra != rank || rb != rank {
                return Err(shape_err(&format!(
                    "A is [r, in] and B [out, r], and the config's r for {module} is {rank}"
                )));
            }
            // A Linear's weight is [out, in] = [y, x]; an embedding's, or a
            // Conv1D's (fan_in_fan_out), is [x, y].
            let straight = (rows, cols) == (y, x);
            let turned = (rows, cols) == (x, y);
            let transposed = match (straight, turned) {
                _ if embedding => turned,
                (true, true) => self.config.fan_in_fan_out,
                (false, true) => true,
                _ => false,
            };
            let fits = if embedding {
                turned
            } else {
                straight || turned
            };
            if !fits {
                return Err(shape_err(if embedding {
                    "an embedding [vocab, dim] takes A [r, vocab] and B [dim, r]"
                } else {
                    "a weight [out, in] takes A [r, in] and B [out, r]"
                }));
            }
            let scale = if self.config.use_rslora {
                alpha / (rank as f64).sqrt()
            } else {
                alpha / rank as f64
            };
            if out.contains_key(&target) {
                return Err(err(format!(
                    "{target} is both adapted ({a}) and replaced by another tensor of the \
                     adapter"
                )));
            }
            out.insert(
                target,
                Adapted::Lora {
                    a,
                    b,
                    rank,
                    alpha,
                    scale,
                    transposed,
                    embedding,
                },
            );
        }
        Ok(out)
    }

    /// `r` of `module`: its `rank_pattern` entry, else the config's.
    fn rank(&self, module: &str) -> u64 {
        self.config
            .rank_pattern
            .iter()
            .find(|(p, _)| pattern_matches(p, module))
            .map_or(self.config.r, |(_, r)| *r)
    }

    /// `lora_alpha` of `module`: its `alpha_pattern` entry, else the config's.
    fn alpha(&self, module: &str) -> f64 {
        self.config
            .alpha_pattern
            .iter()
            .find(|(p, _)| pattern_matches(p, module))
            .map_or(self.config.lora_alpha, |(_, a)| *a)
    }
}

/// PEFT's `get_pattern_key` test: `re.match(rf"(.*\.)?({key})$", module)`.
/// Patterns are compiled when the config is read ([`parse_config`]), so a
/// pattern that does not compile never gets here.
fn pattern_matches(pattern: &str, module: &str) -> bool {
    fancy_regex::Regex::new(&anchored(pattern))
        .ok()
        .and_then(|re| re.is_match(module).ok())
        .unwrap_or(false)
}

fn anchored(pattern: &str) -> String {
    format!(r"^(?:.*\.)?(?:{pattern})$")
}

/// A saved key PEFT writes for something this reader does not apply.
fn unsupported_key(name: &str) -> Option<&'static str> {
    let last = name.rsplit('.').next().unwrap_or(name);
    if name.contains(".lora_magnitude_vector") {
        Some("DoRA's magnitude vector (use_dora)")
    } else if name.contains(".lora_B.bias") {
        Some("a LoRA bias (lora_bias)")
    } else if name.contains(".token_adapter.") {
        Some("a trainable-tokens delta (trainable_token_indices)")
    } else if name.split('.').any(|p| p.starts_with("lora_")) || last.starts_with("lora_") {
        Some("a LoRA tensor of a kind other than lora_A/lora_B and lora_embedding_A/B")
    } else {
        None
    }
}

/// The adapter's weights file and tensors: `adapter_model.safetensors`, else
/// `adapter_model.bin` (read by [`super::read_torch`], as PEFT's
/// `load_peft_weights` prefers the safetensors file too).
pub fn adapter_weights(
    storage: &dyn Storage,
    location: &str,
) -> Result<(String, BTreeMap<String, TensorLocation>), CheckpointError> {
    let locate = |file: &String, tensors: Vec<(String, super::TensorInfo)>| {
        tensors
            .into_iter()
            .map(|(name, info)| {
                let loc = TensorLocation {
                    file: file.clone(),
                    info,
                };
                (name, loc)
            })
            .collect()
    };
    let file = storage.join(location, ADAPTER_SAFETENSORS);
    if storage.exists(&file)? {
        let header = read_header(storage, &file)?;
        let tensors = locate(&file, header.tensors);
        return Ok((file, tensors));
    }
    let bin = storage.join(location, ADAPTER_BIN);
    if storage.exists(&bin)? {
        let tensors = locate(&bin, super::read_torch(storage, &bin)?);
        return Ok((bin, tensors));
    }
    Err(adapter_err(
        location,
        format!("no adapter weights: neither {ADAPTER_SAFETENSORS} nor {ADAPTER_BIN}"),
    ))
}

fn adapter_err(file: &str, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Adapter {
        file: file.to_string(),
        message: message.into(),
    }
}

/// Reads the settings of `adapter_config.json` that decide the merge, and
/// refuses the adapter kinds and options whose merge is not `W + scale·B·A`.
fn parse_config(file: &str, map: &Map<String, Value>) -> Result<LoraConfig, CheckpointError> {
    let err = |m: String| adapter_err(file, m);
    let kind = map.get("peft_type").and_then(Value::as_str);
    match kind {
        Some("LORA") => {}
        Some(other) => {
            return Err(err(format!(
                "adapter kind {other} (peft_type) is not supported: only LoRA adapters \
                 (peft_type LORA) can be folded into a model"
            )))
        }
        None => {
            return Err(err(
                "no peft_type: not a PEFT adapter config (LoRA adapters have \"peft_type\": \
                 \"LORA\")"
                    .into(),
            ))
        }
    }
    let flag = |k: &str| map.get(k).and_then(Value::as_bool).unwrap_or(false);
    let present = |k: &str| match map.get(k) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    let refused: &[(&str, &str)] = &[
        ("use_dora", "DoRA adapters (use_dora)"),
        ("use_qalora", "QA-LoRA adapters (use_qalora)"),
        ("lora_bias", "LoRA biases (lora_bias)"),
        (
            "alora_invocation_tokens",
            "activated LoRA (alora_invocation_tokens)",
        ),
        (
            "trainable_token_indices",
            "trainable tokens (trainable_token_indices)",
        ),
        (
            "target_parameters",
            "adapters on parameters (target_parameters)",
        ),
        ("layer_replication", "layer replication (layer_replication)"),
    ];
    for (key, what) in refused {
        if present(key) {
            return Err(err(format!("{what} are not supported, only plain LoRA")));
        }
    }
    if let Some(init) = map.get("init_lora_weights").and_then(Value::as_str) {
        let lower = init.to_ascii_lowercase();
        if ["pissa", "olora", "corda", "loftq"]
            .iter()
            .any(|k| lower.starts_with(k))
        {
            return Err(err(format!(
                "init_lora_weights {init:?}: the adapter was trained on a base model its \
                 initialisation changed; convert it to a plain LoRA first (PEFT's \
                 path_initial_model_for_weight_conversion)"
            )));
        }
    }
    let positive = |k: &str, v: &Value| match v.as_u64() {
        Some(r) if r > 0 => Ok(r),
        _ => Err(err(format!(
            "{k} is {}, not a positive whole number",
            short(v)
        ))),
    };
    let number = |k: &str, v: &Value| match v.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(err(format!("{k} is {}, not a number", short(v)))),
    };
    let r = positive("r", map.get("r").unwrap_or(&Value::Null))?;
    let lora_alpha = number("lora_alpha", map.get("lora_alpha").unwrap_or(&Value::Null))?;
    let patterns = |key: &str| -> Result<Vec<(String, Value)>, CheckpointError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Object(o)) => o
                .iter()
                .map(|(p, v)| {
                    fancy_regex::Regex::new(&anchored(p)).map_err(|e| {
                        err(format!(
                            "{key}: pattern {p:?} is not a regular expression: {e}"
                        ))
                    })?;
                    Ok((p.clone(), v.clone()))
                })
                .collect(),
            Some(other) => Err(err(format!("{key} is {}, not a mapping", short(other)))),
        }
    };
    let rank_pattern = patterns("rank_pattern")?
        .into_iter()
        .map(|(p, v)| Ok((p.clone(), positive(&format!("rank_pattern[{p:?}]"), &v)?)))
        .collect::<Result<_, CheckpointError>>()?;
    let alpha_pattern = patterns("alpha_pattern")?
        .into_iter()
        .map(|(p, v)| Ok((p.clone(), number(&format!("alpha_pattern[{p:?}]"), &v)?)))
        .collect::<Result<_, CheckpointError>>()?;
    let modules_to_save = match map.get("modules_to_save") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    Ok(LoraConfig {
        r,
        lora_alpha,
        use_rslora: flag("use_rslora"),
        fan_in_fan_out: flag("fan_in_fan_out"),
        rank_pattern,
        alpha_pattern,
        modules_to_save,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::output::ShardLayout;
    use crate::storage::LocalStorage;
    use std::path::{Path, PathBuf};

    fn kit(name: &str) -> String {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/models")
            .join(name)
            .to_string_lossy()
            .into_owned()
    }

    fn base() -> BTreeMap<String, TensorLocation> {
        crate::checkpoint::Checkpoint::open(&LocalStorage, &kit("llama-base"))
            .unwrap()
            .tensors
    }

    /// An adapter folder with `config` (merged over a plain LoRA config) and
    /// tensors of the given dtypes and shapes.
    fn adapter(config: serde_json::Value, tensors: &[(&str, DType, &[u64])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut c = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
            "target_modules": ["q_proj"], "fan_in_fan_out": false});
        for (k, v) in config.as_object().unwrap() {
            c[k] = v.clone();
        }
        std::fs::write(dir.path().join(ADAPTER_CONFIG), c.to_string()).unwrap();
        let specs: Vec<(String, DType, Vec<u64>)> = tensors
            .iter()
            .map(|(n, d, s)| (n.to_string(), *d, s.to_vec()))
            .collect();
        let l = ShardLayout::new(&specs);
        let mut b = l.header.clone();
        b.resize(l.file_size as usize, 0);
        std::fs::write(dir.path().join(ADAPTER_SAFETENSORS), b).unwrap();
        dir
    }

    fn open(dir: &Path) -> Result<Adapter, CheckpointError> {
        Adapter::open(&LocalStorage, &dir.to_string_lossy())
    }

    fn mapped(
        config: serde_json::Value,
        tensors: &[(&str, DType, &[u64])],
    ) -> Result<BTreeMap<String, Adapted>, String> {
        let dir = adapter(config, tensors);
        open(dir.path())
            .and_then(|a| a.map_onto(&base()))
            .map_err(|e| e.to_string())
    }

    const Q: &str = "base_model.model.model.layers.0.self_attn.q_proj";
    const K: &str = "base_model.model.model.layers.0.self_attn.k_proj";

    #[test]
    fn the_kit_adapters_map_onto_their_base() {
        let a = Adapter::open(&LocalStorage, &kit("lora-qv")).unwrap();
        assert_eq!((a.config.r, a.config.lora_alpha), (4, 8.0));
        let map = a.map_onto(&base()).unwrap();
        assert_eq!(map.len(), 12, "q_proj and v_proj of 6 layers");
        let Adapted::Lora {
            a: ka,
            b: kb,
            rank,
            scale,
            transposed,
            embedding,
            ..
        } = &map["model.layers.3.self_attn.v_proj.weight"]
        else {
            panic!("adapted")
        };
        assert_eq!(
            ka,
            "base_model.model.model.layers.3.self_attn.v_proj.lora_A.weight"
        );
        assert_eq!(
            kb,
            "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"
        );
        assert_eq!(
            (*rank, *scale, *transposed, *embedding),
            (4, 2.0, false, false)
        );
        let wide = Adapter::open(&LocalStorage, &kit("lora-wide")).unwrap();
        let map = wide.map_onto(&base()).unwrap();
        assert_eq!(map.len(), 42, "seven modules of 6 layers");
        assert!(map
            .values()
            .all(|x| matches!(x, Adapted::Lora { scale, .. } if *scale == 1.5)));
    }

    #[test]
    fn scales_ranks_and_patterns() {
        // q_proj [64, 64], k_proj [32, 64] in the kit's llama.
        let names = [
            format!("{Q}.lora_A.weight"),
            format!("{Q}.lora_B.weight"),
            format!("{K}.lora_A.weight"),
            format!("{K}.lora_B.weight"),
        ];
        let tensors: &[(&str, DType, &[u64])] = &[
            (&names[0], DType::F32, &[4, 64]),
            (&names[1], DType::F32, &[64, 4]),
            (&names[2], DType::BF16, &[2, 64]),
            (&names[3], DType::BF16, &[32, 2]),
        ];
        let scale_of = |m: &BTreeMap<String, Adapted>, name: &str| match &m[name] {
            Adapted::Lora {
                rank, alpha, scale, ..
            } => (*rank, *alpha, *scale),
            other => panic!("{other:?}"),
        };
        let q = "model.layers.0.self_attn.q_proj.weight";
        let k = "model.layers.0.self_attn.k_proj.weight";
        // k_proj's rank comes from rank_pattern (the first key that matches),
        // its alpha from alpha_pattern.
        let m = mapped(
            serde_json::json!({"rank_pattern": {"v_proj": 8, "k_proj": 2, "layers.0.self_attn.k_proj": 3},
                "alpha_pattern": {"model\\.layers\\.\\d+\\.self_attn\\.k_proj": 16}}),
            tensors,
        )
        .unwrap();
        assert_eq!(scale_of(&m, q), (4, 8.0, 2.0));
        assert_eq!(scale_of(&m, k), (2, 16.0, 8.0));
        // rsLoRA: alpha / sqrt(r).
        let m = mapped(
            serde_json::json!({"use_rslora": true, "rank_pattern": {"k_proj": 2}}),
            tensors,
        )
        .unwrap();
        assert_eq!(scale_of(&m, q), (4, 8.0, 4.0));
        assert_eq!(scale_of(&m, k).2, 8.0 / 2f64.sqrt());
        // A pattern matches whole name components: `proj` is no module.
        let e = mapped(serde_json::json!({"rank_pattern": {"proj": 2}}), tensors).unwrap_err();
        assert!(e.contains("r 4"), "{e}");
        // Without the pattern, k_proj's factors do not fit r 4.
        let e = mapped(serde_json::json!({}), tensors).unwrap_err();
        assert!(e.contains(&format!("{K}.lora_A.weight")), "{e}");
        assert!(
            e.contains("r 4") && e.contains("adapter_model.safetensors"),
            "{e}"
        );
    }

    #[test]
    fn embeddings_conv1d_and_replaced_tensors() {
        // embed_tokens [512, 64]: A [r, 512], B [64, r], transposed.
        let m = mapped(
            serde_json::json!({"modules_to_save": ["lm_head"], "bias": "all"}),
            &[
                (
                    "base_model.model.model.embed_tokens.lora_embedding_A",
                    DType::F32,
                    &[4, 512],
                ),
                (
                    "base_model.model.model.embed_tokens.lora_embedding_B",
                    DType::F32,
                    &[64, 4],
                ),
                ("base_model.model.lm_head.weight", DType::F32, &[512, 64]),
                ("base_model.model.model.norm.weight", DType::BF16, &[64]),
            ],
        )
        .unwrap();
        assert!(matches!(
            &m["model.embed_tokens.weight"],
            Adapted::Lora { transposed: true, embedding: true, scale, .. } if *scale == 2.0
        ));
        assert_eq!(
            m["lm_head.weight"],
            Adapted::Replaced {
                key: "base_model.model.lm_head.weight".into()
            }
        );
        assert!(matches!(m["model.norm.weight"], Adapted::Replaced { .. }));
        // A layer stored [in, out] (GPT-2's Conv1D): A [r, in], B [out, r] fit
        // a k_proj [32, 64] only transposed (in 32, out 64).
        let names = [
            format!("{K}.lora_A.weight"),
            format!("{K}.lora_B.weight"),
            format!("{Q}.lora_A.weight"),
            format!("{Q}.lora_B.weight"),
        ];
        let m = mapped(
            serde_json::json!({"fan_in_fan_out": true}),
            &[
                (&names[0], DType::F32, &[4, 32]),
                (&names[1], DType::F32, &[64, 4]),
                (&names[2], DType::F32, &[4, 64]),
                (&names[3], DType::F32, &[64, 4]),
            ],
        )
        .unwrap();
        assert!(matches!(
            m["model.layers.0.self_attn.k_proj.weight"],
            Adapted::Lora {
                transposed: true,
                ..
            }
        ));
        // Square: the config's fan_in_fan_out decides.
        assert!(matches!(
            m["model.layers.0.self_attn.q_proj.weight"],
            Adapted::Lora {
                transposed: true,
                ..
            }
        ));
        // `<module>.base_layer.weight` replaces the module's weight.
        let m = mapped(
            serde_json::json!({}),
            &[(
                "base_model.model.model.embed_tokens.base_layer.weight",
                DType::BF16,
                &[512, 64],
            )],
        )
        .unwrap();
        assert!(matches!(
            m["model.embed_tokens.weight"],
            Adapted::Replaced { .. }
        ));
    }

    #[test]
    fn what_cannot_be_applied_is_refused_naming_it_and_the_file() {
        let (qa, qb, qm) = (
            format!("{Q}.lora_A.weight"),
            format!("{Q}.lora_B.weight"),
            format!("{Q}.lora_magnitude_vector"),
        );
        let fits: &[(&str, DType, &[u64])] =
            &[(&qa, DType::F32, &[4, 64]), (&qb, DType::F32, &[64, 4])];
        // (adapter_config.json, adapter tensors, words the error names)
        type Case<'a> = (
            serde_json::Value,
            Vec<(&'a str, DType, &'a [u64])>,
            &'a [&'a str],
        );
        let cases: Vec<Case> = vec![
            (
                serde_json::json!({"peft_type": "LOHA"}),
                fits.to_vec(),
                &["LOHA", "adapter_config.json"],
            ),
            (
                serde_json::json!({"peft_type": "IA3"}),
                fits.to_vec(),
                &["IA3", "only LoRA"],
            ),
            (
                serde_json::json!({"peft_type": null}),
                fits.to_vec(),
                &["no peft_type"],
            ),
            (
                serde_json::json!({"use_dora": true}),
                fits.to_vec(),
                &["DoRA", "adapter_config.json"],
            ),
            (
                serde_json::json!({"lora_bias": true}),
                fits.to_vec(),
                &["lora_bias"],
            ),
            (
                serde_json::json!({"trainable_token_indices": [3]}),
                fits.to_vec(),
                &["trainable"],
            ),
            (
                serde_json::json!({"init_lora_weights": "pissa_niter_4"}),
                fits.to_vec(),
                &["pissa"],
            ),
            (serde_json::json!({"r": 0}), fits.to_vec(), &["r is 0"]),
            (
                serde_json::json!({"lora_alpha": "x"}),
                fits.to_vec(),
                &["lora_alpha"],
            ),
            (
                serde_json::json!({"rank_pattern": {"(": 2}}),
                fits.to_vec(),
                &["rank_pattern", "\"(\""],
            ),
            // Keys that fit nothing.
            (
                serde_json::json!({}),
                vec![
                    (
                        "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight",
                        DType::F32,
                        &[4, 64],
                    ),
                    (
                        "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight",
                        DType::F32,
                        &[176, 4],
                    ),
                ],
                &["model.layers.9.mlp.up_proj.lora_A.weight", "does not have"],
            ),
            (
                serde_json::json!({}),
                vec![("base_model.model.classifier.weight", DType::F32, &[2, 64])],
                &["base_model.model.classifier.weight", "matches no tensor"],
            ),
            (
                serde_json::json!({}),
                vec![("base_model.model.lm_head.weight", DType::F32, &[513, 64])],
                &["lm_head.weight", "[512, 64]"],
            ),
            (
                serde_json::json!({}),
                vec![fits[0]],
                &["only one of lora_A.weight and lora_B.weight"],
            ),
            (
                serde_json::json!({}),
                vec![(&qa, DType::F32, &[4, 64]), (&qb, DType::F32, &[32, 4])],
                &["lora_B.weight", "[out, r]"],
            ),
            (
                serde_json::json!({}),
                vec![(&qm, DType::F32, &[64])],
                &["DoRA"],
            ),
            (
                serde_json::json!({}),
                vec![
                    (&qa, DType::F32, &[4, 64, 1, 1]),
                    (&qb, DType::F32, &[64, 4, 1, 1]),
                ],
                &["2-D"],
            ),
        ];
        for (config, tensors, words) in cases {
            let e = mapped(config.clone(), &tensors).unwrap_err();
            for w in words {
                assert!(e.contains(w), "{config}: {e} (wanted {w})");
            }
        }
        // Missing pieces of the folder.
        let dir = adapter(serde_json::json!({}), fits);
        std::fs::remove_file(dir.path().join(ADAPTER_SAFETENSORS)).unwrap();
        let e = open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no adapter weights"), "{e}");
        // Only a .bin: read as a torch checkpoint, so two bytes are refused
        // as one, naming the file.
        std::fs::write(dir.path().join(ADAPTER_BIN), b"PK").unwrap();
        let e = open(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("adapter_model.bin") && e.contains("not a torch.save checkpoint"),
            "{e}"
        );
        std::fs::remove_file(dir.path().join(ADAPTER_CONFIG)).unwrap();
        let e = open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("adapter_config.json: not found"), "{e}");
        std::fs::write(dir.path().join(ADAPTER_CONFIG), "[1]").unwrap();
        let e = open(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("adapter_config.json: expected a JSON object"),
            "{e}"
        );
    }
}
