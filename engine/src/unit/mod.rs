//! The work unit: the one contract between the planner and whoever runs a
//! shard, in this process or on another machine. A [`WorkUnit`] is plain,
//! serializable data (the output tensors of one shard, each with its input byte
//! ranges and fully resolved parameters); a [`UnitOutput`] is what running it
//! produced. The gRPC lease carries a unit as its JSON (`serde_json`) bytes.
//!
//! A unit that comes from elsewhere is checked with [`WorkUnit::validate`]
//! (`validate`) before anything is read or written. A vocabulary tensor of a
//! merge with tokenizer settings carries its [`VocabAlignment`] (`vocab`): how
//! each input's rows are re-indexed into the output vocabulary. An input of a
//! `model+adapter` reference carries its LoRA factors ([`LoraRef`]), added to
//! its weight on read. A tensor the planner computed (a built MoE's router)
//! carries its bytes ([`TensorOp::Literal`]) and reads nothing.

mod validate;
mod vocab;

pub use validate::{is_shard_file_name, UnitError, MAX_NAME_LEN, MAX_RANK, MAX_UNIT_BYTES};
pub use vocab::{fill_row, padding_row, Fill, RowFill, RowMean, RowRun, VocabAlignment};

use crate::dtype::packed::BlockFormat;
use crate::dtype::DType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the plan/work-unit format; peers refuse a different one.
pub const PLAN_FORMAT: u32 = 1;

/// Bytes of one input tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorRef {
    /// Index into the plan's model list (`Plan::models`).
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
    /// A LoRA adapter folded into this (2-D) input on read, in f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<Box<LoraRef>>,
}

/// The LoRA factors of one adapted input, in the adapter's file: the input `W`
/// is read as `W + scale · B·A` (`transposed`: `W + scale · (B·A)ᵀ`), PEFT's
/// `get_delta_weight`. `a` is `[r, in]`, `b` is `[out, r]` for a weight
/// `[out, in]`; transposed (an embedding's `lora_embedding_A/B`, or a
/// `fan_in_fan_out` layer), `a` is `[r, rows]` and `b` is `[cols, r]` for a
/// weight `[rows, cols]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraRef {
    /// `lora_A` (or `lora_embedding_A`).
    pub a: TensorRef,
    /// `lora_B` (or `lora_embedding_B`).
    pub b: TensorRef,
    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    /// The delta is `(B·A)ᵀ`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transposed: bool,
}

impl TensorRef {
    /// Bytes of one row (one index of the first axis; a scalar is one row).
    pub fn row_bytes(&self) -> u64 {
        let elements: u64 = self.shape.iter().skip(1).product();
        elements.saturating_mul(self.dtype.size() as u64)
    }
}

/// What produces an output tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TensorOp {
    /// Run the merge method on the inputs.
    Merge,
    /// A non-float buffer (e.g. integer position ids): copied when every input
    /// holds the same bytes, an error otherwise (mergekit 0.1.5's rule).
    CopyIdentical,
    /// Bytes the planner computed (a built MoE's routers, small): the tensor's
    /// data in its dtype, little-endian, hex-encoded. No inputs.
    Literal { hex: String },
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
    /// Block scales of FP8 inputs (their `*.weight_scale_inv`), or of packed
    /// inputs (their `X_scales`, see [`Packed`]), parallel to `inputs`; empty
    /// when no input is block-scaled. Such inputs are dequantized on read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scales: Vec<Option<TensorRef>>,
    /// Rows and columns of one scale block (`weight_block_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<[u64; 2]>,
    /// Re-quantize the merged tensor to FP8 with fresh block scales
    /// (`--keep-fp8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requant: Option<Requant>,
    /// A vocabulary tensor of a merge with tokenizer settings: how each
    /// input's rows (axis 0) are re-indexed into the output vocabulary before
    /// the method runs. The inputs keep their own row counts; every other
    /// dimension is the output's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<VocabAlignment>,
    /// Inputs in a packed block format (MXFP4), decoded on read; see
    /// [`Packed`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packed: Option<Packed>,
}

/// A tensor whose inputs may be packed (gpt-oss's MXFP4 experts): input `i`
/// is packed when `scales[i]` is set, its codes (`X_blocks`, U8
/// `[E, R, G, 16]`) in `inputs[i]` and its block scales (`X_scales`, U8
/// `[E, R, G]`) in `scales[i]`; it is decoded on read into the transposed
/// `[E, G·32, R]` tensor that the merge sees (see
/// [`crate::dtype::packed`]). The other inputs are float tensors of that
/// shape (e.g. a dequantized fine-tune's `X`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Packed {
    pub format: BlockFormat,
    /// Set when the merged tensor is written in the format again
    /// (`out_dtype: mxfp4`): this output is one half of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out: Option<PackedOut>,
}

