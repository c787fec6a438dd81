//! The generalized task arithmetic family (mergekit's
//! `generalized_task_arithmetic.py`): task vectors `δ_i = x_i − base` are
//! sparsified, weighted, optionally sign-elected, summed, optionally normalised
//! by the (masked) weight sum, scaled by `lambda` and added back to the base.
//! The order is mergekit's: sparsify → weight → elect signs on the *weighted*
//! deltas → masked sum → divide by the masked weight sum → λ.

use super::kernel::{self, MergeJob, OutputView};
use super::select::{self, TopK};
use super::{
    BasePolicy, MergeMethod, MethodError, MethodSpec, ParamDefault, ParamKind, ParamSpec,
    ParamValue, Scope,
};

/// How each task vector is thinned before merging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    None,
    /// Keep the `max(1, trunc(density·n))` largest magnitudes (TIES).
    Magnitude,
}

/// How signs are elected per element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consensus {
    None,
    /// The sign of the sum of the weighted deltas (TIES).
    Sum,
}

pub struct Gta {
    spec: MethodSpec,
    sparsify: Sparsify,
    consensus: Consensus,
}

const fn param_specs(normalize: bool, rescale: bool) -> [ParamSpec; 6] {
    [
        ParamSpec::shared_bool("int8_mask", false),
        ParamSpec::shared_bool("normalize", normalize),
        ParamSpec::shared_bool("rescale", rescale),
        ParamSpec {
            name: "lambda",
            kind: ParamKind::ANY_NUMBER,
            scope: Scope::Shared,
            default: ParamDefault::Value(ParamValue::Number(1.0)),
        },
        ParamSpec {
            name: "weight",
            kind: ParamKind::ANY_NUMBER,
            scope: Scope::NonBase,
            default: ParamDefault::Required,
        },
        ParamSpec {
            name: "density",
            kind: ParamKind::FRACTION,
            scope: Scope::NonBase,
            default: ParamDefault::Value(ParamValue::Number(1.0)),
        },
    ]
}

const fn spec(
    name: &'static str,
    pretty_name: &'static str,
    url: &'static str,
    params: &'static [ParamSpec],
) -> MethodSpec {
    MethodSpec {
        name,
        pretty_name,
        reference_url: Some(url),
        params,
        base: BasePolicy::Required,
        min_inputs: 1,
        max_inputs: None,
        min_non_base: 0,
        max_non_base: None,
    }
}

static TASK_ARITHMETIC_PARAMS: [ParamSpec; 6] = param_specs(false, false);
static TIES_PARAMS: [ParamSpec; 6] = param_specs(true, false);

pub static TASK_ARITHMETIC: Gta = Gta {
    spec: spec(
        "task_arithmetic",
        "Task Arithmetic",
        "https://arxiv.org/abs/2212.04089",
        &TASK_ARITHMETIC_PARAMS,
    ),
    sparsify: Sparsify::None,
    consensus: Consensus::None,
};

pub static TIES: Gta = Gta {
    spec: spec(
        "ties",
        "TIES",
        "https://arxiv.org/abs/2306.01708",
        &TIES_PARAMS,
    ),
    sparsify: Sparsify::Magnitude,
    consensus: Consensus::Sum,
};

/// The per-input state the elementwise pass needs.
struct TaskVector {
    input: usize,
    weight: f32,
    keep: TopK,
    /// L1-preserving rescale factor (1 when rescale is off).
    scale: f32,
}

