//! A vocabulary tensor's inputs, read by rows and re-indexed into the output
//! vocabulary by the tensor's [`VocabAlignment`]. Only the input rows the
//! alignment uses are read ([`VocabAlignment::source_rows`]): each range of
//! rows is one byte range of its file, mapped or fetched by a range request,
//! so the rows of tokens the output drops are never fetched.
//!
//! Read with its window (see [`super::read::load`]), every input is aligned
//! whole ([`align_whole`]). Streamed under the memory budget
//! ([`VocabSource`], behind [`super::stream::Stream`]), a segment of output
//! elements is served from the output rows that cover it, whose input rows
//! are read and aligned for that segment alone. The padding rows (each the
//! mean of an input's aligned token rows) come from a mean accumulated over
//! the token rows as the segments pass in order, completed by a pass over the
//! rest of the token rows when a segment reaches the padding first. Both
//! paths align rows with the same functions, in f32, and the mean adds rows
//! in row order, so a streamed tensor has the bits of a whole one.
//!
//! An adapted input (a LoRA adapter of the embedding or the LM head) gets the
//! delta of each row read as it is decoded, before the rows are re-indexed:
//! the delta of input row `i` is row `i` of the factors' left matrix times the
//! right one ([`LoraDelta::apply`] at the row's first element), whatever rows
//! are read with it, so whole and streamed folds have the same bits, and those
//! of a fold of the whole input. Its aligned rows stay f32 ([`aligned_dtype`]):
//! the adapter is folded in f32 and never rounded before the merge.

use super::read::{self, Maps};
use crate::dtype::{decode_f32, encode_f32, DType};
use crate::methods::lora::LoraFactors;
use crate::storage::StorageError;
use crate::unit::{OutputTensor, RowMean, TensorRef, VocabAlignment};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Mutex;

/// Range requests in flight at once while streaming (a segment's rows may be
/// scattered over many ranges).
const FETCHES_AT_ONCE: usize = 16;

/// The dtype input `r` is handed to the method in once aligned: its own, or
/// f32 for an adapted input.
pub fn aligned_dtype(r: &TensorRef) -> DType {
    if r.lora.is_some() {
        DType::F32
    } else {
        r.dtype
    }
}

/// Values of one row of `t` (every axis but the first).
pub fn width(t: &OutputTensor) -> usize {
    t.shape.iter().skip(1).product::<u64>() as usize
}

/// The byte range of rows `rows` of input `r` in its file.
pub fn byte_range(r: &TensorRef, rows: &Range<u64>) -> Range<u64> {
    let b = r.row_bytes();
    r.offset + rows.start * b..r.offset + rows.end * b
}

/// Input rows in memory, decoded to f32.
pub struct Rows {
    width: usize,
    /// Per input: (rows, their values), sorted by row.
    inputs: Vec<Vec<(Range<u64>, Vec<f32>)>>,
}

impl Rows {
    /// Decodes `pieces`: per input of `t`, sorted row ranges and their bytes;
    /// an adapted input's rows with their delta added (`factors`, per input).
    pub fn decode(
        t: &OutputTensor,
        pieces: &[Vec<(Range<u64>, &[u8])>],
        factors: &[Option<LoraFactors>],
    ) -> Rows {
        let width = width(t);
        let inputs = t
            .inputs
            .iter()
            .zip(pieces)
            .enumerate()
            .map(|(i, (r, pieces))| {
                let size = r.dtype.size();
                let delta = factors.get(i).and_then(Option::as_ref).map(|f| f.delta());
                pieces
                    .iter()
                    .map(|(rows, bytes)| {
                        let mut values = vec![0f32; bytes.len() / size.max(1)];
                        // In blocks of rows, in parallel: a whole embedding is large.
                        let block = width.max(1) * 1024;
                        let first = rows.start as usize * width;
                        values
                            .par_chunks_mut(block)
                            .zip(bytes.par_chunks(block * size))
                            .enumerate()
                            .for_each(|(k, (v, b))| {
                                decode_f32(r.dtype, b, v);
                                if let Some(d) = &delta {
                                    d.apply(first + k * block, v);
                                }
                            });
                        (rows.clone(), values)
                    })
                    .collect()
            })
            .collect();
        Rows { width, inputs }
    }

