//! `karcher` (mergekit 0.1.5 `karcher.py`): the Karcher (Riemannian) mean on the
//! unit hypersphere of every input (the base is just another input), with equal
//! weights `α_i = 1/N`, scaled by the mean norm `Σ α_i·‖x_i‖`. Inputs with norm
//! `≤ tol` are left out of the mean (weights renormalised) but count in the
//! scale; all inputs that small give zeros. Start from the normalised weighted
//! mean of the unit vectors (the first valid unit vector if that is `< tol`
//! long), then `max_iter` times: `T = Σ α_i·θ_i/sin θ_i·(u_i − cos θ_i·μ)` over
//! the inputs with `θ_i = arccos⟨μ, u_i⟩ ≥ tol`; stop if `‖T‖ < tol`;
//! `μ ← cos‖T‖·μ + sin‖T‖·T/‖T‖`, renormalised.
//!
//! The mean is always a linear combination of the unit inputs, so it is kept as
//! coefficients over them: one reduction pass gives the Gram matrix `⟨x_i, x_j⟩`
//! (f64), every iteration works on that small matrix, and one map pass writes
//! `Σ c_i·x_i`. (mergekit materialises the mean in f32; the iteration here runs in
//! f64, which agrees with it to f32 rounding.)

use super::chunked;
use super::{
    BasePolicy, MergeMethod, MethodError, MethodSpec, ParamDefault, ParamKind, ParamProblem,
    ParamSpec, ParamValue, Scope, TensorParams,
};
use super::{MergeJob, OutputView};

pub struct Karcher;

static SPEC: MethodSpec = MethodSpec {
    name: "karcher",
    pretty_name: "Karcher Mean",
    reference_url: Some("https://arxiv.org/abs/2603.04972"),
    params: &[
        ParamSpec {
            name: "max_iter",
            kind: ParamKind::ANY_NUMBER,
            scope: Scope::Shared,
            default: ParamDefault::Value(ParamValue::Number(10.0)),
        },
        ParamSpec {
            name: "tol",
            kind: ParamKind::ANY_NUMBER,
            scope: Scope::Shared,
            default: ParamDefault::Value(ParamValue::Number(1e-5)),
        },
    ],
    base: BasePolicy::Ignored,
    min_inputs: 1,
    max_inputs: None,
    min_non_base: 0,
    max_non_base: None,
};

/// A `max_iter` that is no whole number of at least 1.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("max_iter must be a whole number of iterations, at least 1 (got {got})")]
struct BadMaxIter {
    got: f64,
}

/// `max_iter` as mergekit's `int` parameter accepts it: a whole number.
fn max_iter(params: &TensorParams) -> Result<usize, BadMaxIter> {
    let v = params.shared_f64("max_iter").unwrap_or(10.0);
    if v.is_nan() || v < 1.0 || v.fract() != 0.0 {
        return Err(BadMaxIter { got: v });
    }
    Ok(v.min(1e9) as usize)
}

