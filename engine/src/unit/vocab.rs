//! How one vocabulary tensor's inputs are re-indexed into the output
//! vocabulary (mergekit 0.1.5's `PermutedVocabulary`): for each input, runs of
//! output rows copied from its own rows, the rows that fall back to a default
//! (shared by every input that lacks the token or is forced), and padding rows,
//! each the mean of that input's token rows. Plain data that travels in a work
//! unit; [`VocabAlignment::validate`] checks one from elsewhere,
//! [`VocabAlignment::source_rows`] says which input rows a range of output
//! rows reads (what a reader fetches), and the functions here fill rows from
//! f32 input rows.

use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Output rows `out..out + len` of an input are its rows `src..src + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowRun {
    pub out: u64,
    pub src: u64,
    pub len: u64,
}

/// A row that some input does not copy from itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowFill {
    pub row: u64,
    pub fill: Fill,
}

/// What such a row holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Fill {
    Zero,
    /// Row `row` of input `input` (an index into the tensor's inputs).
    Row {
        input: usize,
        row: u64,
    },
    /// The mean of these rows (input, row), summed in this order.
    Mean(Vec<(usize, u64)>),
}

impl Fill {
    /// The input rows it reads.
    pub fn sources(&self) -> Vec<(usize, u64)> {
        match self {
            Fill::Zero => Vec::new(),
            Fill::Row { input, row } => vec![(*input, *row)],
            Fill::Mean(rows) => rows.clone(),
        }
    }
}

/// The re-indexing of one vocabulary tensor (vocabulary on axis 0: rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VocabAlignment {
    /// Output rows: the vocabulary padded to `pad_to_multiple_of`.
    pub rows: u64,
    /// Rows that belong to a token; `tokens..rows` are padding rows, each the
    /// mean of the input's (aligned) token rows.
    pub tokens: u64,
    /// Per input (parallel to the tensor's inputs): the rows it copies, sorted.
    pub runs: Vec<Vec<RowRun>>,
    /// Rows some input does not copy, sorted by row; an input that has a run
    /// over such a row uses its run.
    pub fills: Vec<RowFill>,
}

impl VocabAlignment {
    /// Checks an alignment from elsewhere against the row counts of the
    /// tensor's inputs: every run and fill inside both tensors, runs sorted and
    /// disjoint, fills sorted, and every token row of every input defined.
    pub fn validate(&self, input_rows: &[u64]) -> Result<(), String> {
        if self.runs.len() != input_rows.len() {
            return Err(format!(
                "{} inputs have row maps, the tensor has {} inputs",
                self.runs.len(),
                input_rows.len()
            ));
        }
        if self.tokens == 0 || self.tokens > self.rows {
            return Err(format!("{} token rows in {} rows", self.tokens, self.rows));
        }
        let check_src = |input: usize, row: u64| -> Result<(), String> {
            match input_rows.get(input) {
                Some(&n) if row < n => Ok(()),
                Some(&n) => Err(format!("row {row} of input {input}, which has {n} rows")),
                None => Err(format!("input {input} of {}", input_rows.len())),
            }
        };
        let mut last = None;
        for f in &self.fills {
            if f.row >= self.tokens || last.is_some_and(|l| f.row <= l) {
                return Err(format!("fill of row {} out of order or range", f.row));
            }
            last = Some(f.row);
            match &f.fill {
                Fill::Zero => {}
                Fill::Row { input, row } => check_src(*input, *row)?,
                Fill::Mean(rows) if rows.is_empty() => {
                    return Err(format!("row {} is the mean of no rows", f.row))
                }
                Fill::Mean(rows) => {
                    for &(input, row) in rows {
                        check_src(input, row)?;
                    }
                }
            }
        }
        for (i, runs) in self.runs.iter().enumerate() {
            let mut next = 0u64;
            for r in runs {
                let out_end = r.out.checked_add(r.len).filter(|&e| e <= self.tokens);
                let src_end = r.src.checked_add(r.len).filter(|&e| e <= input_rows[i]);
                if r.len == 0 || out_end.is_none() || src_end.is_none() {
                    return Err(format!(
                        "input {i}: rows {}+{} from {} outside {} token rows or its {} rows",
                        r.out, r.len, r.src, self.tokens, input_rows[i]
                    ));
                }
                if r.out < next {
                    return Err(format!(
                        "input {i}: runs overlap or are out of order at row {}",
                        r.out
                    ));
                }
                next = r.out + r.len;
            }
        }
        for (i, runs) in self.runs.iter().enumerate() {
            // Walk the runs and the fills together: every token row defined.
            let mut fills = self.fills.iter().map(|f| f.row).peekable();
            let mut next = 0u64;
            let mut gap_to = |end: u64, next: &mut u64| -> Result<(), String> {
                while *next < end {
                    if fills.next_if(|&row| row < *next).is_some() {
                        continue;
                    }
                    if fills.next_if_eq(next).is_none() {
                        return Err(format!(
                            "input {i}: row {next} is neither copied nor filled"
                        ));
                    }
                    *next += 1;
                }
                Ok(())
            };
            for r in runs {
                gap_to(r.out, &mut next)?;
                next = r.out + r.len;
            }
            gap_to(self.tokens, &mut next)?;
        }
        Ok(())
    }

    /// True when input `input` needs no re-indexing: all rows copied in place.
    pub fn is_identity(&self, input: usize) -> bool {
        self.rows == self.tokens
            && matches!(self.runs[input].as_slice(),
                [r] if r.out == 0 && r.src == 0 && r.len == self.rows)
    }

    /// The rows of `input` that its own aligned rows `out` copy, as ranges
    /// (merged where they touch), in output order.
    pub fn copied_ranges(&self, input: usize, out: Range<u64>) -> Vec<Range<u64>> {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        let runs = &self.runs[input];
        let first = runs.partition_point(|r| r.out.saturating_add(r.len) <= out.start);
        for r in runs[first..].iter().take_while(|r| r.out < out.end) {
            let a = r.out.max(out.start);
            let b = (r.out + r.len).min(out.end);
            if a >= b {
                continue;
            }
            let src = r.src + (a - r.out)..r.src + (b - r.out);
            match ranges.last_mut() {
                Some(last) if last.end == src.start => last.end = src.end,
                _ => ranges.push(src),
            }
        }
        ranges
    }

    /// Per input, the rows that aligning output rows `out` reads from it:
    /// the rows its runs copy there, and the sources of the fills there that
    /// some input uses (padding rows read nothing of their own). Sorted
    /// ranges, merged where they touch or overlap: what a reader fetches,
    /// rather than the whole tensor, when rows are dropped.
    pub fn source_rows(&self, out: Range<u64>) -> Vec<Vec<Range<u64>>> {
        let out = out.start.min(self.tokens)..out.end.min(self.tokens);
        let n = self.runs.len();
        let mut rows: Vec<Vec<Range<u64>>> =
            (0..n).map(|i| self.copied_ranges(i, out.clone())).collect();
        let start = self.fills.partition_point(|f| f.row < out.start);
        for f in self.fills[start..].iter().take_while(|f| f.row < out.end) {
            if self.runs.iter().all(|runs| run_at(runs, f.row).is_some()) {
                continue; // every input copies this row itself
            }
            for (input, row) in f.fill.sources() {
                if let Some(r) = rows.get_mut(input) {
                    r.push(row..row.saturating_add(1));
                }
            }
        }
        for ranges in &mut rows {
            ranges.sort_unstable_by_key(|r| r.start);
            let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
            for r in ranges.drain(..) {
                match merged.last_mut() {
                    Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                    _ => merged.push(r),
                }
            }
            *ranges = merged;
        }
        rows
    }

    /// The fills among rows `out` that input `input` uses (rows it does not copy).
    pub fn fills_used(&self, input: usize, out: Range<u64>) -> Vec<&RowFill> {
        let runs = &self.runs[input];
        let start = self.fills.partition_point(|f| f.row < out.start);
        self.fills[start..]
            .iter()
            .take_while(|f| f.row < out.end)
            .filter(|f| run_at(runs, f.row).is_none())
            .collect()
    }

    /// Aligned rows `out` of input `input`, written to `dst`
    /// (`out.len() * width` values). `row(i, r)` gives row `r` of input `i`
    /// (`width` values); `padding` is the input's padding row, needed when `out`
    /// reaches past the token rows (see [`padding_row`]).
    pub fn align_rows<'a>(
        &self,
        input: usize,
        out: Range<u64>,
        width: usize,
        row: &dyn Fn(usize, u64) -> &'a [f32],
        padding: Option<&[f32]>,
        dst: &mut [f32],
    ) {
        assert_eq!(dst.len() as u64, (out.end - out.start) * width as u64);
        let runs = &self.runs[input];
        for (k, r) in out.clone().enumerate() {
            let d = &mut dst[k * width..(k + 1) * width];
            if r >= self.tokens {
                d.copy_from_slice(padding.expect("padding rows need the padding row"));
            } else if let Some(src) = run_at(runs, r) {
                d.copy_from_slice(row(input, src));
            } else {
                let i = self
                    .fills
                    .binary_search_by_key(&r, |f| f.row)
                    .expect("a validated alignment defines every row");
                fill_row(&self.fills[i].fill, width, row, d);
            }
        }
    }

    /// Input `input` re-indexed whole into `dst` (`rows * width` values):
    /// its token rows, then the padding rows, each the mean of those token
    /// rows. `row` as for [`align_rows`](Self::align_rows).
    pub fn align_input<'a>(
        &self,
        input: usize,
        width: usize,
        row: &dyn Fn(usize, u64) -> &'a [f32],
        dst: &mut [f32],
    ) {
        let tokens = self.tokens as usize * width;
        let (token_rows, padding_rows) = dst.split_at_mut(tokens);
        self.align_rows(input, 0..self.tokens, width, row, None, token_rows);
        if self.rows > self.tokens {
            let pad = padding_row(token_rows, width);
            for chunk in padding_rows.chunks_mut(width.max(1)) {
                chunk.copy_from_slice(&pad);
            }
        }
    }

    /// Every input re-indexed whole: `inputs[i]` holds input i's rows
    /// (row-major, `width` values each); the result is `rows * width` values
    /// per input.
    pub fn align(&self, inputs: &[&[f32]], width: usize) -> Vec<Vec<f32>> {
        let row = |i: usize, r: u64| -> &[f32] {
            let start = r as usize * width;
            &inputs[i][start..start + width]
        };
        (0..inputs.len())
            .map(|i| {
                let mut out = vec![0f32; self.rows as usize * width];
                self.align_input(i, width, &row, &mut out);
                out
            })
            .collect()
    }
}

/// The input row that output row `r` copies, if a run covers it.
fn run_at(runs: &[RowRun], r: u64) -> Option<u64> {
    let i = runs.partition_point(|run| run.out + run.len <= r);
    runs.get(i)
        .filter(|run| run.out <= r)
        .map(|run| run.src + (r - run.out))
}

/// One default row: zeros, a copy, or the mean summed in f32 in input order
/// and divided once (as torch does it in mergekit).
pub fn fill_row<'a>(
    fill: &Fill,
    width: usize,
    row: &dyn Fn(usize, u64) -> &'a [f32],
    dst: &mut [f32],
) {
    match fill {
        Fill::Zero => dst.fill(0.0),
        Fill::Row { input, row: r } => dst.copy_from_slice(&row(*input, *r)[..width]),
        Fill::Mean(rows) => {
            dst.fill(0.0);
            for &(i, r) in rows {
                for (d, s) in dst.iter_mut().zip(row(i, r)) {
                    *d += *s;
                }
            }
            let n = rows.len() as f32;
            dst.iter_mut().for_each(|d| *d /= n);
        }
    }
}

/// The padding row of an input: the mean over its aligned token rows
/// (`token_rows`, row-major), accumulated in f64.
pub fn padding_row(token_rows: &[f32], width: usize) -> Vec<f32> {
    let mut mean = RowMean::new(width);
    mean.add_rows(token_rows);
    mean.finish()
}

/// A column mean built up row block by row block (for inputs read in pieces).
#[derive(Debug, Clone)]
pub struct RowMean {
    sum: Vec<f64>,
    count: u64,
}

impl RowMean {
    pub fn new(width: usize) -> RowMean {
        RowMean {
            sum: vec![0.0; width],
            count: 0,
        }
    }

    /// Adds whole rows (row-major).
    pub fn add_rows(&mut self, rows: &[f32]) {
        let width = self.sum.len();
        if width == 0 {
            return;
        }
        for r in rows.chunks_exact(width) {
            for (s, v) in self.sum.iter_mut().zip(r) {
                *s += f64::from(*v);
            }
            self.count += 1;
        }
    }

    pub fn finish(&self) -> Vec<f32> {
        let n = self.count.max(1) as f64;
        self.sum.iter().map(|s| (s / n) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(out: u64, src: u64, len: u64) -> RowRun {
        RowRun { out, src, len }
    }

    /// Two inputs of width 2: input 0 has rows for output tokens 0..3, input 1
    /// for 0..2 and 3..5 (its rows 2..4) but not 2; row 4 only input 1 has;
    /// row 1 is forced to zero; padding to 6 rows.
    fn example() -> VocabAlignment {
        VocabAlignment {
            rows: 6,
            tokens: 5,
            runs: vec![
                vec![run(0, 0, 1), run(2, 2, 2)],
                vec![run(0, 0, 1), run(3, 2, 2)],
            ],
            fills: vec![
                RowFill {
                    row: 1,
                    fill: Fill::Zero,
                },
                RowFill {
                    row: 2,
                    fill: Fill::Row { input: 0, row: 2 },
                },
                RowFill {
                    row: 3,
                    fill: Fill::Mean(vec![(0, 3), (1, 2)]),
                },
                RowFill {
                    row: 4,
                    fill: Fill::Row { input: 1, row: 3 },
                },
            ],
        }
    }

    #[test]
    fn align_whole_tensors() {
        let a = example();
        a.validate(&[4, 4]).unwrap();
        let in0: Vec<f32> = (0..8).map(|v| v as f32).collect(); // rows [0,1] [2,3] [4,5] [6,7]
        let in1: Vec<f32> = (0..8).map(|v| 10.0 + v as f32).collect();
        let out = a.align(&[&in0, &in1], 2);
        // input 0: row0 own, row1 zero (forced), row2 own (2), row3 own (3), row4 fill (input 1 row 3)
        let tokens0 = [0., 1., 0., 0., 4., 5., 6., 7., 16., 17.];
        assert_eq!(&out[0][..10], &tokens0);
        let mean0 = [
            (0. + 0. + 4. + 6. + 16.) / 5.,
            (1. + 0. + 5. + 7. + 17.) / 5.,
        ];
        assert_eq!(&out[0][10..], &mean0);
        // input 1: row0 own, row1 zero, row2 fill (input 0 row 2), row3 own (2), row4 own (3)
        let tokens1 = [10., 11., 0., 0., 4., 5., 14., 15., 16., 17.];
        assert_eq!(&out[1][..10], &tokens1);
        // the mean fill is only used by inputs without a run there: none here
        assert_eq!(
            a.fills_used(0, 0..5)
                .iter()
                .map(|f| f.row)
                .collect::<Vec<_>>(),
            [1, 4]
        );
        assert_eq!(
            a.fills_used(1, 0..5)
                .iter()
                .map(|f| f.row)
                .collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(a.fills_used(1, 2..3).len(), 1);
    }

    #[test]
    fn mean_fill_is_summed_in_f32_in_order() {
        let rows = [[1.0e8f32], [1.0], [-1.0e8]];
        let get = |i: usize, _r: u64| -> &[f32] { &rows[i] };
        let mut d = [0f32];
        fill_row(&Fill::Mean(vec![(0, 0), (1, 0), (2, 0)]), 1, &get, &mut d);
        // (1e8 + 1) rounds to 1e8 in f32, as torch's f32 additions do
        assert_eq!(d[0], 0.0);
        fill_row(&Fill::Mean(vec![(0, 0), (2, 0), (1, 0)]), 1, &get, &mut d);
        assert_eq!(d[0], 1.0 / 3.0);
    }

    #[test]
    fn ranges_and_pieces_agree_with_whole() {
        let a = example();
        let in0: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let in1: Vec<f32> = (0..8).map(|v| 10.0 + v as f32).collect();
        let whole = a.align(&[&in0, &in1], 2);
        assert_eq!(a.copied_ranges(0, 0..6), [0..1, 2..4]);
        assert_eq!(a.copied_ranges(1, 0..6), [0..1, 2..4]);
        assert_eq!(a.copied_ranges(1, 4..6), vec![3..4u64]);
        assert!(a.copied_ranges(0, 1..2).is_empty());
        let inputs = [&in0, &in1];
        let row = |i: usize, r: u64| -> &[f32] { &inputs[i][r as usize * 2..r as usize * 2 + 2] };
        for (i, whole) in whole.iter().enumerate() {
            let mut mean = RowMean::new(2);
            let mut pieces = Vec::new();
            for piece in [0..2u64, 2..5] {
                let mut d = vec![0f32; (piece.end - piece.start) as usize * 2];
                a.align_rows(i, piece, 2, &row, None, &mut d);
                mean.add_rows(&d);
                pieces.extend(d);
            }
            let pad = mean.finish();
            let mut d = vec![0f32; 2];
            a.align_rows(i, 5..6, 2, &row, Some(&pad), &mut d);
            pieces.extend(d);
            assert_eq!(&pieces, whole);
        }
    }

    // One input reads one run of rows: a vector of one range is meant.
    #[allow(clippy::single_range_in_vec_init)]
    #[test]
    fn source_rows_are_the_copied_rows_and_the_used_fills_sources() {
        let a = example();
        // Row 3's mean fill is used by no input (both copy row 3): not read.
        assert_eq!(a.source_rows(3..4), [vec![3..4], vec![2..3]]);
        // Row 4: input 1 copies its row 3, input 0 fills from that same row.
        assert_eq!(a.source_rows(4..5), [vec![], vec![3..4]]);
        // Row 1 is zeros for both; row 5 is padding: nothing to read.
        assert_eq!(a.source_rows(1..2), [Vec::<Range<u64>>::new(), vec![]]);
        assert_eq!(a.source_rows(5..6), [Vec::<Range<u64>>::new(), vec![]]);
        // All rows: input 0's row 2 is read once (its own copy and input 1's fill).
        assert_eq!(a.source_rows(0..6), [vec![0..1, 2..4], vec![0..1, 2..4]]);
        // Runs that drop rows: only the kept rows are read, in source order.
        let dropped = VocabAlignment {
            rows: 4,
            tokens: 4,
            runs: vec![vec![run(0, 0, 2), run(2, 1000, 1), run(3, 10, 1)]],
            fills: Vec::new(),
        };
        dropped.validate(&[2000]).unwrap();
        assert_eq!(dropped.source_rows(0..4), [vec![0..2, 10..11, 1000..1001]]);
        assert_eq!(dropped.copied_ranges(0, 1..3), [1..2, 1000..1001]);
    }

    #[test]
    fn identity() {
        let a = VocabAlignment {
            rows: 4,
            tokens: 4,
            runs: vec![vec![run(0, 0, 4)], vec![run(0, 0, 3)]],
            fills: vec![RowFill {
                row: 3,
                fill: Fill::Row { input: 0, row: 3 },
            }],
        };
        a.validate(&[4, 3]).unwrap();
        assert!(a.is_identity(0));
        assert!(!a.is_identity(1));
    }

    #[test]
    fn validate_rejects_what_would_read_out_of_bounds_or_leave_rows_undefined() {
        let ok = example();
        let bad = |f: &dyn Fn(&mut VocabAlignment), rows: [u64; 2], what: &str| {
            let mut a = ok.clone();
            f(&mut a);
            let e = a.validate(&rows).unwrap_err();
            assert!(e.contains(what), "{what}: {e}");
        };
        assert!(ok.validate(&[4, 4]).is_ok());
        bad(&|_| {}, [4, 3], "input 1");
        bad(&|a| a.fills.truncate(3), [4, 3], "outside");
        bad(
            &|a| a.runs.pop().map(|_| ()).unwrap_or(()),
            [4, 4],
            "row maps",
        );
        bad(&|a| a.runs[0][1].len = 9, [4, 4], "outside");
        bad(&|a| a.runs[0][1].src = u64::MAX, [4, 4], "outside");
        bad(&|a| a.runs[0][1].out = u64::MAX, [4, 4], "outside");
        bad(&|a| a.runs[0][0].len = 0, [4, 4], "outside");
        bad(&|a| a.runs[0].swap(0, 1), [4, 4], "out of order");
        bad(
            &|a| {
                a.fills.remove(0);
            },
            [4, 4],
            "row 1 is neither",
        );
        bad(
            &|a| {
                a.fills.pop();
            },
            [4, 4],
            "row 4 is neither",
        );
        bad(&|a| a.fills.swap(0, 1), [4, 4], "out of order");
        bad(&|a| a.fills[3].row = 5, [4, 4], "out of order or range");
        bad(
            &|a| a.fills[1].fill = Fill::Row { input: 2, row: 0 },
            [4, 4],
            "input 2 of 2",
        );
        bad(
            &|a| a.fills[1].fill = Fill::Row { input: 1, row: 4 },
            [4, 4],
            "row 4 of input 1",
        );
        bad(
            &|a| a.fills[2].fill = Fill::Mean(vec![]),
            [4, 4],
            "mean of no rows",
        );
        bad(
            &|a| a.fills[2].fill = Fill::Mean(vec![(0, 9)]),
            [4, 4],
            "row 9",
        );
        bad(&|a| a.tokens = 7, [4, 4], "token rows");
        bad(&|a| a.tokens = 0, [4, 4], "token rows");
    }
}
