//! Runs one work unit. Its tensors are taken in windows of consecutive tensors
//! (see [`read::windows`]); a window's inputs are loaded (local files mapped,
//! remote ranges fetched) while the window before it computes, the window's
//! tensors are computed in parallel into one reused output buffer, and a writer
//! thread streams finished buffers — header first, tensors in order — to storage
//! and hashes them, while the next window computes. The shard appears in storage
//! atomically when complete.

mod device;
mod guard;
mod inputs;
pub mod memory;
pub mod read;
pub mod stream;

pub use device::Device;

use crate::dtype::DType;
use crate::methods::kernel::BlockScale;
use crate::methods::{self, MergeJob, MethodError, OutputView, Segments, TensorView};
use crate::storage::{self, StorageError};
use crate::unit::{
    NonFinite, OutputTensor, Requant, TensorOp, UnitError, UnitOutput, WorkUnit, PLAN_FORMAT,
};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::sync::{mpsc, Mutex};

mod finite;

/// `tensor: N NaN, M Inf` for up to five tensors, and how many more.
pub fn describe_non_finite(list: &[NonFinite]) -> String {
    let mut parts: Vec<String> = list
        .iter()
        .take(5)
        .map(|t| format!("{}: {} NaN, {} Inf", t.tensor, t.nan, t.inf))
        .collect();
    if list.len() > 5 {
        parts.push(format!("and {} more tensors", list.len() - 5));
    }
    parts.join("; ")
}

/// Why a unit failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Method(#[from] MethodError),
    /// The unit is not one a planner would write (see [`WorkUnit::validate`]).
    #[error(transparent)]
    Invalid(#[from] UnitError),
    /// A panic in the pipeline: a bug, reported as the unit's error.
    #[error("internal error (a bug): {0}")]
    Internal(String),
    /// An input file that is not a usable safetensors file (not one at all,
    /// or truncated or changed since the merge was planned).
    #[error("refusing to read {input} from {location}: not a usable safetensors file: {message}")]
    NotSafetensors {
        location: String,
        input: String,
        message: String,
    },
    /// An input reference that is not exactly a tensor of its file's header.
    #[error("{tensor}: refusing to read input {input} from {location}: {message}")]
    InputMismatch {
        location: String,
        tensor: String,
        input: String,
        message: String,
    },
    #[error("work unit {unit} uses merge method '{method}', which this build does not know")]
    UnknownMethod { unit: usize, method: String },
    #[error("work unit {unit} has plan format {found}, this build reads format {expected}")]
    Format {
        unit: usize,
        found: u32,
        expected: u32,
    },
    #[error(
        "work unit {unit} ({file}) needs at least {needs} of memory ({detail}), more than the \
         {budget} it may use; raise --max-memory or run fewer units at once"
    )]
    OverBudget {
        unit: usize,
        file: String,
        /// The most demanding tensor and why, and what the memory goes to.
        detail: String,
        needs: String,
        budget: String,
    },
    #[error("computing on the GPU: {0}")]
    Gpu(String),
    #[error("{tensor}: the merge produced {produced} of its {expected} bytes while streaming")]
    StreamIncomplete {
        tensor: String,
        produced: u64,
        expected: u64,
    },
    #[error(
        "{tensor}: the inputs hold different values ({models}), but a non-float tensor can only \
         be copied when every model has the same one"
    )]
    BuffersDiffer { tensor: String, models: String },
}

/// Progress callbacks: bytes read from inputs and bytes written so far.
pub trait Progress: Sync {
    fn read(&self, _bytes: u64) {}
    fn written(&self, _bytes: u64) {}
    /// A unit is done: computed now, or `resumed` (finished by an earlier run).
    /// `input_bytes` is what it reads.
    fn unit_done(&self, _input_bytes: u64, _resumed: bool) {}
}

/// No progress reporting.
pub struct NoProgress;
impl Progress for NoProgress {}

/// How much a unit may hold in memory at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecLimits {
    /// Input bytes of one window of tensors computed together (a tensor larger
    /// than this is a window by itself).
    pub window_bytes: u64,
    /// Load the next window while this one computes (doubles the inputs held).
    pub read_ahead: bool,
    /// Stream a tensor whose inputs exceed `window_bytes` in segments of about
    /// that many input bytes instead of reading it whole (see [`stream`]).
    pub stream: bool,
}