    /// Row `row` of input `input`, which must be among the rows decoded (the
    /// rows [`VocabAlignment::source_rows`] names are all an alignment reads).
    fn row(&self, input: usize, row: u64) -> &[f32] {
        let pieces = &self.inputs[input];
        let i = pieces.partition_point(|(rows, _)| rows.end <= row);
        match pieces.get(i) {
            Some((rows, values)) if rows.start <= row => {
                let at = (row - rows.start) as usize * self.width;
                &values[at..at + self.width]
            }
            _ => panic!("row {row} of input {input} is not among the rows read"),
        }
    }
}

/// Every input of `t` re-indexed whole and encoded in its own dtype (as
/// mergekit fills a tensor of the input's dtype before the merge): the inputs
/// the method merges, each of the output's shape. `pieces`: per input, the
/// rows `v.source_rows(0..v.rows)` names and their bytes; `factors`: per
/// input, its LoRA factors (an adapted input is aligned in f32).
pub fn align_whole(
    t: &OutputTensor,
    v: &VocabAlignment,
    pieces: &[Vec<(Range<u64>, &[u8])>],
    factors: &[Option<LoraFactors>],
) -> Vec<Vec<u8>> {
    let rows = Rows::decode(t, pieces, factors);
    let width = rows.width;
    let row = |i: usize, r: u64| rows.row(i, r);
    // One input at a time: one f32 buffer for all of them.
    let mut values = vec![0f32; v.rows as usize * width];
    t.inputs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            v.align_input(i, width, &row, &mut values);
            encode(r, &values)
        })
        .collect()
}

/// `values` encoded in `r`'s aligned dtype ([`aligned_dtype`]).
fn encode(r: &TensorRef, values: &[f32]) -> Vec<u8> {
    let dtype = aligned_dtype(r);
    let size = dtype.size();
    let mut out = vec![0u8; values.len() * size];
    let block = 1 << 16;
    out.par_chunks_mut(block * size)
        .zip(values.par_chunks(block))
        .for_each(|(o, v)| encode_f32(dtype, v, o));
    out
}

/// Reads the rows `wanted` (per input of `t`, sorted ranges) and decodes
/// them (an adapted input's with their delta, `factors`): local files from their maps (mapped ahead, unmapped after), remote
/// objects by range requests, touching ranges of one object in one request,
/// [`FETCHES_AT_ONCE`] at a time.
fn read_rows(
    t: &OutputTensor,
    maps: &Maps,
    wanted: &[Vec<Range<u64>>],
    factors: &[Option<LoraFactors>],
) -> Result<Rows, StorageError> {
    let mut remote: Vec<TensorRef> = Vec::new();
    for (r, ranges) in t.inputs.iter().zip(wanted) {
        for rows in ranges {
            let bytes = byte_range(r, rows);
            match maps.get(r) {
                Some(m) => {
                    m.bytes(bytes.clone())?;
                    m.prefetch(bytes);
                }
                None => remote.push(TensorRef {
                    offset: bytes.start,
                    len: bytes.end - bytes.start,
                    ..r.clone()
                }),
            }
        }
    }
    let spans = read::spans(
        remote.iter().enumerate().map(|(k, r)| (k, 0, r)),
        0,
        read::WINDOW_BYTES,
    );
    let mut fetched = Vec::with_capacity(spans.len());
    for batch in spans.chunks(FETCHES_AT_ONCE) {
        let ranges: Vec<(&str, Range<u64>)> = batch
            .iter()
            .map(|s| (s.location.as_str(), s.range.clone()))
            .collect();
        for data in read::fetch_all(&ranges, &|_| true) {
            fetched.push(data?);
        }
    }
    // Where each remote piece is: (span, offset in it, length).
    let mut at = vec![(0, 0, 0); remote.len()];
    for (i, s) in spans.iter().enumerate() {
        for &(k, _, offset, len) in &s.parts {
            at[k] = (i, offset as usize, len as usize);
        }
    }
    let mut next_remote = 0;
    let mut pieces: Vec<Vec<(Range<u64>, &[u8])>> = Vec::with_capacity(wanted.len());
    for (r, ranges) in t.inputs.iter().zip(wanted) {
        let mut input = Vec::with_capacity(ranges.len());
        for rows in ranges {
            let bytes = match maps.get(r) {
                Some(m) => m.bytes(byte_range(r, rows))?,
                None => {
                    let (span, offset, len) = at[next_remote];
                    next_remote += 1;
                    &fetched[span][offset..offset + len]
                }
            };
            input.push((rows.clone(), bytes));
        }
        pieces.push(input);
    }
    let rows = Rows::decode(t, &pieces, factors);
    for (r, ranges) in t.inputs.iter().zip(wanted) {
        if let Some(m) = maps.get(r) {
            for rows in ranges {
                m.release(byte_range(r, rows));
            }
        }
    }
    Ok(rows)
}

