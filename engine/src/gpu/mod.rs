//! The GPU path: merge methods computed by the kernels of `kernels.cu`.
//!
//! With the cargo feature `cuda`, [`cuda::Gpu`] runs them on an NVIDIA GPU
//! through the CUDA driver API (cudarc, loaded at run time), the kernels
//! compiled at start-up by NVRTC, so building needs neither nvcc nor the CUDA
//! toolkit; running needs the driver (libcuda) and NVRTC (libnvrtc).
//!
//! What runs on the GPU: linear, task_arithmetic, ties, dare_linear and
//! dare_ties on BF16/F16/F32 tensors (see [`supports`]), with the CPU kernels'
//! arithmetic in the CPU kernels' order, so the bytes are the same: TIES's
//! top-k by the CPU's exact histogram selection (select.rs) with the same
//! per-chunk tie quotas, DARE's draws from the same counter-based generator.
//! Everything else runs on the CPU of the same worker.
//!
//! The orchestration below is written against [`Backend`] (buffers and kernel
//! launches, in order), so that the tests run the very same code and kernels
//! in a host emulator (`emu`: kernels.cu compiled as C++ with a small shim,
//! blocks of real threads with barriers) and compare the bytes with the CPU
//! path's, on machines without a GPU.

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(test)]
pub(crate) mod emu;

use crate::dtype::DType;
use crate::methods::gta::{self, DeviceKeep, DeviceSetup};
use crate::methods::select::{self, DigitState, TopK};
use crate::methods::{kernel, MergeJob, OutputView, TensorView};

/// The kernels' source.
pub const KERNELS: &str = include_str!("kernels.cu");

/// Elements per chunk: the CPU kernels' chunks (tie quotas are per chunk).
const CHUNK: usize = kernel::CHUNK;
/// Threads per block (gta_merge's shared arrays are sized for it).
pub const THREADS: u32 = 256;
/// Most task vectors gta_merge takes.
const MAX_STREAMS: usize = 16;
/// Bytes of raw input uploaded (and decoded) at a time.
pub const STAGING: usize = 32 << 20;

/// A failure of the GPU path.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "--device {device}: no CUDA driver (libcuda.so) could be loaded; a GPU worker needs the \
         NVIDIA driver (on Kubernetes: the NVIDIA device plugin and a GPU node)"
    )]
    NoDriver { device: String },
    #[error(
        "--device {device}: NVRTC (libnvrtc.so) could not be loaded; install the CUDA runtime \
         compiler (e.g. the nvidia-cuda-nvrtc-cu12 pip wheel, or the CUDA toolkit) and put it on \
         LD_LIBRARY_PATH"
    )]
    NoNvrtc { device: String },
    #[error("--device {device}: {message}")]
    Open { device: String, message: String },
    /// The device ran out of memory (the tensor is then merged on the CPU).
    #[error("CUDA: out of device memory")]
    OutOfMemory,
    #[error("CUDA: {0}")]
    Driver(String),
}

/// The kernels of kernels.cu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Decode,
    Encode,
    Linear,
    DigitHist,
    ChunkTies,
    L1Parts,
    GtaMerge,
    ApplyScale,
}

impl Kernel {
    pub const ALL: [Kernel; 8] = [
        Kernel::Decode,
        Kernel::Encode,
        Kernel::Linear,
        Kernel::DigitHist,
        Kernel::ChunkTies,
        Kernel::L1Parts,
        Kernel::GtaMerge,
        Kernel::ApplyScale,
    ];

    /// Position in [`Kernel::ALL`] (declaration order).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Decode => "decode",
            Kernel::Encode => "encode",
            Kernel::Linear => "linear",
            Kernel::DigitHist => "digit_hist",
            Kernel::ChunkTies => "chunk_ties",
            Kernel::L1Parts => "l1_parts",
            Kernel::GtaMerge => "gta_merge",
            Kernel::ApplyScale => "apply_scale",
        }
    }
}

