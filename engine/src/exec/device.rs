//! Where a unit's merges are computed: the CPU, or (a build with the `cuda`
//! feature) an NVIDIA GPU, which takes the tensors whose method describes
//! them as a device op and leaves the rest to the CPU (see
//! [`crate::methods::device`] and [`crate::gpu`]).

use crate::gpu::GpuError;
use crate::methods::{MergeJob, MergeMethod, OutputView};

/// A `--device` that cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("--device {spec}: expected cpu, cuda or cuda:N (N: the GPU's index)")]
    Unknown { spec: String },
    #[error(
        "--device {spec}: this build computes on the CPU only; GPU workers need a build with \
         the cuda feature (cargo build --release --features cuda; README: \"CUDA\")"
    )]
    NoCuda { spec: String },
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

/// A compute device, opened once per process and shared by its units.
#[derive(Clone, Debug, Default)]
pub enum Device {
    #[default]
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<crate::gpu::cuda::Gpu>),
    /// The GPU path on the host emulator (tests).
    #[cfg(test)]
    Emulated,
}

impl Device {
    /// Opens the device `spec` names: `cpu`, `cuda` (GPU 0) or `cuda:N`.
    pub fn open(spec: &str) -> Result<Device, DeviceError> {
        let spec = spec.trim();
        if spec == "cpu" {
            return Ok(Device::Cpu);
        }
        let ordinal = match spec.strip_prefix("cuda") {
            Some("") => Some(0),
            Some(rest) => rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()),
            None => None,
        };
        match ordinal {
            Some(n) => open_cuda(spec, n),
            None => Err(DeviceError::Unknown { spec: spec.into() }),
        }
    }

    /// The device in logs and the coordinator's worker list.
    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            Device::Cuda(gpu) => gpu.name().to_string(),
            #[cfg(test)]
            Device::Emulated => "emulated GPU".into(),
        }
    }

    /// Computes `method` on `job` into `out` when this device takes it
    /// (`None`: the CPU does).
    #[cfg_attr(not(any(feature = "cuda", test)), allow(unused_variables))]
    pub(crate) fn merge(
        &self,
        method: &dyn MergeMethod,
        job: &MergeJob,
        out: &mut OutputView,
    ) -> Option<Result<(), GpuError>> {
        match self {
            Device::Cpu => None,
            #[cfg(feature = "cuda")]
            Device::Cuda(gpu) => gpu.merge(method, job, out),
            #[cfg(test)]
            Device::Emulated => {
                let op = crate::gpu::accept(method, job, out)?;
                Some(crate::gpu::run(&crate::gpu::emu::Emu::new(), &op, job, out))
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(spec: &str, ordinal: usize) -> Result<Device, DeviceError> {
    let gpu = crate::gpu::cuda::Gpu::open(spec, ordinal)?;
    Ok(Device::Cuda(std::sync::Arc::new(gpu)))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(spec: &str, _ordinal: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NoCuda { spec: spec.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_checked() {
        assert!(matches!(Device::open("cpu"), Ok(Device::Cpu)));
        for bad in ["gpu", "cuda:", "cuda:x", "cudax", "tpu:0"] {
            let e = Device::open(bad).unwrap_err();
            assert!(matches!(e, DeviceError::Unknown { .. }), "{bad}: {e}");
            assert!(
                e.to_string().contains("expected cpu, cuda or cuda:N"),
                "{bad}: {e}"
            );
        }
        #[cfg(not(feature = "cuda"))]
        {
            let e = Device::open("cuda:1").unwrap_err();
            assert!(matches!(e, DeviceError::NoCuda { .. }), "{e}");
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
    }
}
