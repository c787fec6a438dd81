//! Reading a unit's inputs. Local files are read tensor by tensor (a positioned
//! read each). Remote objects are latency-bound, so consecutive tensors are read
//! in batches of up to [`BATCH_BYTES`]: within a batch, the byte ranges that lie
//! in the same object and at most [`GAP_BYTES`] apart are fetched as one range
//! request, the spans of different objects at the same time, and each tensor's
//! bytes are cut out of its span. A unit of hundreds of small expert tensors
//! costs a handful of requests per input file instead of one per tensor.

use crate::plan::{OutputTensor, TensorRef};
use crate::storage::{self, StorageError};
use std::ops::Range;

/// Input bytes read together at most (one batch of consecutive tensors).
pub const BATCH_BYTES: u64 = 64 << 20;
/// Unneeded bytes a span may carry between two needed ranges.
pub const GAP_BYTES: u64 = 1 << 20;

/// One tensor's inputs, in input order.
pub type Inputs = Vec<Vec<u8>>;

/// Consecutive tensors read together: a tensor with any local input, or whose
/// inputs alone exceed [`BATCH_BYTES`], is a batch by itself.
pub fn batches(tensors: &[OutputTensor]) -> Vec<Range<usize>> {
    let remote = |t: &OutputTensor| {
        !t.inputs.is_empty() && t.inputs.iter().all(|r| storage::is_url(&r.location))
    };
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let b: u64 = t.inputs.iter().map(|r| r.len).sum();
        let joins = i > start && remote(t) && remote(&tensors[i - 1]) && bytes + b <= BATCH_BYTES;
        if i > start && !joins {
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
    /// (tensor index in the batch, input index, offset within the span, length).
    pub parts: Vec<(usize, usize, u64, u64)>,
}

/// Groups the inputs of `tensors` into spans: per object, ranges sorted by
/// offset, merged while the gap is at most `gap` and the span at most `limit`.
pub fn spans(tensors: &[OutputTensor], gap: u64, limit: u64) -> Vec<Span> {
    let mut refs: Vec<(usize, usize, &TensorRef)> = tensors
        .iter()
        .enumerate()
        .flat_map(|(ti, t)| t.inputs.iter().enumerate().map(move |(ii, r)| (ti, ii, r)))
        .collect();
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

fn read_one(r: &TensorRef) -> Result<Vec<u8>, StorageError> {
    storage::for_location(&r.location).read_range(&r.location, r.offset..r.offset + r.len)
}

/// Reads the inputs of a batch of tensors (see [`batches`]).
pub fn read_batch(tensors: &[OutputTensor]) -> Result<Vec<Inputs>, StorageError> {
    let remote = tensors
        .iter()
        .flat_map(|t| &t.inputs)
        .any(|r| storage::is_url(&r.location));
    if !remote {
        return tensors
            .iter()
            .map(|t| t.inputs.iter().map(read_one).collect())
            .collect();
    }
    let spans = spans(tensors, GAP_BYTES, BATCH_BYTES);
    let fetched: Vec<Result<Vec<u8>, StorageError>> = std::thread::scope(|s| {
        let handles: Vec<_> = spans
            .iter()
            .map(|sp| {
                s.spawn(move || {
                    storage::for_location(&sp.location).read_range(&sp.location, sp.range.clone())
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(&spans)
            .map(|(h, sp)| {
                h.join()
                    .unwrap_or_else(|_| Err(StorageError::io(&sp.location, "a reader thread died")))
            })
            .collect()
    });
    let mut out: Vec<Inputs> = tensors
        .iter()
        .map(|t| vec![Vec::new(); t.inputs.len()])
        .collect();
    for (sp, bytes) in spans.iter().zip(fetched) {
        let bytes = bytes?;
        for &(ti, ii, at, len) in &sp.parts {
            out[ti][ii] = bytes[at as usize..(at + len) as usize].to_vec();
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::methods::TensorParams;
    use crate::plan::TensorOp;

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
                })
                .collect(),
            base: None,
            params: TensorParams::default(),
        }
    }

    #[test]
    fn adjacent_ranges_of_one_object_become_one_span() {
        let ts = vec![
            tensor("a", &[("s3://b/x", 100, 10), ("s3://b/y", 0, 10)]),
            tensor("b", &[("s3://b/x", 110, 20), ("s3://b/y", 500, 10)]),
            tensor("c", &[("s3://b/x", 135, 5), ("s3://b/y", 10, 10)]),
        ];
        let sp = spans(&ts, 100, 1 << 20);
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
        assert_eq!(spans(&ts, 0, 100).len(), 2);
        assert_eq!(spans(&ts, 0, 120).len(), 1);
    }

    #[test]
    fn only_remote_tensors_are_batched_up_to_the_limit() {
        let big = BATCH_BYTES / 2 + 1;
        let ts = vec![
            tensor("a", &[("s3://b/x", 0, 10)]),
            tensor("b", &[("s3://b/x", 10, 10)]),
            tensor("c", &[("/local/x", 0, 10)]),
            tensor("d", &[("s3://b/x", 20, big)]),
            tensor("e", &[("s3://b/x", 20 + big, big)]),
        ];
        assert_eq!(batches(&ts), vec![0..2, 2..3, 3..4, 4..5]);
    }
}
