//! LoRA adapters folded into an input on read. An adapted input `W` reads as
//! `W + scale · B·A` (PEFT's `get_delta_weight`; transposed, `(B·A)ᵀ`, for an
//! embedding or a `fan_in_fan_out` layer), in f32: the factors are decoded to
//! f32 once per tensor ([`LoraFactors`]), and each decoded chunk of `W` gets the
//! delta of its own elements added before the method sees it
//! ([`LoraDelta::apply`], called where chunks are decoded, after an FP8
//! weight's block scales). The product of each chunk's rows of the left factor
//! with the right factor is computed by the `gemm` crate, one call per run of
//! rows, so it is chunked and streamed like every other kernel, and the bits do
//! not depend on threads, segments or whether the tensor is streamed.
//!
//! Rounding as PEFT on f32 factors: the product `p = (B·A)[i]` (f32), then
//! `W + fl(p · scale)`, with the scale rounded to f32 as torch multiplies an
//! f32 tensor by a Python float. The product's own rounding is fixed, so that
//! every machine computes the same bits (a cluster's coordinator recomputes a
//! worker's tensors to check them): fused multiply-adds in `k` order within
//! blocks of [`K_BLOCK`] of the rank, the blocks' sums added in order. `gemm`
//! sums that way within a block on x86-64 with FMA and on aarch64; the tests
//! compare its bits with that sum.

use crate::dtype::{decode_f32, DType};

/// The rank is summed in blocks of this many (gemm splits a longer sum by
/// cache sizes, which differ between machines).
pub const K_BLOCK: usize = 256;

/// Raw bytes of one LoRA factor.
#[derive(Debug, Clone, Copy)]
pub struct Factor<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
    /// `[rows, cols]` of the stored matrix.
    pub shape: [usize; 2],
}

/// The f32 factors of one adapted input, arranged so that the delta's rows
/// are rows of `left` times `right`: `left` `[rows, rank]`, `right`
/// `[rank, cols]` (row-major) for a weight `[rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFactors {
    left: Vec<f32>,
    right: Vec<f32>,
    rank: usize,
    cols: usize,
    scale: f32,
}

/// Decodes a factor to f32 (row-major, its own shape).
fn decode(f: &Factor) -> Vec<f32> {
    let mut out = vec![0f32; f.shape[0] * f.shape[1]];
    decode_f32(f.dtype, f.bytes, &mut out);
    out
}

/// `m` (`[rows, cols]`, row-major) transposed.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; m.len()];
    for (r, row) in m.chunks_exact(cols.max(1)).enumerate().take(rows) {
        for (c, &x) in row.iter().enumerate() {
            out[c * rows + r] = x;
        }
    }
    out
}

impl LoraFactors {
    /// The factors `a` (`lora_A`, `[r, x]`) and `b` (`lora_B`, `[y, r]`): the
    /// delta `scale · B·A` of a `[y, x]` weight, or `scale · (B·A)ᵀ` of an
    /// `[x, y]` one (`transposed`). Shapes are the unit's, checked by
    /// `WorkUnit::validate`.
    pub fn decode(a: &Factor, b: &Factor, scale: f64, transposed: bool) -> LoraFactors {
        let (rank, x) = (a.shape[0], a.shape[1]);
        let y = b.shape[0];
        let (da, db) = (decode(a), decode(b));
        let (left, right, cols) = if transposed {
            // (B·A)ᵀ = Aᵀ·Bᵀ: Aᵀ is [x, r], Bᵀ is [r, y].
            (transpose(&da, rank, x), transpose(&db, y, rank), y)
        } else {
            (db, da, x)
        };
        LoraFactors {
            left,
            right,
            rank,
            cols,
            scale: scale as f32,
        }
    }

    /// The view a [`crate::methods::TensorView`] carries.
    pub fn delta(&self) -> LoraDelta<'_> {
        LoraDelta {
            left: &self.left,
            right: &self.right,
            rank: self.rank,
            cols: self.cols,
            scale: self.scale,
        }
    }

    /// Bytes these factors hold (what decoding one adapted input costs).
    pub fn decoded_bytes(a_elements: u64, b_elements: u64) -> u64 {
        4 * (a_elements + b_elements)
    }
}

/// The delta of one adapted input, added to its decoded chunks.
#[derive(Debug, Clone, Copy)]
pub struct LoraDelta<'a> {
    left: &'a [f32],
    right: &'a [f32],
    rank: usize,
    cols: usize,
    scale: f32,
}