/// The coefficients `c` of the output `Σ c_i·x_i`, from the Gram matrix of the
/// raw inputs (`gram[i][j] = ⟨x_i, x_j⟩`).
fn solve(gram: &[Vec<f64>], max_iter: usize, tol: f64) -> Vec<f64> {
    let n = gram.len();
    let norms: Vec<f64> = (0..n).map(|i| gram[i][i].max(0.0).sqrt()).collect();
    let alpha = 1.0 / n as f64;
    let scale: f64 = norms.iter().map(|&v| alpha * v).sum();
    let valid: Vec<usize> = (0..n).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; n];
    }
    // Gram matrix of the valid unit vectors, and their renormalised weights.
    let g: Vec<Vec<f64>> = valid
        .iter()
        .map(|&i| {
            valid
                .iter()
                .map(|&j| gram[i][j] / (norms[i] * norms[j]))
                .collect()
        })
        .collect();
    let m = valid.len();
    let a = 1.0 / m as f64;
    let quad = |c: &[f64]| -> f64 {
        let mut s = 0.0;
        for i in 0..m {
            for j in 0..m {
                s += c[i] * g[i][j] * c[j];
            }
        }
        s.max(0.0).sqrt()
    };
    // μ = Σ mu_i·u_i.
    let mut mu = vec![a; m];
    let norm = quad(&mu);
    if norm < tol {
        mu = vec![0.0; m];
        mu[0] = 1.0;
    } else {
        mu.iter_mut().for_each(|c| *c /= norm);
    }
    for _ in 0..max_iter {
        // dots ⟨μ, u_j⟩ = Σ_i mu_i·G_ij.
        let dots: Vec<f64> = (0..m)
            .map(|j| (0..m).map(|i| mu[i] * g[i][j]).sum())
            .collect();
        let mut tangent = vec![0.0f64; m];
        for j in 0..m {
            let dot = dots[j].clamp(-1.0, 1.0);
            let theta = dot.acos();
            if theta < tol {
                continue;
            }
            let f = a * theta / theta.sin();
            tangent[j] += f;
            for i in 0..m {
                tangent[i] -= f * dot * mu[i];
            }
        }
        let tn = quad(&tangent);
        if tn < tol {
            break;
        }
        for i in 0..m {
            mu[i] = tn.cos() * mu[i] + tn.sin() * tangent[i] / tn;
        }
        let unit_norm = quad(&mu);
        if unit_norm > tol {
            mu.iter_mut().for_each(|c| *c /= unit_norm);
        }
    }
    // Back to coefficients of the raw inputs: scale·mu_i/‖x_i‖.
    let mut c = vec![0.0; n];
    for (s, &i) in valid.iter().enumerate() {
        c[i] = scale * mu[s] / norms[i];
    }
    c
}

