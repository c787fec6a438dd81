//! The [`Backend`] of an NVIDIA GPU: cudarc's driver API (libcuda loaded at
//! run time) and the kernels compiled by NVRTC when the device is opened.
//! Each merge runs on a CUDA stream of its own, so the tensors of a window and
//! the units of several worker slots overlap on the device; inputs go up
//! through two pinned staging buffers in turn, the host filling one while the
//! other is on its way.

use super::{Arg, Backend, GpuError, Kernel, OpenError, KERNELS, STAGING};
use crate::methods::{MergeJob, MergeMethod, OutputView};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};
use std::sync::{Arc, Mutex};

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            GpuError::OutOfMemory
        } else {
            GpuError::Driver(e)
        }
    }
}

/// Compiles the kernels to PTX (NVRTC only: no GPU needed).
pub fn compile() -> Result<cudarc::nvrtc::Ptx, OpenError> {
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
    .map_err(OpenError::Compile)
}

/// Whether libnvrtc can be loaded (cudarc panics on use otherwise).
pub fn nvrtc_present() -> bool {
    // SAFETY: only probes for the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// A pinned host buffer and the event of its last transfer.
type Staging = (PinnedHostSlice<u8>, CudaEvent);

/// One GPU, its kernels, and pinned staging buffers for the merges in flight.
pub struct Gpu {
    name: String,
    ctx: Arc<CudaContext>,
    _module: Arc<CudaModule>,
    functions: Vec<CudaFunction>,
    staging: Mutex<Vec<[Staging; 2]>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.name)
    }
}

impl Gpu {
    /// Opens GPU `ordinal` (`device` names it in errors) and compiles the kernels.
    pub fn open(device: &str, ordinal: usize) -> Result<Gpu, GpuError> {
        let open_err = |reason: OpenError| GpuError::Open {
            device: device.to_string(),
            reason,
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
        let driver = |e| open_err(OpenError::Driver(e));
        let count = CudaContext::device_count().map_err(driver)?;
        if ordinal >= count.max(0) as usize {
            return Err(open_err(OpenError::NoSuchGpu { ordinal, count }));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        let ptx = compile().map_err(open_err)?;
        let module = ctx.load_module(ptx).map_err(driver)?;
        let functions = Kernel::ALL
            .iter()
            .map(|k| {
                module.load_function(k.name()).map_err(|error| {
                    open_err(OpenError::Kernel {
                        kernel: k.name(),
                        error,
                    })
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let name = format!(
            "cuda:{ordinal} ({})",
            ctx.name().unwrap_or_else(|_| "unknown GPU".into())
        );
        Ok(Gpu {
            name,
            ctx,
            _module: module,
            functions,
            staging: Mutex::new(Vec::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the device has room for `job` now; the CPU takes it otherwise.
    fn fits(&self, job: &MergeJob) -> bool {
        if self.ctx.bind_to_thread().is_err() {
            return false;
        }
        match self.ctx.mem_get_info() {
            Ok((free, _)) => super::device_bytes(job) <= free as u64 * 9 / 10,
            Err(_) => false,
        }
    }

    /// Computes `method` on `job` into `out` on this GPU; `None` when the GPU
    /// path does not take it ([`super::accept`]) or the device is full.
    pub fn merge(
        &self,
        method: &dyn MergeMethod,
        job: &MergeJob,
        out: &mut OutputView,
    ) -> Option<Result<(), GpuError>> {
        let op = super::accept(method, job, out)?;
        if !self.fits(job) {
            return None;
        }
        let result = (|| {
            let run = Run {
                gpu: self,
                stream: self.ctx.new_stream()?,
                staging: Mutex::new(Some(self.take_staging()?)),
                turn: Mutex::new(0),
            };
            super::run(&run, &op, job, out)
        })();
        match result {
            // Other merges in flight took the memory `fits` saw: the output is
            // only written at the end, so the CPU can take the tensor over.
            Err(GpuError::OutOfMemory) => {
                tracing::debug!(tensor = job.name, "GPU out of memory: merged on the CPU");
                None
            }
            r => Some(r),
        }
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
}

/// One merge on its own stream.
struct Run<'g> {
    gpu: &'g Gpu,
    stream: Arc<CudaStream>,
    staging: Mutex<Option<[Staging; 2]>>,
    turn: Mutex<usize>,
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        // The staging buffers go back once nothing uses them.
        if self.stream.synchronize().is_ok() {
            if let Some(s) = self.staging.get_mut().ok().and_then(Option::take) {
                if let Ok(mut pool) = self.gpu.staging.lock() {
                    pool.push(s);
                }
            }
        }
    }
}

impl Backend for Run<'_> {
    type Buf = CudaSlice<u8>;

    fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>, GpuError> {
        Ok(self.stream.alloc_zeros::<u8>(bytes.max(1))?)
    }

    fn upload(&self, dst: &mut CudaSlice<u8>, data: &[u8]) -> Result<(), GpuError> {
        let mut staging = self.staging.lock().map_err(|_| GpuError::StagingLost)?;
        let mut turn = self.turn.lock().map_err(|_| GpuError::StagingLost)?;
        let Some(bufs) = staging.as_mut() else {
            return Err(GpuError::StagingLost);
        };
        let mut done = 0;
        while done < data.len() {
            let len = STAGING.min(data.len() - done);
            let (buf, event) = &mut bufs[*turn];
            *turn ^= 1;
            // This buffer's previous transfer must be over.
            event.synchronize()?;
            let host = &mut buf.as_mut_slice()?[..len];
            host.copy_from_slice(&data[done..done + len]);
            let mut to = dst.slice_mut(done..done + len);
            self.stream.memcpy_htod(&*host, &mut to)?;
            event.record(&self.stream)?;
            done += len;
        }
        Ok(())
    }

    fn download(&self, src: &CudaSlice<u8>, out: &mut [u8]) -> Result<(), GpuError> {
        self.stream.memcpy_dtoh(&src.slice(..out.len()), out)?;
        self.stream.synchronize()?;
        Ok(())
    }

    fn launch(
        &self,
        kernel: Kernel,
        grid: u32,
        block: u32,
        args: &[Arg<'_, CudaSlice<u8>>],
    ) -> Result<(), GpuError> {
        let f = &self.gpu.functions[kernel.index()];
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Buf(x) => b.arg(*x),
                Arg::I32(v) => b.arg(v),
                Arg::U32(v) => b.arg(v),
                Arg::U64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid.max(1), 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the orchestration (gpu/*.rs) passes each kernel the
        // arguments of its signature in kernels.cu, with buffers of the sizes
        // it indexes; the emulator tests run the same calls.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels compile with NVRTC (which needs no GPU); CI installs the
    /// nvidia-cuda-nvrtc-cu12 wheel and puts it on LD_LIBRARY_PATH.
    #[test]
    fn kernels_compile_with_nvrtc() {
        assert!(
            nvrtc_present(),
            "libnvrtc.so not found: scripts/test.sh installs it (nvidia-cuda-nvrtc-cu12)"
        );
        let text = compile().unwrap().to_src();
        for kernel in Kernel::ALL {
            assert!(
                text.contains(&format!(".entry {}(", kernel.name())),
                "{} missing from the PTX",
                kernel.name()
            );
        }
    }

    #[test]
    fn opening_a_gpu_without_a_driver_is_a_clear_error() {
        // SAFETY: only probes for the library.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            // A machine with the driver: opening works or fails clearly.
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