impl LoraDelta<'_> {
    /// Adds the delta of elements `start..start + buf.len()` (of the flattened
    /// weight) to `buf`: their rows of `left` times `right`, computed into a
    /// per-thread buffer with one `gemm` call per run of rows (a partial first
    /// row, the whole rows, a partial last row).
    pub fn apply(&self, start: usize, buf: &mut [f32]) {
        if buf.is_empty() || self.rank == 0 || self.cols == 0 {
            return;
        }
        let cols = self.cols;
        let len = buf.len();
        super::chunked::with_buffers(1, len, |bufs| {
            let p = &mut bufs[0][..len];
            let mut done = 0;
            while done < len {
                let at = start + done;
                let (row, col) = (at / cols, at % cols);
                let left = len - done;
                // A partial row (m = 1, its columns), or whole rows.
                let (m, n) = if col != 0 || left < cols {
                    (1, (cols - col).min(left))
                } else {
                    (left / cols, cols)
                };
                self.product(row, col, m, n, &mut p[done..done + m * n]);
                done += m * n;
            }
            let s = self.scale;
            for (w, &d) in buf.iter_mut().zip(p.iter()) {
                *w += d * s;
            }
        });
    }

    /// `out` (`[m, n]`, row-major) = rows `row..row + m` of `left` times
    /// columns `col..col + n` of `right`, the rank summed in blocks of
    /// [`K_BLOCK`]: the first block's product into `out`, each further one
    /// into a buffer of its own and added.
    fn product(&self, row: usize, col: usize, m: usize, n: usize, out: &mut [f32]) {
        let k = self.rank;
        self.block(row, col, m, n, 0, k.min(K_BLOCK), out);
        if k > K_BLOCK {
            super::chunked::with_buffers(1, m * n, |bufs| {
                let part = &mut bufs[0][..m * n];
                for k0 in (K_BLOCK..k).step_by(K_BLOCK) {
                    self.block(row, col, m, n, k0, K_BLOCK.min(k - k0), part);
                    for (o, p) in out.iter_mut().zip(part.iter()) {
                        *o += p;
                    }
                }
            });
        }
    }

    /// `out` = rows `row..row + m` of `left` times columns `col..col + n` of
    /// `right`, over ranks `k0..k0 + kb` only.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        row: usize,
        col: usize,
        m: usize,
        n: usize,
        k0: usize,
        kb: usize,
        out: &mut [f32],
    ) {
        let (k, cols) = (self.rank, self.cols);
        assert!(out.len() == m * n && col + n <= cols && k0 + kb <= k);
        assert!(self.left.len() >= (row + m) * k && self.right.len() >= k * cols);
        let lhs = &self.left[row * k + k0..];
        let rhs = &self.right[k0 * cols + col..];
        // SAFETY: every index gemm touches is in bounds: dst is `m` rows of
        // `n` (row stride `n`) in `out`; lhs is `m` rows of `kb` elements with
        // row stride `k` from `lhs` (the last ends at (row + m - 1)·k + k0 + kb
        // <= (row + m)·k); rhs is `kb` rows of `n` with row stride `cols` from
        // `rhs` (the last ends at (k0 + kb - 1)·cols + col + n <= k·cols), all
        // checked above. `out` is a buffer of its own: dst overlaps neither.
        unsafe {
            gemm::gemm(
                m,
                n,
                kb,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                lhs.as_ptr(),
                1,
                k as isize,
                rhs.as_ptr(),
                1,
                cols as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testing::f32_bytes;

    fn factor(values: &[f32], rows: usize, cols: usize) -> (Vec<u8>, [usize; 2]) {
        assert_eq!(values.len(), rows * cols);
        (f32_bytes(values), [rows, cols])
    }

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let x = (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 2003;
                x as f32 / 1001.5 - 1.0
            })
            .collect()
    }

    /// The product of element (i, j) as the module documents it: fused
    /// multiply-adds in `k` order within blocks of [`K_BLOCK`], the blocks'
    /// sums added in order.
    fn reference(left: &[f32], right: &[f32], k: usize, cols: usize, i: usize, j: usize) -> f32 {
        let mut total = 0f32;
        for k0 in (0..k).step_by(K_BLOCK) {
            let mut acc = 0f32;
            for t in k0..(k0 + K_BLOCK).min(k) {
                acc = left[i * k + t].mul_add(right[t * cols + j], acc);
            }
            total = if k0 == 0 { acc } else { total + acc };
        }
        total
    }

    #[test]
    fn chunks_anywhere_get_the_delta_of_their_own_elements() {
        // Rows of 37 columns, chunks that start mid-row, span rows and end
        // mid-row, and a chunk inside one row.
        for (rows, cols, rank) in [
            (50, 37, 4),
            (9, 1000, 16),
            (3, 5, 1),
            (64, 64, 128),
            (70, 300, 256),
            (8, 40, 1024),
            (5, 33, 300),
        ] {
            let (a, ash) = factor(&values(rank * cols, 1), rank, cols);
            let (b, bsh) = factor(&values(rows * rank, 2), rows, rank);
            let scale = 1.5;
            let f = LoraFactors::decode(
                &Factor {
                    dtype: DType::F32,
                    bytes: &a,
                    shape: ash,
                },
                &Factor {
                    dtype: DType::F32,
                    bytes: &b,
                    shape: bsh,
                },
                scale,
                false,
            );
            let d = f.delta();
            let n = rows * cols;
            let whole: Vec<f32> = {
                let mut w = vec![0.25f32; n];
                d.apply(0, &mut w);
                w
            };
            for (i, w) in whole.iter().enumerate() {
                let p = reference(&f.left, &f.right, rank, cols, i / cols, i % cols);
                assert_eq!(
                    w.to_bits(),
                    (0.25f32 + p * 1.5).to_bits(),
                    "{rows}x{cols} r{rank} {i}"
                );
            }
            for piece in [1, 7, cols - 1, cols + 3, 3 * cols + 5, n] {
                let mut parts = vec![0.25f32; n];
                for (i, c) in parts.chunks_mut(piece).enumerate() {
                    d.apply(i * piece, c);
                }
                assert_eq!(parts, whole, "pieces of {piece}");
            }
        }
    }

    #[test]
    fn transposed_factors_give_the_transposed_product() {
        // An embedding: A [r, vocab], B [dim, r]; the delta is (B·A)ᵀ [vocab, dim].
        let (vocab, dim, rank) = (11, 6, 3);
        let av = values(rank * vocab, 3);
        let bv = values(dim * rank, 4);
        let (a, ash) = factor(&av, rank, vocab);
        let (b, bsh) = factor(&bv, dim, rank);
        let f = LoraFactors::decode(
            &Factor {
                dtype: DType::F32,
                bytes: &a,
                shape: ash,
            },
            &Factor {
                dtype: DType::F32,
                bytes: &b,
                shape: bsh,
            },
            0.5,
            true,
        );
        let mut w = vec![0f32; vocab * dim];
        f.delta().apply(0, &mut w);
        for v in 0..vocab {
            for e in 0..dim {
                let mut acc = 0f32;
                for t in 0..rank {
                    acc = bv[e * rank + t].mul_add(av[t * vocab + v], acc);
                }
                assert_eq!(w[v * dim + e].to_bits(), (acc * 0.5).to_bits(), "{v},{e}");
            }
        }
    }

    #[test]
    fn bf16_factors_are_decoded_exactly() {
        // Values exact in bf16: the delta is exact too.
        let (rows, cols, rank) = (4, 3, 2);
        let a: Vec<f32> = (0..rank * cols).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..rows * rank).map(|i| 1.0 - i as f32 * 0.25).collect();
        let enc = |v: &[f32]| {
            let mut out = vec![0u8; v.len() * 2];
            crate::dtype::encode_f32(DType::BF16, v, &mut out);
            out
        };
        let (ab, bb) = (enc(&a), enc(&b));
        let f = LoraFactors::decode(
            &Factor {
                dtype: DType::BF16,
                bytes: &ab,
                shape: [rank, cols],
            },
            &Factor {
                dtype: DType::BF16,
                bytes: &bb,
                shape: [rows, rank],
            },
            2.0,
            false,
        );
        let mut w = vec![1f32; rows * cols];
        f.delta().apply(0, &mut w);
        for i in 0..rows {
            for j in 0..cols {
                let p: f32 = (0..rank).map(|t| b[i * rank + t] * a[t * cols + j]).sum();
                assert_eq!(w[i * cols + j], 1.0 + 2.0 * p);
            }
        }
    }
}