impl Default for ExecLimits {
    fn default() -> Self {
        ExecLimits {
            window_bytes: read::WINDOW_BYTES,
            read_ahead: true,
            stream: false,
        }
    }
}

impl ExecLimits {
    /// Whether `t` is streamed under these limits. A re-quantized FP8 output
    /// needs its whole merged weight for the block scales, so it never is.
    pub fn streams(&self, t: &OutputTensor) -> bool {
        self.stream && t.requant.is_none() && t.input_bytes() > self.window_bytes
    }

    /// The limits that keep `unit` within `budget` bytes (the defaults when
    /// there is no budget).
    pub fn for_unit(
        unit: &WorkUnit,
        out_dir: &str,
        budget: Option<u64>,
    ) -> Result<Self, ExecError> {
        let Some(budget) = budget else {
            return Ok(ExecLimits::default());
        };
        memory::limits_within(unit, out_dir, budget, rayon::current_num_threads())
            .map_err(|e| e.error(unit, budget))
    }
}

/// A byte count for people: `812 B`, `3.71 GB` (powers of 1000, as disk and
/// network sizes are quoted).
pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// Executes `unit`, writing its shard into `out_dir`.
pub fn execute_unit(
    unit: &WorkUnit,
    out_dir: &str,
    progress: &dyn Progress,
) -> Result<UnitOutput, ExecError> {
    execute_unit_with(unit, out_dir, progress, &ExecLimits::default())
}

/// A finished buffer on its way to the writer: the buffer and how much of it is
/// output.
type Filled = (Vec<u8>, usize);

/// [`execute_unit`] within `limits`.
pub fn execute_unit_with(
    unit: &WorkUnit,
    out_dir: &str,
    progress: &dyn Progress,
    limits: &ExecLimits,
) -> Result<UnitOutput, ExecError> {
    execute_unit_on(unit, out_dir, progress, limits, &Device::Cpu)
}

/// [`execute_unit_with`] computing on `device`. The unit is validated
/// ([`WorkUnit::validate`]) and its inputs checked against their files' headers
/// before anything is written; a panic anywhere in the pipeline is returned as
/// [`ExecError::Internal`].
pub fn execute_unit_on(
    unit: &WorkUnit,
    out_dir: &str,
    progress: &dyn Progress,
    limits: &ExecLimits,
    device: &Device,
) -> Result<UnitOutput, ExecError> {
    guard::catch(|| {
        unit.validate()?;
        run_unit(unit, out_dir, progress, limits, device)
    })
}

