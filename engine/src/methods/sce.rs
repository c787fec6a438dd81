//! `sce` (Select, Calculate, Erase; mergekit 0.1.5 `sce.py`): keep the elements
//! whose task vectors vary most across models (`select_topk` of the non-zero
//! variances), weight each model by the mean square of its (selected) task
//! vector, erase disagreeing signs like TIES, and take the weighted mean.

use super::kernel::{self, MergeJob, OutputView};
use super::select::{self, TopK};
use super::{
    BasePolicy, MergeMethod, MethodError, MethodSpec, ParamDefault, ParamKind, ParamSpec, Scope,
};
use crate::unit::ParamValue;

pub struct Sce;

static SPEC: MethodSpec = MethodSpec {
    name: "sce",
    pretty_name: "SCE",
    reference_url: Some("https://arxiv.org/abs/2408.07990"),
    params: &[
        ParamSpec::shared_bool("int8_mask", false),
        ParamSpec {
            name: "select_topk",
            kind: ParamKind::FRACTION,
            scope: Scope::Shared,
            default: ParamDefault::Value(ParamValue::Number(1.0)),
        },
    ],
    base: BasePolicy::Required,
    min_inputs: 1,
    max_inputs: None,
    min_non_base: 0,
    max_non_base: None,
};

/// Population variance across models of the task vectors at one element, as
/// torch computes it in f32 (`var(dim=0, unbiased=False)`).
fn variance(d: &[f32]) -> f32 {
    let n = d.len() as f32;
    let mean = d.iter().sum::<f32>() / n;
    d.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n
}

impl MergeMethod for Sce {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn working_memory(&self, numel: u64, _inputs: usize) -> u64 {
        super::select::working_memory(numel, 1)
    }

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let Some(base) = job.base else {
            return Err(job.invalid("sce", "needs a base model"));
        };
        let others = job.non_base();
        let k = others.len();
        if k == 0 {
            kernel::map(job, out, |_, x, y| y.copy_from_slice(x[base]));
            return Ok(());
        }
        let topk = job.params.shared_f64("select_topk").unwrap_or(1.0);
        let deltas = |x: &[&[f32]], e: usize, d: &mut [f32]| {
            for (s, &i) in others.iter().enumerate() {
                d[s] = x[i][e] - x[base][e];
            }
        };
        // Select: the top `trunc(nonzero · select_topk)` variances.
        let selection = if topk >= 1.0 {
            TopK::All
        } else if topk <= 0.0 {
            TopK::Nothing
        } else {
            let var_keys = |x: &[&[f32]], out: &mut [u32]| {
                let mut d = vec![0.0f32; k];
                for (e, o) in out.iter_mut().enumerate() {
                    deltas(x, e, &mut d);
                    *o = select::magnitude_key(variance(&d));
                }
            };
            let nonzero: u64 = kernel::fold_exact(
                job,
                || 0u64,
                |acc, c, x| {
                    let mut keys = vec![0u32; c.len];
                    var_keys(x, &mut keys);
                    *acc += keys.iter().filter(|&&v| v != 0).count() as u64;
                },
                |a, b| a + b,
            );
            let want = (nonzero as f64 * topk) as u64;
            select::top_k(job, &[want], |_, x, out| var_keys(x, out))
                .pop()
                .unwrap_or(TopK::Nothing)
        };
        let selected = |c: kernel::Chunk, x: &[&[f32]]| -> Vec<bool> {
            let mut quota = selection.chunk_quota(c);
            let mut d = vec![0.0f32; k];
            (0..c.len)
                .map(|e| {
                    deltas(x, e, &mut d);
                    selection.keep(c.start + e, select::magnitude_key(variance(&d)), &mut quota)
                })
                .collect()
        };
        // Calculate: weights from the mean square of each selected task vector.
        let parts = kernel::reduce(job, |c, x| {
            let mask = selected(c, x);
            let mut sq = vec![0.0f64; k];
            let mut d = vec![0.0f32; k];
            for (e, &m) in mask.iter().enumerate() {
                if m {
                    deltas(x, e, &mut d);
                    for (acc, v) in sq.iter_mut().zip(&d) {
                        *acc += (*v as f64) * (*v as f64);
                    }
                }
            }
            sq
        });
        let n = job.numel().max(1) as f64;
        let mut weights: Vec<f32> = (0..k)
            .map(|s| (parts.iter().map(|p| p[s]).sum::<f64>() / n) as f32)
            .collect();
        let sum: f32 = weights.iter().sum();
        if sum.abs() < 1e-6 {
            weights.iter_mut().for_each(|w| *w = 1.0 / k as f32);
        } else {
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        // Erase and merge.
        kernel::map(job, out, |c, x, y| {
            let mask = selected(c, x);
            let mut d = vec![0.0f32; k];
            for (e, o) in y.iter_mut().enumerate() {
                let b = x[base][e];
                if !mask[e] {
                    *o = b;
                    continue;
                }
                deltas(x, e, &mut d);
                let positive = d.iter().sum::<f32>() >= 0.0;
                let (mut merged, mut div) = (0.0f32, 0.0f32);
                for (s, &v) in d.iter().enumerate() {
                    if v != 0.0 && (v > 0.0) == positive {
                        merged += v * weights[s];
                        div += weights[s];
                    }
                }
                *o = b + merged / div.max(1e-6);
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::kernel::testing::*;

    #[test]
    fn sce_by_hand() {
        // base 0; a = [1, 2, 0, -1], b = [3, -2, 0, -1]; select_topk 1 (everything).
        // Weights: mean(a²) = 6/4, mean(b²) = 14/4 → 0.3 and 0.7.
        // e0: both +: (0.3·1 + 0.7·3)/1 = 2.4. e1: sum 0 → + elected: only a: 0.3·2/0.3 = 2.
        // e2: zeros → base. e3: both −: (−0.3 − 0.7)/1 = −1.
        let p = params(&[("select_topk", num(1.0))], &[&[], &[], &[]]);
        let out = run(
            &Sce,
            &[4],
            &[
                vec![1.0, 2.0, 0.0, -1.0],
                vec![3.0, -2.0, 0.0, -1.0],
                vec![0.0; 4],
            ],
            Some(2),
            &p,
        )
        .unwrap();
        let want = [2.4f32, 2.0, 0.0, -1.0];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn select_keeps_the_most_varying_elements() {
        // Variances: e0 = 1, e1 = 0 (agree), e2 = 4, e3 = 0.25 → nonzero 3, topk 0.5 → 1 kept: e2.
        let p = params(&[("select_topk", num(0.5))], &[&[], &[], &[]]);
        let out = run(
            &Sce,
            &[4],
            &[
                vec![1.0, 1.0, 2.0, 0.5],
                vec![-1.0, 1.0, -2.0, -0.5],
                vec![0.0; 4],
            ],
            Some(2),
            &p,
        )
        .unwrap();
        assert_eq!(out[0], 0.0);
        assert_eq!(out[1], 0.0);
        assert_eq!(out[3], 0.0);
        assert!(out[2] != 0.0);
    }
}