/// The inputs of a streamed vocabulary tensor, aligned a segment at a time.
pub struct VocabSource<'a> {
    t: &'a OutputTensor,
    v: &'a VocabAlignment,
    maps: &'a Maps,
    /// Each input's LoRA factors, for an adapted one.
    factors: Vec<Option<LoraFactors>>,
    /// Output rows aligned at once by the pass that completes the padding.
    step: u64,
    padding: Mutex<Padding>,
}

/// The padding rows' means, built up as segments pass.
struct Padding {
    /// Aligned token rows `0..upto` of each input are added to its mean.
    upto: u64,
    sums: Vec<RowMean>,
    /// Each input's padding row, once all its token rows are added.
    rows: Option<Vec<Vec<f32>>>,
}

impl<'a> VocabSource<'a> {
    /// The source of `t` (aligned by `v`, its adapted inputs' rows adapted
    /// by `factors`) in segments of about `elements`.
    pub fn new(
        t: &'a OutputTensor,
        v: &'a VocabAlignment,
        maps: &'a Maps,
        factors: Vec<Option<LoraFactors>>,
        elements: usize,
    ) -> Self {
        let width = width(t);
        VocabSource {
            t,
            v,
            maps,
            factors,
            step: (elements / width.max(1)).max(1) as u64,
            padding: Mutex::new(Padding {
                upto: 0,
                sums: t.inputs.iter().map(|_| RowMean::new(width)).collect(),
                rows: None,
            }),
        }
    }

    /// Token rows `out` of every input, aligned, in f32.
    fn aligned(&self, out: Range<u64>) -> Result<Vec<Vec<f32>>, StorageError> {
        let width = width(self.t);
        let n = self.t.inputs.len();
        if out.is_empty() {
            return Ok(vec![Vec::new(); n]);
        }
        let wanted = self.v.source_rows(out.clone());
        let rows = read_rows(self.t, self.maps, &wanted, &self.factors)?;
        let row = |i: usize, r: u64| rows.row(i, r);
        Ok((0..n)
            .map(|i| {
                let mut d = vec![0f32; (out.end - out.start) as usize * width];
                self.v.align_rows(i, out.clone(), width, &row, None, &mut d);
                d
            })
            .collect())
    }

    /// Elements `range` of every input, aligned and encoded in its dtype.
    pub fn read(&self, range: Range<usize>) -> Result<Vec<Vec<u8>>, StorageError> {
        let (t, v) = (self.t, self.v);
        let width = width(t).max(1);
        let rows = (range.start / width) as u64..range.end.div_ceil(width) as u64;
        let tokens = v.tokens;
        let tok = rows.start.min(tokens)..rows.end.min(tokens);
        let mut pad = self.padding.lock().unwrap_or_else(|e| e.into_inner());
        let needs_padding = rows.end > tokens && pad.rows.is_none();
        if needs_padding {
            // Rows before this segment's that no segment has added yet
            // (segments come in order, so normally none): added a step at a
            // time, before this segment's rows are held.
            while pad.upto < tok.start {
                let next = pad.upto..(pad.upto + self.step).min(tok.start);
                let aligned = self.aligned(next.clone())?;
                for (sum, a) in pad.sums.iter_mut().zip(&aligned) {
                    sum.add_rows(a);
                }
                pad.upto = next.end;
            }
        }
        let aligned = self.aligned(tok.clone())?;
        if v.rows > tokens && pad.rows.is_none() && tok.start <= pad.upto && pad.upto < tok.end {
            let skip = (pad.upto - tok.start) as usize * width;
            for (sum, a) in pad.sums.iter_mut().zip(&aligned) {
                sum.add_rows(&a[skip..]);
            }
            pad.upto = tok.end;
        }
        if needs_padding {
            // tok ends at the tokens' end here, so every token row is added.
            pad.rows = Some(pad.sums.iter().map(RowMean::finish).collect());
        }
        let padding_rows = rows.end - tok.end.max(rows.start);
        let lo = range.start - rows.start as usize * width;
        let hi = range.end - rows.start as usize * width;
        Ok(t.inputs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut values = aligned[i].clone();
                if let Some(pad) = pad.rows.as_ref().filter(|_| padding_rows > 0) {
                    for _ in 0..padding_rows {
                        values.extend_from_slice(&pad[i]);
                    }
                }
                encode(r, &values[lo..hi])
            })
            .collect())
    }
}