/// The pipeline proper, for a validated unit.
fn run_unit(
    unit: &WorkUnit,
    out_dir: &str,
    progress: &dyn Progress,
    limits: &ExecLimits,
    device: &Device,
) -> Result<UnitOutput, ExecError> {
    let method = unit_method(unit)?;
    let layout = unit.layout();
    let maps = read::Maps::open(&unit.tensors)?;
    inputs::check(unit, &maps)?;
    let windows = read::windows(&unit.tensors, limits.window_bytes);
    let out_store = storage::for_location(out_dir);
    let location = out_store.join(out_dir, &unit.file_name);
    let writer = out_store.create(&location)?;

    let (writer, hasher, size, non_finite) = std::thread::scope(|scope| {
        // Loader: one window ahead of compute (or in step with it).
        // `None`: a streamed tensor, read as it computes.
        let (load_tx, load_rx) = mpsc::sync_channel::<Result<Option<read::Loaded>, ExecError>>(0);
        let (next_tx, next_rx) = mpsc::channel::<()>();
        let tensors = &unit.tensors;
        let maps_ref = &maps;
        let windows_ref = &windows;
        let read_ahead = limits.read_ahead;
        scope.spawn(move || {
            let load = || {
                for w in windows_ref {
                    if !read_ahead && next_rx.recv().is_err() {
                        break;
                    }
                    let ts = &tensors[w.clone()];
                    let loaded = match ts {
                        [t] if limits.streams(t) => Ok(None),
                        _ => read::load(ts, maps_ref).map(Some).map_err(ExecError::from),
                    };
                    let failed = loaded.is_err();
                    if load_tx.send(loaded).is_err() || failed {
                        break;
                    }
                }
                Ok(())
            };
            // A panic is sent on as the window's error.
            if let Err(e) = guard::catch(load) {
                let _ = load_tx.send(Err(e));
            }
        });

        // Writer: header, then every filled buffer in order; buffers go back.
        let (fill_tx, fill_rx) = mpsc::sync_channel::<Filled>(1);
        let (free_tx, free_rx) = mpsc::sync_channel::<Vec<u8>>(2);
        let layout_ref = &layout;
        let writing = scope.spawn(move || {
            guard::catch(move || -> Result<_, ExecError> {
                let mut writer = writer;
                let mut hasher = Sha256::new();
                let mut scan = finite::FiniteScan::new(layout_ref);
                let header = &layout_ref.header;
                writer.write_all(header)?;
                hasher.update(header);
                let mut size = header.len() as u64;
                for (buf, len) in fill_rx {
                    writer.write_all(&buf[..len])?;
                    hasher.update(&buf[..len]);
                    scan.update(&buf[..len]);
                    size += len as u64;
                    progress.written(len as u64);
                    let _ = free_tx.send(buf);
                }
                Ok((writer, hasher, size, scan.finish()))
            })
        });

        // Output buffers: two, passed to the writer and back.
        let pool = Mutex::new(Pool {
            spare: vec![Vec::new(), Vec::new()],
            free: free_rx,
        });
        let send = |buf: Vec<u8>, len: usize| {
            fill_tx
                .send((buf, len))
                .map_err(|_| StorageError::io(&location, "output writer stopped"))
        };
        let emit = |bytes: &[u8]| -> Result<(), StorageError> {
            let mut buf = Pool::take(&pool, &location)?;
            if buf.len() < bytes.len() {
                buf.resize(bytes.len(), 0);
            }
            buf[..bytes.len()].copy_from_slice(bytes);
            send(buf, bytes.len())
        };
        // A panic here (or in a compute thread: rayon passes it on) ends the
        // unit; the channels below are dropped either way, so the reader and
        // the writer stop.
        let computed = guard::catch(|| -> Result<(), ExecError> {
            for w in &windows {
                if !read_ahead {
                    let _ = next_tx.send(());
                }
                let loaded = load_rx
                    .recv()
                    .map_err(|_| StorageError::io(&location, "input reader stopped"))??;
                let tensors = &unit.tensors[w.clone()];
                let Some(loaded) = loaded else {
                    let t = &tensors[0];
                    stream_tensor(unit, method, t, &maps, limits, &pool, &location, &emit)?;
                    progress.read(t.input_bytes());
                    continue;
                };
                let views = loaded.views(tensors, &maps)?;
                let len: usize = tensors.iter().map(|t| t.byte_len() as usize).sum();
                let mut buf = Pool::take(&pool, &location)?;
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                compute_window(unit, method, tensors, &views, &mut buf[..len], device)?;
                drop(views);
                progress.read(loaded.bytes);
                maps.release(tensors);
                if send(buf, len).is_err() {
                    // The writer failed; its error is reported below.
                    break;
                }
            }
            Ok(())
        });
        drop(fill_tx);
        drop(load_rx);
        drop(next_tx);
        drop(pool);
        let written = writing.join().unwrap_or_else(|p| Err(guard::internal(p)));
        // A failed writer stops the compute too: its error is the one to report.
        let written = written?;
        computed?;
        Ok::<_, ExecError>(written)
    })?;
    writer.commit()?;
    for t in &non_finite {
        tracing::warn!(
            tensor = %t.tensor,
            nan = t.nan,
            inf = t.inf,
            shard = %unit.file_name,
            "the merged tensor has non-finite values"
        );
    }
    Ok(UnitOutput {
        unit: unit.id,
        file_name: unit.file_name.clone(),
        size,
        sha256: hex::encode(hasher.finalize()),
        tensors: unit.tensors.iter().map(|t| t.name.clone()).collect(),
        non_finite,
    })
}

