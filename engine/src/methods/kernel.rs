//! Chunked execution of merge kernels. A tensor is cut into fixed-size chunks of
//! elements; each chunk of every input is decoded to f32 in per-thread scratch,
//! handed to the method's closure, and the f32 result is encoded straight into the
//! output bytes. Chunk boundaries depend only on the tensor's size (never on the
//! thread count), and reductions combine per-chunk partials in chunk order, so
//! results are bit-identical whatever the parallelism.
//!
//! A tensor too large to hold may be *streamed* ([`MergeJob::stream`]): every
//! helper then walks it in segments of whole chunks, one after the other, asking
//! the [`Segments`] source for each segment's input bytes (and, in [`map`],
//! handing it each segment's output). Chunks keep their indices and offsets in
//! the whole tensor, so a streamed merge gives the same bits as a whole one; a
//! method that needs whole-tensor statistics (norms, top-k thresholds) gets
//! them from its reductions, each one more pass over the segments.

use super::MethodError;
use crate::dtype::{decode_f32, encode_f32, DType};
use crate::unit::TensorParams;
use rayon::prelude::*;
use std::ops::Range;

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

/// Where a streamed tensor's inputs come from and where its output goes.
pub trait Segments: Sync {
    /// Elements per segment wanted; helpers round it down to a multiple of
    /// their chunk size (at least one chunk).
    fn elements(&self) -> usize;
    /// Calls `f` with every input's bytes of elements `range`, in input order.
    /// A source that fails records its error (the caller reports it) and hands
    /// `f` zeros, so that the method runs to its end harmlessly.
    fn with_inputs(&self, range: std::ops::Range<usize>, f: &mut dyn FnMut(&[&[u8]]));
    /// Takes the next segment of output bytes (segments come in order).
    fn emit(&self, bytes: &[u8]);
}

/// Elements of one segment for a helper with chunk size `chunk` when the source
/// wants `elements`.
pub fn segment_len(elements: usize, chunk: usize) -> usize {
    let chunk = chunk.max(1);
    (elements / chunk).max(1) * chunk
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
    /// Set when the tensor is streamed: `inputs` then carry dtypes and scales
    /// but no bytes, and `out` holds one segment (see [`Segments`]).
    pub stream: Option<&'a dyn Segments>,
}

impl std::fmt::Debug for dyn Segments + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Segments({} elements)", self.elements())
    }
}

impl<'a> MergeJob<'a> {
    /// Calls `f(range, inputs)` for each segment of the tensor in order, with
    /// chunks of `chunk` elements (the whole tensor at once unless streamed).
    fn each_segment(&self, chunk: usize, mut f: impl FnMut(Range<usize>, &[TensorView])) {
        let numel = self.numel();
        let Some(stream) = self.stream else {
            return f(0..numel, &self.inputs);
        };
        let seg = segment_len(stream.elements(), chunk);
        let mut start = 0;
        while start < numel {
            let range = start..(start + seg).min(numel);
            stream.with_inputs(range.clone(), &mut |bytes| {
                let views: Vec<TensorView> = self
                    .inputs
                    .iter()
                    .zip(bytes)
                    .map(|(v, b)| TensorView { bytes: b, ..*v })
                    .collect();
                f(range.clone(), &views)
            });
            start = range.end;
        }
    }

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

