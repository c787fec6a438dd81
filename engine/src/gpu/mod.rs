//! The CUDA path (cargo feature `cuda`): merge methods computed on an NVIDIA
//! GPU through the CUDA driver API (cudarc), with kernels compiled at run time
//! by NVRTC (`kernels.cu`), so that building needs neither nvcc nor the CUDA
//! toolkit; running needs the driver (libcuda) and NVRTC (libnvrtc).
//!
//! On the GPU: linear, task_arithmetic, ties, dare_linear and dare_ties on
//! BF16/F32 tensors (top-k thresholds by histogram passes on the device, the
//! same selection as the CPU's; DARE's draws from the same counter-based
//! generator), bit-identical to the CPU kernels. Everything else (the other
//! methods, F16/FP8 inputs, tensors of at most 65,536 elements whose TIES
//! selection replays torch's sort, streamed tensors, re-quantized FP8) runs on
//! the CPU of the same worker. Each merge runs on a stream of its own, so the
//! tensors of a window and the units of several slots overlap on the device;
//! inputs go up through pinned staging buffers, double-buffered, so that
//! copying the next piece out of the page cache overlaps the transfer.

use crate::dtype::DType;
use crate::methods::gta::{self, DeviceKeep};
use crate::methods::select::{self, DigitState, TopK};
use crate::methods::{kernel, MergeJob, OutputView};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};
use std::sync::{Arc, Mutex};

/// The kernels' source, compiled when a device is opened.
pub const KERNELS: &str = include_str!("kernels.cu");

/// Elements per chunk: the CPU kernels' chunks (tie quotas are per chunk).
const CHUNK: usize = kernel::CHUNK;
const THREADS: u32 = 256;
const MAX_STREAMS: usize = 16;
/// Bytes of one pinned staging buffer.
const STAGING: usize = 32 << 20;

/// A failure of the CUDA path.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "--device {device}: no CUDA driver (libcuda.so) could be loaded; a GPU worker needs the \
         NVIDIA driver (on Kubernetes: the NVIDIA device plugin and a GPU node)"
    )]
    NoDriver { device: String },
    #[error(
        "--device {device}: NVRTC (libnvrtc.so) could not be loaded; install the CUDA runtime \
         compiler (e.g. the nvidia-cuda-nvrtc pip wheel, or the CUDA toolkit) and put it on \
         LD_LIBRARY_PATH"
    )]
    NoNvrtc { device: String },
    #[error("--device {device}: {message}")]
    Open { device: String, message: String },
    #[error("CUDA: {0}")]
    Driver(String),
}

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        GpuError::Driver(e.to_string())
    }
}

/// Compiles the kernels to PTX (NVRTC only: no GPU needed).
pub fn compile() -> Result<cudarc::nvrtc::Ptx, String> {
    cudarc::nvrtc::compile_ptx_with_opts(
        KERNELS,
        cudarc::nvrtc::CompileOptions {
            // Bit-exact with the CPU: no contraction, IEEE division, denormals kept.
            fmad: Some(false),
            ftz: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            name: Some("fleetmerge_kernels.cu".into()),
            ..Default::default()
        },
    )
    .map_err(|e| format!("compiling the kernels with NVRTC: {e}"))
}

/// Whether libnvrtc can be loaded (cudarc panics on use otherwise).
pub fn nvrtc_present() -> bool {
    // SAFETY: only probes for the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// One GPU, its kernels, and pinned staging buffers.
pub struct Gpu {
    name: String,
    ctx: Arc<CudaContext>,
    _module: Arc<CudaModule>,
    f: Functions,
    staging: Mutex<Vec<[Staging; 2]>>,
}

/// A pinned host buffer and the event of its last transfer.
type Staging = (PinnedHostSlice<u8>, CudaEvent);

struct Functions {
    decode: CudaFunction,
    encode: CudaFunction,
    linear: CudaFunction,
    digit_hist: CudaFunction,
    chunk_ties: CudaFunction,
    l1_parts: CudaFunction,
    gta_merge: CudaFunction,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.name)
    }
}

