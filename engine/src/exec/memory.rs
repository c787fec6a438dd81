//! What a work unit holds in memory while it runs, and the [`ExecLimits`] that
//! keep it within a budget (`--max-memory`).
//!
//! A unit holds, at its peak: the inputs of the window being computed and of
//! the one loaded ahead (mapped pages of local files count, as they do in RSS;
//! remote inputs are buffers), two output buffers (one computing, one being
//! written), the output writer's blocks, per-thread chunk scratch, and what the
//! method keeps per tensor (top-k candidates, samples) for every thread that may
//! be merging a tensor of the window at once. A streamed tensor holds one
//! segment of its inputs and two of its output instead of the whole tensor.
//! A vocabulary tensor's inputs are the rows its alignment reads; re-indexing
//! them holds them decoded and the aligned inputs the method merges (read
//! whole: the whole tensor's, streamed: one segment's; see `vocab.rs`; an
//! adapted input's aligned rows are f32). An adapted input's LoRA factors
//! count as inputs (read whole, also when its tensor is streamed), decoded to
//! f32 as working memory, and each thread holds the delta of a chunk. A
//! packed (MXFP4) input is read whole (codes and scales, never streamed) and
//! decoded chunk by chunk; the method's working memory counts the decoded
//! elements, and a half of a packed output (or a re-quantized FP8 weight)
//! holds the whole merged tensor in f32 while it is encoded.

use super::{read, stream, vocab, ExecLimits};
use crate::methods;
use crate::unit::WorkUnit;

/// Bytes of the process itself (code, allocator, runtime), outside any unit.
pub const PROCESS_BYTES: u64 = 48 << 20;

/// Smallest window tried before giving up on a budget.
const MIN_WINDOW: u64 = 1 << 20;

/// A unit's peak memory, by what holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryEstimate {
    /// Inputs of the window in flight and of the one loaded ahead.
    pub inputs: u64,
    /// The two output buffers.
    pub outputs: u64,
    /// Blocks or parts of the output writer.
    pub writer: u64,
    /// Per-thread chunk scratch and the methods' per-tensor working memory.
    pub working: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.inputs + self.outputs + self.writer + self.working
    }
}

