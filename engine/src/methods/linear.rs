//! `linear`: the weighted average `Σ w_i·x_i / Σ w_i` (mergekit 0.1.5 accumulates
//! `acc = fma(x_i, w_i, acc)` in f32 and divides once; so do we, bit for bit).

use super::chunked;
use super::device::{DeviceOp, WeightedSumOp};
use super::{
    BasePolicy, MergeMethod, MethodError, MethodSpec, ParamDefault, ParamKind, ParamProblem,
    ParamSpec, Scope, TensorParams,
};
use super::{MergeJob, OutputView};

pub struct Linear;

static SPEC: MethodSpec = MethodSpec {
    name: "linear",
    pretty_name: "Linear",
    reference_url: Some("https://arxiv.org/abs/2203.05482"),
    params: &[
        ParamSpec {
            name: "weight",
            kind: ParamKind::ANY_NUMBER,
            scope: Scope::Input,
            default: ParamDefault::Required,
        },
        ParamSpec::shared_bool("normalize", true),
    ],
    base: BasePolicy::Ignored,
    min_inputs: 1,
    max_inputs: None,
    min_non_base: 0,
    max_non_base: None,
};

/// Weights as f32 and their f32 sum, as torch computes them.
fn weights(params: &TensorParams, n: usize) -> (Vec<f32>, f32) {
    let w: Vec<f32> = (0..n)
        .map(|i| params.input_f64(i, "weight").unwrap_or(0.0) as f32)
        .collect();
    let sum = w.iter().fold(0.0f32, |a, &x| a + x);
    (w, sum)
}

impl MergeMethod for Linear {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn validate(&self, params: &TensorParams, _base: Option<usize>) -> Result<(), ParamProblem> {
        let (_, sum) = weights(params, params.per_input.len());
        if params.shared_bool("normalize").unwrap_or(true) && sum == 0.0 {
            return Err(ParamProblem {
                params: vec!["weight", "normalize"],
                input: None,
                message: "the weights sum to 0, so `normalize: true` would divide by zero; \
                          change the weights or set normalize: false"
                    .into(),
            });
        }
        Ok(())
    }

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let (w, sum) = weights(job.params, job.inputs.len());
        let normalize = job.params.shared_bool("normalize").unwrap_or(true);
        chunked::map(job, out, |_, xs, y| {
            weighted_sum(xs, &w, y);
            if normalize {
                for v in y.iter_mut() {
                    *v /= sum;
                }
            }
        });
        Ok(())
    }

    fn device_op(&self, job: &MergeJob) -> Option<DeviceOp> {
        let (weights, sum) = weights(job.params, job.inputs.len());
        Some(DeviceOp::WeightedSum(WeightedSumOp {
            weights,
            normalize: job.params.shared_bool("normalize").unwrap_or(true),
            sum,
        }))
    }
}

/// `y = Σ_i fma(x_i, w_i, ·)` accumulated in input order, with hardware FMA when the
/// CPU has it (the software fallback of `mul_add` gives the same bits, slowly).
pub(crate) fn weighted_sum(xs: &[&[f32]], w: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports FMA, checked just above.
            unsafe { weighted_sum_fma(xs, w, y) };
            return;
        }
    }
    weighted_sum_portable(xs, w, y);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn weighted_sum_fma(xs: &[&[f32]], w: &[f32], y: &mut [f32]) {
    weighted_sum_portable(xs, w, y)
}

#[inline(always)]
fn weighted_sum_portable(xs: &[&[f32]], w: &[f32], y: &mut [f32]) {
    y.fill(0.0);
    for (x, &wi) in xs.iter().zip(w) {
        for (acc, &v) in y.iter_mut().zip(x.iter()) {
            *acc = v.mul_add(wi, *acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::methods::testing::*;

    #[test]
    fn weighted_average_by_hand() {
        let p = params(&[], &[&[("weight", num(0.5))], &[("weight", num(0.25))]]);
        let out = run(
            &Linear,
            &[3],
            &[vec![1.0, 2.0, -4.0], vec![3.0, 0.0, 4.0]],
            None,
            &p,
        )
        .unwrap();
        // (0.5*1 + 0.25*3)/0.75 = 1.6666666, (0.5*2)/0.75 = 1.3333334, (-2 + 1)/0.75
        assert_eq!(out, vec![1.25f32 / 0.75, 1.0 / 0.75, -1.0 / 0.75]);
    }

    #[test]
    fn without_normalize_it_is_a_plain_weighted_sum() {
        let p = params(
            &[("normalize", flag(false))],
            &[&[("weight", num(2.0))], &[("weight", num(-1.0))]],
        );
        let out = run(&Linear, &[2], &[vec![1.0, 2.0], vec![3.0, 5.0]], None, &p).unwrap();
        assert_eq!(out, vec![-1.0, -1.0]);
    }

    #[test]
    fn one_model_weight_one_is_bit_exact_in_bf16() {
        let p = params(&[], &[&[("weight", num(1.0))]]);
        let x: Vec<f32> = (0..5000)
            .map(|i| ((i as f32) * 0.37).sin() * 0.02)
            .collect();
        let xb: Vec<f32> = x
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        let out = run_dtype(
            &Linear,
            &[50, 100],
            std::slice::from_ref(&xb),
            None,
            &p,
            DType::BF16,
            DType::BF16,
        )
        .unwrap();
        assert_eq!(out, xb);
    }

    #[test]
    fn zero_weight_sum_is_rejected() {
        let p = params(&[], &[&[("weight", num(1.0))], &[("weight", num(-1.0))]]);
        let problem = Linear.validate(&p, None).unwrap_err();
        assert!(problem.message.contains("sum to 0"));
    }
}