/// What aligning `t`'s inputs holds beyond the bytes read and the aligned
/// inputs handed to the method (both counted as inputs): read whole, the
/// decoded input rows and one f32 aligned input; streamed in segments of at
/// most `segment` elements, a segment's input rows (read and decoded), its
/// aligned f32 rows and the padding means. 0 for other tensors.
pub fn working_bytes(t: &OutputTensor, segment: Option<usize>) -> u64 {
    let Some(v) = &t.vocab else {
        return 0;
    };
    let width = width(t) as u64;
    let n = t.inputs.len() as u64;
    match segment {
        None => {
            let read_elements: u64 = t
                .inputs
                .iter()
                .zip(t.input_read_bytes())
                .map(|(r, b)| b / r.dtype.size().max(1) as u64)
                .sum();
            4 * read_elements + 4 * t.numel()
        }
        Some(elements) => {
            // Rows that cover a segment, and the input rows they read at most:
            // each input's own, and the sources of every fill among them.
            let rows = (elements as u64).div_ceil(width.max(1)) + 1;
            let read_rows = n * rows + max_fill_sources(v, rows);
            let row_bytes = t.inputs.iter().map(|r| r.row_bytes()).max().unwrap_or(0);
            read_rows * (row_bytes + 4 * width) + (n + 1) * rows * width * 4 + n * width * 12
        }
    }
}

/// The most fill sources among any `rows` consecutive output rows.
fn max_fill_sources(v: &VocabAlignment, rows: u64) -> u64 {
    let (mut best, mut sum, mut first) = (0u64, 0u64, 0usize);
    let count = |i: usize| v.fills[i].fill.sources().len() as u64;
    for last in 0..v.fills.len() {
        sum += count(last);
        while v.fills[last].row - v.fills[first].row >= rows {
            sum -= count(first);
            first += 1;
        }
        best = best.max(sum);
    }
    best
}