/// The peak memory of running `unit` into `out_dir` within `limits` on
/// `threads` compute threads.
pub fn estimate(
    unit: &WorkUnit,
    out_dir: &str,
    limits: &ExecLimits,
    threads: usize,
) -> MemoryEstimate {
    let threads = threads.max(1) as u64;
    let windows = read::windows(&unit.tensors, limits.window_bytes);
    // A streamed tensor's largest segment, in elements.
    let segment = |w: &std::ops::Range<usize>| match &unit.tensors[w.clone()] {
        [t] if limits.streams(t) => Some((
            t,
            stream::max_segment_elements(t, stream::segment_elements(t, limits.window_bytes))
                as u64,
        )),
        _ => None,
    };
    let input_bytes = |w: &std::ops::Range<usize>| -> u64 {
        if let Some((t, elements)) = segment(w) {
            let per_element: u64 = t.inputs.iter().map(|r| r.dtype.size() as u64).sum();
            // Block scales and LoRA factors are read whole.
            let side: u64 = t.side_refs().map(|r| r.len).sum();
            return elements * per_element + side;
        }
        unit.tensors[w.clone()]
            .iter()
            .map(|t| t.input_bytes())
            .sum()
    };
    let output_bytes = |w: &std::ops::Range<usize>| -> u64 {
        if let Some((t, elements)) = segment(w) {
            return elements * t.dtype.size() as u64;
        }
        unit.tensors[w.clone()].iter().map(|t| t.byte_len()).sum()
    };
    let ins: Vec<u64> = windows.iter().map(input_bytes).collect();
    let inputs = (0..ins.len())
        .map(|i| {
            let ahead = if limits.read_ahead {
                ins.get(i + 1).copied().unwrap_or(0)
            } else {
                0
            };
            ins[i] + ahead
        })
        .max()
        .unwrap_or(0);
    let outputs = 2 * windows.iter().map(output_bytes).max().unwrap_or(0);
    let method = methods::get_for_unit(&unit.merge_method);
    let max_inputs = unit
        .tensors
        .iter()
        .map(|t| t.inputs.len())
        .max()
        .unwrap_or(0) as u64;
    // Chunk scratch: every input, the output and a few method buffers per
    // input; with a LoRA adapter, the delta's product (and a second one for
    // ranks summed in blocks).
    let adapted = unit
        .tensors
        .iter()
        .any(|t| t.inputs.iter().any(|r| r.lora.is_some()));
    let lora_scratch = if adapted { 2 } else { 0 };
    let scratch =
        threads * (2 * max_inputs + 4 + lora_scratch) * methods::chunked::CHUNK as u64 * 4;
    // Per-tensor working memory: the largest `threads` tensors of a window may
    // be merged at once.
    let per_tensor = windows
        .iter()
        .map(|w| {
            let mut m: Vec<u64> = unit.tensors[w.clone()]
                .iter()
                .map(|t| {
                    // A re-quantized FP8 output, or a half of a packed
                    // (MXFP4) one, merges into f32 first (bytes + values), in
                    // the decoded shape.
                    let packed = t.packed.as_ref().and_then(|p| p.out.as_ref());
                    let requant = t
                        .requant
                        .as_ref()
                        .map(|r| &r.weight_shape)
                        .or(packed.map(|p| &p.merged_shape))
                        .map_or(0, |shape| 8 * shape.iter().product::<u64>());
                    let numel = packed.map_or(t.numel(), |p| p.merged_shape.iter().product());
                    method.map_or(0, |m| m.working_memory(numel, t.inputs.len()))
                        + requant
                        + aligned_bytes(t, limits)
                        + lora_bytes(t)
                })
                .collect();
            m.sort_unstable_by(|a, b| b.cmp(a));
            m.iter().take(threads as usize).sum::<u64>()
        })
        .max()
        .unwrap_or(0);
    MemoryEstimate {
        inputs,
        outputs,
        writer: crate::storage::write_buffer_bytes(out_dir),
        working: scratch + per_tensor,
    }
}

/// What re-indexing a vocabulary tensor's inputs holds at its peak beyond
/// the window's inputs (none for other tensors): read whole, the rows read,
/// decoded, one aligned input in f32, and every aligned input in its aligned
/// dtype (f32 for an adapted input); streamed (the aligned segment is the
/// segment's inputs), a segment's rows read and decoded and its aligned f32
/// rows.
fn aligned_bytes(t: &crate::unit::OutputTensor, limits: &ExecLimits) -> u64 {
    if t.vocab.is_none() {
        return 0;
    }
    if limits.streams(t) {
        let elements =
            stream::max_segment_elements(t, stream::segment_elements(t, limits.window_bytes));
        return vocab::working_bytes(t, Some(elements));
    }
    let aligned: u64 = t
        .inputs
        .iter()
        .map(|r| vocab::aligned_dtype(r).size() as u64)
        .sum();
    vocab::working_bytes(t, None) + aligned * t.numel()
}

/// The LoRA factors of a tensor's adapted inputs, decoded to f32 while it is
/// merged.
fn lora_bytes(t: &crate::unit::OutputTensor) -> u64 {
    t.inputs
        .iter()
        .filter_map(|r| r.lora.as_deref())
        .map(|l| {
            methods::lora::LoraFactors::decoded_bytes(
                l.a.shape.iter().product(),
                l.b.shape.iter().product(),
            )
        })
        .sum()
}

/// Why a unit cannot run within a budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverBudget {
    /// The least the unit needs (smallest window, no read-ahead).
    pub needs: u64,
    /// The tensor that needs the most, and why.
    pub tensor: String,
    pub why: String,
}

