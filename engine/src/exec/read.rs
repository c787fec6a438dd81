//! Reading a unit's inputs, one window of consecutive tensors at a time.
//!
//! Local files are memory-mapped: a tensor's bytes are read in place, without a
//! copy, and the window's ranges are mapped ahead of the compute ([`Mapped::prefetch`])
//! and unmapped after it ([`Mapped::release`]), so that resident memory stays at
//! a couple of windows whatever the model size.
//!
//! Remote objects are latency-bound: within a window, the byte ranges that lie in
//! the same object and at most [`GAP_BYTES`] apart are fetched as one range
//! request, the spans of different objects at the same time, and each tensor's
//! bytes are cut out of its span. A window of hundreds of small expert tensors
//! costs a handful of requests per input file instead of one per tensor.
//!
//! A vocabulary tensor is read by rows: of each input, only the row ranges
//! its alignment uses (see [`super::vocab`]), each one byte range, mapped or
//! fetched (and coalesced) like any other; its inputs' LoRA factors whole.

use crate::storage::{self, Mapped, StorageError};
use crate::unit::{OutputTensor, TensorRef};
use std::collections::HashMap;
use std::ops::Range;

/// Input bytes of one window at most (unless one tensor alone is larger).
pub const WINDOW_BYTES: u64 = 64 << 20;
/// Unneeded bytes a span may carry between two needed ranges.
pub const GAP_BYTES: u64 = 1 << 20;

/// The input bytes `t` takes in a window: what it reads, or for a vocabulary
/// tensor the aligned inputs it merges when they are more.
pub fn tensor_bytes(t: &OutputTensor) -> u64 {
    let read = t.input_bytes();
    if t.vocab.is_none() {
        return read;
    }
    let aligned: u64 = t
        .inputs
        .iter()
        .map(|r| super::vocab::aligned_dtype(r).size() as u64)
        .sum();
    read.max(aligned * t.numel())
}

/// Consecutive tensors computed together: as many as fit in `limit` input
/// bytes ([`tensor_bytes`]); a tensor whose inputs alone exceed it is a window
/// by itself.
pub fn windows(tensors: &[OutputTensor], limit: u64) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let b = tensor_bytes(t);
        if i > start && bytes + b > limit {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += b;
    }
    if start < tensors.len() {
        out.push(start..tensors.len());
    }
    out
}

/// A range of one object to fetch, and the (tensor, input) slices it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub location: String,
    pub range: Range<u64>,
    /// (tensor index in the window, input index, offset within the span, length).
    pub parts: Vec<(usize, usize, u64, u64)>,
}

/// Groups the given inputs into spans: per object, ranges sorted by offset,
/// merged while the gap is at most `gap` and the span at most `limit`.
pub fn spans<'a>(
    refs: impl IntoIterator<Item = (usize, usize, &'a TensorRef)>,
    gap: u64,
    limit: u64,
) -> Vec<Span> {
    let mut refs: Vec<(usize, usize, &TensorRef)> = refs.into_iter().collect();
    refs.sort_by(|a, b| (&a.2.location, a.2.offset).cmp(&(&b.2.location, b.2.offset)));
    let mut out: Vec<Span> = Vec::new();
    for (ti, ii, r) in refs {
        let end = r.offset + r.len;
        match out.last_mut() {
            Some(s)
                if s.location == r.location
                    && r.offset <= s.range.end + gap
                    && end.max(s.range.end) - s.range.start <= limit =>
            {
                s.range.end = s.range.end.max(end);
                s.parts.push((ti, ii, r.offset - s.range.start, r.len));
            }
            _ => out.push(Span {
                location: r.location.clone(),
                range: r.offset..end,
                parts: vec![(ti, ii, 0, r.len)],
            }),
        }
    }
    out
}

/// All (tensor, input, ref) triples of a window.
fn refs(tensors: &[OutputTensor]) -> impl Iterator<Item = (usize, usize, &TensorRef)> {
    tensors
        .iter()
        .enumerate()
        .flat_map(|(ti, t)| t.all_refs().enumerate().map(move |(ii, r)| (ti, ii, r)))
}

