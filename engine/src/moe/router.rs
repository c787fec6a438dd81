//! Router ("gate") initialisation, as mergekit-moe's `moe/router.py`: per
//! layer an `[experts, hidden]` matrix, computed once by the planner (it is
//! small) and written as literal tensors. `random` (standard normal) and
//! `uniform_random` (uniform in ±1/√hidden) draw counter-based numbers (a
//! function of the seed and the element, as our randomized methods; mergekit
//! draws from torch's generator); `cheap_embed` sums the token embeddings of
//! each expert's prompts (each prefixed with the BOS token string, tokenized
//! without special tokens), normalises, subtracts the negative prompts' vector
//! and normalises again, the same vector for every layer, in mergekit's f32
//! order of summation. Also the condition-number check mergekit warns with.

use super::config::{Expert, GateMode};
use crate::methods::moe_expert::normal;
use crate::methods::rng::Stream;
use std::collections::BTreeMap;

/// Gate vectors: `layers × experts × hidden`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Gates {
    pub layers: usize,
    pub experts: usize,
    pub hidden: usize,
    pub values: Vec<f32>,
}

impl Gates {
    /// Layer `l`'s matrix of experts `range`, row-major.
    pub fn layer(&self, l: usize, range: std::ops::Range<usize>) -> &[f32] {
        let row = self.hidden;
        let at = (l * self.experts) * row;
        &self.values[at + range.start * row..at + range.end * row]
    }
}

/// The name random gates key their stream with.
const STREAM_NAME: &str = "moe.router";

/// `random` / `uniform_random` gates for `experts` experts.
pub fn random(mode: GateMode, seed: u64, layers: usize, experts: usize, hidden: usize) -> Gates {
    let s = Stream::new(seed, STREAM_NAME, 0);
    let n = layers * experts * hidden;
    let scale = (1.0 / hidden as f64).sqrt() as f32;
    let values = (0..n as u64)
        .map(|i| match mode {
            GateMode::UniformRandom => s.uniform(i) * 2.0 * scale - scale,
            _ => normal(&s, i),
        })
        .collect();
    Gates {
        layers,
        experts,
        hidden,
        values,
    }
}

/// Token ids of the prompts of each expert: (positive, negative), each a
/// list of prompts' ids.
pub type PromptIds = Vec<(Vec<Vec<u32>>, Vec<Vec<u32>>)>;

/// Tokenizes every expert's prompts as mergekit's `tokenize_prompts`:
/// `bos + prompt`, no special tokens added (padding does not matter here:
/// padded positions are masked out of every sum).
pub fn tokenize(
    tokenizer: &tokenizers::Tokenizer,
    bos: &str,
    experts: &[&Expert],
) -> Result<PromptIds, String> {
    let ids = |prompts: &Option<Vec<String>>| -> Result<Vec<Vec<u32>>, String> {
        prompts
            .iter()
            .flatten()
            .map(|p| {
                tokenizer
                    .encode(format!("{bos}{p}"), false)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| format!("tokenizing the prompt {p:?}: {e}"))
            })
            .collect()
    };
    experts
        .iter()
        .map(|e| Ok((ids(&e.positive_prompts)?, ids(&e.negative_prompts)?)))
        .collect()
}

/// `x / max(‖x‖, 1e-8)` (torch's `norm` then `clamp`).
pub(super) fn normalize(x: &mut [f32]) {
    let norm = x
        .iter()
        .map(|v| (*v as f64) * (*v as f64))
        .sum::<f64>()
        .sqrt() as f32;
    let d = norm.max(1e-8);
    for v in x {
        *v /= d;
    }
}

/// mergekit's `get_cheap_embedding` of one prompt group: the embeddings of
/// every token, summed over the tokens of each prompt then over the prompts
/// (f32), normalised.
fn cheap_embedding(
    prompts: &[Vec<u32>],
    rows: &BTreeMap<u32, Vec<f32>>,
    hidden: usize,
) -> Vec<f32> {
    let mut total = vec![0f32; hidden];
    for p in prompts {
        let mut sum = vec![0f32; hidden];
        for id in p {
            for (s, x) in sum.iter_mut().zip(&rows[id]) {
                *s += *x;
            }
        }
        for (t, s) in total.iter_mut().zip(&sum) {
            *t += *s;
        }
    }
    normalize(&mut total);
    total
}