impl OverBudget {
    /// The error that refuses `unit` for a `budget`.
    pub fn error(self, unit: &WorkUnit, budget: u64) -> super::ExecError {
        super::ExecError::OverBudget {
            unit: unit.id,
            file: unit.file_name.clone(),
            detail: format!("{} {}", self.tensor, self.why),
            needs: super::human_bytes(self.needs as f64),
            budget: super::human_bytes(budget as f64),
        }
    }
}

/// The highest estimated peak over the units of a merge.
#[derive(Debug)]
pub struct Peak<'a> {
    /// Bytes at the peak (for a unit over budget, the least it needs).
    pub bytes: u64,
    /// The unit that peaks, and the limits it runs with.
    pub unit: Option<&'a WorkUnit>,
    pub limits: ExecLimits,
    /// The first unit that cannot run within the budget.
    pub over_budget: Option<super::ExecError>,
    /// Tensors streamed in segments under the budget, over all units.
    pub streamed: usize,
}

impl crate::plan::summary::PeakMemory for Peak<'_> {
    fn peak_bytes(&self) -> u64 {
        self.bytes
    }
    fn streamed_tensors(&self) -> usize {
        self.streamed
    }
}

/// Estimates every unit of `units` (into `out_dir`, on `threads` threads,
/// within `budget` bytes each when given) and returns the highest peak.
pub fn peak<'a>(
    units: &'a [WorkUnit],
    out_dir: &str,
    budget: Option<u64>,
    threads: usize,
) -> Peak<'a> {
    let mut p = Peak {
        bytes: 0,
        unit: None,
        limits: ExecLimits::default(),
        over_budget: None,
        streamed: 0,
    };
    for unit in units {
        let (bytes, limits) = match budget.map(|b| (b, limits_within(unit, out_dir, b, threads))) {
            None => (None, ExecLimits::default()),
            Some((_, Ok(limits))) => (None, limits),
            Some((b, Err(e))) => {
                let needs = e.needs;
                p.over_budget.get_or_insert_with(|| e.error(unit, b));
                (
                    Some(needs),
                    ExecLimits {
                        window_bytes: MIN_WINDOW,
                        read_ahead: false,
                        stream: true,
                    },
                )
            }
        };
        let bytes = bytes
            .unwrap_or_else(|| PROCESS_BYTES + estimate(unit, out_dir, &limits, threads).total());
        p.streamed += unit.tensors.iter().filter(|t| limits.streams(t)).count();
        if p.unit.is_none() || bytes > p.bytes {
            p = Peak {
                bytes,
                unit: Some(unit),
                limits,
                over_budget: p.over_budget,
                streamed: p.streamed,
            };
        }
    }
    p
}

