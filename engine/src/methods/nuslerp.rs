//! `nuslerp` (mergekit 0.1.5 `nuslerp.py`): spherical interpolation between the
//! two non-base models with `t = w₂ / (w₁ + w₂)` (0.5 when `|w₁ + w₂| < 1e-6`);
//! with a base, between the task vectors `x_i − b`, added back to the base.
//! The vectors are the whole flattened tensor (`nuslerp_flatten`, the default),
//! else the rows along the last axis, or with `nuslerp_row_wise` the vectors
//! along axis 0 (the columns of a 2-D tensor; mergekit's naming). A 1-D tensor is
//! one vector in every mode. Per vector: `cos = ⟨v₀, v₁⟩ / (max(‖v₀‖, 1e-7)·
//! max(‖v₁‖, 1e-7))` clamped to [−1, 1]; colinear (`1 − cos² ≤ 1e-16`) → lerp,
//! else `(sin((1−t)θ)·v₀ + sin(tθ)·v₁) / sin θ` on the un-normalised vectors.

use super::chunked;
use super::{
    BasePolicy, MergeMethod, MethodError, MethodSpec, ParamDefault, ParamKind, ParamProblem,
    ParamSpec, Scope, TensorParams,
};
use super::{MergeJob, OutputView};

pub struct NuSlerp;

static SPEC: MethodSpec = MethodSpec {
    name: "nuslerp",
    pretty_name: "NuSLERP",
    reference_url: None,
    params: &[
        ParamSpec {
            name: "weight",
            kind: ParamKind::ANY_NUMBER,
            scope: Scope::NonBase,
            default: ParamDefault::Required,
        },
        ParamSpec::shared_bool("nuslerp_row_wise", false),
        ParamSpec::shared_bool("nuslerp_flatten", true),
    ],
    base: BasePolicy::Optional,
    min_inputs: 2,
    max_inputs: Some(3),
    min_non_base: 2,
    max_non_base: Some(2),
};

/// Upper bound on the partial results of the per-column reduction (each holds
/// three f64 per column), so their memory stays bounded for tall tensors.
const MAX_COLUMN_PARTS: usize = 64;

/// `t` from the two non-base weights (in input order), as mergekit computes it
/// in Python floats; `None` unless exactly two non-base inputs have a weight.
fn factor(params: &TensorParams, base: Option<usize>) -> Option<f64> {
    let w: Vec<f64> = (0..params.per_input.len())
        .filter(|&i| Some(i) != base)
        .map(|i| params.input_f64(i, "weight"))
        .collect::<Option<_>>()?;
    let [w1, w2] = w.as_slice() else {
        return None;
    };
    let total = w1 + w2;
    Some(if total.abs() < 1e-6 { 0.5 } else { w2 / total })
}

/// The coefficients `(c₀, c₁)` of one vector pair from its squared norms and dot
/// product (accumulated in f64).
fn coefficients(t: f64, aa: f64, bb: f64, ab: f64) -> (f32, f32) {
    let na = aa.sqrt().max(1e-7);
    let nb = bb.sqrt().max(1e-7);
    let cos = (ab / (na * nb)).clamp(-1.0, 1.0);
    if 1.0 - cos * cos <= 1e-16 {
        return ((1.0 - t) as f32, t as f32);
    }
    let theta = cos.acos();
    let sin_theta = theta.sin();
    (
        (((1.0 - t) * theta).sin() / sin_theta) as f32,
        ((t * theta).sin() / sin_theta) as f32,
    )
}

/// Where the vectors lie in the flattened tensor.
enum Layout {
    /// One vector: the whole tensor.
    Flat,
    /// Contiguous rows of this length (the last axis).
    Rows(usize),
    /// Strided columns: element `e` belongs to vector `e % cols`.
    Columns(usize),
}

impl MergeMethod for NuSlerp {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn validate(&self, params: &TensorParams, base: Option<usize>) -> Result<(), ParamProblem> {
        match factor(params, base) {
            Some(t) if t.is_finite() => Ok(()),
            Some(t) => Err(ParamProblem {
                params: vec!["weight"],
                input: None,
                message: format!(
                    "the weights give the interpolation factor t = w2 / (w1 + w2) = {t}; \
                     choose weights whose sum is not so close to zero"
                ),
            }),
            None => Err(ParamProblem {
                params: vec!["weight"],
                input: None,
                message: "nuslerp needs a weight for each of exactly two models besides the base"
                    .into(),
            }),
        }
    }

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let non_base = job.non_base();
        let [i1, i2] = non_base.as_slice() else {
            return Err(job.invalid("nuslerp", "needs exactly two models besides the base"));
        };
        let (i1, i2, base) = (*i1, *i2, job.base);
        let t = factor(job.params, base)
            .ok_or_else(|| job.invalid("nuslerp", "parameter weight is not set"))?;
        // The two vectors' elements at `e` (task vectors when there is a base).
        let pair = move |x: &[&[f32]], e: usize| match base {
            Some(b) => (x[i1][e] - x[b][e], x[i2][e] - x[b][e]),
            None => (x[i1][e], x[i2][e]),
        };
        let write = move |x: &[&[f32]], e: usize, (c0, c1): (f32, f32)| {
            let (v0, v1) = pair(x, e);
            let r = c0 * v0 + c1 * v1;
            match base {
                Some(b) => x[b][e] + r,
                None => r,
            }
        };
        let stats = move |x: &[&[f32]], range: std::ops::Range<usize>| {
            let mut s = [0.0f64; 3];
            for e in range {
                let (p, q) = pair(x, e);
                let (p, q) = (p as f64, q as f64);
                s[0] += p * p;
                s[1] += q * q;
                s[2] += p * q;
            }
            s
        };