/// Computes tensor `index` of `unit` alone, on the CPU, and returns its bytes:
/// what the unit's shard holds for it. A tensor's merge depends only on the
/// tensor (name, shape, inputs, parameters) and the unit's seed, not on the
/// other tensors of the unit, so this is how a coordinator spot-checks a
/// worker's shard without recomputing the whole unit.
pub fn compute_tensor(unit: &WorkUnit, index: usize) -> Result<Vec<u8>, ExecError> {
    let method = unit_method(unit)?;
    let Some(tensors) = unit.tensors.get(index..index + 1) else {
        return Ok(Vec::new());
    };
    let maps = read::Maps::open(tensors)?;
    let loaded = read::load(tensors, &maps)?;
    let views = loaded.views(tensors, &maps)?;
    let mut out = vec![0u8; tensors[0].byte_len() as usize];
    compute(
        unit,
        method,
        &tensors[0],
        &views[0],
        &mut out,
        None,
        &Device::Cpu,
    )?;
    Ok(out)
}

/// The method of a unit this build can execute: its plan format must be this
/// build's and its method known.
fn unit_method(unit: &WorkUnit) -> Result<&'static dyn methods::MergeMethod, ExecError> {
    if unit.format != PLAN_FORMAT {
        return Err(ExecError::Format {
            unit: unit.id,
            found: unit.format,
            expected: PLAN_FORMAT,
        });
    }
    methods::get(&unit.merge_method).ok_or_else(|| ExecError::UnknownMethod {
        unit: unit.id,
        method: unit.merge_method.clone(),
    })
}

/// Computes a window's tensors in parallel, each into its slice of `out`.
fn compute_window(
    unit: &WorkUnit,
    method: &dyn methods::MergeMethod,
    tensors: &[OutputTensor],
    inputs: &[Vec<&[u8]>],
    mut out: &mut [u8],
    device: &Device,
) -> Result<(), ExecError> {
    let mut slices = Vec::with_capacity(tensors.len());
    for t in tensors {
        let (head, rest) = out.split_at_mut(t.byte_len() as usize);
        slices.push(head);
        out = rest;
    }
    if tensors.len() == 1 {
        return compute(
            unit,
            method,
            &tensors[0],
            &inputs[0],
            slices.pop().unwrap_or_default(),
            None,
            device,
        );
    }
    tensors
        .par_iter()
        .zip(inputs)
        .zip(slices)
        .try_for_each(|((t, ins), o)| compute(unit, method, t, ins, o, None, device))
}

/// The free output buffers: spare ones, and those the writer gives back.
struct Pool {
    spare: Vec<Vec<u8>>,
    free: mpsc::Receiver<Vec<u8>>,
}

impl Pool {
    /// A free buffer, waiting for the writer to return one if need be.
    fn take(pool: &Mutex<Pool>, location: &str) -> Result<Vec<u8>, StorageError> {
        let mut p = pool
            .lock()
            .map_err(|_| StorageError::io(location, "output buffers lost"))?;
        match p.spare.pop() {
            Some(b) => Ok(b),
            None => p
                .free
                .recv()
                .map_err(|_| StorageError::io(location, "output writer stopped")),
        }
    }

    fn put(pool: &Mutex<Pool>, buf: Vec<u8>) {
        if let Ok(mut p) = pool.lock() {
            p.spare.push(buf);
        }
    }
}

