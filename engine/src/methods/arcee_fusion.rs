//! `arcee_fusion` (mergekit 0.1.5 `arcee_fusion.py`): keep the other model's
//! value where its change is an outlier of importance, the base elsewhere.
//! Importance `I = |x − a|·KL_row`, where per row (last axis; a 1-D tensor is one
//! row) `p = softmax(x) + 1e-8`, `q = softmax(a) + 1e-8`, `KL = Σ p·ln(p/q)`.
//! Threshold `τ = median + 1.5·(Q3 − Q1)`, quantile `q` = element
//! `trunc(q·(n − 1))` of the sorted importances; `out = a + (x − a)·[I ≥ τ]`.
//!
//! Deliberate difference: for tensors of more than 10^6 elements mergekit takes
//! the quantiles of 10^6 elements sampled with replacement by torch's global
//! generator; we sample 10^6 element indices with replacement from a counter-based
//! splitmix64 generator keyed by the job's seed and the tensor name, so a merge is
//! reproducible whatever the schedule, thread count or worker. Smaller tensors use
//! every element, exactly like mergekit.

use super::chunked;
use super::{BasePolicy, MergeMethod, MethodError, MethodSpec};
use super::{MergeJob, OutputView};
use std::cmp::Ordering;

pub struct ArceeFusion;

static SPEC: MethodSpec = MethodSpec {
    name: "arcee_fusion",
    pretty_name: "Arcee Fusion",
    reference_url: Some("https://arcee.ai"),
    params: &[],
    base: BasePolicy::Required,
    min_inputs: 2,
    max_inputs: Some(2),
    min_non_base: 1,
    max_non_base: Some(1),
};

/// mergekit's `_QUANTILE_SAMPLE_SIZE`.
const SAMPLE: usize = 1_000_000;

/// Counter-based sampling of element indices (see the module note).
mod sample {
    /// SplitMix64's finaliser.
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The `count` indices in `[0, n)` drawn with replacement for this tensor,
    /// sorted (the quantiles do not depend on their order).
    pub fn indices(seed: u64, tensor: &str, n: usize, count: usize) -> Vec<usize> {
        let name = tensor.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let key = mix(mix(seed ^ 0xa076_1d64_78bd_642f) ^ mix(name ^ 0xe703_7ed1_a0b4_28db));
        let mut v: Vec<usize> = (0..count as u64)
            .map(|i| {
                let z = mix(key.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
                ((z as u128 * n as u128) >> 64) as usize
            })
            .collect();
        v.sort_unstable();
        v
    }
}

/// `KL(p‖q)` of one row, p from the other model, q from the base, in f32 with
/// f64 sums (the softmax scales by the reciprocal of its sum, as torch's CPU
/// kernel does). The KL of close models is dominated by f32 rounding, so a few
/// elements right at the threshold can flip relative to mergekit.
fn row_kl(x: &[f32], a: &[f32], ex: &mut Vec<f32>, ea: &mut Vec<f32>) -> f32 {
    fn softmax(v: &[f32], e: &mut Vec<f32>) {
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        e.clear();
        e.extend(v.iter().map(|&t| (t - max).exp()));
        let sum = e.iter().map(|&t| t as f64).sum::<f64>() as f32;
        for t in e.iter_mut() {
            *t = *t * (1.0 / sum) + 1e-8;
        }
    }
    softmax(x, ex);
    softmax(a, ea);
    ex.iter()
        .zip(ea.iter())
        .map(|(&p, &q)| (p * (p / q).ln()) as f64)
        .sum::<f64>() as f32
}

/// torch.sort's order: NaN last.
fn order(a: &f32, b: &f32) -> Ordering {
    a.partial_cmp(b)
        .unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
}

/// `median + 1.5·(Q3 − Q1)` of `v` (reordered in place).
fn threshold(v: &mut [f32]) -> f32 {
    let n = v.len();
    let at = |q: f32| (q * (n - 1) as f32) as usize;
    let (i1, i2, i3) = (at(0.25), at(0.5), at(0.75));
    let (left, &mut median, right) = v.select_nth_unstable_by(i2, order);
    let q1 = if i1 < i2 {
        *left.select_nth_unstable_by(i1, order).1
    } else {
        median
    };
    let q3 = if i3 > i2 {
        *right.select_nth_unstable_by(i3 - i2 - 1, order).1
    } else {
        median
    };
    median + 1.5 * (q3 - q1)
}

impl MergeMethod for ArceeFusion {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn working_memory(&self, numel: u64, _inputs: usize) -> u64 {
        // The importance sample and one KL value per row.
        numel.min(SAMPLE as u64) * 4 * 2 + numel * 4 / 64
    }

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let non_base = job.non_base();
        let (Some(base), [other]) = (job.base, non_base.as_slice()) else {
            return Err(job.invalid(
                "arcee_fusion",
                "needs the base model and exactly one other model",
            ));
        };
        let other = *other;
        let n = job.numel();
        if n == 0 {
            return Ok(());
        }
        let row = job.row_len();
        // Pass 1: KL of every row.
        let kl: Vec<f32> = chunked::reduce_sized(job, chunked::row_chunk(row), |c, x| {
            let (mut ex, mut ea) = (Vec::new(), Vec::new());
            (0..c.len)
                .step_by(row)
                .map(|r| {
                    let s = r..r + row;
                    row_kl(&x[other][s.clone()], &x[base][s], &mut ex, &mut ea)
                })
                .collect::<Vec<f32>>()
        })
        .concat();
        let importance = |x: &[&[f32]], start: usize, e: usize| {
            (x[other][e] - x[base][e]).abs() * kl[(start + e) / row]
        };