/// `cheap_embed` gates from the prompts' token ids and the embedding rows
/// they use (`rows`: token id → its row, f32).
pub fn cheap_embed(
    prompts: &PromptIds,
    rows: &BTreeMap<u32, Vec<f32>>,
    layers: usize,
    hidden: usize,
) -> Gates {
    let experts = prompts.len();
    let mut per_expert = Vec::with_capacity(experts);
    for (pos, neg) in prompts {
        let mut v = cheap_embedding(pos, rows, hidden);
        if !neg.is_empty() {
            let n = cheap_embedding(neg, rows, hidden);
            for (a, b) in v.iter_mut().zip(&n) {
                *a -= *b;
            }
        }
        normalize(&mut v);
        per_expert.push(v);
    }
    let mut values = Vec::with_capacity(layers * experts * hidden);
    for _ in 0..layers {
        for v in &per_expert {
            values.extend_from_slice(v);
        }
    }
    Gates {
        layers,
        experts,
        hidden,
        values,
    }
}

/// The 2-norm condition number of an `n × h` matrix (`torch.linalg.cond`):
/// the ratio of its largest to smallest singular value, from the eigenvalues
/// of its Gram matrix (the smaller side) by Jacobi rotations, in f64.
pub fn condition_number(m: &[f32], n: usize, h: usize) -> f64 {
    let (k, gram) = if n <= h {
        let mut g = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                g[i * n + j] = (0..h)
                    .map(|c| m[i * h + c] as f64 * m[j * h + c] as f64)
                    .sum();
            }
        }
        (n, g)
    } else {
        let mut g = vec![0f64; h * h];
        for i in 0..h {
            for j in 0..h {
                g[i * h + j] = (0..n)
                    .map(|r| m[r * h + i] as f64 * m[r * h + j] as f64)
                    .sum();
            }
        }
        (h, g)
    };
    let eig = symmetric_eigenvalues(gram, k);
    let max = eig.iter().cloned().fold(0f64, f64::max);
    let min = eig.iter().cloned().fold(f64::INFINITY, f64::min);
    if min <= max * 1e-30 || min <= 0.0 {
        return f64::INFINITY;
    }
    (max / min).sqrt()
}

