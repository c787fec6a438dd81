//! Chunked execution of merge kernels. A tensor is cut into fixed-size chunks of
//! elements; each chunk of every input is decoded to f32 in per-thread scratch,
//! handed to the method's closure, and the f32 result is encoded straight into the
//! output bytes. Chunk boundaries depend only on the tensor's size (never on the
//! thread count), and reductions combine per-chunk partials in chunk order, so
//! results are bit-identical whatever the parallelism.

use super::{MethodError, TensorParams};
use crate::dtype::{decode_f32, encode_f32, DType};
use rayon::prelude::*;

/// Elements per chunk: small enough that every input's chunk stays in L2 cache,
/// large enough to amortise the per-chunk bookkeeping.
pub const CHUNK: usize = 1 << 15;

/// Raw bytes of one input tensor.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
    /// Block scales of an FP8 weight: it is dequantized on read.
    pub scale: Option<BlockScale<'a>>,
}

/// The block scales of a 2-D FP8 weight (DeepSeek-V3's `weight_scale_inv`):
/// element (r, c) is `fp8 · scale[r / block_rows][c / block_cols]`.
#[derive(Debug, Clone, Copy)]
pub struct BlockScale<'a> {
    /// Float dtype of the scales and their raw bytes, row-major.
    pub dtype: DType,
    pub bytes: &'a [u8],
    /// Columns of the weight.
    pub cols: usize,
    pub block_rows: usize,
    pub block_cols: usize,
    /// Columns of the scale grid.
    pub scale_cols: usize,
}

impl BlockScale<'_> {
    fn at(&self, i: usize) -> f32 {
        let size = self.dtype.size();
        let mut v = [0f32; 1];
        decode_f32(self.dtype, &self.bytes[i * size..(i + 1) * size], &mut v);
        v[0]
    }

    /// Multiplies the dequantized FP8 values of elements `start..start + len`
    /// (in `buf`) by their blocks' scales.
    fn apply(&self, start: usize, buf: &mut [f32]) {
        let cols = self.cols.max(1);
        let mut e = 0;
        while e < buf.len() {
            let idx = start + e;
            let (r, c) = (idx / cols, idx % cols);
            // A run of elements within one row and one block.
            let run = (self.block_cols - c % self.block_cols)
                .min(cols - c)
                .min(buf.len() - e);
            let s = self.at((r / self.block_rows) * self.scale_cols + c / self.block_cols);
            for x in &mut buf[e..e + run] {
                *x *= s;
            }
            e += run;
        }
    }
}

/// Raw bytes of the output tensor.
#[derive(Debug)]
pub struct OutputView<'a> {
    pub dtype: DType,
    pub bytes: &'a mut [u8],
}

/// One output tensor's worth of work for a method.
#[derive(Debug)]
pub struct MergeJob<'a> {
    /// Output tensor name (keys the random generator; names errors).
    pub name: &'a str,
    pub shape: &'a [u64],
    /// Inputs in source order (YAML order; an appended base comes last).
    pub inputs: Vec<TensorView<'a>>,
    /// Index of the base model in `inputs`.
    pub base: Option<usize>,
    pub params: &'a TensorParams,
    /// `--random-seed` (or the documented default).
    pub seed: u64,
}

impl MergeJob<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product::<u64>() as usize
    }

    /// Length of the last axis (a 1-D tensor is one row; a scalar a row of one).
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1).max(1) as usize
    }

    /// The non-base inputs, in order.
    pub fn non_base(&self) -> Vec<usize> {
        (0..self.inputs.len())
            .filter(|&i| Some(i) != self.base)
            .collect()
    }

    pub fn invalid(&self, method: &'static str, message: impl Into<String>) -> MethodError {
        MethodError::Invalid {
            method,
            message: format!("{}: {}", self.name, message.into()),
        }
    }
}

/// A chunk: elements `start..start + len` of the flattened tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub index: usize,
    pub start: usize,
    pub len: usize,
}

struct Scratch {
    inputs: Vec<Vec<f32>>,
    out: Vec<f32>,
}

impl Scratch {
    /// Makes room for `n` inputs of `chunk` elements; buffers keep whatever they
    /// held (every use overwrites the part it reads).
    fn fit(&mut self, n: usize, chunk: usize) {
        if self.inputs.len() < n {
            self.inputs.resize_with(n, Vec::new);
        }
        for b in self
            .inputs
            .iter_mut()
            .take(n)
            .chain(std::iter::once(&mut self.out))
        {
            if b.len() < chunk {
                b.resize(chunk, 0.0);
            }
        }
    }

    fn load(&mut self, inputs: &[TensorView], c: Chunk) {
        for (buf, view) in self.inputs.iter_mut().zip(inputs) {
            let size = view.dtype.size();
            decode_f32(
                view.dtype,
                &view.bytes[c.start * size..(c.start + c.len) * size],
                &mut buf[..c.len],
            );
            if let Some(scale) = &view.scale {
                scale.apply(c.start, &mut buf[..c.len]);
            }
        }
    }
}