        // Pass 2: the importances of the sample (every element up to 10^6).
        let picks = (n > SAMPLE).then(|| sample::indices(job.seed, job.name, n, SAMPLE));
        let mut values: Vec<f32> = chunked::reduce(job, |c, x| -> Vec<f32> {
            match &picks {
                None => (0..c.len).map(|e| importance(x, c.start, e)).collect(),
                Some(p) => {
                    let lo = p.partition_point(|&i| i < c.start);
                    let hi = p.partition_point(|&i| i < c.start + c.len);
                    p[lo..hi]
                        .iter()
                        .map(|&i| importance(x, c.start, i - c.start))
                        .collect()
                }
            }
        })
        .concat();
        let tau = threshold(&mut values);
        drop(values);

        // Pass 3: keep the outliers.
        chunked::map(job, out, |c, x, y| {
            for (e, o) in y.iter_mut().enumerate() {
                let (a, b) = (x[base][e], x[other][e]);
                let mask = if importance(x, c.start, e) >= tau {
                    1.0
                } else {
                    0.0
                };
                *o = a + (b - a) * mask;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testing::*;

    fn fusion(shape: &[u64], base: Vec<f32>, other: Vec<f32>) -> Vec<f32> {
        let p = params(&[], &[&[], &[]]);
        run(&ArceeFusion, shape, &[base, other], Some(0), &p).unwrap()
    }

    #[test]
    fn kl_by_hand() {
        // softmax(ln 3, 0) = (3/4, 1/4) against (1/2, 1/2):
        // KL = 0.75·ln 1.5 + 0.25·ln 0.5.
        let (mut ex, mut ea) = (Vec::new(), Vec::new());
        let kl = row_kl(&[3f32.ln(), 0.0], &[0.0, 0.0], &mut ex, &mut ea);
        let want = 0.75 * 1.5f64.ln() + 0.25 * 0.5f64.ln();
        assert!((kl as f64 - want).abs() < 1e-6, "{kl} vs {want}");
        // Softmax ignores a constant shift: KL = 0 exactly.
        let kl = row_kl(&[5.0, 5.0, 5.0], &[0.0, 0.0, 0.0], &mut ex, &mut ea);
        assert_eq!(kl, 0.0);
    }

    #[test]
    fn only_outliers_are_taken() {
        // One row, KL = K > 0: I = K·(0.1, 0.2, 0.3, 0.4, 2.0). Sorted indices
        // trunc(q·4) = 1, 2, 3 → τ = 0.3K + 1.5·(0.4K − 0.2K) = 0.6K: only 2.0.
        let out = fusion(&[5], vec![0.0; 5], vec![0.1, -0.2, 0.3, -0.4, 2.0]);
        assert_eq!(out, vec![0.0, 0.0, 0.0, 0.0, 2.0]);
    }

    #[test]
    fn importance_is_weighted_per_row() {
        // Row 0 only shifts (KL 0 → I = 0); row 1 changes by (0.1, 0.2, 0.5, 2)
        // with KL K. Sorted I: 0,0,0,0,.1K,.2K,.5K,2K; indices trunc(q·7) =
        // 1, 3, 5 → τ = 0 + 1.5·(0.2K − 0) = 0.3K: keeps 0.5 and 2 only.
        let base = vec![0.0; 8];
        let other = vec![5.0, 5.0, 5.0, 5.0, 0.1, 0.2, 0.5, 2.0];
        let out = fusion(&[2, 4], base, other);
        assert_eq!(out, vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 2.0]);
    }

    #[test]
    fn identical_inputs_give_the_base() {
        // I = 0 everywhere, τ = 0, every element is kept: a + 0.
        let a = vec![0.5, -1.0, 2.0];
        assert_eq!(fusion(&[3], a.clone(), a.clone()), a);
    }

    #[test]
    fn kept_elements_are_a_plus_the_difference() {
        // a + (x − a) rounds like torch: 1 + (1e-8 − 1) = 0 in f32.
        let out = fusion(&[2], vec![1.0, 0.0], vec![1e-8, 0.0]);
        assert_eq!(out[0], 1.0f32 + (1e-8f32 - 1.0));
    }

    #[test]
    fn quantile_indices_truncate() {
        let mut v = vec![4.0, 1.0, 3.0, 2.0];
        // n − 1 = 3: indices 0, 1, 2 → 2 + 1.5·(3 − 1) = 5.
        assert_eq!(threshold(&mut v), 5.0);
        let mut v = vec![7.0];
        assert_eq!(threshold(&mut v), 7.0);
        let mut v = vec![f32::NAN, 1.0, 2.0, 3.0, 4.0];
        // NaN sorts last: indices 1, 2, 3 of (1, 2, 3, 4, NaN).
        assert_eq!(threshold(&mut v), 3.0 + 1.5 * (4.0 - 2.0));
    }

    #[test]
    fn sample_is_deterministic_and_in_range() {
        let a = sample::indices(42, "t", 1_500_000, 1000);
        assert_eq!(a, sample::indices(42, "t", 1_500_000, 1000));
        assert_ne!(a, sample::indices(43, "t", 1_500_000, 1000));
        assert_ne!(a, sample::indices(42, "u", 1_500_000, 1000));
        assert!(a.windows(2).all(|w| w[0] <= w[1]) && *a.last().unwrap() < 1_500_000);
        let mean = sample::indices(7, "t", 1000, 100_000)
            .iter()
            .map(|&i| i as f64)
            .sum::<f64>()
            / 100_000.0;
        assert!((mean - 499.5).abs() < 5.0, "{mean}");
    }

    #[test]
    fn large_tensors_use_a_seeded_sample() {
        // 1.2M elements: changes spread over (0, 1) plus every 1000th changed by
        // 10. Any reasonable sample puts τ near 1.25·K, keeping exactly the 10s.
        let n = 1_200_000usize;
        let other: Vec<f32> = (0..n)
            .map(|e| {
                if e % 1000 == 7 {
                    10.0
                } else {
                    ((e * 7919) % 1000) as f32 / 1000.0 + 5e-4
                }
            })
            .collect();
        let p = params(&[], &[&[], &[]]);
        let inputs = [vec![0.0; n], other.clone()];
        let out = run_seeded(&ArceeFusion, &[n as u64], &inputs, Some(0), &p, 1);
        let want: Vec<f32> = other
            .iter()
            .map(|&v| if v == 10.0 { 10.0 } else { 0.0 })
            .collect();
        assert!(out == want);
        let again = run_seeded(&ArceeFusion, &[n as u64], &inputs, Some(0), &p, 2);
        assert!(again == want);
    }
}