/// A kernel argument: a device buffer (the kernel's pointer, whatever its
/// element type) or a scalar.
pub enum Arg<'a, B> {
    Buf(&'a B),
    I32(i32),
    U32(u32),
    U64(u64),
    F32(f32),
}

/// A device as the orchestration sees it: byte buffers and kernel launches,
/// executed in the order issued (one CUDA stream).
pub trait Backend {
    type Buf;
    /// A zeroed buffer of `bytes`.
    fn alloc(&self, bytes: usize) -> Result<Self::Buf, GpuError>;
    /// Copies `data` to the start of `dst` (after the work issued before).
    fn upload(&self, dst: &mut Self::Buf, data: &[u8]) -> Result<(), GpuError>;
    /// Copies the first `out.len()` bytes of `src` into `out`, once the work
    /// issued before is done.
    fn download(&self, src: &Self::Buf, out: &mut [u8]) -> Result<(), GpuError>;
    /// Launches `kernel` on `grid` blocks of `block` threads.
    fn launch(
        &self,
        kernel: Kernel,
        grid: u32,
        block: u32,
        args: &[Arg<'_, Self::Buf>],
    ) -> Result<(), GpuError>;
}

/// Whether the GPU path computes `method` on `job` into `out` (else the CPU does).
pub fn supports(method: &str, job: &MergeJob, out: &OutputView) -> bool {
    let dtype_ok = |d: DType| matches!(d, DType::BF16 | DType::F16 | DType::F32);
    // FP8 inputs, with block scales or without.
    let input_ok = |v: &TensorView| {
        (dtype_ok(v.dtype) && v.scale.is_none())
            || (v.dtype.is_fp8() && v.scale.is_none_or(|s| dtype_ok(s.dtype)))
    };
    if job.stream.is_some()
        || !dtype_ok(out.dtype)
        || job.numel() == 0
        || job.inputs.is_empty()
        || !job.inputs.iter().all(input_ok)
    {
        return false;
    }
    let family = job.base.is_some() && job.inputs.len() <= MAX_STREAMS + 1;
    match method {
        "linear" => true,
        "task_arithmetic" | "dare_linear" | "dare_ties" => family,
        // Small tensors replay torch's sort order on the CPU.
        "ties" => family && job.numel() > select::EXACT_LIMIT,
        _ => false,
    }
}

/// Device bytes [`merge`] needs for `job` at most.
pub fn device_bytes(job: &MergeJob) -> u64 {
    let n = job.numel() as u64;
    // Inputs as f32, the f32 result, the encoded output, the raw staging.
    n * 4 * (job.inputs.len() as u64 + 2) + STAGING as u64 + (16 << 20)
}

/// Computes `method` on `job` into `out` on `b` (for a job [`supports`] takes).
pub fn merge<B: Backend>(
    b: &B,
    method: &str,
    job: &MergeJob,
    out: &mut OutputView,
) -> Result<(), GpuError> {
    let n = job.numel();
    let xs = upload_inputs(b, job)?;
    let y = b.alloc(n * 4)?;
    if method == "linear" {
        linear(b, job, &xs, &y)?;
    } else {
        let setup = gta::device_setup(method, job)
            .ok_or_else(|| GpuError::Driver(format!("{method} has no device setup")))?;
        gta_family(b, job, &setup, &xs, &y)?;
    }
    let raw = b.alloc(out.bytes.len())?;
    b.launch(
        Kernel::Encode,
        grid(n),
        THREADS,
        &[
            Arg::Buf(&y),
            Arg::I32(dtype_code(out.dtype)),
            Arg::Buf(&raw),
            Arg::U64(n as u64),
        ],
    )?;
    b.download(&raw, out.bytes)
}

/// Every input decoded to f32, one after the other in one buffer, uploaded
/// [`STAGING`] bytes at a time.
fn upload_inputs<B: Backend>(b: &B, job: &MergeJob) -> Result<B::Buf, GpuError> {
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

fn linear<B: Backend>(b: &B, job: &MergeJob, xs: &B::Buf, y: &B::Buf) -> Result<(), GpuError> {
    let (w, sum) = crate::methods::linear_weights(job.params, job.inputs.len());
    let normalize = job.params.shared_bool("normalize").unwrap_or(true);
    let w = upload_vec(b, &w, |v| v.to_le_bytes())?;
    let n = job.numel();
    b.launch(
        Kernel::Linear,
        grid(n),
        THREADS,
        &[
            Arg::Buf(xs),
            Arg::Buf(&w),
            Arg::I32(job.inputs.len() as i32),
            Arg::I32(normalize as i32),
            Arg::F32(sum),
            Arg::Buf(y),
            Arg::U64(n as u64),
        ],
    )
}

/// task_arithmetic, ties, dare_linear, dare_ties (methods/gta.rs).
fn gta_family<B: Backend>(
    b: &B,
    job: &MergeJob,
    s: &DeviceSetup,
    xs: &B::Buf,
    y: &B::Buf,
) -> Result<(), GpuError> {
    let n = job.numel();
    let chunks = n.div_ceil(CHUNK);
    let k = s.streams.len();
    let ks: Vec<u64> = s
        .streams
        .iter()
        .map(|st| match st.keep {
            DeviceKeep::Top(k) => k,
            _ => n as u64,
        })
        .collect();
    let tops = if s
        .streams
        .iter()
        .any(|st| matches!(st.keep, DeviceKeep::Top(_)))
    {
        top_k(b, job, s, xs, &ks)?
    } else {
        vec![TopK::All; k]
    };
    // Per stream: mode (0 all, 1 nothing, 2 top-k, 3 random), threshold, p, key.
    let mut mode = Vec::with_capacity(k);
    let mut threshold = Vec::with_capacity(k);
    let mut quota = vec![0u32; k * chunks * 2];
    let mut p = Vec::with_capacity(k);
    let mut rng = Vec::with_capacity(k);
    for (i, (st, top)) in s.streams.iter().zip(&tops).enumerate() {
        let (m, t, pp, r): (i32, u32, f32, u64) = match (&st.keep, top) {
            (DeviceKeep::Random { p, key }, _) => (3, 0, *p, *key),
            (DeviceKeep::Top(_), TopK::Nothing) => (1, 0, 0.0, 0),
            (DeviceKeep::Top(_), TopK::Threshold { key, quota: q }) => {
                for (c, tq) in q.iter().enumerate().take(chunks) {
                    quota[(i * chunks + c) * 2] = tq.skip;
                    quota[(i * chunks + c) * 2 + 1] = tq.take;
                }
                (2, *key, 0.0, 0)
            }
            _ => (0, 0, 0.0, 0),
        };
        mode.push(m);
        threshold.push(t);
        p.push(pp);
        rng.push(r);
    }
    let d_quota = upload_vec(b, &quota, |v| v.to_le_bytes())?;
    let mut scale = vec![1.0f32; k];
    if s.rescale {
        // L1 norms before and after sparsifying, per chunk in element order
        // (as the CPU sums them), added up here in chunk order.
        let before = b.alloc(chunks * 8)?;
        let after = b.alloc(chunks * 8)?;
        for (i, st) in s.streams.iter().enumerate() {
            b.launch(
                Kernel::L1Parts,
                (chunks as u32).div_ceil(64),
                64,
                &[
                    Arg::Buf(xs),
                    Arg::I32(st.input as i32),
                    Arg::I32(s.base as i32),
                    Arg::U64(n as u64),
                    Arg::U32(CHUNK as u32),
                    Arg::U32(chunks as u32),
                    Arg::I32(mode[i]),
                    Arg::U32(threshold[i]),
                    Arg::Buf(&d_quota),
                    Arg::U64((i * chunks * 2) as u64),
                    Arg::F32(p[i]),
                    Arg::U64(rng[i]),
                    Arg::Buf(&before),
                    Arg::Buf(&after),
                ],
            )?;
            let bf = download_vec(b, &before, chunks, f64::from_le_bytes)?;
            let af = download_vec(b, &after, chunks, f64::from_le_bytes)?;
            let (mut before_sum, mut after_sum) = (0.0f64, 0.0f64);
            for (x, y) in bf.iter().zip(&af) {
                before_sum += x;
                after_sum += y;
            }
            // mergekit: rescale only when both norms are at least 1e-7.
            if before_sum >= 1e-7 && after_sum >= 1e-7 {
                scale[i] = (before_sum / after_sum) as f32;
            }
        }
    }
    let idx: Vec<i32> = s.streams.iter().map(|st| st.input as i32).collect();
    let weight: Vec<f32> = s.streams.iter().map(|st| st.weight).collect();
    let d_idx = upload_vec(b, &idx, |v| v.to_le_bytes())?;
    let d_mode = upload_vec(b, &mode, |v| v.to_le_bytes())?;
    let d_threshold = upload_vec(b, &threshold, |v| v.to_le_bytes())?;
    let d_p = upload_vec(b, &p, |v| v.to_le_bytes())?;
    let d_rng = upload_vec(b, &rng, |v| v.to_le_bytes())?;
    let d_scale = upload_vec(b, &scale, |v| v.to_le_bytes())?;
    let d_weight = upload_vec(b, &weight, |v| v.to_le_bytes())?;
    b.launch(
        Kernel::GtaMerge,
        chunks as u32,
        THREADS,
        &[
            Arg::Buf(xs),
            Arg::U64(n as u64),
            Arg::I32(s.base as i32),
            Arg::I32(k as i32),
            Arg::Buf(&d_idx),
            Arg::Buf(&d_mode),
            Arg::Buf(&d_threshold),
            Arg::Buf(&d_quota),
            Arg::U32(chunks as u32),
            Arg::Buf(&d_p),
            Arg::Buf(&d_rng),
            Arg::Buf(&d_scale),
            Arg::Buf(&d_weight),
            Arg::U32(CHUNK as u32),
            Arg::I32(s.sign_consensus as i32),
            Arg::I32(s.normalize as i32),
            Arg::F32(s.plain_divisor),
            Arg::F32(s.lambda),
            Arg::Buf(y),
        ],
    )
}

/// The CPU's exact top-k (select.rs) with the histograms and tie counts
/// computed on the device: three digit passes, then the threshold-equal keys
/// of every chunk.
fn top_k<B: Backend>(
    b: &B,
    job: &MergeJob,
    s: &DeviceSetup,
    xs: &B::Buf,
    ks: &[u64],
) -> Result<Vec<TopK>, GpuError> {
    let n = job.numel();
    let chunks = n.div_ceil(CHUNK);
    let mut state: Vec<DigitState> = select::initial_state(ks, n as u64);
    for &(shift, bits) in &select::DIGITS {
        let buckets = 1usize << bits;
        let mut hist = vec![0u64; state.len() * buckets];
        for (i, st) in state.iter().enumerate() {
            let Some((prefix, mask, _)) = *st else {
                continue;
            };
            let d_hist = b.alloc(buckets * 8)?;
            b.launch(
                Kernel::DigitHist,
                grid(n),
                THREADS,
                &[
                    Arg::Buf(xs),
                    Arg::I32(s.streams[i].input as i32),
                    Arg::I32(s.base as i32),
                    Arg::U64(n as u64),
                    Arg::U32(prefix),
                    Arg::U32(mask),
                    Arg::U32(shift),
                    Arg::U32(buckets as u32),
                    Arg::Buf(&d_hist),
                ],
            )?;
            let h = download_vec(b, &d_hist, buckets, u64::from_le_bytes)?;
            hist[i * buckets..(i + 1) * buckets].copy_from_slice(&h);
        }
        select::apply_digit(&mut state, &hist, (shift, bits));
    }
    let thresholds: Vec<Option<(u32, u64)>> = state
        .iter()
        .map(|st| st.map(|(key, _, left)| (key, left)))
        .collect();
    let mut eq = vec![Vec::new(); state.len()];
    for (i, t) in thresholds.iter().enumerate() {
        let Some((key, _)) = *t else {
            continue;
        };
        let counts = b.alloc(chunks * 4)?;
        b.launch(
            Kernel::ChunkTies,
            chunks as u32,
            THREADS,
            &[
                Arg::Buf(xs),
                Arg::I32(s.streams[i].input as i32),
                Arg::I32(s.base as i32),
                Arg::U64(n as u64),
                Arg::U32(key),
                Arg::U32(CHUNK as u32),
                Arg::Buf(&counts),
            ],
        )?;
        eq[i] = download_vec(b, &counts, chunks, u32::from_le_bytes)?;
    }
    Ok(select::finish(ks, &thresholds, chunks, |c, s| {
        eq[s].get(c).copied().unwrap_or(0)
    }))
}

/// A device buffer holding `v`.
fn upload_vec<B: Backend, T: Copy, const N: usize>(
    b: &B,
    v: &[T],
    bytes: impl Fn(T) -> [u8; N],
) -> Result<B::Buf, GpuError> {
    let data: Vec<u8> = v.iter().flat_map(|&x| bytes(x)).collect();
    let mut buf = b.alloc(data.len().max(N))?;
    b.upload(&mut buf, &data)?;
    Ok(buf)
}

/// The first `len` values of `buf`.
fn download_vec<B: Backend, T, const N: usize>(
    b: &B,
    buf: &B::Buf,
    len: usize,
    value: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>, GpuError> {
    let mut data = vec![0u8; len * N];
    b.download(buf, &mut data)?;
    Ok(data
        .chunks_exact(N)
        .map(|c| value(c.try_into().unwrap_or([0; N])))
        .collect())
}

/// The kernels' code of a stored element type.
fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 2,
        DType::F8_E4M3 => 3,
        DType::F8_E5M2 => 4,
        _ => 1,
    }
}

/// Blocks of a grid-stride launch over `n` elements.
fn grid(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).clamp(1, 65_535) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::kernel::testing::{num, params};
    use crate::methods::{self, TensorView};
    use crate::unit::TensorParams;