/// One half of a merged tensor written packed: its codes (`X_blocks`) or
/// (`scales`) its block scales (`X_scales`). The merge of `merged` (of the
/// decoded shape `merged_shape`, `[E, C, R]`) is computed in f32 and encoded;
/// both halves compute the same merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackedOut {
    pub merged: String,
    pub merged_shape: Vec<u64>,
    pub scales: bool,
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
    /// Every byte range the tensor reads: the inputs, then [`Self::side_refs`].
    pub fn all_refs(&self) -> impl Iterator<Item = &TensorRef> {
        self.inputs.iter().chain(self.side_refs())
    }

    /// What the inputs need besides their own bytes, always read whole: their
    /// block scales, then each adapted input's LoRA factors (A, B).
    pub fn side_refs(&self) -> impl Iterator<Item = &TensorRef> {
        self.scales.iter().flatten().chain(
            self.inputs
                .iter()
                .filter_map(|r| r.lora.as_deref())
                .flat_map(|l| [&l.a, &l.b]),
        )
    }

    /// Calls `f` on every reference of [`Self::all_refs`] (in another order)
    /// until it fails: a worker rewrites their locations this way.
    pub fn try_for_each_ref_mut<E>(
        &mut self,
        mut f: impl FnMut(&mut TensorRef) -> Result<(), E>,
    ) -> Result<(), E> {
        for r in self
            .inputs
            .iter_mut()
            .chain(self.scales.iter_mut().flatten())
        {
            f(r)?;
            if let Some(l) = r.lora.as_deref_mut() {
                f(&mut l.a)?;
                f(&mut l.b)?;
            }
        }
        Ok(())
    }

    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
    /// Bytes the tensor reads: every input and its [side refs](Self::side_refs)
    /// (block scales, LoRA factors), except that a vocabulary tensor reads
    /// only the rows of each input its alignment uses (see
    /// [`input_read_bytes`](Self::input_read_bytes)).
    pub fn input_bytes(&self) -> u64 {
        let side: u64 = self.side_refs().map(|r| r.len).sum();
        self.input_read_bytes().iter().sum::<u64>() + side
    }

    /// Bytes read of each input (not its scales), in input order: the whole
    /// tensor, or for a vocabulary tensor the rows that
    /// [`VocabAlignment::source_rows`] names.
    pub fn input_read_bytes(&self) -> Vec<u64> {
        let Some(v) = &self.vocab else {
            return self.inputs.iter().map(|r| r.len).collect();
        };
        let rows = v.source_rows(0..v.rows);
        self.inputs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let rows: u64 = rows
                    .get(i)
                    .map_or(0, |rs| rs.iter().map(|x| x.end - x.start).sum());
                rows.saturating_mul(r.row_bytes()).min(r.len)
            })
            .collect()
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
    /// The unit writes one byte range of its shard (a *part*), not the whole
    /// shard: shards larger than the planner's unit size are split so that a
    /// cluster has units enough to balance (see [`UnitPart`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<UnitPart>,
}

/// Where a unit's bytes go in its shard when a shard is written by several
/// units. Part `index` writes the bytes `offset .. offset + len` of the
/// shard's file (the first part starts with the header, and carries the
/// shard's whole tensor list to write it); the shard appears once every part
/// is written. On an object store the shard is one multipart upload whose
/// parts (of [`UnitPart::chunk`] bytes; see [`upload_chunks`]) are numbered
/// across the units from [`UnitPart::first_chunk`]; on a local disk every part
/// writes at its offset into one prepared file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitPart {
    pub index: u32,
    pub count: u32,
    pub offset: u64,
    pub len: u64,
    /// Size of the whole shard file.
    pub shard_size: u64,
    /// Upload chunk size, and the number of chunks of the parts before this one.
    pub chunk: u64,
    pub first_chunk: u32,
    /// First part only: every tensor of the shard (name, dtype, shape) in
    /// order, for the header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shard_tensors: Vec<(String, DType, Vec<u64>)>,
    /// The multipart upload the parts go to (object stores), set by the
    /// coordinator when it hands the unit out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<String>,
}

pub use crate::storage::{upload_chunks, PartSpec, CHUNK, MAX_CHUNKS, MIN_CHUNK};