    /// Decodes chunk `c` of inputs whose bytes begin at element `offset`.
    fn load(&mut self, inputs: &[TensorView], c: Chunk, offset: usize) {
        for (buf, view) in self.inputs.iter_mut().zip(inputs) {
            let size = view.dtype.size();
            let at = c.start - offset;
            decode_f32(
                view.dtype,
                &view.bytes[at * size..(at + c.len) * size],
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

/// The chunks of elements `range` (which starts on a chunk boundary).
fn chunks(range: Range<usize>, chunk: usize) -> impl IndexedParallelIterator<Item = Chunk> {
    let chunk = chunk.max(1);
    let first = range.start / chunk;
    let count = range.len().div_ceil(chunk);
    (first..first + count).into_par_iter().map(move |index| {
        let start = index * chunk;
        Chunk {
            index,
            start,
            len: chunk.min(range.end - start),
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
    let mut spill = Vec::new();
    job.each_segment(chunk, |range, inputs| {
        let len = range.len() * out_size;
        // A segment longer than the caller's buffer (not with the executor's
        // sizes) is computed into a buffer of its own.
        let seg_out: &mut [u8] = if out.bytes.len() >= len {
            &mut out.bytes[..len]
        } else {
            spill.resize(len, 0u8);
            &mut spill[..]
        };
        let first = range.start / chunk;
        seg_out
            .par_chunks_mut(chunk * out_size)
            .enumerate()
            .for_each(|(i, out_bytes)| {
                let index = first + i;
                let c = Chunk {
                    index,
                    start: index * chunk,
                    len: out_bytes.len() / out_size,
                };
                with_scratch(n_inputs, chunk, |scratch| {
                    scratch.load(inputs, c, range.start);
                    let Scratch { inputs, out } = scratch;
                    let views: Vec<&[f32]> =
                        inputs[..n_inputs].iter().map(|b| &b[..c.len]).collect();
                    let out = &mut out[..c.len];
                    f(c, &views, out);
                    encode_f32(out_dtype, out, out_bytes);
                })
            });
        if let Some(stream) = job.stream {
            stream.emit(seg_out);
        }
    });
}

/// Copies input `input` unchanged into the output (same dtype, no scale).
pub fn copy(job: &MergeJob, input: usize, out: &mut OutputView) {
    job.each_segment(CHUNK, |_, inputs| match job.stream {
        Some(stream) => stream.emit(inputs[input].bytes),
        None => out.bytes.copy_from_slice(inputs[input].bytes),
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
    let mut results = Vec::with_capacity(job.numel().div_ceil(chunk));
    job.each_segment(chunk, |range, inputs| {
        let offset = range.start;
        results.par_extend(chunks(range, chunk).map(|c| {
            with_scratch(n_inputs, chunk, |scratch| {
                scratch.load(inputs, c, offset);
                let views: Vec<&[f32]> = scratch.inputs[..n_inputs]
                    .iter()
                    .map(|b| &b[..c.len])
                    .collect();
                f(c, &views)
            })
        }));
    });
    results
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
    let mut total = None;
    job.each_segment(CHUNK, |range, inputs| {
        let offset = range.start;
        let part = chunks(range, CHUNK)
            .fold(&init, |mut acc, c| {
                with_scratch(n_inputs, CHUNK, |scratch| {
                    scratch.load(inputs, c, offset);
                    let views: Vec<&[f32]> = scratch.inputs[..n_inputs]
                        .iter()
                        .map(|b| &b[..c.len])
                        .collect();
                    fold(&mut acc, c, &views);
                });
                acc
            })
            .reduce(&init, &combine);
        total = Some(match total.take() {
            Some(t) => combine(t, part),
            None => part,
        });
    });
    total.unwrap_or_else(init)
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
    use crate::methods::MergeMethod;
    use crate::unit::TensorParams;

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
        let bytes = run_bytes(
            method, shape, inputs, base, params, in_dtype, out_dtype, seed, None,
        )?;
        let mut res = vec![0f32; bytes.len() / out_dtype.size()];
        decode_f32(out_dtype, &bytes, &mut res);
        Ok(res)
    }

    /// `inputs` stored as `dtype`.
    pub fn encode(inputs: &[Vec<f32>], dtype: DType) -> Vec<Vec<u8>> {
        inputs
            .iter()
            .map(|v| {
                let mut b = vec![0u8; v.len() * dtype.size()];
                encode_f32(dtype, v, &mut b);
                b
            })
            .collect()
    }

    /// An in-memory [`Segments`] source: serves ranges of the inputs' bytes
    /// and collects what is emitted.
    pub struct MemorySegments<'a> {
        pub elements: usize,
        pub inputs: Vec<(&'a [u8], usize)>,
        pub emitted: std::sync::Mutex<Vec<u8>>,
    }

    impl Segments for MemorySegments<'_> {
        fn elements(&self) -> usize {
            self.elements
        }
        fn with_inputs(&self, range: Range<usize>, f: &mut dyn FnMut(&[&[u8]])) {
            let parts: Vec<&[u8]> = self
                .inputs
                .iter()
                .map(|&(b, size)| &b[range.start * size..range.end * size])
                .collect();
            f(&parts)
        }
        fn emit(&self, bytes: &[u8]) {
            self.emitted.lock().unwrap().extend_from_slice(bytes);
        }
    }

    /// Runs `method` and returns the output bytes; with `segment` set, the
    /// tensor is streamed in segments of that many elements, through an output
    /// buffer of one segment.
    #[allow(clippy::too_many_arguments)]
    pub fn run_bytes(
        method: &dyn MergeMethod,
        shape: &[u64],
        inputs: &[Vec<f32>],
        base: Option<usize>,
        params: &TensorParams,
        in_dtype: DType,
        out_dtype: DType,
        seed: u64,
        segment: Option<usize>,
    ) -> Result<Vec<u8>, MethodError> {
        let encoded = encode(inputs, in_dtype);
        let source = segment.map(|elements| MemorySegments {
            elements,
            inputs: encoded.iter().map(|b| (&b[..], in_dtype.size())).collect(),
            emitted: Default::default(),
        });
        let job = MergeJob {
            name: "model.layers.0.mlp.up_proj.weight",
            shape,
            inputs: encoded
                .iter()
                .map(|b| TensorView {
                    dtype: in_dtype,
                    bytes: if segment.is_some() { &[] } else { b },
                    scale: None,
                })
                .collect(),
            base,
            params,
            seed,
            stream: source.as_ref().map(|s| s as &dyn Segments),
        };
        let n = job.numel();
        let len = match segment {
            Some(e) => e.max(CHUNK).min(n.max(1)),
            None => n,
        };
        let mut bytes = vec![0u8; len * out_dtype.size()];
        let mut out = OutputView {
            dtype: out_dtype,
            bytes: &mut bytes,
        };
        method.merge(&job, &mut out)?;
        drop(job);
        Ok(match source {
            Some(s) => s.emitted.into_inner().unwrap(),
            None => bytes,
        })
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
            stream: None,
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

    /// Parameters every registered method accepts: its required ones set to
    /// plausible values, varied by input.
    fn plausible_params(method: &dyn crate::methods::MergeMethod, n: usize) -> TensorParams {
        use crate::methods::{ParamDefault, ParamKind, Scope};
        use crate::unit::ParamValue;
        let mut p = TensorParams {
            per_input: vec![Default::default(); n],
            ..Default::default()
        };
        for spec in method.spec().params {
            let value = |i: usize| match (spec.name, spec.kind) {
                (_, ParamKind::Bool) => ParamValue::Bool(false),
                ("weight", _) => ParamValue::Number(0.3 + 0.2 * i as f64),
                ("density", _) => ParamValue::Number(0.55),
                ("epsilon", _) => ParamValue::Number(0.1),
                (_, ParamKind::Number { min, max }) if min >= 0.0 && max <= 1.0 => {
                    ParamValue::Number(0.35)
                }
                _ => ParamValue::Number(0.5),
            };
            if spec.default != ParamDefault::Required {
                continue;
            }
            match spec.scope {
                Scope::Shared => {
                    p.shared.insert(spec.name.to_string(), value(0));
                }
                Scope::Input | Scope::NonBase => {
                    for (i, m) in p.per_input.iter_mut().enumerate() {
                        m.insert(spec.name.to_string(), value(i));
                    }
                }
            }
        }
        p
    }

    #[test]
    fn every_method_gives_the_same_bits_streamed_in_segments() {
        use crate::methods::{registry, BasePolicy};
        // Rows of 1000 (not a divisor of CHUNK), 300 rows: 9 chunks and a tail.
        let shape = [300u64, 1000];
        let n = 300_000;
        let mut merged = 0;
        for method in registry() {
            let spec = method.spec();
            let count = 3usize
                .max(spec.min_inputs)
                .min(spec.max_inputs.unwrap_or(usize::MAX));
            let base = match spec.base {
                BasePolicy::Required | BasePolicy::Optional if count > 1 => Some(count - 1),
                _ => None,
            };
            let inputs: Vec<Vec<f32>> = (0..count)
                .map(|m| {
                    (0..n)
                        .map(|i| (((i * (m + 3) * 7919) % 2003) as f32 - 1001.0) * 1e-3)
                        .collect()
                })
                .collect();
            let params = plausible_params(*method, count);
            let run = |segment| {
                testing::run_bytes(
                    *method,
                    &shape,
                    &inputs,
                    base,
                    &params,
                    DType::BF16,
                    DType::BF16,
                    7,
                    segment,
                )
            };
            let whole = run(None);
            for segment in [CHUNK, 3 * CHUNK + 5, 100_000] {
                let streamed = run(Some(segment));
                match (&whole, &streamed) {
                    (Ok(a), Ok(b)) => {
                        assert!(a == b, "{}: segments of {segment} differ", spec.name)
                    }
                    (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
                    _ => panic!("{}: {whole:?} vs {streamed:?}", spec.name),
                }
            }
            merged += whole.is_ok() as usize;
        }
        eprintln!("{merged} of {} methods merged", registry().len());
        // Every method but passthrough (one input only) merged.
        assert!(merged >= registry().len() - 1, "only {merged} merged");
    }

    #[test]
    fn row_chunks_hold_whole_rows() {
        assert_eq!(row_chunk(64) % 64, 0);
        assert_eq!(row_chunk(CHUNK * 3), CHUNK * 3);
        assert_eq!(row_chunk(1000) % 1000, 0);
    }
}
