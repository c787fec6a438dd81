//! Chunked execution of merge methods. A tensor is cut into fixed-size chunks of
//! elements; each chunk of every input is decoded to f32 in per-thread scratch
//! (an FP8 weight's block scales and a LoRA adapter's delta applied there; a
//! packed MXFP4 input decoded from its codes and scales),
//! handed to the method's closure, and the f32 result is encoded straight into the
//! output bytes. Chunk boundaries depend only on the tensor's size (never on the
//! thread count), and reductions combine per-chunk partials in chunk order, so
//! results are bit-identical whatever the parallelism.
//!
//! A tensor too large to hold may be *streamed* ([`MergeJob::stream`]): every
//! helper then walks it in segments of whole chunks, one after the other, asking
//! the [`Segments`](super::Segments) source for each segment's input bytes (and, in [`map`],
//! handing it each segment's output). Chunks keep their indices and offsets in
//! the whole tensor, so a streamed merge gives the same bits as a whole one; a
//! method that needs whole-tensor statistics (norms, top-k thresholds) gets
//! them from its reductions, each one more pass over the segments.

use super::job::{Chunk, MergeJob, OutputView, TensorView};
use crate::dtype::{decode_f32, encode_f32};
use rayon::prelude::*;
use std::ops::Range;

/// Elements per chunk: small enough that every input's chunk stays in L2 cache,
/// large enough to amortise the per-chunk bookkeeping.
pub const CHUNK: usize = 1 << 15;

/// Elements of one segment for a helper with chunk size `chunk` when the source
/// wants `elements`.
pub fn segment_len(elements: usize, chunk: usize) -> usize {
    let chunk = chunk.max(1);
    (elements / chunk).max(1) * chunk
}

/// Calls `f(range, inputs)` for each segment of `job`'s tensor in order, with
/// chunks of `chunk` elements (the whole tensor at once unless streamed).
fn each_segment(job: &MergeJob, chunk: usize, mut f: impl FnMut(Range<usize>, &[TensorView])) {
    let numel = job.numel();
    let Some(stream) = job.stream else {
        return f(0..numel, &job.inputs);
    };
    let seg = segment_len(stream.elements(), chunk);
    let mut start = 0;
    while start < numel {
        let range = start..(start + seg).min(numel);
        stream.with_inputs(range.clone(), &mut |bytes| {
            let views: Vec<TensorView> = job
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
            if let Some(p) = &view.packed {
                p.decode(c.start, &mut buf[..c.len]);
            } else {
                let size = view.dtype.size();
                let at = c.start - offset;
                decode_f32(
                    view.dtype,
                    &view.bytes[at * size..(at + c.len) * size],
                    &mut buf[..c.len],
                );
            }
            if let Some(scale) = &view.scale {
                scale.apply(c.start, &mut buf[..c.len]);
            }
            if let Some(lora) = &view.lora {
                lora.apply(c.start, &mut buf[..c.len]);
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
fn chunk_iter(range: Range<usize>, chunk: usize) -> impl IndexedParallelIterator<Item = Chunk> {
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
    each_segment(job, chunk, |range, inputs| {
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
    each_segment(job, CHUNK, |_, inputs| match job.stream {
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
    each_segment(job, chunk, |range, inputs| {
        let offset = range.start;
        results.par_extend(chunk_iter(range, chunk).map(|c| {
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
    each_segment(job, CHUNK, |range, inputs| {
        let offset = range.start;
        let part = chunk_iter(range, CHUNK)
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
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::methods::testing;
    use crate::unit::TensorParams;

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
                lora: None,
                packed: None,
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