/// Computes `t` in segments (see [`stream`]), each output segment going to
/// `emit` as it is done.
#[allow(clippy::too_many_arguments)]
fn stream_tensor(
    unit: &WorkUnit,
    method: &dyn methods::MergeMethod,
    t: &OutputTensor,
    maps: &read::Maps,
    limits: &ExecLimits,
    pool: &Mutex<Pool>,
    location: &str,
    emit: &(dyn Fn(&[u8]) -> Result<(), StorageError> + Sync),
) -> Result<(), ExecError> {
    // Block scales are small: read whole.
    let scales: Vec<std::borrow::Cow<[u8]>> = t
        .scales
        .iter()
        .flatten()
        .map(|r| match maps.get(r) {
            Some(m) => m
                .bytes(r.offset..r.offset + r.len)
                .map(std::borrow::Cow::Borrowed),
            None => storage::for_location(&r.location)
                .read_range(&r.location, r.offset..r.offset + r.len)
                .map(std::borrow::Cow::Owned),
        })
        .collect::<Result<_, _>>()?;
    let mut inputs: Vec<&[u8]> = vec![&[]; t.inputs.len()];
    inputs.extend(scales.iter().map(|s| &s[..]));
    let elements = stream::segment_elements(t, limits.window_bytes);
    let source = stream::Stream::new(&t.inputs, maps, elements, emit);
    let out_len = stream::max_segment_elements(t, elements) * t.dtype.size();
    let mut buf = Pool::take(pool, location)?;
    if buf.len() < out_len {
        buf.resize(out_len, 0);
    }
    let computed = compute(
        unit,
        method,
        t,
        &inputs,
        &mut buf[..out_len],
        Some(&source),
        &Device::Cpu,
    );
    Pool::put(pool, buf);
    let (failed, produced) = source.finish();
    if let Some(e) = failed {
        return Err(e.into());
    }
    computed?;
    if produced != t.byte_len() {
        return Err(ExecError::StreamIncomplete {
            tensor: t.name.clone(),
            produced,
            expected: t.byte_len(),
        });
    }
    Ok(())
}

