//! The merge configuration schema: mergekit 0.1.5's `MergeConfiguration`
//! (models or slices, base model, parameters, dtypes, tokenizer, chat template)
//! read from the YAML node tree, with every mistake reported at its key and line.
//! The types are here; reading them is split by section: the reading context
//! and the top level (`reader`), `models:` and `slices:` (`inputs`), model
//! references (`model_ref`), and parameters, dtypes and the tokenizer
//! (`settings`).

mod inputs;
mod model_ref;
mod reader;
mod settings;
#[cfg(test)]
mod testing;

use std::fmt;
use std::path::Path;

use super::params::ParamSetting;
use super::tokenizer::TokenizerConfig;
use super::{ConfigError, Spanned};
use crate::dtype::packed::BlockFormat;
use crate::dtype::DType;
use crate::yaml::{Node, Span};
use reader::Reader;

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
    /// `out_dtype: mxfp4`: packed (MXFP4) inputs are written packed again;
    /// `out_dtype` is then unset (the other tensors keep `dtype`).
    pub out_packed: Option<Spanned<BlockFormat>>,
    /// `tokenizer_source:` or `tokenizer:` (see [`crate::config::tokenizer`]).
    pub tokenizer: Option<TokenizerConfig>,
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

/// `path[@revision]`, optionally with a LoRA adapter (`path[@revision]+lora[@revision]`);
/// equality by value like mergekit's ModelReference; Display gives back the string
/// as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelRef {
    pub path: String,
    pub revision: Option<String>,
    /// A PEFT LoRA adapter applied to the model's weights on read.
    pub lora: Option<ModelPath>,
}

/// `path[@revision]` of a LoRA adapter (mergekit's `ModelPath`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelPath {
    pub path: String,
    pub revision: Option<String>,
}

impl ModelRef {
    /// A plain model reference, without an adapter.
    pub fn new(path: impl Into<String>, revision: Option<String>) -> Self {
        ModelRef {
            path: path.into(),
            revision,
            lora: None,
        }
    }

    /// The model without its adapter (where its checkpoint is read).
    pub fn base(&self) -> ModelRef {
        ModelRef::new(self.path.clone(), self.revision.clone())
    }
}

/// Like mergekit's ModelPath.__str__: an empty revision is not shown.
fn path_with_revision(f: &mut fmt::Formatter<'_>, path: &str, rev: Option<&str>) -> fmt::Result {
    match rev {
        Some(rev) if !rev.is_empty() => write!(f, "{path}@{rev}"),
        _ => f.write_str(path),
    }
}

impl fmt::Display for ModelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        path_with_revision(f, &self.path, self.revision.as_deref())
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        path_with_revision(f, &self.path, self.revision.as_deref())?;
        match &self.lora {
            Some(lora) => write!(f, "+{lora}"),
            None => Ok(()),
        }
    }
}

impl MergeConfig {
    /// Parses the YAML text of a config; `file` names it in messages.
    pub fn parse(file: &str, source: &str) -> Result<MergeConfig, ConfigError> {
        let root = Node::parse(file, source)?;
        Reader { file }.config(&root, source)
    }

    /// Reads a model reference node (every form a config's `model:` takes:
    /// `PATH[@REV][+LORA[@REV]]`, `{model, lora}`) of the file `file` at
    /// `key_path`, as other configs that name models (`fleetmerge moe`) do.
    pub fn model_reference(
        file: &str,
        node: &Node,
        key_path: &str,
    ) -> Result<Spanned<ModelRef>, ConfigError> {
        Reader { file }.model_ref(node, key_path)
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

#[cfg(test)]
mod tests {
    use super::testing::{
        parse, ERR_LAYER_RANGE, ERR_UNKNOWN_METHOD, KARCHER, SLERP_GRADIENT, TIES,
    };
    use super::*;

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
