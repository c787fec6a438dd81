//! `multislerp` (mergekit 0.1.5 `multislerp.py`): barycentric interpolation on the
//! hypersphere of the non-base tensors (task vectors `x_i − b` with a base), each
//! flattened to one vector. One non-base model is returned as is. Else with
//! weights `w` (divided by `Σw` if `normalize_weights`), norms `n_i`, near-unit
//! vectors `u_i = x_i / (n_i + eps)`, mean `m = Σ w_i·u_i`:
//! if `‖m‖ < eps`: two models give `w₁x₁ + w₂x₂` (+ b), more are an error; else
//! `m̂ = m/‖m‖`, tangent `τ = Σ w_i·(u_i − ⟨u_i, m̂⟩·m̂)`, `ℓ = ‖τ‖ + eps`,
//! `out = (cos ℓ·m̂ + sin ℓ/ℓ·τ)·Σ w_i·n_i` (+ b).
//!
//! `τ = m − ⟨m, m̂⟩·m̂ = 0` in exact arithmetic, so `‖τ‖` is taken from the f64
//! statistics (`|‖m‖ − Σ w_i⟨u_i, m̂⟩|`) rather than from a third pass; `τ` itself
//! is still formed per element as mergekit forms it (it only carries rounding).

use super::chunked;
use super::{
    BasePolicy, MergeMethod, MethodError, MethodSpec, ParamDefault, ParamKind, ParamProblem,
    ParamSpec, ParamValue, Scope, TensorParams,
};
use super::{MergeJob, OutputView};

pub struct MultiSlerp;

static SPEC: MethodSpec = MethodSpec {
    name: "multislerp",
    pretty_name: "Multi-SLERP",
    reference_url: Some("https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    params: &[
        ParamSpec {
            name: "weight",
            kind: ParamKind::ANY_NUMBER,
            scope: Scope::NonBase,
            default: ParamDefault::Required,
        },
        ParamSpec::shared_bool("normalize_weights", true),
        ParamSpec {
            name: "eps",
            kind: ParamKind::ANY_NUMBER,
            scope: Scope::Shared,
            default: ParamDefault::Value(ParamValue::Number(1e-8)),
        },
    ],
    base: BasePolicy::Optional,
    min_inputs: 1,
    max_inputs: None,
    min_non_base: 1,
    max_non_base: None,
};

/// The non-base weights in f32 (torch's tensor of the compute dtype), and their
/// f32 sum.
fn weights(params: &TensorParams, base: Option<usize>) -> (Vec<f32>, f32) {
    let w: Vec<f32> = (0..params.per_input.len())
        .filter(|&i| Some(i) != base)
        .map(|i| params.input_f64(i, "weight").unwrap_or(0.0) as f32)
        .collect();
    let sum = w.iter().fold(0.0f32, |a, &x| a + x);
    (w, sum)
}

impl MergeMethod for MultiSlerp {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn validate(&self, params: &TensorParams, base: Option<usize>) -> Result<(), ParamProblem> {
        let (w, sum) = weights(params, base);
        if w.len() > 1 && params.shared_bool("normalize_weights").unwrap_or(true) && sum == 0.0 {
            return Err(ParamProblem {
                params: vec!["weight", "normalize_weights"],
                input: None,
                message: "the weights sum to 0, so `normalize_weights: true` would divide by \
                          zero; change the weights or set normalize_weights: false"
                    .into(),
            });
        }
        Ok(())
    }

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let others = job.non_base();
        let k = others.len();
        if k == 0 {
            return Err(job.invalid("multislerp", "needs at least one model besides the base"));
        }
        if k == 1 {
            let only = others[0];
            chunked::map(job, out, |_, x, y| y.copy_from_slice(x[only]));
            return Ok(());
        }
        let base = job.base;
        let (mut w, sum) = weights(job.params, base);
        if job.params.shared_bool("normalize_weights").unwrap_or(true) {
            for v in &mut w {
                *v /= sum;
            }
        }
        let eps = job.params.shared_f64("eps").unwrap_or(1e-8);
        let delta = move |x: &[&[f32]], i: usize, e: usize| match base {
            Some(b) => x[i][e] - x[b][e],
            None => x[i][e],
        };

