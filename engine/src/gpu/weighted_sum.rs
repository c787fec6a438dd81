//! [`WeightedSumOp`] (linear) on the device: one launch of the `linear` kernel.

use super::backend::{grid, upload_vec, Arg, Backend, Kernel};
use super::{GpuError, THREADS};
use crate::methods::device::WeightedSumOp;

/// `y` (n elements) from the decoded inputs `xs`.
pub(super) fn run<B: Backend>(
    b: &B,
    op: &WeightedSumOp,
    n: usize,
    xs: &B::Buf,
    y: &B::Buf,
) -> Result<(), GpuError> {
    let w = upload_vec(b, &op.weights, |v| v.to_le_bytes())?;
    b.launch(
        Kernel::Linear,
        grid(n),
        THREADS,
        &[
            Arg::Buf(xs),
            Arg::Buf(&w),
            Arg::I32(op.weights.len() as i32),
            Arg::I32(op.normalize as i32),
            Arg::F32(op.sum),
            Arg::Buf(y),
            Arg::U64(n as u64),
        ],
    )
}