impl UnitPart {
    /// Where the part's bytes go, as storage takes it.
    pub fn spec(&self) -> PartSpec {
        PartSpec {
            offset: self.offset,
            len: self.len,
            shard_size: self.shard_size,
            chunk: self.chunk,
            first_chunk: self.first_chunk,
            upload: self.upload.clone(),
        }
    }
}

/// The layout of a shard of `tensors` (name, dtype, shape), in order.
pub fn shard_layout(tensors: &[(String, DType, Vec<u64>)]) -> crate::output::ShardLayout {
    crate::output::ShardLayout::new(tensors)
}

impl WorkUnit {
    /// The byte layout of the unit's shard: its tensors in order, as the
    /// executor writes it and the coordinator expects to find it.
    pub fn layout(&self) -> crate::output::ShardLayout {
        let own: Vec<_> = self
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
            .collect();
        match &self.part {
            Some(p) if p.index == 0 => crate::output::ShardLayout::new(&p.shard_tensors),
            _ => crate::output::ShardLayout::new(&own),
        }
    }

    /// The bytes this unit writes: its shard's header (unless it is a part
    /// after the first), then its tensors' data, with offsets relative to the
    /// first byte it writes. For a whole shard, [`Self::layout`].
    pub fn written_layout(&self) -> crate::output::ShardLayout {
        let full = self.layout();
        let Some(p) = &self.part else {
            return full;
        };
        if p.index == 0 {
            let n = self.tensors.len();
            return crate::output::ShardLayout {
                header: full.header,
                tensors: full.tensors.into_iter().take(n).collect(),
                file_size: p.len,
            };
        }
        // A later part: its own tensors laid out from its offset.
        let mut tensors = Vec::with_capacity(self.tensors.len());
        let mut at = 0u64;
        for t in &self.tensors {
            let len = t.byte_len();
            tensors.push((t.name.clone(), t.dtype, t.shape.clone(), at, len));
            at = at.saturating_add(len);
        }
        crate::output::ShardLayout {
            header: Vec::new(),
            tensors,
            file_size: p.len,
        }
    }

    /// The shard's file name with the part, for people:
    /// `model-00001-of-00004.safetensors (part 2/3)`.
    pub fn describe_target(&self) -> String {
        match &self.part {
            None => self.file_name.clone(),
            Some(p) => format!("{} (part {}/{})", self.file_name, p.index + 1, p.count),
        }
    }

    /// Bytes of tensor data in the shard.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(OutputTensor::byte_len).sum()
    }
    /// Bytes read from inputs (see [`OutputTensor::input_bytes`]).
    pub fn input_bytes(&self) -> u64 {
        self.tensors.iter().map(OutputTensor::input_bytes).sum()
    }
}

/// A resolved parameter value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Number(f64),
}

impl ParamValue {
    pub fn as_f64(self) -> f64 {
        match self {
            ParamValue::Number(x) => x,
            ParamValue::Bool(b) => b as u8 as f64,
        }
    }
    pub fn as_bool(self) -> bool {
        match self {
            ParamValue::Bool(b) => b,
            ParamValue::Number(x) => x != 0.0,
        }
    }
}

/// Fully resolved parameters of one output tensor: shared values, and one map
/// per input (in input order; empty for the base where the scope excludes it).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TensorParams {
    pub shared: BTreeMap<String, ParamValue>,
    pub per_input: Vec<BTreeMap<String, ParamValue>>,
}

impl TensorParams {
    pub fn shared_f64(&self, name: &str) -> Option<f64> {
        self.shared.get(name).map(|v| v.as_f64())
    }
    pub fn shared_bool(&self, name: &str) -> Option<bool> {
        self.shared.get(name).map(|v| v.as_bool())
    }
    pub fn input_f64(&self, input: usize, name: &str) -> Option<f64> {
        self.per_input.get(input)?.get(name).map(|v| v.as_f64())
    }
}

/// What a finished unit produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitOutput {
    pub unit: usize,
    pub file_name: String,
    /// Bytes written, and their sha256 (the whole shard, or the unit's part
    /// of it, starting at `offset`).
    pub size: u64,
    pub sha256: String,
    pub tensors: Vec<String>,
    /// Where a part's bytes start in its shard.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    /// A part's upload chunks' ids (object stores), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
    /// Tensors written with NaN or infinite values (reported as warnings).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub non_finite: Vec<NonFinite>,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

/// Non-finite values of one output tensor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonFinite {
    pub tensor: String,
    pub nan: u64,
    pub inf: u64,
}

#[cfg(test)]
mod tests;