    /// Runs `method` on `job` on the CPU and through the emulated GPU path
    /// (which must take it) into `out_dtype`; returns both outputs.
    fn cpu_and_gpu(method: &str, job: &MergeJob, out_dtype: DType) -> (Vec<u8>, Vec<u8>) {
        let n = job.numel() * out_dtype.size();
        let (mut cpu, mut gpu) = (vec![0u8; n], vec![0u8; n]);
        methods::get(method)
            .unwrap()
            .merge(
                job,
                &mut OutputView {
                    dtype: out_dtype,
                    bytes: &mut cpu,
                },
            )
            .unwrap();
        let mut out = OutputView {
            dtype: out_dtype,
            bytes: &mut gpu,
        };
        assert!(supports(method, job, &out), "{method} not on the GPU path");
        merge(&emu::Emu::new(), method, job, &mut out).unwrap();
        (cpu, gpu)
    }

    /// [`cpu_and_gpu`] on f32 values stored as `in_dtype`.
    fn both(
        method: &str,
        shape: &[u64],
        inputs: &[Vec<f32>],
        base: Option<usize>,
        p: &TensorParams,
        in_dtype: DType,
        out_dtype: DType,
    ) -> (Vec<u8>, Vec<u8>) {
        let encoded = crate::methods::kernel::testing::encode(inputs, in_dtype);
        let job = MergeJob {
            name: "model.layers.3.mlp.down_proj.weight",
            shape,
            inputs: encoded
                .iter()
                .map(|b| TensorView {
                    dtype: in_dtype,
                    bytes: b,
                    scale: None,
                })
                .collect(),
            base,
            params: p,
            seed: 1234,
            stream: None,
        };
        cpu_and_gpu(method, &job, out_dtype)
    }