impl Gta {
    fn task_vectors(&self, job: &MergeJob, base: usize) -> Vec<TaskVector> {
        let others = job.non_base();
        let n = job.numel() as u64;
        let density = |i: usize| job.params.input_f64(i, "density").unwrap_or(1.0);
        let keeps: Vec<TopK> = match self.sparsify {
            Sparsify::None => others.iter().map(|_| TopK::All).collect(),
            Sparsify::Magnitude => {
                let ks: Vec<u64> = others
                    .iter()
                    .map(|&i| {
                        let d = density(i);
                        if d >= 1.0 {
                            n
                        } else if d <= 0.0 {
                            0
                        } else {
                            ((d * n as f64) as u64).max(1)
                        }
                    })
                    .collect();
                select::top_k(job, &ks, |s, x, out| {
                    let xi = x[others[s]];
                    for ((o, &v), &b) in out.iter_mut().zip(xi).zip(x[base]) {
                        *o = select::magnitude_key(v - b);
                    }
                })
            }
        };
        let mut tvs: Vec<TaskVector> = others
            .iter()
            .zip(keeps)
            .map(|(&input, keep)| TaskVector {
                input,
                weight: job.params.input_f64(input, "weight").unwrap_or(0.0) as f32,
                keep,
                scale: 1.0,
            })
            .collect();
        let rescale = job.params.shared_bool("rescale").unwrap_or(false);
        if rescale && self.sparsify != Sparsify::None {
            let parts = kernel::reduce(job, |c, x| {
                tvs.iter()
                    .map(|tv| {
                        let mut left = tv.keep.chunk_quota(c);
                        let (mut before, mut after) = (0.0f64, 0.0f64);
                        for (e, (&v, &b)) in x[tv.input].iter().zip(x[base]).enumerate() {
                            let d = v - b;
                            before += d.abs() as f64;
                            if tv
                                .keep
                                .keep(c.start + e, select::magnitude_key(d), &mut left)
                            {
                                after += d.abs() as f64;
                            }
                        }
                        [before, after]
                    })
                    .collect::<Vec<_>>()
            });
            for (s, tv) in tvs.iter_mut().enumerate() {
                let (mut before, mut after) = (0.0f64, 0.0f64);
                for p in &parts {
                    before += p[s][0];
                    after += p[s][1];
                }
                if before >= 1e-7 && after >= 1e-7 {
                    tv.scale = (before / after) as f32;
                }
            }
        }
        tvs
    }
}

