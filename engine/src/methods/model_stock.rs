//! `model_stock` (mergekit 0.1.5 `model_stock.py`): with offsets `o_i = w_i − w0`
//! from the base, `cos` = the mean over pairs `i < j` of
//! `clamp(⟨o_i, o_j⟩ / max(‖o_i‖·‖o_j‖, 1e-6), −1, 1)`,
//! `t = k·cos / (1 + (k − 1)·cos)` (0 where `|1 + (k − 1)·cos| < 1e-6`, 0.1.5's
//! guard), `out = t·mean(w_i) + (1 − t)·w0`. Over the whole flattened tensor, or
//! per row (last axis) with `filter_wise`; a 1-D tensor is one row.

use super::chunked;
use super::{BasePolicy, MergeMethod, MethodError, MethodSpec, ParamSpec};
use super::{MergeJob, OutputView};

pub struct ModelStock;

static SPEC: MethodSpec = MethodSpec {
    name: "model_stock",
    pretty_name: "Model Stock",
    reference_url: Some("https://arxiv.org/abs/2403.19522"),
    params: &[ParamSpec::shared_bool("filter_wise", false)],
    base: BasePolicy::Required,
    min_inputs: 3,
    max_inputs: None,
    min_non_base: 2,
    max_non_base: None,
};

/// Accumulates `‖o_i‖²` and `⟨o_i, o_j⟩` (i < j) of the offsets at elements
/// `range` of one chunk, into `s` laid out as `[sq_0..sq_k, pairs...]`.
fn accumulate(
    x: &[&[f32]],
    base: usize,
    others: &[usize],
    range: std::ops::Range<usize>,
    o: &mut [f32],
    s: &mut [f64],
) {
    let k = others.len();
    for e in range {
        for (d, &i) in o.iter_mut().zip(others) {
            *d = x[i][e] - x[base][e];
        }
        let mut p = k;
        for i in 0..k {
            let a = o[i] as f64;
            s[i] += a * a;
            for &b in &o[i + 1..] {
                s[p] += a * b as f64;
                p += 1;
            }
        }
    }
}

/// The interpolation factor `t` from the statistics laid out by [`accumulate`].
fn factor(s: &[f64], k: usize) -> f32 {
    let mut p = k;
    let mut cos_sum = 0.0f64;
    let mut pairs = 0usize;
    for i in 0..k {
        for j in i + 1..k {
            let norm_product = (s[i].sqrt() as f32) * (s[j].sqrt() as f32);
            let c = (s[p] as f32 / norm_product.max(1e-6)).clamp(-1.0, 1.0);
            cos_sum += c as f64;
            pairs += 1;
            p += 1;
        }
    }
    let cos = (cos_sum / pairs as f64) as f32;
    let count = k as f32;
    let denominator = 1.0 + (count - 1.0) * cos;
    if denominator.abs() < 1e-6 {
        0.0
    } else {
        (count * cos) / denominator
    }
}

/// `t·mean(w_i) + (1 − t)·w0` at elements `range`, as torch computes it in f32.
fn combine(
    x: &[&[f32]],
    base: usize,
    others: &[usize],
    t: f32,
    range: std::ops::Range<usize>,
    y: &mut [f32],
) {
    let count = others.len() as f32;
    for e in range {
        let sum = others.iter().fold(0.0f32, |acc, &i| acc + x[i][e]);
        y[e] = t * (sum / count) + (1.0 - t) * x[base][e];
    }
}