thread_local! {
    /// Per-thread scratch, reused across chunks and tensors: no allocation (or
    /// zeroing) per chunk, however finely rayon splits the work.
    static SCRATCH: std::cell::RefCell<Vec<Scratch>> = const { std::cell::RefCell::new(Vec::new()) };
    static BUFFERS: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch sized for `n` inputs of `chunk` elements.
/// Re-entrant (a nested call takes another scratch from the pool).
fn with_scratch<R>(n: usize, chunk: usize, f: impl FnOnce(&mut Scratch) -> R) -> R {
    let mut s = SCRATCH.with(|p| p.borrow_mut().pop()).unwrap_or(Scratch {
        inputs: Vec::new(),
        out: Vec::new(),
    });
    s.fit(n, chunk);
    let r = f(&mut s);
    SCRATCH.with(|p| p.borrow_mut().push(s));
    r
}

/// Runs `f` with `count` f32 buffers of at least `len` elements each, taken from
/// a per-thread pool (contents unspecified: overwrite before reading).
pub fn with_buffers<R>(count: usize, len: usize, f: impl FnOnce(&mut [Vec<f32>]) -> R) -> R {
    let mut bufs: Vec<Vec<f32>> = BUFFERS.with(|p| {
        let mut p = p.borrow_mut();
        let keep = p.len().saturating_sub(count);
        p.split_off(keep)
    });
    bufs.resize_with(count, Vec::new);
    for b in &mut bufs {
        if b.len() < len {
            b.resize(len, 0.0);
        }
    }
    let r = f(&mut bufs);
    BUFFERS.with(|p| p.borrow_mut().extend(bufs));
    r
}

fn chunks(numel: usize, chunk: usize) -> impl IndexedParallelIterator<Item = Chunk> {
    let chunk = chunk.max(1);
    let count = numel.div_ceil(chunk);
    (0..count).into_par_iter().map(move |index| {
        let start = index * chunk;
        Chunk {
            index,
            start,
            len: chunk.min(numel - start),
        }
    })
}

/// A chunk size that is a whole number of rows of `row_len` elements.
pub fn row_chunk(row_len: usize) -> usize {
    let row_len = row_len.max(1);
    row_len * (CHUNK / row_len).max(1)
}

/// Computes every output chunk with `f(chunk, inputs_f32, out_f32)`.
pub fn map(job: &MergeJob, out: &mut OutputView, f: impl Fn(Chunk, &[&[f32]], &mut [f32]) + Sync) {
    map_sized(job, out, CHUNK, f)
}

/// [`map`] with a chosen chunk size (e.g. [`row_chunk`] for row-wise methods).
pub fn map_sized(
    job: &MergeJob,
    out: &mut OutputView,
    chunk: usize,
    f: impl Fn(Chunk, &[&[f32]], &mut [f32]) + Sync,
) {
    let chunk = chunk.max(1);
    let out_dtype = out.dtype;
    let out_size = out_dtype.size();
    let n_inputs = job.inputs.len();
    out.bytes
        .par_chunks_mut(chunk * out_size)
        .enumerate()
        .for_each(|(index, out_bytes)| {
            let c = Chunk {
                index,
                start: index * chunk,
                len: out_bytes.len() / out_size,
            };
            with_scratch(n_inputs, chunk, |scratch| {
                scratch.load(&job.inputs, c);
                let Scratch { inputs, out } = scratch;
                let views: Vec<&[f32]> = inputs[..n_inputs].iter().map(|b| &b[..c.len]).collect();
                let out = &mut out[..c.len];
                f(c, &views, out);
                encode_f32(out_dtype, out, out_bytes);
            })
        });
}

/// Runs `f` over every chunk and returns its results in chunk order.
pub fn reduce<T: Send>(job: &MergeJob, f: impl Fn(Chunk, &[&[f32]]) -> T + Sync) -> Vec<T> {
    reduce_sized(job, CHUNK, f)
}

/// [`reduce`] with a chosen chunk size.
pub fn reduce_sized<T: Send>(
    job: &MergeJob,
    chunk: usize,
    f: impl Fn(Chunk, &[&[f32]]) -> T + Sync,
) -> Vec<T> {
    let n_inputs = job.inputs.len();
    let chunk = chunk.max(1);
    chunks(job.numel(), chunk)
        .map(|c| {
            with_scratch(n_inputs, chunk, |scratch| {
                scratch.load(&job.inputs, c);
                let views: Vec<&[f32]> = scratch.inputs[..n_inputs]
                    .iter()
                    .map(|b| &b[..c.len])
                    .collect();
                f(c, &views)
            })
        })
        .collect()
}

/// Folds every chunk into per-thread accumulators and combines them. Only for
/// exact accumulations (integer counts), where the combination order cannot
/// change the result.
pub fn fold_exact<T: Send>(
    job: &MergeJob,
    init: impl Fn() -> T + Sync + Send,
    fold: impl Fn(&mut T, Chunk, &[&[f32]]) + Sync + Send,
    combine: impl Fn(T, T) -> T + Sync + Send,
) -> T {
    let n_inputs = job.inputs.len();
    chunks(job.numel(), CHUNK)
        .fold(&init, |mut acc, c| {
            with_scratch(n_inputs, CHUNK, |scratch| {
                scratch.load(&job.inputs, c);
                let views: Vec<&[f32]> = scratch.inputs[..n_inputs]
                    .iter()
                    .map(|b| &b[..c.len])
                    .collect();
                fold(&mut acc, c, &views);
            });
            acc
        })
        .reduce(&init, &combine)
}

/// Sums of f64 partials in chunk order (deterministic).
pub fn sum_partials<const N: usize>(parts: &[[f64; N]]) -> [f64; N] {
    let mut acc = [0.0f64; N];
    for p in parts {
        for (a, x) in acc.iter_mut().zip(p) {
            *a += x;
        }
    }
    acc
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for method unit tests: run a method on small f32 tensors.
    use super::*;
    use crate::methods::{MergeMethod, TensorParams};

    pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Runs `method` on f32 inputs and returns the f32 output.
    pub fn run(
        method: &dyn MergeMethod,
        shape: &[u64],
        inputs: &[Vec<f32>],
        base: Option<usize>,
        params: &TensorParams,
    ) -> Result<Vec<f32>, MethodError> {
        run_dtype(method, shape, inputs, base, params, DType::F32, DType::F32)
    }

    /// Runs `method` on f32 inputs with a given seed.
    pub fn run_seeded(
        method: &dyn MergeMethod,
        shape: &[u64],
        inputs: &[Vec<f32>],
        base: Option<usize>,
        params: &TensorParams,
        seed: u64,
    ) -> Vec<f32> {
        run_full(
            method,
            shape,
            inputs,
            base,
            params,
            DType::F32,
            DType::F32,
            seed,
        )
        .expect("method runs")
    }

    /// Runs `method` with inputs stored as `in_dtype` and output as `out_dtype`.
    pub fn run_dtype(
        method: &dyn MergeMethod,
        shape: &[u64],
        inputs: &[Vec<f32>],
        base: Option<usize>,
        params: &TensorParams,
        in_dtype: DType,
        out_dtype: DType,
    ) -> Result<Vec<f32>, MethodError> {
        run_full(method, shape, inputs, base, params, in_dtype, out_dtype, 42)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_full(
        method: &dyn MergeMethod,
        shape: &[u64],
        inputs: &[Vec<f32>],
        base: Option<usize>,
        params: &TensorParams,
        in_dtype: DType,
        out_dtype: DType,
        seed: u64,
    ) -> Result<Vec<f32>, MethodError> {
        let encoded: Vec<Vec<u8>> = inputs
            .iter()
            .map(|v| {
                let mut b = vec![0u8; v.len() * in_dtype.size()];
                encode_f32(in_dtype, v, &mut b);
                b
            })
            .collect();
        let job = MergeJob {
            name: "model.layers.0.mlp.up_proj.weight",
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
            params,
            seed,
        };
        let n = job.numel();
        let mut bytes = vec![0u8; n * out_dtype.size()];
        let mut out = OutputView {
            dtype: out_dtype,
            bytes: &mut bytes,
        };
        method.merge(&job, &mut out)?;
        let mut res = vec![0f32; n];
        decode_f32(out_dtype, &bytes, &mut res);
        Ok(res)
    }

    pub fn params(
        shared: &[(&str, crate::methods::ParamValue)],
        per_input: &[&[(&str, crate::methods::ParamValue)]],
    ) -> TensorParams {
        TensorParams {
            shared: shared.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            per_input: per_input
                .iter()
                .map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect())
                .collect(),
        }
    }

    pub fn num(x: f64) -> crate::methods::ParamValue {
        crate::methods::ParamValue::Number(x)
    }

    pub fn flag(b: bool) -> crate::methods::ParamValue {
        crate::methods::ParamValue::Bool(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_do_not_depend_on_thread_count() {
        let n = CHUNK * 5 + 123;
        let data: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
        let bytes = testing::f32_bytes(&data);
        let params = TensorParams::default();
        let shape = [n as u64];
        let job = MergeJob {
            name: "t",
            shape: &shape,
            inputs: vec![TensorView {
                dtype: DType::F32,
                bytes: &bytes,
                scale: None,
            }],
            base: None,
            params: &params,
            seed: 0,
        };
        let sum = |job: &MergeJob| {
            sum_partials(&reduce(job, |_, x| {
                [x[0].iter().map(|&v| v as f64).sum::<f64>()]
            }))[0]
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let four = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let a = one.install(|| sum(&job));
        let b = four.install(|| sum(&job));
        assert_eq!(a.to_bits(), b.to_bits());
    }

    #[test]
    fn row_chunks_hold_whole_rows() {
        assert_eq!(row_chunk(64) % 64, 0);
        assert_eq!(row_chunk(CHUNK * 3), CHUNK * 3);
        assert_eq!(row_chunk(1000) % 1000, 0);
    }
}