/// Computes `t` from its inputs' bytes (then its scales' bytes) into `out`;
/// streamed (`stream`), the inputs' bytes are empty and come segment by
/// segment from `stream`, and `out` holds one segment.
fn compute(
    unit: &WorkUnit,
    method: &dyn methods::MergeMethod,
    t: &OutputTensor,
    inputs: &[&[u8]],
    out: &mut [u8],
    stream: Option<&dyn Segments>,
    device: &Device,
) -> Result<(), ExecError> {
    match t.op {
        TensorOp::CopyIdentical => {
            let differ = || ExecError::BuffersDiffer {
                tensor: t.name.clone(),
                models: t
                    .inputs
                    .iter()
                    .map(|r| r.name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            if let Some(stream) = stream {
                let mut same = true;
                let numel = t.numel() as usize;
                let seg = stream.elements().max(1);
                for start in (0..numel).step_by(seg) {
                    stream.with_inputs(start..(start + seg).min(numel), &mut |ins| {
                        same &= ins.iter().all(|b| *b == ins[0]);
                        if same {
                            stream.emit(ins[0]);
                        }
                    });
                    if !same {
                        return Err(differ());
                    }
                }
                return Ok(());
            }
            let inputs = &inputs[..t.inputs.len().min(inputs.len())];
            if inputs.iter().any(|b| *b != inputs[0]) {
                return Err(differ());
            }
            out.copy_from_slice(inputs[0]);
            Ok(())
        }
        TensorOp::Merge => {
            // `inputs` holds the inputs, then the scales of the block-scaled ones.
            let n = t.inputs.len();
            let mut scale_bytes = inputs[n.min(inputs.len())..].iter();
            let block = t.block.unwrap_or([128, 128]);
            let mut views = Vec::with_capacity(n);
            for (i, (r, b)) in t.inputs.iter().zip(inputs).enumerate() {
                let scale = match t.scales.get(i) {
                    Some(Some(sr)) => Some(BlockScale {
                        dtype: sr.dtype,
                        bytes: scale_bytes.next().copied().unwrap_or_default(),
                        cols: r.shape.get(1).copied().unwrap_or(1) as usize,
                        block_rows: block[0].max(1) as usize,
                        block_cols: block[1].max(1) as usize,
                        scale_cols: sr.shape.get(1).copied().unwrap_or(1) as usize,
                    }),
                    _ => None,
                };
                views.push(TensorView {
                    dtype: r.dtype,
                    bytes: b,
                    scale,
                });
            }
            // A re-quantized FP8 output merges as its weight (name and shape
            // key the method and its random streams).
            let (name, shape) = match &t.requant {
                Some(rq) => (rq.weight.as_str(), rq.weight_shape.as_slice()),
                None => (t.name.as_str(), t.shape.as_slice()),
            };
            let job = MergeJob {
                name,
                shape,
                inputs: views,
                base: t.base,
                params: &t.params,
                seed: unit.seed,
                stream,
            };
            let Some(rq) = &t.requant else {
                let mut view = OutputView {
                    dtype: t.dtype,
                    bytes: out,
                };
                if let Some(done) = device.merge(&unit.merge_method, &job, &mut view) {
                    return done.map_err(ExecError::Gpu);
                }
                method.merge(&job, &mut view)?;
                return Ok(());
            };
            let numel = job.numel();
            let mut merged = vec![0u8; numel * 4];
            method.merge(
                &job,
                &mut OutputView {
                    dtype: DType::F32,
                    bytes: &mut merged,
                },
            )?;
            let mut values = vec![0f32; numel];
            crate::dtype::decode_f32(DType::F32, &merged, &mut values);
            drop(merged);
            requantize(&values, shape, rq, out);
            Ok(())
        }
    }
}

/// Writes `values` (a merged 2-D weight) as E4M3 with per-block scales
/// `amax / 448`, or (`rq.scales`) those scales as F32: DeepSeek-V3's layout,
/// where the weight is `fp8 · weight_scale_inv` per block.
fn requantize(values: &[f32], shape: &[u64], rq: &Requant, out: &mut [u8]) {
    let (rows, cols) = (
        shape.first().copied().unwrap_or(1) as usize,
        shape.get(1).copied().unwrap_or(1).max(1) as usize,
    );
    let (br, bc) = (rq.block[0].max(1) as usize, rq.block[1].max(1) as usize);
    let (sr, sc) = (rows.div_ceil(br), cols.div_ceil(bc));
    // Block scales, one row of blocks at a time.
    let scales: Vec<f32> = (0..sr)
        .into_par_iter()
        .flat_map_iter(|b| {
            let mut amax = vec![0f32; sc];
            for r in b * br..((b + 1) * br).min(rows) {
                for (c, v) in values[r * cols..(r + 1) * cols].iter().enumerate() {
                    let a = &mut amax[c / bc];
                    *a = a.max(v.abs());
                }
            }
            amax.into_iter().map(|a| {
                if a > 0.0 && a.is_finite() {
                    a / crate::dtype::F8_E4M3_MAX
                } else {
                    1.0
                }
            })
        })
        .collect();
    if rq.scales {
        for (o, s) in out.chunks_exact_mut(4).zip(&scales) {
            o.copy_from_slice(&s.to_le_bytes());
        }
        return;
    }
    out.par_chunks_mut(cols)
        .zip(values.par_chunks(cols))
        .enumerate()
        .for_each(|(r, (o, v))| {
            let srow = &scales[(r / br) * sc..(r / br + 1) * sc];
            for (c, (o, &x)) in o.iter_mut().zip(v).enumerate() {
                *o = crate::dtype::f32_to_f8_e4m3(x / srow[c / bc]);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MergeConfig;
    use crate::plan::{plan, PlanOptions, DEFAULT_SHARD_SIZE};
    use std::path::PathBuf;

    /// The conformance kit's cases for the methods the GPU path computes, run
    /// unit by unit on the CPU and on the emulated GPU (through the same
    /// executor: windows, tensors merged in parallel): the shards are equal.
    #[test]
    fn units_on_the_emulated_gpu_write_the_cpu_bytes() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        for case in [
            "linear",
            "dare_ties",
            "task_arithmetic",
            "mixtral_task_arithmetic",
        ] {
            let path = root
                .join("tests/fixtures/cases")
                .join(case)
                .join("config.yaml");
            let yaml = std::fs::read_to_string(&path).unwrap();
            let cfg = MergeConfig::parse("config.yaml", &yaml).unwrap();
            let p = plan(
                &cfg,
                &PlanOptions {
                    out_shard_size: DEFAULT_SHARD_SIZE / 4,
                    seed: 7,
                    allow_crimes: false,
                    keep_fp8: false,
                    base_dir: root.join("examples"),
                },
            )
            .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let out = |d: &str| {
                let o = dir.path().join(d);
                std::fs::create_dir_all(&o).unwrap();
                o.to_string_lossy().into_owned()
            };
            let (cpu, gpu) = (out("cpu"), out("gpu"));
            for unit in &p.units {
                let limits = ExecLimits::default();
                let a = execute_unit_on(unit, &cpu, &NoProgress, &limits, &Device::Cpu).unwrap();
                let b =
                    execute_unit_on(unit, &gpu, &NoProgress, &limits, &Device::Emulated).unwrap();
                assert_eq!(a.sha256, b.sha256, "{case}: {} differs", unit.file_name);
            }
        }
    }

    fn ties_unit() -> WorkUnit {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let yaml =
            std::fs::read_to_string(root.join("tests/fixtures/cases/ties/config.yaml")).unwrap();
        let cfg = MergeConfig::parse("config.yaml", &yaml).unwrap();
        let mut p = plan(
            &cfg,
            &PlanOptions {
                out_shard_size: DEFAULT_SHARD_SIZE,
                seed: 7,
                allow_crimes: false,
                keep_fp8: false,
                base_dir: root.join("examples"),
            },
        )
        .unwrap();
        p.units.remove(0)
    }

    /// `f`'s result on a thread of its own, or a failed test after `limit`
    /// (a hang) or if the thread panicked (a panic that escaped).
    fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the unit did not end within 60 s"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the panic escaped"),
        }
    }

    fn out_dir() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().to_string_lossy().into_owned();
        (dir, out)
    }

    fn assert_internal(e: &ExecError) {
        let text = e.to_string();
        assert!(matches!(e, ExecError::Internal(_)), "{text}");
        assert!(
            text.starts_with("internal error (a bug): panicked at ") && text.contains(".rs:"),
            "{text}"
        );
    }

    /// A kernel that panics (an integer merged output, which validation would
    /// refuse: the pipeline is called without it) fails the unit within
    /// bounded time, in the parallel compute of a window, in a window of one
    /// tensor, and in a streamed tensor; nothing is written.
    #[test]
    fn a_panicking_kernel_is_the_units_error_not_a_hang() {
        let mut unit = ties_unit();
        for t in &mut unit.tensors {
            t.dtype = DType::I64;
        }
        assert!(unit.validate().is_err());
        for limits in [
            ExecLimits::default(),
            ExecLimits {
                window_bytes: 1,
                read_ahead: false,
                stream: false,
            },
            ExecLimits {
                window_bytes: 4096,
                read_ahead: true,
                stream: true,
            },
        ] {
            let (dir, out) = out_dir();
            let u = unit.clone();
            let r = bounded(move || run_unit(&u, &out, &NoProgress, &limits, &Device::Cpu));
            let e = r.expect_err("a panic is an error");
            assert_internal(&e);
            assert!(e.to_string().contains("non-float dtype I64"), "{e}");
            assert_eq!(
                std::fs::read_dir(dir.path()).unwrap().count(),
                0,
                "{limits:?}"
            );
            // Through the public entry, validation refuses the unit first.
            let (_dir, out) = out_dir();
            let e = execute_unit_with(&unit, &out, &NoProgress, &limits).unwrap_err();
            assert!(matches!(e, ExecError::Invalid(_)), "{e}");
        }
    }

    /// A panic on the writer thread (here in a progress callback) fails the
    /// unit too, with the panic's message and place.
    #[test]
    fn a_panic_on_the_writer_thread_is_the_units_error() {
        struct Explodes;
        impl Progress for Explodes {
            fn written(&self, _: u64) {
                panic!("progress callback exploded");
            }
        }
        let unit = ties_unit();
        let (dir, out) = out_dir();
        let r = bounded(move || execute_unit(&unit, &out, &Explodes));
        let e = r.expect_err("a panic is an error");
        assert_internal(&e);
        assert!(e.to_string().contains("progress callback exploded"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Inputs are read only as tensors of their file's own header.
    #[test]
    fn inputs_must_be_tensors_of_their_files_header() {
        let unit = ties_unit();
        let (dir, out) = out_dir();
        let run = |u: &WorkUnit| execute_unit(u, &out, &NoProgress).unwrap_err().to_string();
        let name = unit.tensors[0].name.clone();

        // Shifted by one element: same length, not the header's range.
        let mut u = unit.clone();
        u.tensors[0].inputs[1].offset += 2;
        let e = run(&u);
        let file = &unit.tensors[0].inputs[1].location;
        assert!(e.contains(&name) && e.contains(file.as_str()), "{e}");
        assert!(e.contains("but the file's header has"), "{e}");

        // Another tensor's name at this tensor's range.
        let mut u = unit.clone();
        u.tensors[0].inputs[0].name = "model.norm.weight".into();
        assert!(run(&u).contains("but the file's header has"));

        // A name the file does not have.
        let mut u = unit.clone();
        u.tensors[0].inputs[0].name = "exfil".into();
        assert!(run(&u).contains("exfil") && run(&u).contains("no such tensor"));

        // A file that is not a safetensors file.
        let secret = dir.path().join("secret.txt");
        std::fs::write(&secret, vec![b'x'; 200_000]).unwrap();
        let mut u = unit.clone();
        u.tensors[0].inputs[0].location = secret.to_string_lossy().into_owned();
        let e = run(&u);
        assert!(
            e.contains("secret.txt") && e.contains("not a usable safetensors file"),
            "{e}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("secret.txt")]);
    }

    /// What the checks cost on a unit of 12,000 tensors from four 12,000-tensor
    /// files (`cargo test --release -p fleetmerge-engine check_cost -- --ignored
    /// --nocapture`).
    #[test]
    #[ignore = "a measurement"]
    fn check_cost() {
        use crate::unit::{ParamValue, TensorParams, TensorRef};
        use std::time::Instant;
        const N: usize = 12_000;
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..N)
            .map(|i| {
                format!(
                    "model.layers.{}.mlp.experts.{}.up_proj.weight",
                    i / 100,
                    i % 100
                )
            })
            .collect();
        let mut files = Vec::new();
        for m in 0..4 {
            let mut header = serde_json::Map::new();
            for (i, n) in names.iter().enumerate() {
                header.insert(
                    n.clone(),
                    serde_json::json!({"dtype": "BF16", "shape": [64], "data_offsets": [i * 128, (i + 1) * 128]}),
                );
            }
            let json = serde_json::to_vec(&header).unwrap();
            let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(&json);
            let start = bytes.len() as u64;
            bytes.resize(bytes.len() + N * 128, 0x3f);
            let path = dir.path().join(format!("m{m}.safetensors"));
            std::fs::write(&path, bytes).unwrap();
            files.push((path.to_string_lossy().into_owned(), start));
        }
        let mut params = TensorParams::default();
        params
            .shared
            .insert("normalize".into(), ParamValue::Bool(true));
        params.per_input = vec![[("weight".to_string(), ParamValue::Number(0.25))].into(); 4];
        let unit = WorkUnit {
            format: PLAN_FORMAT,
            id: 0,
            file_name: "model.safetensors".into(),
            merge_method: "linear".into(),
            seed: 0,
            tensors: names
                .iter()
                .enumerate()
                .map(|(i, n)| OutputTensor {
                    name: n.clone(),
                    dtype: DType::BF16,
                    shape: vec![64],
                    op: TensorOp::Merge,
                    inputs: files
                        .iter()
                        .enumerate()
                        .map(|(m, (loc, start))| TensorRef {
                            model: m,
                            name: n.clone(),
                            location: loc.clone(),
                            offset: start + i as u64 * 128,
                            len: 128,
                            dtype: DType::BF16,
                            shape: vec![64],
                        })
                        .collect(),
                    base: None,
                    params: params.clone(),
                    scales: Vec::new(),
                    block: None,
                    requant: None,
                })
                .collect(),
        };
        let t = Instant::now();
        unit.validate().unwrap();
        let validate = t.elapsed();
        let t = Instant::now();
        let maps = read::Maps::open(&unit.tensors).unwrap();
        inputs::check(&unit, &maps).unwrap();
        let check = t.elapsed();
        let (_out, out) = out_dir();
        let t = Instant::now();
        execute_unit(&unit, &out, &NoProgress).unwrap();
        let whole = t.elapsed();
        println!(
            "{N} tensors x 4 inputs: validate {validate:?}, header check (4 headers of {N}) \
             {check:?}, whole unit (both included) {whole:?}"
        );
    }
}
