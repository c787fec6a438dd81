//! The plan: from a config and the headers of its input checkpoints, the list of
//! output tensors (each with its inputs, byte ranges and fully resolved
//! parameters), grouped into output shards. Each shard is a [`WorkUnit`]: plain,
//! serializable data that a worker in this process or on another machine can
//! execute without the config or the planner.

mod build;
pub mod layout;
mod resolve;
pub mod summary;
mod validate;

pub use build::{inspect_models, plan, ModelFacts, PlanOptions};
pub use validate::{is_shard_file_name, UnitError, MAX_NAME_LEN, MAX_RANK, MAX_UNIT_BYTES};

use crate::checkpoint::CheckpointError;
use crate::config::ConfigError;
use crate::dtype::DType;
use crate::methods::TensorParams;
use serde::{Deserialize, Serialize};

/// Version of the plan/work-unit format; peers refuse a different one.
pub const PLAN_FORMAT: u32 = 1;

/// The default `--out-shard-size`: 5 000 000 000 bytes, as mergekit.
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

/// A model the config references.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedModel {
    /// The reference as written in the YAML.
    pub reference: String,
    /// Where it was found (absolute path or URL).
    pub location: String,
}

/// Bytes of one input tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorRef {
    /// Index into [`Plan::models`].
    pub model: usize,
    /// The tensor's name in that checkpoint.
    pub name: String,
    /// The shard file holding it.
    pub location: String,
    /// Absolute byte offset of its data in the file, and its length.
    pub offset: u64,
    pub len: u64,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

/// What produces an output tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TensorOp {
    /// Run the merge method on the inputs.
    Merge,
    /// A non-float buffer (e.g. integer position ids): copied when every input
    /// holds the same bytes, an error otherwise (mergekit 0.1.5's rule).
    CopyIdentical,
}

/// One tensor of the output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub op: TensorOp,
    /// Inputs in source order.
    pub inputs: Vec<TensorRef>,
    /// Index of the base model within `inputs`.
    pub base: Option<usize>,
    pub params: TensorParams,
    /// Block scales of FP8 inputs (their `*.weight_scale_inv`), parallel to
    /// `inputs`; empty when no input is block-scaled. Such inputs are
    /// dequantized on read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scales: Vec<Option<TensorRef>>,
    /// Rows and columns of one scale block (`weight_block_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<[u64; 2]>,
    /// Re-quantize the merged tensor to FP8 with fresh block scales
    /// (`--keep-fp8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requant: Option<Requant>,
}

/// How an FP8 output is produced: the merge of the weight `weight` (of
/// `weight_shape`) is computed in f32, each block gets the scale
/// `amax / 448`, and the tensor is either the weight in E4M3 or (`scales`) the
/// F32 scales (`weight_scale_inv`). Both halves compute the same merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Requant {
    pub block: [u64; 2],
    pub weight: String,
    pub weight_shape: Vec<u64>,
    pub scales: bool,
}

impl OutputTensor {
    /// Every byte range the tensor reads: the inputs, then their scales.
    pub fn all_refs(&self) -> impl Iterator<Item = &TensorRef> {
        self.inputs.iter().chain(self.scales.iter().flatten())
    }

    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
    /// Bytes of every input, the scales included.
    pub fn input_bytes(&self) -> u64 {
        self.all_refs().map(|r| r.len).sum()
    }
    pub fn byte_len(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }
}

/// One output shard and everything needed to compute it. A unit that comes
/// from elsewhere is checked with [`WorkUnit::validate`] before it is run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkUnit {
    pub format: u32,
    pub id: usize,
    /// File name of the shard inside the output location.
    pub file_name: String,
    pub merge_method: String,
    pub seed: u64,
    pub tensors: Vec<OutputTensor>,
}

impl WorkUnit {
    /// The byte layout of the unit's shard: its tensors in order, as the
    /// executor writes it and the coordinator expects to find it.
    pub fn layout(&self) -> crate::output::ShardLayout {
        crate::output::ShardLayout::new(
            &self
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
                .collect::<Vec<_>>(),
        )
    }

    /// Bytes of tensor data in the shard.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(OutputTensor::byte_len).sum()
    }
    /// Bytes read from inputs.
    pub fn input_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .flat_map(|t| t.all_refs().map(|i| i.len))
            .sum()
    }
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
}

/// The whole merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format: u32,
    pub merge_method: String,
    pub models: Vec<PlannedModel>,
    pub units: Vec<WorkUnit>,
    pub output: OutputMeta,
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