impl MergeMethod for Karcher {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn validate(&self, params: &TensorParams, _base: Option<usize>) -> Result<(), ParamProblem> {
        max_iter(params).map(|_| ()).map_err(|e| ParamProblem {
            params: vec!["max_iter"],
            input: None,
            message: e.to_string(),
        })
    }

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let n = job.inputs.len();
        if n == 1 {
            chunked::map(job, out, |_, x, y| y.copy_from_slice(x[0]));
            return Ok(());
        }
        let iters = max_iter(job.params).map_err(|e| job.invalid("karcher", e.to_string()))?;
        let tol = job.params.shared_f64("tol").unwrap_or(1e-5);
        // One pass: the upper triangle of the Gram matrix.
        let pairs: Vec<(usize, usize)> = (0..n).flat_map(|i| (i..n).map(move |j| (i, j))).collect();
        let parts = chunked::reduce(job, |c, x| {
            pairs
                .iter()
                .map(|&(i, j)| {
                    x[i][..c.len]
                        .iter()
                        .zip(&x[j][..c.len])
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                })
                .collect::<Vec<f64>>()
        });
        let mut gram = vec![vec![0.0f64; n]; n];
        for part in &parts {
            for (&(i, j), v) in pairs.iter().zip(part) {
                gram[i][j] += v;
            }
        }
        for &(i, j) in &pairs {
            gram[j][i] = gram[i][j];
        }
        let c: Vec<f32> = solve(&gram, iters, tol).iter().map(|&v| v as f32).collect();
        chunked::map(job, out, |_, x, y| {
            y.fill(0.0);
            for (xi, &ci) in x.iter().zip(&c) {
                for (o, &v) in y.iter_mut().zip(xi.iter()) {
                    *o += ci * v;
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testing::*;

    fn karcher(inputs: &[Vec<f32>], shared: &[(&str, ParamValue)]) -> Vec<f32> {
        let p = params(shared, &vec![&[][..]; inputs.len()]);
        Karcher.validate(&p, None).unwrap();
        let n = inputs[0].len() as u64;
        run(&Karcher, &[n], inputs, None, &p).unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn two_inputs_meet_at_the_midpoint_of_the_arc() {
        // Unit vectors e0 and e1·3: the geodesic midpoint (H, H), scaled by
        // the mean norm (1 + 3)/2 = 2.
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let out = karcher(&[vec![1.0, 0.0], vec![0.0, 3.0]], &[]);
        close(&out, &[2.0 * h, 2.0 * h], 1e-6);
    }

    #[test]
    fn three_orthogonal_inputs_by_hand() {
        // Symmetric: the mean direction is (1,1,1)/√3 from the start, T = 0.
        let out = karcher(
            &[
                vec![2.0, 0.0, 0.0],
                vec![0.0, 2.0, 0.0],
                vec![0.0, 0.0, 2.0],
            ],
            &[],
        );
        let v = 2.0 / 3f32.sqrt();
        close(&out, &[v, v, v], 1e-6);
    }

    #[test]
    fn iterations_move_off_the_euclidean_mean() {
        // Unit vectors at angles 0, 0 and 90°: the Euclidean start is at
        // atan(1/2) ≈ 26.57°, the Karcher mean (minimiser of Σθ²) at 30°.
        let out = karcher(
            &[vec![1.0, 0.0], vec![1.0, 0.0], vec![0.0, 1.0]],
            &[("max_iter", num(100.0)), ("tol", num(1e-9))],
        );
        let a = std::f32::consts::FRAC_PI_6;
        close(&out, &[a.cos(), a.sin()], 1e-5);
        // One iteration from atan(1/2): a Riemannian gradient step.
        let one = karcher(
            &[vec![1.0, 0.0], vec![1.0, 0.0], vec![0.0, 1.0]],
            &[("max_iter", num(1.0))],
        );
        let start = 0.5f64.atan();
        let step = (2.0 * -start + (std::f64::consts::FRAC_PI_2 - start)) / 3.0;
        let angle = (start + step) as f32;
        close(&one, &[angle.cos(), angle.sin()], 1e-6);
    }

    #[test]
    fn zero_inputs_are_left_out_of_the_direction_but_not_the_scale() {
        // Valid: only (0, 4) → μ = (0, 1); scale = (0 + 4)/2 = 2.
        let out = karcher(&[vec![0.0, 0.0], vec![0.0, 4.0]], &[]);
        assert_eq!(out, vec![0.0, 2.0]);
        let out = karcher(&[vec![0.0, 0.0], vec![0.0, 0.0]], &[]);
        assert_eq!(out, vec![0.0, 0.0]);
    }

    #[test]
    fn antipodal_pair_starts_from_the_first() {
        // The Euclidean mean is 0 (< tol): μ starts at u_0. θ_0 = 0 is skipped;
        // θ_1 = π has u_1 − cos θ_1·μ = 0, so T = 0 and μ stays u_0;
        // scale = (1 + 1)/2.
        let out = karcher(&[vec![1.0, 0.0], vec![-1.0, 0.0]], &[]);
        assert_eq!(out, vec![1.0, 0.0]);
    }

    #[test]
    fn colinear_inputs_keep_the_direction() {
        let out = karcher(&[vec![3.0, 4.0], vec![6.0, 8.0]], &[]);
        close(&out, &[4.5, 6.0], 1e-6);
    }

    #[test]
    fn single_input_is_returned() {
        let out = karcher(&[vec![0.3, -0.2]], &[]);
        assert_eq!(out, vec![0.3, -0.2]);
    }

    #[test]
    fn max_iter_must_be_a_whole_number_at_least_one() {
        for bad in [0.0, -1.0, 2.5] {
            let p = params(&[("max_iter", num(bad))], &[&[], &[]]);
            let problem = Karcher.validate(&p, None).unwrap_err();
            assert_eq!(problem.params, vec!["max_iter"]);
        }
        let p = params(&[("max_iter", num(3.0))], &[&[], &[]]);
        assert!(Karcher.validate(&p, None).is_ok());
    }
}
