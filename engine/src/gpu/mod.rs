//! The GPU path: the [`DeviceOp`]s of merge methods computed by the kernels of
//! `kernels.cu`.
//!
//! With the cargo feature `cuda`, `cuda::Gpu` runs them on an NVIDIA GPU
//! through the CUDA driver API (cudarc, loaded at run time), the kernels
//! compiled at start-up by NVRTC, so building needs neither nvcc nor the CUDA
//! toolkit; running needs the driver (libcuda) and NVRTC (libnvrtc). Without
//! it, this host code is compiled (and type-checked) but never run.
//!
//! What runs on the GPU is what a method describes as a [`DeviceOp`]
//! ([`MergeMethod::device_op`], see [`crate::methods::device`]): today linear,
//! task_arithmetic, ties, dare_linear and dare_ties, on BF16/F16/F32 and FP8
//! inputs ([`accept`]), with the CPU merge's arithmetic in its order, so the
//! bytes are the same: TIES's top-k by the CPU's exact histogram selection
//! with the same per-chunk tie quotas, DARE's draws from the same counter-based
//! generator. Everything else runs on the CPU of the same worker.
//!
//! [`run`] computes one op on any [`Backend`] (buffers and kernel launches, in
//! order): inputs decoded on the device (`convert.rs`), the op (`weighted_sum.rs`,
//! `task_vectors.rs`), the output encoded. The tests run the very same code and
//! kernels in a host emulator (`emu`: kernels.cu compiled as C++ with a small
//! shim, blocks of real threads with barriers) and compare the bytes with the
//! CPU path's, on machines without a GPU.

mod backend;
mod convert;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(test)]
pub(crate) mod emu;
mod error;
mod task_vectors;
#[cfg(test)]
mod tests;
mod weighted_sum;

pub use backend::{Arg, Backend, Kernel};
pub use error::{GpuError, OpenError};

use crate::dtype::DType;
use crate::methods::device::DeviceOp;
use crate::methods::{MergeJob, MergeMethod, OutputView, TensorView};

/// The kernels' source.
pub const KERNELS: &str = include_str!("kernels.cu");

/// Threads per block (gta_merge's shared arrays are sized for it).
pub const THREADS: u32 = 256;
/// Most task vectors gta_merge takes.
const MAX_STREAMS: usize = 16;
/// Bytes of raw input uploaded (and decoded) at a time.
pub const STAGING: usize = 32 << 20;

/// The op the GPU path computes `job` with, if it takes the job: `method`'s
/// device op, for a job whose inputs it decodes and whose output it encodes,
/// within its kernels' limits. `None`: the CPU merges it.
pub fn accept(method: &dyn MergeMethod, job: &MergeJob, out: &OutputView) -> Option<DeviceOp> {
    let dtype_ok = |d: DType| matches!(d, DType::BF16 | DType::F16 | DType::F32);
    // FP8 inputs, with block scales or without; LoRA-adapted and packed
    // (MXFP4) inputs are merged on the CPU.
    let input_ok = |v: &TensorView| {
        v.lora.is_none()
            && v.packed.is_none()
            && ((dtype_ok(v.dtype) && v.scale.is_none())
                || (v.dtype.is_fp8() && v.scale.is_none_or(|s| dtype_ok(s.dtype))))
    };
    if job.stream.is_some()
        || !dtype_ok(out.dtype)
        || job.numel() == 0
        || job.inputs.is_empty()
        || !job.inputs.iter().all(input_ok)
    {
        return None;
    }
    let op = method.device_op(job)?;
    let fits = match &op {
        DeviceOp::WeightedSum(_) => true,
        DeviceOp::TaskVectors(t) => t.streams.len() <= MAX_STREAMS,
    };
    fits.then_some(op)
}

/// Device bytes [`run`] needs for `job` at most.
pub fn device_bytes(job: &MergeJob) -> u64 {
    let n = job.numel() as u64;
    // Inputs as f32, the f32 result, the encoded output, the raw staging.
    n * 4 * (job.inputs.len() as u64 + 2) + STAGING as u64 + (16 << 20)
}

/// Computes `op` (what [`accept`] returned for `job`) on `b` into `out`.
pub fn run<B: Backend>(
    b: &B,
    op: &DeviceOp,
    job: &MergeJob,
    out: &mut OutputView,
) -> Result<(), GpuError> {
    let n = job.numel();
    let xs = convert::upload_inputs(b, job)?;
    let y = b.alloc(n * 4)?;
    match op {
        DeviceOp::WeightedSum(op) => weighted_sum::run(b, op, n, &xs, &y)?,
        DeviceOp::TaskVectors(op) => task_vectors::run(b, op, n, &xs, &y)?,
    }
    convert::download_output(b, &y, n, out)
}
