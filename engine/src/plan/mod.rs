//! The plan: from a config and the headers of its input checkpoints, the list of
//! output tensors (each with its inputs, byte ranges and fully resolved
//! parameters), grouped into output shards. Each shard is a [`WorkUnit`] (see
//! [`crate::unit`]): plain, serializable data that a worker in this process or on
//! another machine can execute without the config or the planner. `inputs`
//! lends the planner's input models and sharding to other planners
//! (`crate::moe`).

mod build;
pub mod inputs;
pub mod layout;
mod meta;
mod models;
mod resolve;
mod shards;
mod slices;
pub mod summary;
mod tensors;

pub use build::{plan, PlanOptions};
pub use models::{inspect_models, AdapterFacts, ModelFacts};

use crate::checkpoint::CheckpointError;
use crate::config::ConfigError;
use crate::dtype::DType;
use crate::unit::WorkUnit;
use serde::{Deserialize, Serialize};

/// The default `--out-shard-size`: 5 000 000 000 bytes, as mergekit.
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

/// A model the config references.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedModel {
    /// The reference as written in the YAML.
    pub reference: String,
    /// Where it was found (absolute path or URL).
    pub location: String,
    /// Where its LoRA adapter was found, for a `model+adapter` reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

/// What the output needs besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputMeta {
    /// Directory whose config.json is copied (the base model, else the first
    /// model: mergekit picks an arbitrary one from a set there, we do not).
    pub config_dir: String,
    /// Directory whose tokenizer files are copied (`tokenizer_source`, else the
    /// config donor).
    pub tokenizer_dir: String,
    /// `torch_dtype` to write into config.json (`out_dtype`, else `dtype`).
    pub config_dtype: Option<DType>,
    /// Layer-count key and value to write (slices configs).
    pub layers: Option<(String, u64)>,
    pub chat_template: Option<String>,
    /// With a tokenizer setting: the output tokenizer files (name, text) from
    /// [`crate::tokenizer::Vocabulary::output_files`], written instead of
    /// copying `tokenizer_dir`'s.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokenizer_files: Vec<(String, String)>,
    /// With a tokenizer setting: config.json's vocabulary size (the embedding
    /// rows, padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<u64>,
    /// FP8 inputs were dequantized: config.json loses its `quantization_config`.
    #[serde(default)]
    pub dequantized: bool,
    /// The config YAML verbatim (mergekit_config.yml, model card).
    pub config_yaml: String,
    /// Method name and card text.
    pub method_pretty: String,
    pub method_url: Option<String>,
    /// References for the model card: the base and every referenced model.
    pub base_reference: Option<String>,
    pub references: Vec<String>,
    /// A model built rather than merged (`fleetmerge moe`): its config.json
    /// and model card are given here instead of derived from a donor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated: Option<GeneratedFiles>,
}

/// The files of a built model (`fleetmerge moe`) that a merge derives from its
/// donor and config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedFiles {
    /// config.json, verbatim.
    pub config_json: String,
    /// The model card (README.md) before its provenance section.
    pub card: String,
    /// The name the config YAML is written under (`mergekit_moe_config.yml`).
    pub config_file: String,
    /// `tokenizer_config.json` to write over the copied one (mergekit-moe
    /// saves the base's tokenizer with its pad token set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_config: Option<String>,
}

/// The whole merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format: u32,
    pub merge_method: String,
    pub models: Vec<PlannedModel>,
    pub units: Vec<WorkUnit>,
    pub output: OutputMeta,
    /// With a tokenizer setting: what `plan` shows of the output vocabulary
    /// (sizes, tokens added and from where, rows that fall back to a default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocabulary: Option<crate::tokenizer::VocabSummary>,
}

impl Plan {
    /// Sum of all output tensor bytes (the index's `total_size`).
    pub fn total_size(&self) -> u64 {
        self.units.iter().map(WorkUnit::data_bytes).sum()
    }

    /// Tensor name → shard file, in output order.
    pub fn weight_map(&self) -> Vec<(String, String)> {
        self.units
            .iter()
            .flat_map(|u| {
                u.tensors
                    .iter()
                    .map(|t| (t.name.clone(), u.file_name.clone()))
            })
            .collect()
    }

    pub fn tensor_count(&self) -> usize {
        self.units.iter().map(|u| u.tensors.len()).sum()
    }
}

/// Why a merge cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A problem tied to a place in the YAML.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A problem with the inputs that no single YAML key explains.
    #[error("{0}")]
    Inputs(String),
}

/// Sizes (`--out-shard-size`): see [`crate::size`].
pub use crate::size::parse_size;
#[cfg(test)]
mod tests;
