//! A host emulator of the GPU, for tests on machines without one: kernels.cu
//! compiled as C++ (g++) behind a small shim that maps CUDA's built-ins to
//! host code, and the kernels launched block by block with every thread of a
//! block as a coroutine (ucontext) that runs until its next `__syncthreads()`,
//! which is a barrier. Buffers are host memory. It runs the GPU path's host
//! code (gpu/*.rs) unchanged, so the tests check the kernels' arithmetic and the
//! host logic against the CPU path, byte for byte; what it cannot check is
//! CUDA itself (the driver API calls, memory coalescing, real concurrency).

use super::{Arg, Backend, GpuError, Kernel, KERNELS};
use std::cell::UnsafeCell;
use std::sync::{Mutex, OnceLock};

/// The shim compiled ahead of kernels.cu.
const SHIM: &str = r#"
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>
#include <ucontext.h>

struct Dim3 { unsigned x = 0, y = 0, z = 0; };
static Dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
// One block runs at a time: a block's shared memory is a static.
#define __shared__ static

static ucontext_t scheduler;
static std::vector<ucontext_t> threads;
static std::vector<std::vector<char>> stacks;
static std::vector<char> finished;
static unsigned current;
static const std::function<void()> *body;

static inline void __syncthreads() { swapcontext(&threads[current], &scheduler); }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
template <class T> static inline T atomicAdd(T *p, T v) { T old = *p; *p = old + v; return old; }

static void trampoline() {
    (*body)();
    finished[current] = 1;
    swapcontext(&threads[current], &scheduler);
}

// Runs `f` as every thread of every block; a block's threads take turns up
// to their next __syncthreads(), so each one is a barrier.
static void run_blocks(unsigned grid, unsigned block, const std::function<void()> &f) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    body = &f;
    threads.resize(block);
    finished.assign(block, 0);
    while (stacks.size() < block) stacks.emplace_back(256 * 1024);
    for (unsigned b = 0; b < grid; b++) {
        blockIdx = {b, 0, 0};
        for (unsigned t = 0; t < block; t++) {
            getcontext(&threads[t]);
            threads[t].uc_stack.ss_sp = stacks[t].data();
            threads[t].uc_stack.ss_size = stacks[t].size();
            threads[t].uc_link = nullptr;
            makecontext(&threads[t], trampoline, 0);
            finished[t] = 0;
        }
        bool running = true;
        while (running) {
            running = false;
            for (unsigned t = 0; t < block; t++) {
                if (finished[t]) continue;
                current = t;
                threadIdx = {t, 0, 0};
                swapcontext(&scheduler, &threads[t]);
                running |= !finished[t];
            }
        }
    }
}
"#;

/// Launch entry: kernel index (Kernel::ALL order), grid, block, and the
/// arguments in 8-byte slots.
const ENTRY: &str = r#"
#define P(i, T) ((T)(uintptr_t)a[i])
#define I(i) ((int)(long long)a[i])
#define U(i) ((u32)a[i])
#define L(i) ((u64)a[i])
#define F(i) (__uint_as_float((u32)a[i]))
extern "C" void emu_launch(int kernel, unsigned grid, unsigned block, const u64 *a) {
    std::function<void()> f;
    switch (kernel) {
    case 0: f = [&] { decode(P(0, const void *), I(1), P(2, float *), L(3), L(4)); }; break;
    case 1: f = [&] { encode(P(0, const float *), I(1), P(2, void *), L(3)); }; break;
    case 2: f = [&] { linear(P(0, const float *), P(1, const float *), I(2), I(3), F(4),
                             P(5, float *), L(6)); }; break;
    case 3: f = [&] { digit_hist(P(0, const float *), I(1), I(2), L(3), U(4), U(5), U(6), U(7),
                                 P(8, u64 *)); }; break;
    case 4: f = [&] { chunk_ties(P(0, const float *), I(1), I(2), L(3), U(4), U(5),
                                 P(6, u32 *)); }; break;
    case 5: f = [&] { l1_parts(P(0, const float *), I(1), I(2), L(3), U(4), U(5), I(6), U(7),
                               P(8, const u32 *), L(9), F(10), L(11), P(12, double *),
                               P(13, double *)); }; break;
    case 6: f = [&] { gta_merge(P(0, const float *), L(1), I(2), I(3), P(4, const int *),
                                P(5, const int *), P(6, const u32 *), P(7, const u32 *), U(8),
                                P(9, const float *), P(10, const u64 *), P(11, const float *),
                                P(12, const float *), U(13), I(14), I(15), F(16), F(17),
                                P(18, float *)); }; break;
    case 7: f = [&] { apply_scale(P(0, float *), L(1), L(2), P(3, const void *), I(4), L(5), L(6),
                                  L(7), L(8)); }; break;
    default: return;
    }
    run_blocks(grid, block, f);
}
"#;