/// The largest window (with read-ahead when it fits) that keeps `unit` within
/// `budget` bytes, the process's own share included. Under a budget, a tensor
/// larger than the window is streamed when it can be.
pub fn limits_within(
    unit: &WorkUnit,
    out_dir: &str,
    budget: u64,
    threads: usize,
) -> Result<ExecLimits, OverBudget> {
    let fits =
        |l: &ExecLimits| PROCESS_BYTES + estimate(unit, out_dir, l, threads).total() <= budget;
    let mut window = read::WINDOW_BYTES;
    while window >= MIN_WINDOW {
        for read_ahead in [true, false] {
            let l = ExecLimits {
                window_bytes: window,
                read_ahead,
                stream: true,
            };
            if fits(&l) {
                return Ok(l);
            }
        }
        window /= 2;
    }
    let least = ExecLimits {
        window_bytes: MIN_WINDOW,
        read_ahead: false,
        stream: true,
    };
    // The tensor that needs the most: read whole, or working memory streamed.
    let method = methods::get_for_unit(&unit.merge_method);
    let (tensor, why) = unit
        .tensors
        .iter()
        .map(|t| {
            let working = method.map_or(0, |m| m.working_memory(t.numel(), t.inputs.len()))
                + aligned_bytes(t, &least);
            if least.streams(t) {
                let why = format!(
                    "needs {} of working memory for {}its {} merge, even streamed",
                    super::human_bytes(working as f64),
                    if t.vocab.is_some() {
                        "aligning its rows to the output vocabulary and "
                    } else {
                        ""
                    },
                    unit.merge_method
                );
                (working, t, why)
            } else if t.packed.is_some() && t.input_bytes() > least.window_bytes {
                let why = "is read whole: MXFP4 inputs are decoded from their whole codes (each \
                           decoded element of the transposed tensor reads anywhere in them)"
                    .to_string();
                (t.input_bytes() + working, t, why)
            } else if t.requant.is_some() && t.input_bytes() > least.window_bytes {
                let why = "is read whole: FP8 weights re-quantized with --keep-fp8 are merged \
                           whole (their block scales need the whole merged weight)"
                    .to_string();
                (t.input_bytes() + working, t, why)
            } else {
                (t.input_bytes() + working, t, "is read whole".to_string())
            }
        })
        .max_by_key(|(bytes, _, _)| *bytes)
        .map(|(_, t, why)| (t.name.clone(), why))
        .unwrap_or_default();
    let e = estimate(unit, out_dir, &least, threads);
    let h = |b: u64| super::human_bytes(b as f64);
    Err(OverBudget {
        needs: PROCESS_BYTES + e.total(),
        tensor,
        why: format!(
            "{why}; in all: {} for the process, {} of inputs and outputs, {} of output writer \
             buffers, {} of thread scratch and method working memory",
            h(PROCESS_BYTES),
            h(e.inputs + e.outputs),
            h(e.writer),
            h(e.working)
        ),
    })
}

