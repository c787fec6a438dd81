//! `slerp`: spherical interpolation between the base and one other model, over
//! the whole flattened tensor (mergekit 0.1.5 `slerp.py`): `t = 0` gives the base,
//! `t = 1` the other model; nearly (anti-)parallel tensors fall back to a plain
//! lerp; the coefficients apply to the un-normalised tensors.

use super::chunked;
use super::{
    BasePolicy, MergeMethod, MethodError, MethodSpec, ParamDefault, ParamKind, ParamSpec, Scope,
};
use super::{MergeJob, OutputView};

pub struct Slerp;

static SPEC: MethodSpec = MethodSpec {
    name: "slerp",
    pretty_name: "SLERP",
    reference_url: Some("https://en.wikipedia.org/wiki/Slerp"),
    params: &[ParamSpec {
        name: "t",
        kind: ParamKind::ANY_NUMBER,
        scope: Scope::Shared,
        default: ParamDefault::Required,
    }],
    base: BasePolicy::Required,
    min_inputs: 2,
    max_inputs: Some(2),
    min_non_base: 1,
    max_non_base: Some(1),
};

const DOT_THRESHOLD: f64 = 0.9995;
const EPS: f64 = 1e-8;

/// The two interpolation coefficients `(c_base, c_other)` for the given squared
/// norms and dot product of the raw tensors (accumulated in f64).
pub(crate) fn coefficients(t: f64, aa: f64, bb: f64, ab: f64) -> (f64, f64) {
    let na = aa.sqrt();
    let nb = bb.sqrt();
    // mergekit leaves a (near-)zero vector un-normalised.
    let na = if na > EPS { na } else { 1.0 };
    let nb = if nb > EPS { nb } else { 1.0 };
    let dot = (ab / (na * nb)).clamp(-1.0, 1.0);
    if dot.abs() > DOT_THRESHOLD {
        return (1.0 - t, t);
    }
    let theta = dot.acos();
    let sin_theta = theta.sin();
    (
        ((1.0 - t) * theta).sin() / sin_theta,
        (t * theta).sin() / sin_theta,
    )
}

impl MergeMethod for Slerp {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let non_base = job.non_base();
        let (Some(base), [other]) = (job.base, non_base.as_slice()) else {
            return Err(job.invalid("slerp", "needs the base model and exactly one other model"));
        };
        let other = *other;
        let t = job
            .params
            .shared_f64("t")
            .ok_or_else(|| job.invalid("slerp", "parameter t is not set"))?;
        let parts = chunked::reduce(job, |_, x| {
            let (a, b) = (x[base], x[other]);
            let mut s = [0.0f64; 3];
            for (&p, &q) in a.iter().zip(b) {
                let (p, q) = (p as f64, q as f64);
                s[0] += p * p;
                s[1] += q * q;
                s[2] += p * q;
            }
            s
        });
        let [aa, bb, ab] = chunked::sum_partials(&parts);
        let (ca, cb) = coefficients(t, aa, bb, ab);
        let (ca, cb) = (ca as f32, cb as f32);
        chunked::map(job, out, |_, x, y| {
            for ((o, &p), &q) in y.iter_mut().zip(x[base]).zip(x[other]) {
                *o = ca * p + cb * q;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testing::*;

    fn slerp(t: f64, a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
        let p = params(&[("t", num(t))], &[&[], &[]]);
        let n = a.len() as u64;
        run(&Slerp, &[n], &[a, b], Some(0), &p).unwrap()
    }

    #[test]
    fn endpoints_are_exact() {
        let a = vec![1.0f32, 0.0, 0.25];
        let b = vec![0.0f32, 1.0, -0.5];
        assert_eq!(slerp(0.0, a.clone(), b.clone()), a);
        assert_eq!(slerp(1.0, a.clone(), b.clone()), b);
    }

    #[test]
    fn orthogonal_unit_vectors_by_hand() {
        // theta = pi/2: c = sin(pi/4)/1 each.
        let out = slerp(0.5, vec![1.0, 0.0], vec![0.0, 1.0]);
        let c = std::f32::consts::FRAC_1_SQRT_2;
        assert!((out[0] - c).abs() < 1e-7 && (out[1] - c).abs() < 1e-7);
    }

    #[test]
    fn parallel_vectors_lerp() {
        // Same direction, different norms: plain lerp 0.75*1 + 0.25*3 = 1.5.
        let out = slerp(0.25, vec![1.0, 2.0], vec![3.0, 6.0]);
        assert_eq!(out, vec![1.5, 3.0]);
        // Anti-parallel also lerps (mergekit's quirk).
        let out = slerp(0.5, vec![1.0, 2.0], vec![-1.0, -2.0]);
        assert_eq!(out, vec![0.0, 0.0]);
    }

    #[test]
    fn zero_vector_is_not_normalised() {
        // a = 0 → dot = 0, theta = pi/2 → cos(t·pi/2)·a + sin(t·pi/2)·b.
        let out = slerp(1.0 / 3.0, vec![0.0, 0.0], vec![2.0, 0.0]);
        assert!((out[0] - 1.0).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn coefficients_match_formula() {
        let (ca, cb) = coefficients(0.3, 1.0, 1.0, 0.5);
        let theta = 0.5f64.acos();
        assert!((ca - (0.7 * theta).sin() / theta.sin()).abs() < 1e-15);
        assert!((cb - (0.3 * theta).sin() / theta.sin()).abs() < 1e-15);
    }
}
