//! Inputs up, output down: every input's stored bytes uploaded [`STAGING`]
//! bytes at a time and decoded to f32 on the device (an FP8 weight's block
//! scales applied), and the f32 result encoded to the output's dtype and
//! downloaded.

use super::backend::{dtype_code, grid, Arg, Backend, Kernel};
use super::{GpuError, STAGING, THREADS};
use crate::methods::{MergeJob, OutputView};

/// Every input decoded to f32, one after the other in one buffer, uploaded
/// [`STAGING`] bytes at a time.
pub(super) fn upload_inputs<B: Backend>(b: &B, job: &MergeJob) -> Result<B::Buf, GpuError> {
    let n = job.numel();
    let xs = b.alloc(n * 4 * job.inputs.len())?;
    let largest = job.inputs.iter().map(|v| v.bytes.len()).max().unwrap_or(0);
    let mut raw = b.alloc(STAGING.min(largest).max(1))?;
    for (i, input) in job.inputs.iter().enumerate() {
        let size = input.dtype.size();
        let per = STAGING / size;
        let mut start = 0;
        while start < n {
            let count = per.min(n - start);
            b.upload(&mut raw, &input.bytes[start * size..(start + count) * size])?;
            b.launch(
                Kernel::Decode,
                grid(count),
                THREADS,
                &[
                    Arg::Buf(&raw),
                    Arg::I32(dtype_code(input.dtype)),
                    Arg::Buf(&xs),
                    Arg::U64((i * n + start) as u64),
                    Arg::U64(count as u64),
                ],
            )?;
            start += count;
        }
        if let Some(scale) = &input.scale {
            let scales = b.alloc(scale.bytes.len())?;
            let mut scales = scales;
            b.upload(&mut scales, scale.bytes)?;
            b.launch(
                Kernel::ApplyScale,
                grid(n),
                THREADS,
                &[
                    Arg::Buf(&xs),
                    Arg::U64((i * n) as u64),
                    Arg::U64(n as u64),
                    Arg::Buf(&scales),
                    Arg::I32(dtype_code(scale.dtype)),
                    Arg::U64(scale.cols.max(1) as u64),
                    Arg::U64(scale.block_rows.max(1) as u64),
                    Arg::U64(scale.block_cols.max(1) as u64),
                    Arg::U64(scale.scale_cols as u64),
                ],
            )?;
        }
    }
    Ok(xs)
}

/// Encodes the f32 result `y` of `n` elements to `out`'s dtype on the device
/// and downloads it into `out`.
pub(super) fn download_output<B: Backend>(
    b: &B,
    y: &B::Buf,
    n: usize,
    out: &mut OutputView,
) -> Result<(), GpuError> {
    let raw = b.alloc(out.bytes.len())?;
    b.launch(
        Kernel::Encode,
        grid(n),
        THREADS,
        &[
            Arg::Buf(y),
            Arg::I32(dtype_code(out.dtype)),
            Arg::Buf(&raw),
            Arg::U64(n as u64),
        ],
    )?;
    b.download(&raw, out.bytes)
}