impl MergeMethod for Gta {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let Some(base) = job.base else {
            return Err(job.invalid(self.spec.name, "needs a base model"));
        };
        let tvs = self.task_vectors(job, base);
        let normalize = job
            .params
            .shared_bool("normalize")
            .unwrap_or(self.consensus == Consensus::Sum);
        let lambda = job.params.shared_f64("lambda").unwrap_or(1.0) as f32;
        let weight_sum = tvs.iter().fold(0.0f32, |a, tv| a + tv.weight);
        let plain_divisor = if weight_sum.abs() < 1e-8 {
            1.0
        } else {
            weight_sum
        };
        let consensus = self.consensus;
        let k = tvs.len();
        kernel::map(job, out, |c, x, y| {
            let mut left: Vec<select::TieQuota> =
                tvs.iter().map(|tv| tv.keep.chunk_quota(c)).collect();
            let mut d = vec![0.0f32; k];
            for (e, o) in y.iter_mut().enumerate() {
                let b = x[base][e];
                for (s, tv) in tvs.iter().enumerate() {
                    let delta = x[tv.input][e] - b;
                    let kept =
                        tv.keep
                            .keep(c.start + e, select::magnitude_key(delta), &mut left[s]);
                    d[s] = if kept {
                        delta * tv.scale * tv.weight
                    } else {
                        0.0
                    };
                }
                let (mixed, divisor) = match consensus {
                    Consensus::None => (d.iter().fold(0.0f32, |a, &v| a + v), plain_divisor),
                    Consensus::Sum => {
                        let positive = d.iter().fold(0.0f32, |a, &v| a + v) >= 0.0;
                        let (mut mixed, mut div) = (0.0f32, 0.0f32);
                        for (s, &v) in d.iter().enumerate() {
                            // Zeros have sign 0 and never match the elected sign.
                            if v != 0.0 && (v > 0.0) == positive {
                                mixed += v;
                                div += tvs[s].weight;
                            }
                        }
                        (mixed, if div == 0.0 { 1.0 } else { div })
                    }
                };
                let mut mixed = if normalize { mixed / divisor } else { mixed };
                if lambda != 1.0 {
                    mixed *= lambda;
                }
                *o = b + mixed;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::methods::kernel::testing::*;
    use crate::methods::TensorParams;

    fn ties(
        inputs: &[Vec<f32>],
        per: &[&[(&str, ParamValue)]],
        shared: &[(&str, ParamValue)],
    ) -> Vec<f32> {
        let n = inputs[0].len() as u64;
        let p = params(shared, per);
        run(&TIES, &[n], inputs, Some(inputs.len() - 1), &p).unwrap()
    }

    #[test]
    fn ties_by_hand() {
        // base 0; deltas a = [1, -2, 3, 0.5], b = [-1, -1, 1, 0] with weights 1 and 0.5,
        // density 1 (no pruning). Weighted: a' = [1, -2, 3, 0.5], b' = [-0.5, -0.5, 0.5, 0].
        // Signs of sums: [+, -, +, +]. Element 0: only a agrees → 1/1 = 1.
        // Element 1: both → (-2 - 0.5)/(1 + 0.5) = -5/3. Element 2: (3 + 0.5)/1.5 = 7/3.
        // Element 3: b's zero never votes → 0.5/1.
        let out = ties(
            &[
                vec![1.0, -2.0, 3.0, 0.5],
                vec![-1.0, -1.0, 1.0, 0.0],
                vec![0.0; 4],
            ],
            &[
                &[("weight", num(1.0)), ("density", num(1.0))],
                &[("weight", num(0.5)), ("density", num(1.0))],
                &[],
            ],
            &[],
        );
        assert_eq!(out, vec![1.0, -2.5f32 / 1.5, 3.5f32 / 1.5, 0.5]);
    }

    #[test]
    fn weights_scale_before_the_election() {
        // a = +1 (weight 0.1), b = -0.5 (weight 1): unweighted sum is +0.5, but the
        // weighted sum (0.1 - 0.5) is negative, so b wins: -0.5*1/1 = -0.5.
        let out = ties(
            &[vec![1.0], vec![-0.5], vec![0.0]],
            &[&[("weight", num(0.1))], &[("weight", num(1.0))], &[]],
            &[],
        );
        assert_eq!(out, vec![-0.5]);
    }

    #[test]
    fn magnitude_pruning_keeps_top_density() {
        // density 0.5 of 4 elements → the 2 largest |delta| of each model.
        let out = ties(
            &[vec![0.1, -0.4, 0.3, 0.2], vec![0.0; 4]],
            &[&[("weight", num(1.0)), ("density", num(0.5))], &[]],
            &[],
        );
        assert_eq!(out, vec![0.0, -0.4, 0.3, 0.0]);
    }

    #[test]
    fn zero_deltas_never_vote_and_agreeing_values_survive() {
        // Element where all deltas are zero stays at base; a single non-zero that
        // agrees with the (its own) sign is kept whole.
        let base = vec![0.25f32, 0.5];
        let a = vec![0.25f32, 0.75];
        let b = vec![0.25f32, 0.5];
        let out = ties(
            &[a, b, base],
            &[&[("weight", num(1.0))], &[("weight", num(1.0))], &[]],
            &[],
        );
        assert_eq!(out, vec![0.25, 0.75]);
    }

    #[test]
    fn single_model_density_one_is_bit_exact() {
        let base: Vec<f32> = (0..3000).map(|i| ((i as f32) * 0.1).sin() * 0.02).collect();
        let ft: Vec<f32> = base
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if i % 3 == 0 {
                    b
                } else {
                    b + ((i as f32) * 0.7).cos() * 0.004
                }
            })
            .collect();
        for dt in [DType::BF16, DType::F32] {
            let round = |v: &Vec<f32>| -> Vec<f32> {
                let mut bytes = vec![0u8; v.len() * dt.size()];
                crate::dtype::encode_f32(dt, v, &mut bytes);
                let mut r = vec![0f32; v.len()];
                crate::dtype::decode_f32(dt, &bytes, &mut r);
                r
            };
            let (b, x) = (round(&base), round(&ft));
            let p = params(&[], &[&[("weight", num(1.0)), ("density", num(1.0))], &[]]);
            let out = run_dtype(&TIES, &[3000], &[x.clone(), b], Some(1), &p, dt, dt).unwrap();
            assert_eq!(out, x, "{dt}");
        }
    }

    #[test]
    fn task_arithmetic_by_hand() {
        let p = params(
            &[],
            &[&[("weight", num(1.0))], &[("weight", num(-0.5))], &[]],
        );
        let out = run(
            &TASK_ARITHMETIC,
            &[2],
            &[vec![2.0, 1.0], vec![3.0, 1.0], vec![1.0, 1.0]],
            Some(2),
            &p,
        )
        .unwrap();
        // 1 + (1·1 + (-0.5)·2) = 1, 1 + 0 = 1
        assert_eq!(out, vec![1.0, 1.0]);
        let p = TensorParams {
            shared: [("lambda".to_string(), num(2.0))].into(),
            ..params(&[], &[&[("weight", num(0.5))], &[]])
        };
        let out = run(&TASK_ARITHMETIC, &[1], &[vec![3.0], vec![1.0]], Some(1), &p).unwrap();
        assert_eq!(out, vec![3.0]); // 1 + 2·(0.5·2)
    }
}
