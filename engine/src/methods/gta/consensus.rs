//! The merge of one chunk's weighted task vectors (the second half of mergekit's
//! `generalized_task_arithmetic.py`): their sum; with sign consensus (TIES),
//! the election of each element's sign on the *weighted* deltas, the sum of
//! the agreeing ones and of their weights; the division by the (agreeing)
//! weights' sum when `normalize`; `λ`; and the base added back.

use super::Consensus;

/// How a chunk's weighted task vectors become the output.
#[derive(Debug, Clone, Copy)]
pub(super) struct Combine {
    pub(super) consensus: Consensus,
    pub(super) normalize: bool,
    pub(super) lambda: f32,
    /// What `normalize` divides by without sign election.
    pub(super) plain_divisor: f32,
}

impl Combine {
    /// `y = base + λ·merged` for one chunk of `y.len()` elements, from the
    /// weighted task vectors `w` (zero where pruned; `weights[s]` is the weight
    /// of `w[s]`). `sum` and `div` are scratch of at least the chunk's length.
    pub(super) fn chunk(
        &self,
        weights: &[f32],
        w: &[Vec<f32>],
        sum: &mut [f32],
        div: &mut [f32],
        base: &[f32],
        y: &mut [f32],
    ) {
        let Combine {
            consensus,
            normalize,
            lambda,
            plain_divisor,
        } = *self;
        let len = y.len();
        let (sum, div, b) = (&mut sum[..len], &mut div[..len], &base[..len]);
        // Stream-major sums: the same additions, in the same (model) order,
        // as an element-by-element fold, but in loops the compiler vectorizes.
        sum.fill(0.0);
        for w in w.iter() {
            for (a, &v) in sum.iter_mut().zip(&w[..len]) {
                *a += v;
            }
        }
        match consensus {
            Consensus::None => {
                for ((o, &m), &b) in y.iter_mut().zip(sum.iter()).zip(b) {
                    let mut m = if normalize { m / plain_divisor } else { m };
                    if lambda != 1.0 {
                        m *= lambda;
                    }
                    *o = b + m;
                }
            }
            Consensus::Sum => {
                y.fill(0.0);
                div.fill(0.0);
                for (&weight, w) in weights.iter().zip(w.iter()) {
                    for (((o, d), &v), &total) in y
                        .iter_mut()
                        .zip(div.iter_mut())
                        .zip(&w[..len])
                        .zip(sum.iter())
                    {
                        // Zeros have sign 0 and never match the elected sign.
                        // Adding +0.0 leaves the running sums as they were
                        // (they start at +0.0 and never become -0.0).
                        // (`&`, not `&&`: branch-free, so the loop vectorizes.)
                        let agree = (v != 0.0) & ((v > 0.0) == (total >= 0.0));
                        *o += if agree { v } else { 0.0 };
                        *d += if agree { weight } else { 0.0 };
                    }
                }
                for ((o, &d), &b) in y.iter_mut().zip(div.iter()).zip(b) {
                    let divisor = if d == 0.0 { 1.0 } else { d };
                    let mut m = if normalize { *o / divisor } else { *o };
                    if lambda != 1.0 {
                        m *= lambda;
                    }
                    *o = b + m;
                }
            }
        }
    }
}