/// The memory maps of a unit's local input files, opened once per unit.
#[derive(Default)]
pub struct Maps {
    files: HashMap<String, Mapped>,
}

impl Maps {
    /// Maps every local file the tensors read.
    pub fn open(tensors: &[OutputTensor]) -> Result<Self, StorageError> {
        let mut files = HashMap::new();
        for (_, _, r) in refs(tensors) {
            if !files.contains_key(&r.location) {
                // Local files, and Hub files the HF cache holds.
                if let Some(path) = storage::local_file(&r.location) {
                    files.insert(r.location.clone(), Mapped::open(&path)?);
                }
            }
        }
        Ok(Maps { files })
    }

    /// The map of `r`'s file (`None` for a remote object).
    pub fn get(&self, r: &TensorRef) -> Option<&Mapped> {
        self.files.get(&r.location)
    }

    /// Releases the mapped pages of a window's local inputs.
    pub fn release(&self, tensors: &[OutputTensor]) {
        for (_, _, r) in refs(tensors) {
            if let Some(m) = self.get(r) {
                m.release(r.offset..r.offset + r.len);
            }
        }
    }
}

/// One byte range a window reads: all of an input (or scale) of one of its
/// tensors, or rows of a vocabulary tensor's input.
#[derive(Debug, Clone)]
struct Part {
    tensor: usize,
    /// Index into the tensor's [`OutputTensor::all_refs`].
    input: usize,
    /// The rows, for a vocabulary tensor.
    rows: Option<Range<u64>>,
    bytes: Range<u64>,
}

/// Every part a window reads, in tensor, input and row order, with its ref.
fn parts(tensors: &[OutputTensor]) -> Vec<(Part, &TensorRef)> {
    let mut out = Vec::new();
    for (ti, t) in tensors.iter().enumerate() {
        if t.vocab.is_some() {
            for (ii, (r, rows)) in t.inputs.iter().zip(super::vocab::whole_rows(t)).enumerate() {
                for rows in rows {
                    let bytes = super::vocab::byte_range(r, &rows);
                    let rows = Some(rows);
                    out.push((
                        Part {
                            tensor: ti,
                            input: ii,
                            rows,
                            bytes,
                        },
                        r,
                    ));
                }
            }
            // Its inputs' LoRA factors, whole (after its inputs in
            // `all_refs`, as validated units carry no scales with it).
            let n = t.inputs.len();
            for (j, r) in t.side_refs().enumerate() {
                let part = Part {
                    tensor: ti,
                    input: n + j,
                    rows: None,
                    bytes: r.offset..r.offset + r.len,
                };
                out.push((part, r));
            }
            continue;
        }
        for (ii, r) in t.all_refs().enumerate() {
            let part = Part {
                tensor: ti,
                input: ii,
                rows: None,
                bytes: r.offset..r.offset + r.len,
            };
            out.push((part, r));
        }
    }
    out
}

/// A window's inputs, ready for compute: remote spans fetched, local ranges
/// checked and mapped.
pub struct Loaded {
    /// Fetched spans of remote objects.
    spans: Vec<Vec<u8>>,
    /// Every part read, in order, and where its bytes are.
    parts: Vec<(Part, Source)>,
    /// Input bytes of the window not yet told to [`load`]'s `arrived` (the
    /// mapped local ones, read as the window is computed): with those told,
    /// what it reads ([`OutputTensor::input_bytes`]).
    pub bytes: u64,
}

#[derive(Clone)]
enum Source {
    /// In the memory map of the ref's own file.
    Mapped,
    /// `range` of fetched span `span`.
    Span { span: usize, range: Range<usize> },
}

