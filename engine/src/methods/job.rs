//! What a method is given to compute one output tensor: the [`MergeJob`]
//! (name, shape, parameters, seed, and a [`TensorView`] of each input's raw
//! bytes, with the [`BlockScale`]s of an FP8 weight, the codes and scales of
//! a packed one ([`PackedView`]) and the LoRA delta of an adapted one), the
//! [`OutputView`] it
//! writes, and, for a tensor too large to hold, the [`Segments`] source it is
//! streamed through. A [`Chunk`] is what the helpers of [`super::chunked`] hand
//! a method's closures.

use super::{MethodError, TensorParams};
use crate::dtype::{decode_f32, DType};

/// Raw bytes of one input tensor.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
    /// Block scales of an FP8 weight: it is dequantized on read.
    pub scale: Option<BlockScale<'a>>,
    /// A LoRA adapter: its delta is added to each decoded chunk (after the
    /// block scales).
    pub lora: Option<super::lora::LoraDelta<'a>>,
    /// A packed input (MXFP4): `bytes` are unused, the view's elements are
    /// those of the decoded tensor.
    pub packed: Option<PackedView<'a>>,
}

pub use crate::dtype::packed::PackedView;

/// The block scales of a 2-D FP8 weight (DeepSeek-V3's `weight_scale_inv`):
/// element (r, c) is `fp8 · scale[r / block_rows][c / block_cols]`.
#[derive(Debug, Clone, Copy)]
pub struct BlockScale<'a> {
    /// Float dtype of the scales and their raw bytes, row-major.
    pub dtype: DType,
    pub bytes: &'a [u8],
    /// Columns of the weight.
    pub cols: usize,
    pub block_rows: usize,
    pub block_cols: usize,
    /// Columns of the scale grid.
    pub scale_cols: usize,
}

impl BlockScale<'_> {
    fn at(&self, i: usize) -> f32 {
        let size = self.dtype.size();
        let mut v = [0f32; 1];
        decode_f32(self.dtype, &self.bytes[i * size..(i + 1) * size], &mut v);
        v[0]
    }

    /// Multiplies the dequantized FP8 values of elements `start..start + len`
    /// (in `buf`) by their blocks' scales.
    pub(super) fn apply(&self, start: usize, buf: &mut [f32]) {
        let cols = self.cols.max(1);
        let mut e = 0;
        while e < buf.len() {
            let idx = start + e;
            let (r, c) = (idx / cols, idx % cols);
            // A run of elements within one row and one block.
            let run = (self.block_cols - c % self.block_cols)
                .min(cols - c)
                .min(buf.len() - e);
            let s = self.at((r / self.block_rows) * self.scale_cols + c / self.block_cols);
            for x in &mut buf[e..e + run] {
                *x *= s;
            }
            e += run;
        }
    }
}

/// Where a streamed tensor's inputs come from and where its output goes.
pub trait Segments: Sync {
    /// Elements per segment wanted; helpers round it down to a multiple of
    /// their chunk size (at least one chunk).
    fn elements(&self) -> usize;
    /// Calls `f` with every input's bytes of elements `range`, in input order.
    /// A source that fails records its error (the caller reports it) and hands
    /// `f` zeros, so that the method runs to its end harmlessly.
    fn with_inputs(&self, range: std::ops::Range<usize>, f: &mut dyn FnMut(&[&[u8]]));
    /// Takes the next segment of output bytes (segments come in order).
    fn emit(&self, bytes: &[u8]);
}

/// Raw bytes of the output tensor.
#[derive(Debug)]
pub struct OutputView<'a> {
    pub dtype: DType,
    pub bytes: &'a mut [u8],
}

/// One output tensor's worth of work for a method.
#[derive(Debug)]
pub struct MergeJob<'a> {
    /// Output tensor name (keys the random generator; names errors).
    pub name: &'a str,
    pub shape: &'a [u64],
    /// Inputs in source order (YAML order; an appended base comes last).
    pub inputs: Vec<TensorView<'a>>,
    /// Index of the base model in `inputs`.
    pub base: Option<usize>,
    pub params: &'a TensorParams,
    /// `--random-seed` (or the documented default).
    pub seed: u64,
    /// Set when the tensor is streamed: `inputs` then carry dtypes and scales
    /// but no bytes, and `out` holds one segment (see [`Segments`]).
    pub stream: Option<&'a dyn Segments>,
}

impl std::fmt::Debug for dyn Segments + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Segments({} elements)", self.elements())
    }
}

impl MergeJob<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product::<u64>() as usize
    }

    /// Length of the last axis (a 1-D tensor is one row; a scalar a row of one).
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1).max(1) as usize
    }

    /// The non-base inputs, in order.
    pub fn non_base(&self) -> Vec<usize> {
        (0..self.inputs.len())
            .filter(|&i| Some(i) != self.base)
            .collect()
    }

    pub fn invalid(&self, method: &'static str, message: impl Into<String>) -> MethodError {
        MethodError::Invalid {
            method,
            message: format!("{}: {}", self.name, message.into()),
        }
    }
}

/// A chunk: elements `start..start + len` of the flattened tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub index: usize,
    pub start: usize,
    pub len: usize,
}