/// Memory sizes (`--max-memory`): the one size syntax of [`crate::size`].
pub use crate::size::parse_size as parse_memory;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::unit::{OutputTensor, TensorOp, TensorRef, PLAN_FORMAT};

    fn unit(method: &str, tensors: &[(&str, u64)]) -> WorkUnit {
        WorkUnit {
            part: None,
            format: PLAN_FORMAT,
            id: 0,
            file_name: "model.safetensors".into(),
            merge_method: method.into(),
            seed: 0,
            tensors: tensors
                .iter()
                .map(|&(name, numel)| OutputTensor {
                    name: name.into(),
                    dtype: DType::BF16,
                    shape: vec![numel],
                    op: TensorOp::Merge,
                    inputs: (0..3)
                        .map(|i| TensorRef {
                            model: i,
                            location: format!("/m{i}/model.safetensors"),
                            name: name.into(),
                            dtype: DType::BF16,
                            shape: vec![numel],
                            lora: None,
                            offset: 0,
                            len: numel * 2,
                        })
                        .collect(),
                    base: Some(2),
                    params: Default::default(),
                    scales: Vec::new(),
                    block: None,
                    requant: None,
                    packed: None,
                    vocab: None,
                })
                .collect(),
        }
    }

    /// A unit of one vocabulary tensor of `rows` rows of `width` bf16 values
    /// from two inputs: the first has exactly those rows, the second
    /// `extra` more that the output drops.
    fn vocab_unit(rows: u64, width: u64, extra: u64) -> WorkUnit {
        use crate::unit::{RowRun, VocabAlignment};
        let mut u = unit("linear", &[("model.embed_tokens.weight", rows * width)]);
        let t = &mut u.tensors[0];
        t.shape = vec![rows, width];
        t.inputs.truncate(2);
        t.base = None;
        for (r, n) in t.inputs.iter_mut().zip([rows, rows + extra]) {
            r.shape = vec![n, width];
            r.len = n * width * 2;
        }
        let all = vec![RowRun {
            out: 0,
            src: 0,
            len: rows,
        }];
        t.vocab = Some(VocabAlignment {
            rows,
            tokens: rows,
            runs: vec![all.clone(), all],
            fills: Vec::new(),
        });
        u
    }

    #[test]
    fn a_vocabulary_tensor_reads_and_holds_only_its_aligned_rows() {
        // 32 Ki rows of 1024 bf16 (64 MiB per input); the second input has
        // 224 Ki more rows (448 MiB) that the output drops.
        let u = vocab_unit(32 << 10, 1024, 224 << 10);
        let t = &u.tensors[0];
        assert_eq!(t.input_bytes(), 2 * (64 << 20));
        assert_eq!(t.input_read_bytes(), [64 << 20, 64 << 20]);
        assert_eq!(u.input_bytes(), 2 * (64 << 20));
        let whole = estimate(&u, "/out", &ExecLimits::default(), 2);
        assert_eq!(
            whole.inputs,
            2 * (64 << 20),
            "the dropped rows are not read"
        );
        // Aligning holds the rows decoded (2 x 128 MiB), one aligned input in
        // f32 (128 MiB) and both aligned inputs in bf16 (128 MiB).
        assert!(whole.working >= 512 << 20, "{whole:?}");
        // Within 300 MiB it streams: a segment of rows at a time.
        let budget = 300 << 20;
        let limits = limits_within(&u, "/out", budget, 2).unwrap();
        assert!(limits.streams(t), "{limits:?}");
        let streamed = estimate(&u, "/out", &limits, 2);
        assert!(PROCESS_BYTES + streamed.total() <= budget);
        assert!(
            streamed.inputs < 2 * limits.window_bytes + (1 << 20),
            "{streamed:?}"
        );
        // The smallest window: a segment's rows, not the tensor.
        let least = ExecLimits {
            window_bytes: MIN_WINDOW,
            read_ahead: false,
            stream: true,
        };
        let e = estimate(&u, "/out", &least, 2);
        assert!(e.inputs + e.outputs + e.working < 16 << 20, "{e:?}");
    }

    #[test]
    fn sizes_parse_in_both_unit_systems() {
        assert_eq!(parse_memory("8G").unwrap(), 8_000_000_000);
        assert_eq!(parse_memory("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_memory("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_memory("2gi").unwrap(), 2 << 30);
        assert_eq!(parse_memory("4096").unwrap(), 4096);
        assert!(parse_memory("much").is_err());
        assert!(parse_memory("0").is_err());
    }

    #[test]
    fn estimates_follow_the_window_and_the_method() {
        // 16 tensors of 8 Mi elements: 48 MiB of inputs and 16 MiB of output each.
        let names: Vec<String> = (0..16).map(|i| format!("t{i}")).collect();
        let ts: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 8 << 20)).collect();
        let linear = unit("linear", &ts);
        let l = ExecLimits::default();
        let e = estimate(&linear, "/out", &l, 2);
        // One tensor per 64 MiB window, plus the one loaded ahead.
        assert_eq!(e.inputs, 2 * (48 << 20));
        assert_eq!(e.outputs, 2 * (16 << 20));
        let no_ahead = ExecLimits {
            read_ahead: false,
            ..l
        };
        assert_eq!(estimate(&linear, "/out", &no_ahead, 2).inputs, 48 << 20);
        // TIES keeps top-k candidates per tensor being merged.
        let ties = estimate(&unit("ties", &ts), "/out", &l, 2);
        assert!(ties.working > e.working + (8 << 20));
    }

    #[test]
    fn a_budget_picks_the_largest_window_that_fits() {
        let names: Vec<String> = (0..64).map(|i| format!("t{i}")).collect();
        let ts: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 1 << 20)).collect();
        let u = unit("linear", &ts);
        let roomy = limits_within(&u, "/out", 8 << 30, 2).unwrap();
        assert_eq!(
            roomy,
            ExecLimits {
                stream: true,
                ..ExecLimits::default()
            }
        );
        let tight = limits_within(&u, "/out", 150 << 20, 2).unwrap();
        assert!(tight.window_bytes < read::WINDOW_BYTES);
        assert!(PROCESS_BYTES + estimate(&u, "/out", &tight, 2).total() <= 150 << 20);
        let err = limits_within(&u, "/out", 60 << 20, 2).unwrap_err();
        assert!(err.needs > 60 << 20);
    }
}