/// The bytes of a window's vocabulary tensor `t` as [`super::read::load`]
/// reads them: per input, the row ranges of the whole alignment.
pub fn whole_rows(t: &OutputTensor) -> Vec<Vec<Range<u64>>> {
    match &t.vocab {
        Some(v) => v.source_rows(0..v.rows),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::unit::{Fill, RowFill, RowRun, TensorOp};

    /// An alignment with every kind of row: runs that skip input rows, a
    /// row filled from another input, a mean fill, a zero fill, and padding.
    fn alignment() -> VocabAlignment {
        let run = |out, src, len| RowRun { out, src, len };
        VocabAlignment {
            rows: 24,
            tokens: 21,
            runs: vec![
                // Input 0 (40 rows): 0..8 from 0..8, 10..16 from 30..36 (rows 8..30 dropped).
                vec![run(0, 0, 8), run(10, 30, 6)],
                // Input 1 (30 rows): 0..5 from 20..25, 5..10 from 0..5, 16..21 from 10..15.
                vec![run(0, 20, 5), run(5, 0, 5), run(16, 10, 5)],
            ],
            fills: vec![
                RowFill {
                    row: 8,
                    fill: Fill::Row { input: 1, row: 29 },
                },
                RowFill {
                    row: 9,
                    fill: Fill::Mean(vec![(1, 28), (0, 39), (1, 27)]),
                },
                RowFill {
                    row: 10,
                    fill: Fill::Mean(vec![(0, 37), (1, 26)]),
                },
                RowFill {
                    row: 11,
                    fill: Fill::Row { input: 0, row: 31 },
                },
                RowFill {
                    row: 12,
                    fill: Fill::Zero,
                },
                RowFill {
                    row: 13,
                    fill: Fill::Mean(vec![(0, 32), (0, 34)]),
                },
                RowFill {
                    row: 14,
                    fill: Fill::Row { input: 0, row: 35 },
                },
                RowFill {
                    row: 15,
                    fill: Fill::Zero,
                },
                RowFill {
                    row: 16,
                    fill: Fill::Row { input: 1, row: 10 },
                },
                RowFill {
                    row: 17,
                    fill: Fill::Mean(vec![(1, 11), (1, 12)]),
                },
                RowFill {
                    row: 18,
                    fill: Fill::Zero,
                },
                RowFill {
                    row: 19,
                    fill: Fill::Row { input: 1, row: 14 },
                },
                RowFill {
                    row: 20,
                    fill: Fill::Mean(vec![(1, 15), (0, 7)]),
                },
            ],
        }
    }

    /// A safetensors file of one tensor `w` with `rows` rows of `width`
    /// values in `dtype`; returns its ref.
    fn write_input(
        dir: &std::path::Path,
        name: &str,
        dtype: DType,
        rows: u64,
        width: u64,
        seed: u64,
    ) -> TensorRef {
        let n = (rows * width) as usize;
        let values: Vec<f32> = (0..n)
            .map(|i| ((i as u64 * 7919 + seed * 104_729) % 2003) as f32 * 1e-3 - 1.0)
            .collect();
        write_values(dir, name, dtype, &values, width)
    }

    fn write_values(
        dir: &std::path::Path,
        name: &str,
        dtype: DType,
        values: &[f32],
        width: u64,
    ) -> TensorRef {
        let rows = values.len() as u64 / width;
        let n = values.len();
        let mut data = vec![0u8; n * dtype.size()];
        encode_f32(dtype, values, &mut data);
        let header = serde_json::json!({"w": {"dtype": dtype.to_string(), "shape": [rows, width],
            "data_offsets": [0, data.len()]}});
        let json = serde_json::to_vec(&header).unwrap();
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&json);
        let offset = bytes.len() as u64;
        bytes.extend_from_slice(&data);
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        TensorRef {
            model: 0,
            name: "w".into(),
            location: path.to_string_lossy().into_owned(),
            offset,
            len: data.len() as u64,
            dtype,
            shape: vec![rows, width],
            lora: None,
        }
    }

    fn tensor(inputs: Vec<TensorRef>, v: VocabAlignment, width: u64) -> OutputTensor {
        OutputTensor {
            name: "model.embed_tokens.weight".into(),
            dtype: DType::BF16,
            shape: vec![v.rows, width],
            op: TensorOp::Merge,
            inputs,
            base: None,
            params: Default::default(),
            scales: Vec::new(),
            block: None,
            requant: None,
            packed: None,
            vocab: Some(v),
        }
    }

    /// The inputs aligned by the reference: whole inputs decoded, aligned by
    /// [`VocabAlignment::align`] (the code every path had before rows were
    /// read by range), encoded in each input's dtype.
    fn reference(t: &OutputTensor) -> Vec<Vec<u8>> {
        let v = t.vocab.as_ref().unwrap();
        let decoded: Vec<Vec<f32>> = t
            .inputs
            .iter()
            .map(|r| {
                let bytes = std::fs::read(&r.location).unwrap();
                let b = &bytes[r.offset as usize..(r.offset + r.len) as usize];
                let mut d = vec![0f32; b.len() / r.dtype.size()];
                decode_f32(r.dtype, b, &mut d);
                d
            })
            .collect();
        let refs: Vec<&[f32]> = decoded.iter().map(Vec::as_slice).collect();
        v.align(&refs, width(t))
            .iter()
            .zip(&t.inputs)
            .map(|(values, r)| encode(r, values))
            .collect()
    }

    #[test]
    fn whole_and_streamed_alignments_are_the_reference_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let width = 3;
        let v = alignment();
        let inputs = vec![
            write_input(dir.path(), "a.safetensors", DType::BF16, 40, width, 1),
            write_input(dir.path(), "b.safetensors", DType::F32, 30, width, 2),
        ];
        v.validate(&[40, 30]).unwrap();
        let t = tensor(inputs, v.clone(), width);
        let want = reference(&t);
        let maps = Maps::open(std::slice::from_ref(&t)).unwrap();

        // Whole: the rows `source_rows` names, and nothing else, suffice.
        let wanted = whole_rows(&t);
        let rows = read_rows(&t, &maps, &wanted, &[]).unwrap();
        let pieces: Vec<Vec<(Range<u64>, &[u8])>> = rows
            .inputs
            .iter()
            .zip(&t.inputs)
            .map(|(ps, r)| {
                ps.iter()
                    .map(|(rows, _)| {
                        let b = byte_range(r, rows);
                        (rows.clone(), maps.get(r).unwrap().bytes(b).unwrap())
                    })
                    .collect()
            })
            .collect();
        assert_eq!(align_whole(&t, &v, &pieces, &[]), want);

        // Streamed: segments of every size, aligned to rows or not, in order
        // (as the methods walk them), several passes, and out of order.
        let numel = (v.rows * width) as usize;
        for seg in [1usize, 2, 3, 5, 7, 9, 16, 31, numel] {
            for pass in 0..2 {
                let source = VocabSource::new(&t, &v, &maps, Vec::new(), seg);
                let mut got = vec![Vec::new(); 2];
                let mut starts: Vec<usize> = (0..numel).step_by(seg).collect();
                if pass == 1 {
                    // The padding first: its mean comes from a pass of its own.
                    starts.reverse();
                }
                let mut parts = vec![Vec::new(); starts.len()];
                for (k, &s) in starts.iter().enumerate() {
                    parts[k] = source.read(s..(s + seg).min(numel)).unwrap();
                }
                if pass == 1 {
                    parts.reverse();
                }
                for part in parts {
                    for (g, p) in got.iter_mut().zip(part) {
                        g.extend(p);
                    }
                }
                assert_eq!(got, want, "segments of {seg} elements, pass {pass}");
                // A second pass over the same source gives the same bytes.
                let again: Vec<Vec<u8>> = source.read(0..numel).unwrap();
                assert_eq!(again, want);
            }
        }
    }

    #[test]
    fn the_padding_mean_sums_rows_in_row_order_like_the_whole_tensor() {
        // Columns whose f64 sums depend on the order of the rows: 1 + 1e30
        // rounds to 1e30, so a mean that added rows in another order (or
        // combined per-segment partial sums) would differ.
        let dir = tempfile::tempdir().unwrap();
        let width = 2u64;
        let values: Vec<f32> = (0..64)
            .flat_map(|i| match i {
                0 => [1.0f32, 1.0],
                1 => [1e30, 1e30],
                2 => [-1e30, -1e30],
                _ => [0.25 * (i % 4) as f32, 0.5],
            })
            .collect();
        let r = write_values(dir.path(), "x.safetensors", DType::F32, &values, width);
        let v = VocabAlignment {
            rows: 72,
            tokens: 64,
            runs: vec![vec![RowRun {
                out: 0,
                src: 0,
                len: 64,
            }]],
            fills: Vec::new(),
        };
        let t = tensor(vec![r], v.clone(), width);
        let want = reference(&t);
        // In row order the 1 is absorbed by the 1e30; backwards, the small
        // values are.
        let pad = &want[0][64 * 8..64 * 8 + 8];
        let mut reversed = RowMean::new(2);
        for row in values.chunks(2).rev() {
            reversed.add_rows(row);
        }
        let forward = crate::unit::padding_row(&values, 2);
        assert_ne!(
            forward,
            reversed.finish(),
            "the data do not tell the orders apart"
        );
        let forward: Vec<u8> = forward.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(pad, &forward[..]);
        let maps = Maps::open(std::slice::from_ref(&t)).unwrap();
        for seg in [2usize, 6, 22, 128, 144] {
            let source = VocabSource::new(&t, &v, &maps, Vec::new(), seg);
            let mut got = Vec::new();
            for s in (0..144).step_by(seg) {
                got.extend(source.read(s..(s + seg).min(144)).unwrap().remove(0));
            }
            assert_eq!(got, want[0], "segments of {seg}");
        }
    }

    // One input reads one run of rows: a vector of one range is meant.
    #[allow(clippy::single_range_in_vec_init)]
    #[test]
    fn streamed_reads_fetch_only_the_rows_used() {
        let v = alignment();
        // Output rows 10..16 of input 0 are its rows 30..36, plus the sources
        // of row 10's mean fill (used by input 1, which lacks row 10).
        let wanted = v.source_rows(10..16);
        assert_eq!(wanted, [vec![30..36, 37..38], vec![26..27]]);
        // Input 0's rows 8..30 are never read, whatever the segment.
        let all = v.source_rows(0..v.rows);
        assert_eq!(all[0], [0..8, 30..36, 37..38, 39..40]);
        assert_eq!(all[1], [0..5, 10..16, 20..25, 26..30]);
    }

    #[test]
    fn working_memory_bounds_hold_the_fill_sources() {
        let v = alignment();
        // Row 9 has 3 sources, rows 9..11 have 3 + 2, rows 8..11 1 + 3 + 2
        // (as do rows 9..12), 8..12 1 + 3 + 2 + 1; 16 in all.
        assert_eq!(max_fill_sources(&v, 1), 3);
        assert_eq!(max_fill_sources(&v, 2), 5);
        assert_eq!(max_fill_sources(&v, 3), 6);
        assert_eq!(max_fill_sources(&v, 4), 7);
        assert_eq!(max_fill_sources(&v, 1000), 16);
    }
}