/// One tensor's loaded inputs.
pub enum Inputs<'a> {
    /// Each input's bytes, in input order, then its inputs' scales.
    Whole(Vec<&'a [u8]>),
    /// A vocabulary tensor: per input, the row ranges read and their bytes;
    /// then its inputs' LoRA factors (A, B of each adapted input), whole.
    Rows {
        rows: Vec<Vec<(Range<u64>, &'a [u8])>>,
        side: Vec<&'a [u8]>,
    },
}

impl Loaded {
    /// Every tensor's inputs.
    pub fn views<'a>(
        &'a self,
        tensors: &'a [OutputTensor],
        maps: &'a Maps,
    ) -> Result<Vec<Inputs<'a>>, StorageError> {
        let mut out: Vec<Inputs> = tensors
            .iter()
            .map(|t| match t.vocab {
                Some(_) => Inputs::Rows {
                    rows: vec![Vec::new(); t.inputs.len()],
                    side: Vec::new(),
                },
                None => Inputs::Whole(Vec::with_capacity(t.all_refs().count())),
            })
            .collect();
        for (p, s) in &self.parts {
            let bytes = match s {
                Source::Mapped => {
                    let t = &tensors[p.tensor];
                    let r = t
                        .all_refs()
                        .nth(p.input)
                        .ok_or_else(|| StorageError::io(&t.name, "a part of no input"))?;
                    maps.get(r)
                        .ok_or_else(|| StorageError::io(&r.location, "input file not mapped"))?
                        .bytes(p.bytes.clone())?
                }
                Source::Span { span, range } => &self.spans[*span][range.clone()],
            };
            match (&mut out[p.tensor], &p.rows) {
                (Inputs::Rows { rows: inputs, .. }, Some(rows)) => {
                    inputs[p.input].push((rows.clone(), bytes))
                }
                (Inputs::Rows { side, .. }, None) => side.push(bytes),
                (Inputs::Whole(inputs), None) => inputs.push(bytes),
                _ => {
                    let name = &tensors[p.tensor].name;
                    return Err(StorageError::io(name, "rows of a tensor read whole"));
                }
            }
        }
        Ok(out)
    }
}

