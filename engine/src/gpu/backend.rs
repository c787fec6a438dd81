//! A device as the GPU path's host code sees it: byte buffers and launches of
//! the kernels of kernels.cu, in the order issued ([`Backend`]). The CUDA
//! backend (cuda.rs) and the host emulator of the tests (emu.rs) implement it,
//! so both run the very same host code. Also the small conversions every op
//! needs: vectors up and down, dtype codes, grid sizes.

use super::{GpuError, THREADS};
use crate::dtype::DType;

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

/// A device buffer holding `v`.
pub(super) fn upload_vec<B: Backend, T: Copy, const N: usize>(
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
pub(super) fn download_vec<B: Backend, T, const N: usize>(
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
pub(super) fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 2,
        DType::F8_E4M3 => 3,
        DType::F8_E5M2 => 4,
        _ => 1,
    }
}

/// Blocks of a grid-stride launch over `n` elements.
pub(super) fn grid(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).clamp(1, 65_535) as u32
}