impl MergeMethod for ModelStock {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let others = job.non_base();
        let k = others.len();
        let Some(base) = job.base.filter(|_| k >= 2) else {
            return Err(job.invalid(
                "model_stock",
                "needs the base model and at least two other models",
            ));
        };
        let stats = k + k * (k - 1) / 2;
        if job.params.shared_bool("filter_wise").unwrap_or(false) {
            let row = job.row_len();
            chunked::map_sized(job, out, chunked::row_chunk(row), |_, x, y| {
                let mut o = vec![0.0f32; k];
                let mut s = vec![0.0f64; stats];
                for r in (0..y.len()).step_by(row) {
                    s.fill(0.0);
                    accumulate(x, base, &others, r..r + row, &mut o, &mut s);
                    let t = factor(&s, k);
                    combine(x, base, &others, t, r..r + row, y);
                }
            });
        } else {
            let parts = chunked::reduce(job, |c, x| {
                let mut o = vec![0.0f32; k];
                let mut s = vec![0.0f64; stats];
                accumulate(x, base, &others, 0..c.len, &mut o, &mut s);
                s
            });
            let mut s = vec![0.0f64; stats];
            for p in &parts {
                for (a, v) in s.iter_mut().zip(p) {
                    *a += v;
                }
            }
            let t = factor(&s, k);
            chunked::map(job, out, |_, x, y| {
                combine(x, base, &others, t, 0..y.len(), y);
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testing::*;

    fn stock(shape: &[u64], inputs: &[Vec<f32>], filter_wise: bool) -> Vec<f32> {
        let p = params(
            &[("filter_wise", flag(filter_wise))],
            &vec![&[][..]; inputs.len()],
        );
        run(&ModelStock, shape, inputs, Some(0), &p).unwrap()
    }

    #[test]
    fn orthogonal_offsets_by_hand() {
        // o1 = (1,0), o2 = (0,1): cos = 0 → t = 0 → the base.
        let out = stock(
            &[2],
            &[vec![1.0, 1.0], vec![2.0, 1.0], vec![1.0, 2.0]],
            false,
        );
        assert_eq!(out, vec![1.0, 1.0]);
    }

    #[test]
    fn sixty_degrees_by_hand() {
        // o1 = (2,0), o2 = (1,√3): cos = 0.5, t = 2·0.5/(1 + 0.5) = 2/3;
        // mean = (1.5, √3/2); out = 2/3·mean (the base is 0).
        let s3 = 3f32.sqrt();
        let out = stock(
            &[2],
            &[vec![0.0, 0.0], vec![2.0, 0.0], vec![1.0, s3]],
            false,
        );
        let t = 2.0 / 3.0;
        assert!((out[0] - t * 1.5).abs() < 1e-6, "{out:?}");
        assert!((out[1] - t * s3 / 2.0).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn identical_offsets_take_the_mean() {
        // cos = 1 → t = 2/2 = 1 → the mean of the others.
        let out = stock(
            &[2],
            &[vec![1.0, 1.0], vec![2.0, 3.0], vec![2.0, 3.0]],
            false,
        );
        assert_eq!(out, vec![2.0, 3.0]);
    }

    #[test]
    fn singular_denominator_keeps_the_base() {
        // Opposite offsets: cos = −1, 1 + (2 − 1)·(−1) = 0 → t = 0.
        let out = stock(
            &[2],
            &[vec![1.0, 1.0], vec![2.0, 1.0], vec![0.0, 1.0]],
            false,
        );
        assert_eq!(out, vec![1.0, 1.0]);
    }

    #[test]
    fn zero_offsets_give_cos_zero() {
        // ‖o‖ = 0: the 1e-6 clamp makes cos = 0 → t = 0.
        let out = stock(
            &[2],
            &[vec![1.0, 2.0], vec![1.0, 2.0], vec![3.0, 4.0]],
            false,
        );
        assert_eq!(out, vec![1.0, 2.0]);
    }

    #[test]
    fn three_models_average_pair_cosines() {
        // o1 = (1,0), o2 = (1,0), o3 = (0,1): cos pairs 1, 0, 0 → 1/3;
        // t = 3·(1/3)/(1 + 2/3) = 0.6; mean = (2/3, 1/3).
        let out = stock(
            &[2],
            &[
                vec![0.0, 0.0],
                vec![1.0, 0.0],
                vec![1.0, 0.0],
                vec![0.0, 1.0],
            ],
            false,
        );
        assert!(
            (out[0] - 0.4).abs() < 1e-6 && (out[1] - 0.2).abs() < 1e-6,
            "{out:?}"
        );
    }

    #[test]
    fn filter_wise_is_per_row() {
        // Row 0: identical offsets (t = 1 → mean); row 1: opposite (t = 0 → base).
        let base = vec![1.0, 1.0, 1.0, 1.0];
        let a = vec![2.0, 3.0, 2.0, 1.0];
        let b = vec![2.0, 3.0, 0.0, 1.0];
        let out = stock(&[2, 2], &[base.clone(), a.clone(), b.clone()], true);
        assert_eq!(out, vec![2.0, 3.0, 1.0, 1.0]);
        // Flattened, the same tensors give one t: cos = (1+4-1)/(√6·√6) = 2/3.
        let flat = stock(&[2, 2], &[base, a, b], false);
        let t = 2.0 * (2.0 / 3.0) / (1.0 + 2.0 / 3.0);
        assert!((flat[0] - (t * 2.0 + (1.0 - t))).abs() < 1e-6, "{flat:?}");
    }

    #[test]
    fn filter_wise_one_dimensional_is_one_row() {
        let inputs = [vec![0.0, 0.0], vec![2.0, 0.0], vec![1.0, 3f32.sqrt()]];
        assert_eq!(stock(&[2], &inputs, true), stock(&[2], &inputs, false));
    }
}
