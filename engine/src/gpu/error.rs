//! Failures of the GPU path, each with the error of the driver, NVRTC or the
//! host emulator that caused it as its source.

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
    /// The device could not be opened, or its kernels not loaded.
    #[error("--device {device}: {reason}")]
    Open {
        device: String,
        #[source]
        reason: OpenError,
    },
    /// The device ran out of memory (the tensor is then merged on the CPU).
    #[error("CUDA: out of device memory")]
    OutOfMemory,
    /// A call of the CUDA driver API failed.
    #[cfg(feature = "cuda")]
    #[error("CUDA: {0}")]
    Driver(#[source] cudarc::driver::DriverError),
    /// A merge's pinned staging buffers were lost (a panic while another
    /// thread held them).
    #[error("CUDA: staging buffers lost")]
    StagingLost,
    /// The host emulator of the tests (gpu/emu.rs) failed.
    #[cfg(test)]
    #[error("emulated GPU: {0}")]
    Emulator(#[source] super::emu::EmuError),
}

/// Why a device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("there is no GPU {ordinal}: this machine has {count}")]
    NoSuchGpu { ordinal: usize, count: i32 },
    #[cfg(feature = "cuda")]
    #[error("{0}")]
    Driver(#[source] cudarc::driver::DriverError),
    #[cfg(feature = "cuda")]
    #[error("compiling the kernels with NVRTC: {0}")]
    Compile(#[source] cudarc::nvrtc::CompileError),
    #[cfg(feature = "cuda")]
    #[error("kernel {kernel}: {error}")]
    Kernel {
        kernel: &'static str,
        #[source]
        error: cudarc::driver::DriverError,
    },
}