        // Pass 1: the norms n_i.
        let parts = chunked::reduce(job, |c, x| {
            let mut s = vec![0.0f64; k];
            for (s, &i) in s.iter_mut().zip(&others) {
                for e in 0..c.len {
                    let d = delta(x, i, e) as f64;
                    *s += d * d;
                }
            }
            s
        });
        let mut norms = vec![0.0f64; k];
        for p in &parts {
            for (a, v) in norms.iter_mut().zip(p) {
                *a += v;
            }
        }
        let norms: Vec<f32> = norms.iter().map(|s| s.sqrt() as f32).collect();
        let den: Vec<f32> = norms.iter().map(|&n| n + eps as f32).collect();
        // The mean of the near-unit vectors at one element, and those vectors.
        let mean_at = |x: &[&[f32]], e: usize, u: &mut [f32]| {
            let mut m = 0.0f32;
            for (s, &i) in others.iter().enumerate() {
                u[s] = delta(x, i, e) / den[s];
                m += u[s] * w[s];
            }
            m
        };

        // Pass 2: ‖m‖² and ⟨u_i, m⟩.
        let parts = chunked::reduce(job, |c, x| {
            let mut s = vec![0.0f64; k + 1];
            let mut u = vec![0.0f32; k];
            for e in 0..c.len {
                let m = mean_at(x, e, &mut u) as f64;
                s[k] += m * m;
                for (a, &v) in s.iter_mut().zip(&u) {
                    *a += v as f64 * m;
                }
            }
            s
        });
        let mut s = vec![0.0f64; k + 1];
        for p in &parts {
            for (a, v) in s.iter_mut().zip(p) {
                *a += v;
            }
        }
        let mean_norm = s[k].sqrt();
        if (mean_norm as f32) < eps as f32 {
            if k != 2 {
                return Err(job.invalid(
                    "multislerp",
                    "the weighted sum of the input tensors is zero (antipodal tensors whose \
                     weights balance out); use different weights",
                ));
            }
            chunked::map(job, out, |_, x, y| {
                for (e, o) in y.iter_mut().enumerate() {
                    let r = delta(x, others[0], e) * w[0] + delta(x, others[1], e) * w[1];
                    *o = match base {
                        Some(b) => r + x[b][e],
                        None => r,
                    };
                }
            });
            return Ok(());
        }
        let dots: Vec<f32> = s[..k].iter().map(|d| (d / mean_norm) as f32).collect();
        let weighted_dots: f64 = s[..k]
            .iter()
            .zip(&w)
            .map(|(d, &wi)| d / mean_norm * wi as f64)
            .sum();
        let tangent_norm = (mean_norm - weighted_dots).abs() + eps;
        let cos_l = tangent_norm.cos() as f32;
        let sinc_l = (tangent_norm.sin() / tangent_norm) as f32;
        let avg_norm = norms
            .iter()
            .zip(&w)
            .fold(0.0f32, |acc, (&n, &wi)| acc + n * wi);
        let mean_norm = mean_norm as f32;

