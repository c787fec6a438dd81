//! `sce` (Select, Calculate, Erase; mergekit 0.1.5 `sce.py`): keep the elements
//! whose task vectors vary most across models (`select_topk` of the non-zero
//! variances), weight each model by the mean square of its (selected) task
//! vector, erase disagreeing signs like TIES, and take the weighted mean.
//! The variances, their count and, on tensors up to `select::EXACT_LIMIT`
//! elements, the choice among equal variances ([`super::torch_topk`]) are
//! torch's, so small tensors keep exactly mergekit's elements.

use super::chunked;
use super::select::{self, TopK, TorchOrder};
use super::{
    BasePolicy, MergeMethod, MethodError, MethodSpec, ParamDefault, ParamKind, ParamSpec,
    ParamValue, Scope,
};
use super::{MergeJob, OutputView};

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
/// torch's CPU `var(dim=0, unbiased=False)` computes it for f32: Welford's
/// update in f64 (`WelfordOps<float, double>`), rounded to f32 once. Its last
/// bit decides which variances tie at the top-k threshold, so it must be
/// torch's, not merely close.
fn variance(d: &[f32]) -> f32 {
    let (mut mean, mut m2) = (0.0f64, 0.0f64);
    for (i, &v) in d.iter().enumerate() {
        let v = v as f64;
        let delta = v - mean;
        mean += delta / (i + 1) as f64;
        m2 += delta * (v - mean);
    }
    (m2 / d.len() as f64) as f32
}

/// How many variances SCE keeps: mergekit's `int(count_nonzero(var) *
/// select_topk)` multiplies an int64 tensor by a Python float, which torch does
/// in f32: 90 · 0.7 keeps 63 (in f64, 62.99… would keep 62).
fn keep_count(nonzero: u64, select_topk: f64) -> u64 {
    (nonzero as f32 * select_topk as f32) as u64
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
            chunked::map(job, out, |_, x, y| y.copy_from_slice(x[base]));
            return Ok(());
        }
        let topk = job.params.shared_f64("select_topk").unwrap_or(1.0);
        let deltas = |x: &[&[f32]], e: usize, d: &mut [f32]| {
            for (s, &i) in others.iter().enumerate() {
                d[s] = x[i][e] - x[base][e];
            }
        };
        // Select: the top `trunc(nonzero · select_topk)` variances, as torch.topk
        // picks them among equals.
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
            let nonzero: u64 = chunked::fold_exact(
                job,
                || 0u64,
                |acc, c, x| {
                    let mut keys = vec![0u32; c.len];
                    var_keys(x, &mut keys);
                    *acc += keys.iter().filter(|&&v| v != 0).count() as u64;
                },
                |a, b| a + b,
            );
            let want = keep_count(nonzero, topk);
            select::top_k_as(job, &[want], TorchOrder::Topk, |_, x, out| var_keys(x, out))
                .pop()
                .unwrap_or(TopK::Nothing)
        };
        let selected = |c: super::Chunk, x: &[&[f32]]| -> Vec<bool> {
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
        let parts = chunked::reduce(job, |c, x| {
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
        chunked::map(job, out, |c, x, y| {
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
    use crate::methods::testing::*;

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
    fn norm_weight_with_tied_variances_merges_as_mergekit() {
        // sce_fixture.txt (scripts/torch_topk_fixtures.py): a 64-element bf16
        // norm weight of three fine-tunes, merged by mergekit 0.1.5 with torch.
        let lines: Vec<&str> = include_str!("sce_fixture.txt")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect();
        let bf16 = |line: &str| -> Vec<f32> {
            line.split_whitespace()
                .map(|h| f32::from_bits(u32::from_str_radix(h, 16).unwrap() << 16))
                .collect()
        };
        let base = bf16(lines[0]);
        let models: Vec<Vec<f32>> = lines[1..4].iter().map(|l| bf16(l)).collect();
        let want: Vec<u32> = lines[4]
            .split_whitespace()
            .map(|h| u32::from_str_radix(h, 16).unwrap())
            .collect();
        // The case is one where ties decide: more variances equal the k-th
        // largest than the selection keeps of them.
        let vars: Vec<f32> = (0..64)
            .map(|e| variance(&[0, 1, 2].map(|m| models[m][e] - base[e])))
            .collect();
        let nonzero = vars.iter().filter(|&&v| v != 0.0).count() as u64;
        let k = keep_count(nonzero, 0.5) as usize;
        let mut sorted = vars.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let (threshold, above) = (
            sorted[k - 1],
            sorted.iter().filter(|&&v| v > sorted[k - 1]).count(),
        );
        let tied = vars.iter().filter(|&&v| v == threshold).count();
        assert!(tied > k - above, "{tied} tied, {} of them kept", k - above);

        let mut inputs = models.clone();
        inputs.push(base);
        let p = params(&[("select_topk", num(0.5))], &[&[], &[], &[], &[]]);
        let out = run(&Sce, &[64], &inputs, Some(3), &p).unwrap();
        let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn keep_count_multiplies_in_f32_as_torch() {
        // int(torch.tensor(90) * 0.7) == 63, int(180 * 0.35) == 63 in torch.
        assert_eq!(keep_count(90, 0.7), 63);
        assert_eq!(keep_count(180, 0.35), 63);
        assert_eq!(keep_count(64, 0.5), 32);
    }

    #[test]
    fn variance_is_torchs_f64_welford() {
        // torch.var(torch.tensor([[a], [b], [c]]), dim=0, unbiased=False) is
        // 0x3a30e38e for these bf16-valued deltas; a plain f32 two-pass is not.
        let d = [0.02734375f32, -0.0234375, -0.03125];
        assert_eq!(variance(&d).to_bits(), 0x3a30_e38e);
        let mean = d.iter().sum::<f32>() / 3.0;
        let plain = d.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 3.0;
        assert_ne!(plain.to_bits(), 0x3a30_e38e);
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