        let flatten = job.params.shared_bool("nuslerp_flatten").unwrap_or(true);
        let row_wise = job.params.shared_bool("nuslerp_row_wise").unwrap_or(false);
        let layout = if flatten || job.shape.len() <= 1 {
            Layout::Flat
        } else if row_wise {
            Layout::Columns(job.numel() / (job.shape[0].max(1) as usize))
        } else {
            Layout::Rows(job.row_len())
        };
        match layout {
            Layout::Flat => {
                let parts = chunked::reduce(job, |c, x| stats(x, 0..c.len));
                let [aa, bb, ab] = chunked::sum_partials(&parts);
                let c = coefficients(t, aa, bb, ab);
                chunked::map(job, out, |_, x, y| {
                    for (e, o) in y.iter_mut().enumerate() {
                        *o = write(x, e, c);
                    }
                });
            }
            Layout::Rows(row) => {
                chunked::map_sized(job, out, chunked::row_chunk(row), |_, x, y| {
                    for r in (0..y.len()).step_by(row) {
                        let [aa, bb, ab] = stats(x, r..r + row);
                        let c = coefficients(t, aa, bb, ab);
                        for (e, o) in y[r..r + row].iter_mut().enumerate() {
                            *o = write(x, r + e, c);
                        }
                    }
                });
            }
            Layout::Columns(cols) => {
                let cols = cols.max(1);
                let rows = job.numel() / cols;
                let per_part = (chunked::CHUNK / cols)
                    .max(rows.div_ceil(MAX_COLUMN_PARTS))
                    .max(1);
                let parts = chunked::reduce_sized(job, per_part * cols, |c, x| {
                    let mut s = vec![0.0f64; 3 * cols];
                    for e in 0..c.len {
                        let (p, q) = pair(x, e);
                        let (p, q) = (p as f64, q as f64);
                        let s = &mut s[3 * (e % cols)..3 * (e % cols) + 3];
                        s[0] += p * p;
                        s[1] += q * q;
                        s[2] += p * q;
                    }
                    s
                });
                let mut s = vec![0.0f64; 3 * cols];
                for p in &parts {
                    for (a, v) in s.iter_mut().zip(p) {
                        *a += v;
                    }
                }
                let coef: Vec<(f32, f32)> = s
                    .chunks_exact(3)
                    .map(|s| coefficients(t, s[0], s[1], s[2]))
                    .collect();
                chunked::map(job, out, |c, x, y| {
                    for (e, o) in y.iter_mut().enumerate() {
                        *o = write(x, e, coef[(c.start + e) % cols]);
                    }
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testing::*;
    use crate::unit::ParamValue;

    fn nuslerp(
        shape: &[u64],
        inputs: &[Vec<f32>],
        base: Option<usize>,
        w: (f64, f64),
        flags: &[(&str, ParamValue)],
    ) -> Vec<f32> {
        let w1 = [("weight", num(w.0))];
        let w2 = [("weight", num(w.1))];
        let mut per: Vec<&[(&str, ParamValue)]> = vec![&w1, &w2];
        if let Some(b) = base {
            per.insert(b, &[]);
        }
        let p = params(flags, &per);
        NuSlerp.validate(&p, base).unwrap();
        run(&NuSlerp, shape, inputs, base, &p).unwrap()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    const H: f32 = std::f32::consts::FRAC_1_SQRT_2;

    #[test]
    fn orthogonal_vectors_by_hand() {
        // θ = π/2, t = 0.5 → sin(π/4)·(v0 + v1).
        let out = nuslerp(
            &[2],
            &[vec![1.0, 0.0], vec![0.0, 1.0]],
            None,
            (1.0, 1.0),
            &[],
        );
        close(&out, &[H, H]);
        // t = w2/(w1+w2) = 1/3 → (sin(π/3), sin(π/6)); norms are kept.
        let out = nuslerp(
            &[2],
            &[vec![2.0, 0.0], vec![0.0, 2.0]],
            None,
            (2.0, 1.0),
            &[],
        );
        close(&out, &[2.0 * 3f32.sqrt() / 2.0, 1.0]);
    }

    #[test]
    fn weights_summing_to_zero_use_one_half() {
        let out = nuslerp(
            &[2],
            &[vec![1.0, 0.0], vec![0.0, 1.0]],
            None,
            (1.0, -1.0),
            &[],
        );
        close(&out, &[H, H]);
    }

    #[test]
    fn task_vectors_with_a_base() {
        // Base last: deltas (1,0) and (0,1) from (1,1).
        let out = nuslerp(
            &[2],
            &[vec![2.0, 1.0], vec![1.0, 2.0], vec![1.0, 1.0]],
            Some(2),
            (1.0, 1.0),
            &[],
        );
        close(&out, &[1.0 + H, 1.0 + H]);
    }

    #[test]
    fn colinear_vectors_lerp() {
        // Parallel and anti-parallel: plain lerp (0.75·v0 + 0.25·v1).
        let out = nuslerp(
            &[2],
            &[vec![1.0, 2.0], vec![3.0, 6.0]],
            None,
            (3.0, 1.0),
            &[],
        );
        assert_eq!(out, vec![1.5, 3.0]);
        let out = nuslerp(
            &[2],
            &[vec![1.0, 2.0], vec![-1.0, -2.0]],
            None,
            (1.0, 1.0),
            &[],
        );
        assert_eq!(out, vec![0.0, 0.0]);
    }

    #[test]
    fn zero_vector_is_orthogonal() {
        // ‖v0‖ = 0 → cos = 0, θ = π/2 → sin(tπ/2)·v1.
        let out = nuslerp(
            &[2],
            &[vec![0.0, 0.0], vec![2.0, 0.0]],
            None,
            (2.0, 1.0),
            &[],
        );
        close(&out, &[1.0, 0.0]);
    }

    #[test]
    fn per_row_and_per_column() {
        // [[1, 0], [0, 1]] and [[0, 1], [1, 1]].
        let a = vec![1.0, 0.0, 0.0, 1.0];
        let b = vec![0.0, 1.0, 1.0, 1.0];
        let no_flat = [("nuslerp_flatten", flag(false))];
        // Rows: row 0 orthogonal → (H, H); row 1 at 45°: θ = π/4,
        // c = sin(π/8)/sin(π/4) each → c·(1, 2).
        let c = ((std::f64::consts::PI / 8.0).sin() / (std::f64::consts::PI / 4.0).sin()) as f32;
        let rows = nuslerp(&[2, 2], &[a.clone(), b.clone()], None, (1.0, 1.0), &no_flat);
        close(&rows, &[H, H, c, 2.0 * c]);
        // Columns (row_wise): column 0 (1,0)·(0,1) orthogonal → (H, H);
        // column 1 (0,1)·(1,1) at 45° → c·(1, 2).
        let cols = nuslerp(
            &[2, 2],
            &[a, b],
            None,
            (1.0, 1.0),
            &[
                ("nuslerp_flatten", flag(false)),
                ("nuslerp_row_wise", flag(true)),
            ],
        );
        close(&cols, &[H, c, H, 2.0 * c]);
    }

    #[test]
    fn one_dimensional_is_one_vector_in_every_mode() {
        let inputs = [vec![1.0, 0.0, 2.0], vec![0.5, 1.0, -1.0]];
        let flat = nuslerp(&[3], &inputs, None, (1.0, 2.0), &[]);
        for row_wise in [false, true] {
            let out = nuslerp(
                &[3],
                &inputs,
                None,
                (1.0, 2.0),
                &[
                    ("nuslerp_flatten", flag(false)),
                    ("nuslerp_row_wise", flag(row_wise)),
                ],
            );
            assert_eq!(out, flat);
        }
    }

    #[test]
    fn many_columns_match_per_column_by_hand() {
        // Tall tensor: column j of input 0 is e0·(j+1), of input 1 is e1·(j+1):
        // every column is orthogonal → H·(v0 + v1).
        let (rows, cols) = (3000usize, 40usize);
        let mut a = vec![0.0f32; rows * cols];
        let mut b = vec![0.0f32; rows * cols];
        for j in 0..cols {
            a[j] = (j + 1) as f32;
            b[cols + j] = (j + 1) as f32;
        }
        let out = nuslerp(
            &[rows as u64, cols as u64],
            &[a.clone(), b.clone()],
            None,
            (1.0, 1.0),
            &[
                ("nuslerp_flatten", flag(false)),
                ("nuslerp_row_wise", flag(true)),
            ],
        );
        let want: Vec<f32> = a.iter().zip(&b).map(|(p, q)| H * p + H * q).collect();
        close(&out, &want);
    }

    #[test]
    fn validate_needs_two_weights() {
        let p = params(&[], &[&[("weight", num(1.0))], &[]]);
        let problem = NuSlerp.validate(&p, None).unwrap_err();
        assert_eq!(problem.params, vec!["weight"]);
        // The base's (absent) weight is not needed.
        let p = params(
            &[],
            &[&[], &[("weight", num(1.0))], &[("weight", num(0.0))]],
        );
        assert!(NuSlerp.validate(&p, Some(0)).is_ok());
        // Huge weights still give a finite t (the sum overflows to inf → t = 0).
        let p = params(
            &[],
            &[&[("weight", num(f64::MAX))], &[("weight", num(f64::MAX))]],
        );
        assert_eq!(factor(&p, None), Some(0.0));
    }
}