    /// Task-vector-like inputs: a base and fine-tunes that move part of it,
    /// in bf16 steps so that many magnitudes tie.
    fn models(n: usize, count: usize) -> Vec<Vec<f32>> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let base: Vec<f32> = (0..n).map(|_| next() * 0.05).collect();
        let mut out = vec![base.clone()];
        for m in 1..count {
            out.push(
                base.iter()
                    .enumerate()
                    .map(|(i, &b)| {
                        if (i + m) % 7 == 0 {
                            b
                        } else {
                            b + (next() * 0.01 * m as f32)
                        }
                    })
                    .collect(),
            );
        }
        // Base last, as the planner appends it.
        out.rotate_left(1);
        out
    }

    #[test]
    fn emulated_gpu_merges_are_byte_identical_to_the_cpu() {
        // 3 chunks and a tail; above EXACT_LIMIT so TIES selects on the GPU.
        let (rows, cols) = (300u64, 331u64);
        let n = (rows * cols) as usize;
        let inputs = models(n, 4);
        let base = Some(3);
        // Per fine-tune: weight and density (a negative weight; density 1 keeps all).
        let family = |shared: &[(&str, crate::unit::ParamValue)]| {
            params(
                shared,
                &[
                    &[("weight", num(0.7)), ("density", num(0.3))],
                    &[("weight", num(-0.4)), ("density", num(0.55))],
                    &[("weight", num(1.1)), ("density", num(1.0))],
                    &[],
                ],
            )
        };
        let flag = crate::methods::kernel::testing::flag;
        let cases: Vec<(&str, TensorParams)> = vec![
            (
                "linear",
                params(
                    &[],
                    &[
                        &[("weight", num(0.7))],
                        &[("weight", num(-0.4))],
                        &[("weight", num(1.1))],
                        &[("weight", num(0.2))],
                    ],
                ),
            ),
            ("ties", family(&[])),
            ("dare_ties", family(&[])),
            ("dare_linear", family(&[("lambda", num(0.8))])),
            ("task_arithmetic", family(&[("normalize", flag(true))])),
            // TIES with DARE's rescale switched on, and lambda.
            (
                "ties",
                family(&[("rescale", flag(true)), ("lambda", num(1.5))]),
            ),
        ];
        for (method, p) in &cases {
            for (i, o) in [
                (DType::BF16, DType::BF16),
                (DType::F32, DType::F32),
                (DType::F16, DType::F16),
                (DType::BF16, DType::F16),
            ] {
                let (cpu, gpu) = both(method, &[rows, cols], &inputs, base, p, i, o);
                let differ = cpu
                    .chunks(o.size())
                    .zip(gpu.chunks(o.size()))
                    .filter(|(a, b)| a != b)
                    .count();
                assert_eq!(
                    differ, 0,
                    "{method} {i}->{o}: {differ} of {n} elements differ"
                );
            }
        }
    }

    #[test]
    fn emulated_top_k_keeps_the_cpu_tie_quotas() {
        // Every magnitude in a handful of values: the threshold key is shared
        // by thousands of elements across chunks.
        let n = 5 * CHUNK + 77;
        let base = vec![0.0f32; n];
        let a: Vec<f32> = (0..n).map(|i| [0.5, -0.25, 0.125, 0.0][i % 4]).collect();
        let b: Vec<f32> = (0..n)
            .map(|i| [0.25, 0.25, -0.5, 0.125][(i / 3) % 4])
            .collect();
        // One magnitude everywhere: every element ties, and every rank counts.
        let c: Vec<f32> = (0..n).map(|i| [0.25, -0.25][i % 2]).collect();
        let p = params(
            &[],
            &[
                &[("weight", num(1.0)), ("density", num(0.4))],
                &[("weight", num(0.5)), ("density", num(0.1))],
                &[("weight", num(0.8)), ("density", num(0.37))],
                &[],
            ],
        );
        let (cpu, gpu) = both(
            "ties",
            &[n as u64],
            &[a, b, c, base],
            Some(3),
            &p,
            DType::F32,
            DType::F32,
        );
        assert!(cpu == gpu, "tie handling differs");
    }

    /// F16 and BF16 conversions on the device match the CPU's (the half
    /// crate) bit for bit: every F16 code decoded, and f32 values around every
    /// rounding case (ties, subnormals, overflow, infinities, NaN payloads)
    /// encoded, through a linear "merge" of one model with weight 1.
    #[test]
    fn emulated_conversions_match_the_cpu_bit_for_bit() {
        let p = params(&[], &[&[("weight", num(1.0))]]);
        let copy = |bytes: &[u8], from: DType, to: DType| -> (Vec<u8>, Vec<u8>) {
            let n = bytes.len() / from.size();
            let shape = [n as u64];
            let job = MergeJob {
                name: "t",
                shape: &shape,
                inputs: vec![TensorView {
                    dtype: from,
                    bytes,
                    scale: None,
                }],
                base: None,
                params: &p,
                seed: 0,
                stream: None,
            };
            cpu_and_gpu("linear", &job, to)
        };
        // Every F16 code, decoded to f32.
        let codes: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
        let (cpu, gpu) = copy(&codes, DType::F16, DType::F32);
        let nan_blind = |b: &[u8]| {
            let v = f32::from_le_bytes(b.try_into().unwrap());
            if v.is_nan() {
                u32::MAX
            } else {
                v.to_bits()
            }
        };
        for (i, (a, b)) in cpu.chunks(4).zip(gpu.chunks(4)).enumerate() {
            // fma(NaN, 1, 0) may quiet a NaN on either side: only NaN-ness must agree.
            assert_eq!(nan_blind(a), nan_blind(b), "f16 code {i:#06x}");
        }
        // f32 bit patterns around every f16 and bf16 rounding boundary.
        let mut values: Vec<u32> = Vec::new();
        for h in (0..=u16::MAX).step_by(7) {
            let f = half::f16::from_bits(h).to_f32().to_bits();
            for d in [
                0u32, 1, 0xfff, 0x1000, 0x1001, 0x2000, 0x7fff, 0x8000, 0x8001,
            ] {
                values.push(f.wrapping_add(d));
                values.push(f.wrapping_sub(d));
            }
        }
        values.extend([
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0x7fc0_1234,
            0x0000_0001,
            0x3380_0000,
        ]);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        for to in [DType::F16, DType::BF16] {
            let (cpu, gpu) = copy(&bytes, DType::F32, to);
            for (i, (a, b)) in cpu.chunks(2).zip(gpu.chunks(2)).enumerate() {
                let v = f32::from_bits(values[i]);
                if v.is_nan() {
                    // NaN payloads may differ (a GPU's arithmetic returns its
                    // canonical NaN): both must be NaN.
                    let is_nan = |b: &[u8]| {
                        let h = u16::from_le_bytes([b[0], b[1]]);
                        match to {
                            DType::F16 => half::f16::from_bits(h).is_nan(),
                            _ => half::bf16::from_bits(h).is_nan(),
                        }
                    };
                    assert!(is_nan(a) && is_nan(b), "{to} of NaN {:#010x}", values[i]);
                    continue;
                }
                assert_eq!(a, b, "{to} of {:#010x} ({v:e})", values[i]);
            }
        }
    }

    /// FP8 inputs as DeepSeek-V3 stores them (E4M3 with F32 scales per
    /// 128 x 128 block, on a shape that is no multiple of the block), and every
    /// E4M3 / E5M2 code: the same bytes on the emulated GPU as on the CPU.
    #[test]
    fn emulated_fp8_inputs_match_the_cpu() {
        use crate::methods::kernel::BlockScale;
        let (rows, cols) = (300usize, 331usize);
        let n = rows * cols;
        let (sr, sc) = (rows.div_ceil(128), cols.div_ceil(128));
        let mut x = 0x9e37_79b9u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        // Four models' codes (never the NaN codes 0x7f, 0xff) and F32 scales.
        let codes: Vec<Vec<u8>> = (0..4)
            .map(|_| {
                (0..n)
                    .map(|_| match (next() % 254) as u8 {
                        c if c >= 0x7f => c + 1,
                        c => c,
                    })
                    .collect()
            })
            .collect();
        let scales: Vec<Vec<u8>> = (0..4)
            .map(|_| {
                (0..sr * sc)
                    .flat_map(|_| ((next() % 1000) as f32 * 1e-5 + 1e-4).to_le_bytes())
                    .collect()
            })
            .collect();
        let p4 = params(
            &[],
            &[
                &[("weight", num(0.7)), ("density", num(0.3))],
                &[("weight", num(0.5)), ("density", num(0.6))],
                &[("weight", num(0.2)), ("density", num(0.9))],
                &[("weight", num(0.1))],
            ],
        );
        let run = |method: &str,
                   dtype: DType,
                   codes: &[&[u8]],
                   scales: Option<&[Vec<u8>]>,
                   shape: &[u64],
                   base: Option<usize>,
                   p: &TensorParams,
                   out_dtype: DType| {
            let job = MergeJob {
                name: "model.layers.5.mlp.experts.3.up_proj.weight",
                shape,
                inputs: codes
                    .iter()
                    .enumerate()
                    .map(|(i, b)| TensorView {
                        dtype,
                        bytes: b,
                        scale: scales.map(|s| BlockScale {
                            dtype: DType::F32,
                            bytes: &s[i],
                            cols,
                            block_rows: 128,
                            block_cols: 128,
                            scale_cols: sc,
                        }),
                    })
                    .collect(),
                base,
                params: p,
                seed: 99,
                stream: None,
            };
            cpu_and_gpu(method, &job, out_dtype)
        };
        let refs: Vec<&[u8]> = codes.iter().map(|c| c.as_slice()).collect();
        let shape = [rows as u64, cols as u64];
        for method in ["linear", "ties", "dare_ties"] {
            let base = (method != "linear").then_some(3);
            let (cpu, gpu) = run(
                method,
                DType::F8_E4M3,
                &refs,
                Some(&scales),
                &shape,
                base,
                &p4,
                DType::BF16,
            );
            assert!(cpu == gpu, "{method}: block-scaled E4M3 differs");
        }
        // Every code of both formats, decoded (weight 1, no scale).
        let all: Vec<u8> = (0..=255).collect();
        let one = params(&[], &[&[("weight", num(1.0))]]);
        for dtype in [DType::F8_E4M3, DType::F8_E5M2] {
            let (cpu, gpu) = run(
                "linear",
                dtype,
                &[&all],
                None,
                &[256],
                None,
                &one,
                DType::F32,
            );
            for (code, (a, b)) in cpu.chunks(4).zip(gpu.chunks(4)).enumerate() {
                let (a, b) = (
                    f32::from_le_bytes(a.try_into().unwrap()),
                    f32::from_le_bytes(b.try_into().unwrap()),
                );
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "{dtype} code {code:#04x}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn kernels_are_listed_in_index_order() {
        for (i, k) in Kernel::ALL.iter().enumerate() {
            assert_eq!(k.index(), i, "{}", k.name());
        }
    }

    #[test]
    fn the_gpu_path_declines_what_it_does_not_compute() {
        let v = vec![0u8; 8];
        let p = TensorParams::default();
        let view = |dtype| TensorView {
            dtype,
            bytes: &v,
            scale: None,
        };
        let job = |dtype, base| MergeJob {
            name: "t",
            shape: &[4],
            inputs: vec![view(dtype), view(dtype)],
            base,
            params: &p,
            seed: 0,
            stream: None,
        };
        let mut bytes = vec![0u8; 8];
        let out = OutputView {
            dtype: DType::BF16,
            bytes: &mut bytes,
        };
        assert!(supports("linear", &job(DType::BF16, None), &out));
        assert!(supports("linear", &job(DType::F16, None), &out));
        assert!(supports("linear", &job(DType::F8_E4M3, None), &out));
        assert!(!supports("linear", &job(DType::I32, None), &out));
        assert!(!supports("slerp", &job(DType::BF16, Some(1)), &out));
        assert!(!supports("task_arithmetic", &job(DType::BF16, None), &out));
        // 4 elements: TIES replays torch's sort on the CPU.
        assert!(!supports("ties", &job(DType::BF16, Some(1)), &out));
        assert!(supports("dare_ties", &job(DType::BF16, Some(1)), &out));
    }
}