/// Fetches byte ranges of remote objects, all at the same time, in order;
/// `arrived` hears the bytes as they arrive (from the fetching threads) and
/// answers whether to go on (see [`storage::Storage::read_range_reporting`]).
pub fn fetch_all(
    ranges: &[(&str, Range<u64>)],
    arrived: &(dyn Fn(u64) -> bool + Sync),
) -> Vec<Result<Vec<u8>, StorageError>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = ranges
            .iter()
            .map(|(location, range)| {
                s.spawn(move || {
                    storage::for_location(location).read_range_reporting(
                        location,
                        range.clone(),
                        arrived,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(ranges)
            .map(|(h, (location, _))| {
                h.join()
                    .unwrap_or_else(|_| Err(StorageError::io(location, "a reader thread died")))
            })
            .collect()
    })
}

/// Loads a window: fetches its remote inputs (coalesced, concurrently; each
/// piece's size told to `arrived` as it arrives, which answers whether to go
/// on: `false` stops the fetches with [`StorageError::Cancelled`]) and maps
/// its local ones ahead of use; of a vocabulary tensor, only the rows its
/// alignment uses.
pub fn load(
    tensors: &[OutputTensor],
    maps: &Maps,
    arrived: &(dyn Fn(u64) -> bool + Sync),
) -> Result<Loaded, StorageError> {
    let parts = parts(tensors);
    let mut bytes = 0;
    for (p, r) in &parts {
        bytes += p.bytes.end - p.bytes.start;
        if let Some(m) = maps.get(r) {
            // Check the range before anyone touches it, then map it.
            m.bytes(p.bytes.clone())?;
            m.prefetch(p.bytes.clone());
        }
    }
    let mut sources = vec![Source::Mapped; parts.len()];
    // The remote parts, as refs of their own byte ranges.
    let remote: Vec<(usize, TensorRef)> = parts
        .iter()
        .enumerate()
        .filter(|(_, (_, r))| maps.get(r).is_none())
        .map(|(k, (p, r))| {
            let part = TensorRef {
                offset: p.bytes.start,
                len: p.bytes.end - p.bytes.start,
                ..(*r).clone()
            };
            (k, part)
        })
        .collect();
    let mut buffers = Vec::new();
    // Remote bytes told to `arrived`: at most the parts' own (a span may
    // also fetch the gaps between them), so that what a window reports in
    // all is its input bytes.
    let remote_bytes: u64 = remote.iter().map(|(_, r)| r.len).sum();
    let told = std::sync::atomic::AtomicU64::new(0);
    let tell = |n: u64| {
        use std::sync::atomic::Ordering::Relaxed;
        let before = told
            .fetch_update(Relaxed, Relaxed, |t| Some((t + n).min(remote_bytes)))
            .unwrap_or_else(|t| t);
        let after = (before + n).min(remote_bytes);
        arrived(after - before)
    };
    if !remote.is_empty() {
        let spans = spans(
            remote.iter().map(|(k, r)| (*k, 0, r)),
            GAP_BYTES,
            WINDOW_BYTES,
        );
        let ranges: Vec<(&str, Range<u64>)> = spans
            .iter()
            .map(|sp| (sp.location.as_str(), sp.range.clone()))
            .collect();
        let fetched = fetch_all(&ranges, &tell);
        buffers.reserve(spans.len());
        for (i, (sp, data)) in spans.iter().zip(fetched).enumerate() {
            buffers.push(data?);
            for &(k, _, at, len) in &sp.parts {
                sources[k] = Source::Span {
                    span: i,
                    range: at as usize..(at + len) as usize,
                };
            }
        }
    }
    Ok(Loaded {
        spans: buffers,
        parts: parts.into_iter().map(|(p, _)| p).zip(sources).collect(),
        bytes: bytes - told.into_inner(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::unit::{TensorOp, TensorParams};

    fn tensor(name: &str, inputs: &[(&str, u64, u64)]) -> OutputTensor {
        OutputTensor {
            name: name.into(),
            dtype: DType::BF16,
            shape: vec![1],
            op: TensorOp::Merge,
            inputs: inputs
                .iter()
                .map(|&(loc, offset, len)| TensorRef {
                    model: 0,
                    name: name.into(),
                    location: loc.into(),
                    offset,
                    len,
                    dtype: DType::BF16,
                    shape: vec![len / 2],
                    lora: None,
                })
                .collect(),
            base: None,
            params: TensorParams::default(),
            scales: Vec::new(),
            block: None,
            requant: None,
            packed: None,
            vocab: None,
        }
    }

    #[test]
    fn adjacent_ranges_of_one_object_become_one_span() {
        let ts = vec![
            tensor("a", &[("s3://b/x", 100, 10), ("s3://b/y", 0, 10)]),
            tensor("b", &[("s3://b/x", 110, 20), ("s3://b/y", 500, 10)]),
            tensor("c", &[("s3://b/x", 135, 5), ("s3://b/y", 10, 10)]),
        ];
        let sp = spans(refs(&ts), 100, 1 << 20);
        assert_eq!(sp.len(), 3, "{sp:?}");
        assert_eq!(sp[0].location, "s3://b/x");
        assert_eq!(sp[0].range, 100..140);
        assert_eq!(
            sp[0].parts,
            vec![(0, 0, 0, 10), (1, 0, 10, 20), (2, 0, 35, 5)]
        );
        // y: 0..20 together; 500 is more than the gap away.
        assert_eq!(sp[1].range, 0..20);
        assert_eq!(sp[2].range, 500..510);
    }

    #[test]
    fn spans_respect_the_size_limit() {
        let ts = vec![
            tensor("a", &[("s3://b/x", 0, 60)]),
            tensor("b", &[("s3://b/x", 60, 60)]),
        ];
        assert_eq!(spans(refs(&ts), 0, 100).len(), 2);
        assert_eq!(spans(refs(&ts), 0, 120).len(), 1);
    }

    #[test]
    fn windows_fill_up_to_the_limit() {
        let big = 60;
        let ts = vec![
            tensor("a", &[("s3://b/x", 0, 10)]),
            tensor("b", &[("/local/x", 10, 10)]),
            tensor("c", &[("s3://b/x", 20, 90)]),
            tensor("d", &[("s3://b/x", 20, big)]),
            tensor("e", &[("s3://b/x", 20 + big, big)]),
        ];
        assert_eq!(windows(&ts, 100), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(windows(&ts, 120), vec![0..3, 3..5]);
    }
}
