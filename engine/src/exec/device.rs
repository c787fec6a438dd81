//! Where a unit's merges are computed: the CPU, or (a build with the `cuda`
//! feature) an NVIDIA GPU, which takes the tensors and methods it supports and
//! leaves the rest to the CPU (see [`crate::gpu`]).

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
    pub fn open(spec: &str) -> Result<Device, String> {
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
            None => Err(format!(
                "--device {spec}: expected cpu, cuda or cuda:N (N: the GPU's index)"
            )),
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
        method: &str,
        job: &crate::methods::MergeJob,
        out: &mut crate::methods::OutputView,
    ) -> Option<Result<(), String>> {
        match self {
            Device::Cpu => None,
            #[cfg(feature = "cuda")]
            Device::Cuda(gpu) => gpu
                .merge(method, job, out)
                .map(|r| r.map_err(|e| e.to_string())),
            #[cfg(test)]
            Device::Emulated => crate::gpu::supports(method, job, out).then(|| {
                crate::gpu::merge(&crate::gpu::emu::Emu::new(), method, job, out)
                    .map_err(|e| e.to_string())
            }),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(spec: &str, ordinal: usize) -> Result<Device, String> {
    crate::gpu::cuda::Gpu::open(spec, ordinal)
        .map(|g| Device::Cuda(std::sync::Arc::new(g)))
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(spec: &str, _ordinal: usize) -> Result<Device, String> {
    Err(format!(
        "--device {spec}: this build computes on the CPU only; GPU workers need a build with \
         the cuda feature (cargo build --release --features cuda; README: \"CUDA\")"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_checked() {
        assert!(matches!(Device::open("cpu"), Ok(Device::Cpu)));
        for bad in ["gpu", "cuda:", "cuda:x", "cudax", "tpu:0"] {
            let e = Device::open(bad).unwrap_err();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        #[cfg(not(feature = "cuda"))]
        {
            let e = Device::open("cuda:1").unwrap_err();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