type Launch = unsafe extern "C" fn(i32, u32, u32, *const u64);

/// Why the emulator is not available.
#[derive(Debug, thiserror::Error)]
pub enum EmuError {
    #[error("writing the emulator's source: {0}")]
    Write(#[source] std::io::Error),
    #[error("running g++ (scripts/test.sh installs it): {0}")]
    NoCompiler(#[source] std::io::Error),
    #[error("compiling kernels.cu for the emulator:\n{stderr}")]
    Compile { stderr: String },
    #[error("loading the emulator: {0}")]
    Load(#[source] libloading::Error),
}

/// The compiled emulator (compiled once per test process).
fn library() -> &'static Result<(libloading::Library, tempfile::TempDir), EmuError> {
    static LIB: OnceLock<Result<(libloading::Library, tempfile::TempDir), EmuError>> =
        OnceLock::new();
    LIB.get_or_init(|| {
        let dir = tempfile::tempdir().map_err(EmuError::Write)?;
        let src = dir.path().join("emu.cpp");
        std::fs::write(&src, format!("{SHIM}\n{KERNELS}\n{ENTRY}")).map_err(EmuError::Write)?;
        let lib = dir.path().join("libemu.so");
        let out = std::process::Command::new(std::env::var("CXX").unwrap_or("g++".into()))
            .args([
                "-std=c++17",
                "-O1",
                "-ffp-contract=off",
                "-fPIC",
                "-shared",
                "-o",
            ])
            .arg(&lib)
            .arg(&src)
            .output()
            .map_err(EmuError::NoCompiler)?;
        if !out.status.success() {
            return Err(EmuError::Compile {
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        // SAFETY: our own library, with no initialisers beyond the C++ runtime's.
        let lib = unsafe { libloading::Library::new(&lib) }.map_err(EmuError::Load)?;
        Ok((lib, dir))
    })
}

/// Launches share the emulator's globals: one at a time.
static LAUNCH: Mutex<()> = Mutex::new(());

/// The emulated device.
pub struct Emu {
    lib: &'static libloading::Library,
}

impl Emu {
    /// The emulator, compiled on first use; panics (failing the test) with
    /// the reason when it cannot be built.
    pub fn new() -> Emu {
        match library() {
            Ok((lib, _)) => Emu { lib },
            Err(e) => panic!("{e}"),
        }
    }
}

/// A buffer of host memory, 8-byte aligned, written by kernels through a
/// pointer taken from a shared reference (as a device buffer is).
pub struct HostBuf {
    words: UnsafeCell<Vec<u64>>,
    len: usize,
}

impl HostBuf {
    fn ptr(&self) -> *mut u8 {
        // SAFETY: the Vec itself is never resized after allocation.
        unsafe { (*self.words.get()).as_mut_ptr() as *mut u8 }
    }
}

impl Backend for Emu {
    type Buf = HostBuf;

    fn alloc(&self, bytes: usize) -> Result<HostBuf, GpuError> {
        Ok(HostBuf {
            words: UnsafeCell::new(vec![0u64; bytes.div_ceil(8).max(1)]),
            len: bytes,
        })
    }

    fn upload(&self, dst: &mut HostBuf, data: &[u8]) -> Result<(), GpuError> {
        assert!(data.len() <= dst.len, "upload past the end of a buffer");
        // SAFETY: `dst` holds at least data.len() bytes (checked above).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst.ptr(), data.len()) };
        Ok(())
    }

    fn download(&self, src: &HostBuf, out: &mut [u8]) -> Result<(), GpuError> {
        assert!(out.len() <= src.len, "download past the end of a buffer");
        // SAFETY: `src` holds at least out.len() bytes (checked above).
        unsafe { std::ptr::copy_nonoverlapping(src.ptr(), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn launch(
        &self,
        kernel: Kernel,
        grid: u32,
        block: u32,
        args: &[Arg<'_, HostBuf>],
    ) -> Result<(), GpuError> {
        let slots: Vec<u64> = args
            .iter()
            .map(|a| match a {
                Arg::Buf(b) => b.ptr() as u64,
                Arg::I32(v) => *v as i64 as u64,
                Arg::U32(v) => *v as u64,
                Arg::U64(v) => *v,
                Arg::F32(v) => v.to_bits() as u64,
            })
            .collect();
        let index = kernel.index() as i32;
        let _one = LAUNCH.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: emu_launch has this signature (ENTRY above); the
        // orchestration passes every kernel its arguments, with buffers of the
        // sizes it indexes (the same calls the CUDA backend makes).
        unsafe {
            let f: libloading::Symbol<Launch> = self
                .lib
                .get(b"emu_launch")
                .map_err(|e| GpuError::Emulator(EmuError::Load(e)))?;
            f(index, grid.max(1), block, slots.as_ptr());
        }
        Ok(())
    }
}