/// Eigenvalues of a symmetric `k × k` matrix (cyclic Jacobi).
fn symmetric_eigenvalues(mut a: Vec<f64>, k: usize) -> Vec<f64> {
    for _sweep in 0..100 {
        let off: f64 = (0..k)
            .flat_map(|i| (0..k).filter(move |j| *j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * k + j] * a[i * k + j])
            .sum();
        let diag: f64 = (0..k).map(|i| a[i * k + i] * a[i * k + i]).sum();
        if off <= 1e-30 * diag.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..k {
            for q in p + 1..k {
                let apq = a[p * k + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..k {
                    let arp = a[r * k + p];
                    let arq = a[r * k + q];
                    a[r * k + p] = c * arp - s * arq;
                    a[r * k + q] = s * arp + c * arq;
                }
                for r in 0..k {
                    let apr = a[p * k + r];
                    let aqr = a[q * k + r];
                    a[p * k + r] = c * apr - s * aqr;
                    a[q * k + r] = s * apr + c * aqr;
                }
            }
        }
    }
    (0..k).map(|i| a[i * k + i]).collect()
}

/// The layers whose gate matrix has a condition number above 5, and
/// mergekit's warning about them (`warn_degenerate_gates`), if any.
pub fn degenerate_warning(g: &Gates) -> Option<String> {
    let bad: Vec<usize> = (0..g.layers)
        .filter(|&l| condition_number(g.layer(l, 0..g.experts), g.experts, g.hidden) > 5.0)
        .collect();
    if bad.is_empty() {
        return None;
    }
    let (layers, verb) = match bad.len() {
        1 => (format!("layer {}", bad[0]), "has"),
        2 => (format!("layers {} and {}", bad[0], bad[1]), "have"),
        n if n >= g.layers => ("ALL layers".to_string(), "have"),
        n => (
            format!(
                "layers {}, and {}",
                bad[..n - 1]
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                bad[n - 1]
            ),
            "have",
        ),
    };
    Some(format!(
        "{layers} {verb} degenerate routing parameters - your prompts may be too similar. One or \
         more experts will be underutilized in your model."
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_gates_are_seed_stable_and_distributed() {
        let a = random(GateMode::Random, 7, 4, 8, 256);
        assert_eq!(a, random(GateMode::Random, 7, 4, 8, 256));
        assert_ne!(a, random(GateMode::Random, 8, 4, 8, 256));
        let mean = a.values.iter().map(|v| *v as f64).sum::<f64>() / a.values.len() as f64;
        assert!(mean.abs() < 0.05, "{mean}");
        let u = random(GateMode::UniformRandom, 7, 4, 8, 256);
        let bound = 1.0 / 16.0;
        assert!(u.values.iter().all(|v| v.abs() <= bound), "within ±1/√256");
        assert!(u.values.iter().any(|v| v.abs() > bound * 0.9));
        // The first values of seed 0, so that a change of the stream shows.
        let z = random(GateMode::Random, 0, 1, 1, 4);
        let again = random(GateMode::Random, 0, 1, 1, 4);
        assert_eq!(z.values, again.values);
    }

    #[test]
    fn cheap_embed_sums_normalises_and_subtracts() {
        let rows: BTreeMap<u32, Vec<f32>> = [
            (1, vec![1.0, 0.0]),
            (5, vec![0.0, 2.0]),
            (6, vec![3.0, 4.0]),
        ]
        .into_iter()
        .collect();
        // Expert 0: one prompt [1, 5]: (1, 2)/√5. Expert 1: [6] minus [1]:
        // (0.6, 0.8) - (1, 0) = (-0.4, 0.8), normalised.
        let ids: PromptIds = vec![(vec![vec![1, 5]], vec![]), (vec![vec![6]], vec![vec![1]])];
        let g = cheap_embed(&ids, &rows, 3, 2);
        let s5 = 5f32.sqrt();
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(
            close(g.layer(2, 0..1), &[1.0 / s5, 2.0 / s5]),
            "{:?}",
            g.layer(2, 0..1)
        );
        let n = (0.16f32 + 0.64).sqrt();
        assert!(
            close(g.layer(0, 1..2), &[-0.4 / n, 0.8 / n]),
            "{:?}",
            g.layer(0, 1..2)
        );
        assert_eq!(g.layer(0, 0..2), g.layer(1, 0..2));
    }

    #[test]
    fn condition_numbers() {
        // Orthogonal rows: 1; parallel rows: infinite; a known 2x2 case.
        assert!((condition_number(&[1.0, 0.0, 0.0, 1.0], 2, 2) - 1.0).abs() < 1e-9);
        assert!(condition_number(&[1.0, 2.0, 2.0, 4.0], 2, 2).is_infinite());
        // [[2, 0], [0, 0.5]]: 4.
        assert!((condition_number(&[2.0, 0.0, 0.0, 0.5], 2, 2) - 4.0).abs() < 1e-9);
        // A 3 x 5 matrix: singular values of rows scaled 1, 2, 8 on distinct axes.
        let mut m = vec![0f32; 15];
        m[0] = 1.0;
        m[5 + 1] = 2.0;
        m[10 + 2] = 8.0;
        assert!((condition_number(&m, 3, 5) - 8.0).abs() < 1e-9);
        let g = Gates {
            layers: 3,
            experts: 2,
            hidden: 2,
            values: vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.01, 1.0, 0.0, 1.0, 0.0],
        };
        let w = degenerate_warning(&g).unwrap();
        assert!(
            w.starts_with("layers 1 and 2 have degenerate routing parameters"),
            "{w}"
        );
        let ok = Gates {
            values: [1.0, 0.0, 0.0, 1.0].repeat(3),
            ..g
        };
        assert_eq!(degenerate_warning(&ok), None);
    }
}
