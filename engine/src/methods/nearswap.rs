//! `nearswap` (mergekit 0.1.5 `nearswap.py`): elementwise, take the other model's
//! value where it lies within `t` of the base and stay near the base elsewhere:
//! `ω = clamp(t / max(|b − x|, 1e-6), 0, 1)`, `out = ω·x + (1 − ω)·b`.

use super::chunked;
use super::{
    BasePolicy, MergeMethod, MethodError, MethodSpec, ParamDefault, ParamKind, ParamSpec, Scope,
};
use super::{MergeJob, OutputView};

pub struct NearSwap;

static SPEC: MethodSpec = MethodSpec {
    name: "nearswap",
    pretty_name: "NearSwap",
    reference_url: Some("https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
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

/// One element, in f32 as torch computes it.
#[inline(always)]
fn swap(t: f32, a: f32, b: f32) -> f32 {
    let absdiff = (a - b).abs().max(1e-6);
    let w = (t / absdiff).clamp(0.0, 1.0);
    w * b + (1.0 - w) * a
}

impl MergeMethod for NearSwap {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let non_base = job.non_base();
        let (Some(base), [other]) = (job.base, non_base.as_slice()) else {
            return Err(job.invalid(
                "nearswap",
                "needs the base model and exactly one other model",
            ));
        };
        let other = *other;
        let t = job
            .params
            .shared_f64("t")
            .ok_or_else(|| job.invalid("nearswap", "parameter t is not set"))?
            as f32;
        chunked::map(job, out, |_, x, y| {
            for ((o, &a), &b) in y.iter_mut().zip(x[base]).zip(x[other]) {
                *o = swap(t, a, b);
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testing::*;

    fn nearswap(t: f64, a: Vec<f32>, b: Vec<f32>, base: usize) -> Vec<f32> {
        let p = params(&[("t", num(t))], &[&[], &[]]);
        let n = a.len() as u64;
        run(&NearSwap, &[n], &[a, b], Some(base), &p).unwrap()
    }

    #[test]
    fn near_elements_swap_far_ones_stay() {
        // |diff| = 0.5 ≤ t → ω = 1 (other); |diff| = 4 → ω = 0.25; equal → other.
        let out = nearswap(1.0, vec![1.0, 0.0, 2.0], vec![1.5, 4.0, 2.0], 0);
        assert_eq!(out, vec![1.5, 1.0, 2.0]);
    }

    #[test]
    fn base_index_decides_which_is_kept() {
        // base is input 1 now: ω = 0.25 toward input 0.
        let out = nearswap(1.0, vec![4.0], vec![0.0], 1);
        assert_eq!(out, vec![1.0]);
    }

    #[test]
    fn zero_or_negative_t_keeps_the_base() {
        let out = nearswap(0.0, vec![1.0, 2.0], vec![3.0, 2.0], 0);
        assert_eq!(out, vec![1.0, 2.0]);
        let out = nearswap(-1.0, vec![1.0, 2.0], vec![3.0, 2.0], 0);
        assert_eq!(out, vec![1.0, 2.0]);
    }

    #[test]
    fn tiny_differences_use_the_clamped_denominator() {
        // |diff| = 2^-23 < 1e-6 → ω = min(t/1e-6, 1) ≈ 0.5 for t = 5e-7.
        let a = 1.0f32;
        let b = 1.0 + 2f32.powi(-23);
        let out = nearswap(5e-7, vec![a], vec![b], 0);
        let w = (5e-7f32 / 1e-6f32).clamp(0.0, 1.0);
        assert_eq!(out, vec![w * b + (1.0 - w) * a]);
    }
}