        // Map: the exponential map of τ at m̂, scaled by the mean norm.
        chunked::map(job, out, |_, x, y| {
            let mut u = vec![0.0f32; k];
            for (e, o) in y.iter_mut().enumerate() {
                let m = mean_at(x, e, &mut u) / mean_norm;
                let mut tangent = 0.0f32;
                for s in 0..k {
                    tangent += (u[s] - dots[s] * m) * w[s];
                }
                let r = (m * cos_l + tangent * sinc_l) * avg_norm;
                *o = match base {
                    Some(b) => r + x[b][e],
                    None => r,
                };
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testing::*;

    fn multislerp(
        shape: &[u64],
        inputs: &[Vec<f32>],
        base: Option<usize>,
        w: &[f64],
        shared: &[(&str, ParamValue)],
    ) -> Result<Vec<f32>, MethodError> {
        let ws: Vec<[(&str, ParamValue); 1]> = w.iter().map(|&v| [("weight", num(v))]).collect();
        let mut per: Vec<&[(&str, ParamValue)]> = ws.iter().map(|a| &a[..]).collect();
        if let Some(b) = base {
            per.insert(b, &[]);
        }
        let p = params(shared, &per);
        run(&MultiSlerp, shape, inputs, base, &p)
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn orthogonal_pair_by_hand() {
        // u = (1,0), (0,1); m = (0.5, 0.5) → m̂ = (H, H); avg norm = 0.5·2 + 0.5·4 = 3.
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let out = multislerp(
            &[2],
            &[vec![2.0, 0.0], vec![0.0, 4.0]],
            None,
            &[1.0, 1.0],
            &[],
        )
        .unwrap();
        close(&out, &[3.0 * h, 3.0 * h], 1e-5);
    }

    #[test]
    fn weights_are_normalised() {
        // Weights 3:1 → w = (0.75, 0.25); m = (0.75, 0.25)/‖·‖; avg norm = 1.
        let out = multislerp(
            &[2],
            &[vec![1.0, 0.0], vec![0.0, 1.0]],
            None,
            &[3.0, 1.0],
            &[],
        )
        .unwrap();
        let n = (0.75f32 * 0.75 + 0.25 * 0.25).sqrt();
        close(&out, &[0.75 / n, 0.25 / n], 1e-6);
        // Without normalisation, the norm scale is Σ w_i n_i = 4.
        let out = multislerp(
            &[2],
            &[vec![1.0, 0.0], vec![0.0, 1.0]],
            None,
            &[3.0, 1.0],
            &[("normalize_weights", flag(false))],
        )
        .unwrap();
        close(&out, &[4.0 * 0.75 / n, 4.0 * 0.25 / n], 1e-5);
    }

    #[test]
    fn three_models_with_a_base() {
        // Base (1,1,1) first; deltas e0, e1, e2·2 with equal weights:
        // m̂ = (1,1,1)/√3, avg norm = (1 + 1 + 2)/3.
        let out = multislerp(
            &[3],
            &[
                vec![1.0, 1.0, 1.0],
                vec![2.0, 1.0, 1.0],
                vec![1.0, 2.0, 1.0],
                vec![1.0, 1.0, 3.0],
            ],
            Some(0),
            &[1.0, 1.0, 1.0],
            &[],
        )
        .unwrap();
        let v = 1.0 + (4.0 / 3.0) / 3f32.sqrt();
        close(&out, &[v, v, v], 1e-5);
    }

    #[test]
    fn one_model_is_returned_as_is() {
        let out = multislerp(
            &[2],
            &[vec![0.1, 0.2], vec![0.3, -0.7]],
            Some(0),
            &[0.5],
            &[],
        )
        .unwrap();
        assert_eq!(out, vec![0.3, -0.7]);
    }

    #[test]
    fn antipodal_pair_falls_back_to_lerp() {
        // u1 = −u2 with equal weights: m = 0 → 0.5·x1 + 0.5·x2.
        let out = multislerp(
            &[2],
            &[vec![1.0, 2.0], vec![-1.0, -2.0]],
            None,
            &[1.0, 1.0],
            &[],
        )
        .unwrap();
        assert_eq!(out, vec![0.0, 0.0]);
        let out = multislerp(
            &[2],
            &[vec![0.0, 0.0], vec![0.0, 0.0]],
            None,
            &[1.0, 3.0],
            &[],
        )
        .unwrap();
        assert_eq!(out, vec![0.0, 0.0]);
    }

    #[test]
    fn balanced_triple_is_an_error() {
        let err = multislerp(
            &[2],
            &[vec![1.0, 0.0], vec![-1.0, 0.0], vec![0.0, 0.0]],
            None,
            &[1.0, 1.0, 1.0],
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("zero"), "{err}");
    }

    #[test]
    fn colinear_inputs_keep_the_direction() {
        // Same direction, norms 1 and 3: out = m̂·(0.5·1 + 0.5·3) = 2·(0.6, 0.8).
        let out = multislerp(
            &[2],
            &[vec![0.6, 0.8], vec![1.8, 2.4]],
            None,
            &[1.0, 1.0],
            &[],
        )
        .unwrap();
        close(&out, &[1.2, 1.6], 1e-6);
    }

    #[test]
    fn zero_weight_sum_is_rejected() {
        let p = params(&[], &[&[("weight", num(1.0))], &[("weight", num(-1.0))]]);
        let problem = MultiSlerp.validate(&p, None).unwrap_err();
        assert!(problem.message.contains("sum to 0"));
        let p = params(
            &[("normalize_weights", flag(false))],
            &[&[("weight", num(1.0))], &[("weight", num(-1.0))]],
        );
        assert!(MultiSlerp.validate(&p, None).is_ok());
    }
}