impl Gpu {
    /// Opens GPU `ordinal` (`device` names it in errors) and compiles the kernels.
    pub fn open(device: &str, ordinal: usize) -> Result<Gpu, GpuError> {
        let open_err = |message: String| GpuError::Open {
            device: device.to_string(),
            message,
        };
        // SAFETY: only probes for the library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver {
                device: device.into(),
            });
        }
        if !nvrtc_present() {
            return Err(GpuError::NoNvrtc {
                device: device.into(),
            });
        }
        let count = CudaContext::device_count().map_err(|e| open_err(e.to_string()))?;
        if ordinal >= count.max(0) as usize {
            return Err(open_err(format!(
                "there is no GPU {ordinal}: this machine has {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| open_err(e.to_string()))?;
        let ptx = compile().map_err(open_err)?;
        let module = ctx.load_module(ptx).map_err(|e| open_err(e.to_string()))?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| open_err(format!("kernel {name}: {e}")))
        };
        let f = Functions {
            decode: load("decode")?,
            encode: load("encode")?,
            linear: load("linear")?,
            digit_hist: load("digit_hist")?,
            chunk_ties: load("chunk_ties")?,
            l1_parts: load("l1_parts")?,
            gta_merge: load("gta_merge")?,
        };
        let name = format!(
            "cuda:{ordinal} ({})",
            ctx.name().unwrap_or_else(|_| "unknown GPU".into())
        );
        Ok(Gpu {
            name,
            ctx,
            _module: module,
            f,
            staging: Mutex::new(Vec::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this path computes `method` on `job` into `out` (else the CPU does).
    pub fn supports(&self, method: &str, job: &MergeJob, out: &OutputView) -> bool {
        let dtype_ok = |d: DType| matches!(d, DType::BF16 | DType::F32);
        if job.stream.is_some()
            || !dtype_ok(out.dtype)
            || job.numel() == 0
            || job.inputs.is_empty()
            || job
                .inputs
                .iter()
                .any(|v| !dtype_ok(v.dtype) || v.scale.is_some())
        {
            return false;
        }
        match method {
            "linear" => true,
            "task_arithmetic" | "dare_linear" | "dare_ties" => {
                job.base.is_some() && job.inputs.len() <= MAX_STREAMS + 1
            }
            // Small tensors replay torch's sort order on the CPU.
            "ties" => {
                job.base.is_some()
                    && job.inputs.len() <= MAX_STREAMS + 1
                    && job.numel() > select::EXACT_LIMIT
            }
            _ => false,
        }
    }

    /// Whether the device has room for `job` now (inputs as f32, the raw
    /// bytes of one, the output); the CPU takes it otherwise.
    fn fits(&self, job: &MergeJob) -> bool {
        let n = job.numel() as u64;
        let need = n * 4 * (job.inputs.len() as u64 + 2) + n * 4 + (64 << 20);
        // Bind the context to this (rayon) thread before querying it.
        if self.ctx.bind_to_thread().is_err() {
            return false;
        }
        match self.ctx.mem_get_info() {
            Ok((free, _)) => need <= free as u64 * 9 / 10,
            Err(_) => false,
        }
    }

    /// Computes `method` on `job` into `out` on the GPU; `None` when this path
    /// does not take it (see [`Gpu::supports`]) or the device is full.
    pub fn merge(
        &self,
        method: &str,
        job: &MergeJob,
        out: &mut OutputView,
    ) -> Option<Result<(), GpuError>> {
        if !self.supports(method, job, out) || !self.fits(job) {
            return None;
        }
        let setup = if method == "linear" {
            None
        } else {
            Some(gta::device_setup(method, job)?)
        };
        Some(self.run(job, setup, out))
    }

    fn run(
        &self,
        job: &MergeJob,
        setup: Option<gta::DeviceSetup>,
        out: &mut OutputView,
    ) -> Result<(), GpuError> {
        let stream = self.ctx.new_stream()?;
        let n = job.numel();
        let xs = self.upload(&stream, job)?;
        let mut y = stream.alloc_zeros::<f32>(n)?;
        match setup {
            None => self.linear(&stream, job, &xs, &mut y)?,
            Some(s) => self.gta(&stream, job, &s, &xs, &mut y)?,
        }
        // Encode on the device, then down into the output buffer.
        let mut raw = stream.alloc_zeros::<u8>(out.bytes.len())?;
        let dtype = dtype_code(out.dtype);
        let n64 = n as u64;
        let mut b = stream.launch_builder(&self.f.encode);
        b.arg(&y).arg(&dtype).arg(&mut raw).arg(&n64);
        // SAFETY: the kernel reads n f32 and writes n elements of `dtype`,
        // which is what `y` and `raw` hold.
        unsafe { b.launch(grid(n)) }?;
        stream.memcpy_dtoh(&raw, &mut *out.bytes)?;
        stream.synchronize()?;
        Ok(())
    }

    /// Every input decoded to f32, one after the other in one buffer. The raw
    /// bytes go up through two pinned staging buffers in turn: the host fills
    /// one while the other is on its way.
    fn upload(&self, stream: &Arc<CudaStream>, job: &MergeJob) -> Result<CudaSlice<f32>, GpuError> {
        let n = job.numel();
        let mut xs = stream.alloc_zeros::<f32>(n * job.inputs.len())?;
        let mut staging = self.take_staging()?;
        let largest = job.inputs.iter().map(|v| v.bytes.len()).max().unwrap_or(0);
        let mut raw = stream.alloc_zeros::<u8>(STAGING.min(largest).max(1))?;
        let mut turn = 0;
        let result = (|| -> Result<(), GpuError> {
            for (i, input) in job.inputs.iter().enumerate() {
                let size = input.dtype.size();
                let code = dtype_code(input.dtype);
                // Whole elements per staging buffer.
                let per = STAGING / size;
                let mut start = 0;
                while start < n {
                    let count = per.min(n - start);
                    let bytes = &input.bytes[start * size..(start + count) * size];
                    let (buf, done) = &mut staging[turn];
                    turn ^= 1;
                    // This buffer's previous transfer must be over.
                    done.synchronize()?;
                    let host = &mut buf.as_mut_slice()?[..bytes.len()];
                    host.copy_from_slice(bytes);
                    let mut dst = raw.slice_mut(..bytes.len());
                    stream.memcpy_htod(&*host, &mut dst)?;
                    done.record(stream)?;
                    let offset = (i * n + start) as u64;
                    let count64 = count as u64;
                    let mut b = stream.launch_builder(&self.f.decode);
                    b.arg(&raw)
                        .arg(&code)
                        .arg(&mut xs)
                        .arg(&offset)
                        .arg(&count64);
                    // SAFETY: `raw` holds `count` elements of the input's dtype;
                    // `xs` has room for n elements per input.
                    unsafe { b.launch(grid(count)) }?;
                    start += count;
                }
            }
            Ok(stream.synchronize()?)
        })();
        self.give_staging(staging);
        result.map(|()| xs)
    }

    fn take_staging(&self) -> Result<[Staging; 2], GpuError> {
        if let Some(p) = self.staging.lock().ok().and_then(|mut s| s.pop()) {
            return Ok(p);
        }
        let one = || -> Result<Staging, GpuError> {
            // SAFETY: the buffer is written before it is read.
            let buf = unsafe { self.ctx.alloc_pinned(STAGING)? };
            Ok((buf, self.ctx.new_event(None)?))
        };
        Ok([one()?, one()?])
    }

    fn give_staging(&self, p: [Staging; 2]) {
        if let Ok(mut s) = self.staging.lock() {
            s.push(p);
        }
    }

    fn linear(
        &self,
        stream: &Arc<CudaStream>,
        job: &MergeJob,
        xs: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let (w, sum) = crate::methods::linear_weights(job.params, job.inputs.len());
        let normalize = job.params.shared_bool("normalize").unwrap_or(true) as i32;
        let w = stream.clone_htod(&w)?;
        let inputs = job.inputs.len() as i32;
        let n = job.numel() as u64;
        let mut b = stream.launch_builder(&self.f.linear);
        b.arg(xs)
            .arg(&w)
            .arg(&inputs)
            .arg(&normalize)
            .arg(&sum)
            .arg(y)
            .arg(&n);
        // SAFETY: `xs` holds `inputs` inputs of n f32, `w` one weight each, `y` n f32.
        unsafe { b.launch(grid(job.numel())) }?;
        Ok(())
    }

    fn gta(
        &self,
        stream: &Arc<CudaStream>,
        job: &MergeJob,
        s: &gta::DeviceSetup,
        xs: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let n = job.numel();
        let chunks = n.div_ceil(CHUNK);
        let k = s.streams.len();
        // Top-k thresholds and tie quotas, as the CPU's select::top_k.
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
            self.top_k(stream, job, s, xs, &ks)?
        } else {
            vec![TopK::All; k]
        };
        let mut mode = Vec::with_capacity(k);
        let mut threshold = Vec::with_capacity(k);
        let mut quota = vec![0u32; k * chunks * 2];
        let mut p = Vec::with_capacity(k);
        let mut rng = Vec::with_capacity(k);
        for (i, (st, top)) in s.streams.iter().zip(&tops).enumerate() {
            let (m, t, pp, r) = match (&st.keep, top) {
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
        let idx: Vec<i32> = s.streams.iter().map(|st| st.input as i32).collect();
        let weight: Vec<f32> = s.streams.iter().map(|st| st.weight).collect();
        let mut scale = vec![1.0f32; k];
        let (d_mode, d_threshold, d_quota, d_p, d_rng) = (
            stream.clone_htod(&mode)?,
            stream.clone_htod(&threshold)?,
            stream.clone_htod(&quota)?,
            stream.clone_htod(&p)?,
            stream.clone_htod(&rng)?,
        );
        let base = s.base as i32;
        let (n64, chunk, chunks32) = (n as u64, CHUNK as u32, chunks as u32);
        if s.rescale {
            // L1 norms before and after sparsifying, per chunk in order.
            let mut before = stream.alloc_zeros::<f64>(chunks)?;
            let mut after = stream.alloc_zeros::<f64>(chunks)?;
            for (i, st) in s.streams.iter().enumerate() {
                let x = xs.slice(st.input * n..(st.input + 1) * n);
                let b_view = xs.slice(s.base * n..(s.base + 1) * n);
                let quota_at = (i * chunks * 2) as u64;
                let mut b = stream.launch_builder(&self.f.l1_parts);
                b.arg(&x)
                    .arg(&b_view)
                    .arg(&n64)
                    .arg(&chunk)
                    .arg(&chunks32)
                    .arg(&mode[i])
                    .arg(&threshold[i])
                    .arg(&d_quota)
                    .arg(&quota_at)
                    .arg(&p[i])
                    .arg(&rng[i])
                    .arg(&mut before)
                    .arg(&mut after);
                let cfg = LaunchConfig {
                    grid_dim: (chunks32.div_ceil(64), 1, 1),
                    block_dim: (64, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: x and b hold n f32; before/after one f64 per chunk.
                unsafe { b.launch(cfg) }?;
                let (bf, af) = (stream.clone_dtoh(&before)?, stream.clone_dtoh(&after)?);
                stream.synchronize()?;
                let (before_sum, after_sum) = bf
                    .iter()
                    .zip(&af)
                    .fold((0.0f64, 0.0f64), |(x, y), (b, a)| (x + b, y + a));
                // mergekit: rescale only when both norms are at least 1e-7.
                if before_sum >= 1e-7 && after_sum >= 1e-7 {
                    scale[i] = (before_sum / after_sum) as f32;
                }
            }
        }
        let (d_idx, d_scale, d_weight) = (
            stream.clone_htod(&idx)?,
            stream.clone_htod(&scale)?,
            stream.clone_htod(&weight)?,
        );
        let (streams, consensus, normalize) =
            (k as i32, s.sign_consensus as i32, s.normalize as i32);
        let mut b = stream.launch_builder(&self.f.gta_merge);
        b.arg(xs)
            .arg(&n64)
            .arg(&base)
            .arg(&streams)
            .arg(&d_idx)
            .arg(&d_mode)
            .arg(&d_threshold)
            .arg(&d_quota)
            .arg(&chunks32)
            .arg(&d_p)
            .arg(&d_rng)
            .arg(&d_scale)
            .arg(&d_weight)
            .arg(&chunk)
            .arg(&consensus)
            .arg(&normalize)
            .arg(&s.plain_divisor)
            .arg(&s.lambda)
            .arg(y);
        let cfg = LaunchConfig {
            grid_dim: (chunks32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every per-stream array has `streams` entries, quota
        // streams * chunks pairs, xs every input's n f32, y n f32.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// The CPU's exact top-k (select.rs) with its histograms and tie counts
    /// computed on the device: three digit passes, then the threshold-equal
    /// keys per chunk.
    fn top_k(
        &self,
        stream: &Arc<CudaStream>,
        job: &MergeJob,
        s: &gta::DeviceSetup,
        xs: &CudaSlice<f32>,
        ks: &[u64],
    ) -> Result<Vec<TopK>, GpuError> {
        let n = job.numel();
        let chunks = n.div_ceil(CHUNK);
        let mut state: Vec<DigitState> = select::initial_state(ks, n as u64);
        let b_view = xs.slice(s.base * n..(s.base + 1) * n);
        let n64 = n as u64;
        for &(shift, bits) in &select::DIGITS {
            let buckets = 1usize << bits;
            let mut hist = vec![0u64; state.len() * buckets];
            for (i, st) in state.iter().enumerate() {
                let Some((prefix, mask, _)) = *st else {
                    continue;
                };
                let input = s.streams[i].input;
                let x = xs.slice(input * n..(input + 1) * n);
                let mut d_hist = stream.alloc_zeros::<u64>(buckets)?;
                let buckets32 = buckets as u32;
                let mut b = stream.launch_builder(&self.f.digit_hist);
                b.arg(&x)
                    .arg(&b_view)
                    .arg(&n64)
                    .arg(&prefix)
                    .arg(&mask)
                    .arg(&shift)
                    .arg(&buckets32)
                    .arg(&mut d_hist);
                // SAFETY: x and b hold n f32, d_hist `buckets` u64 (<= 4096).
                unsafe { b.launch(grid(n)) }?;
                stream.memcpy_dtoh(&d_hist, &mut hist[i * buckets..(i + 1) * buckets])?;
            }
            stream.synchronize()?;
            select::apply_digit(&mut state, &hist, (shift, bits));
        }
        let thresholds: Vec<Option<(u32, u64)>> = state
            .iter()
            .map(|st| st.map(|(key, _, left)| (key, left)))
            .collect();
        let mut eq = vec![vec![0u32; chunks]; state.len()];
        for (i, t) in thresholds.iter().enumerate() {
            let Some((key, _)) = *t else {
                continue;
            };
            let input = s.streams[i].input;
            let x = xs.slice(input * n..(input + 1) * n);
            let mut counts = stream.alloc_zeros::<u32>(chunks)?;
            let chunk = CHUNK as u32;
            let mut b = stream.launch_builder(&self.f.chunk_ties);
            b.arg(&x)
                .arg(&b_view)
                .arg(&n64)
                .arg(&key)
                .arg(&chunk)
                .arg(&mut counts);
            let cfg = LaunchConfig {
                grid_dim: (chunks as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: x and b hold n f32, counts one u32 per chunk.
            unsafe { b.launch(cfg) }?;
            stream.memcpy_dtoh(&counts, &mut eq[i])?;
        }
        stream.synchronize()?;
        Ok(select::finish(ks, &thresholds, chunks, |c, s| eq[s][c]))
    }
}

fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        _ => 1,
    }
}

/// A grid-stride launch over `n` elements.
fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels compile with NVRTC (which needs no GPU); CI installs the
    /// nvidia-cuda-nvrtc wheel and points LD_LIBRARY_PATH at it.
    #[test]
    fn kernels_compile_with_nvrtc() {
        assert!(
            nvrtc_present(),
            "libnvrtc.so not found: scripts/test.sh installs it (nvidia-cuda-nvrtc) for \
             builds with the cuda feature"
        );
        let ptx = compile().unwrap();
        let text = ptx.to_src();
        for kernel in [
            "decode",
            "encode",
            "linear",
            "digit_hist",
            "chunk_ties",
            "l1_parts",
            "gta_merge",
        ] {
            assert!(
                text.contains(&format!(".entry {kernel}(")),
                "{kernel} missing from the PTX"
            );
        }
    }

    #[test]
    fn opening_a_gpu_without_a_driver_is_a_clear_error() {
        // SAFETY: only probes for the library.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            // A machine with the driver: opening must work or fail clearly.
            if let Err(e) = Gpu::open("cuda:0", 0) {
                assert!(e.to_string().starts_with("--device cuda:0"), "{e}");
            }
            return;
        }
        let e = Gpu::open("cuda:0", 0).unwrap_err();
        assert!(matches!(e, GpuError::NoDriver { .. }), "{e}");
        assert!(e.to_string().contains("libcuda.so"), "{e}");
    }
}
