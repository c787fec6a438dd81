//! Sparsification of the task vectors (mergekit's `sparsify.py`): which
//! elements of each `δ_i = x_i − base` survive — all, the largest magnitudes
//! (TIES), a random draw (DARE), a band of magnitudes (Model Breadcrumbs), or a
//! draw whose probability follows the magnitude's rank in its row (DELLA) —
//! and the L1-preserving rescale of what survives.

use super::{Gta, Sparsify};
use crate::methods::chunked;
use crate::methods::rng::Stream;
use crate::methods::select::{self, TieQuota, TopK};
use crate::methods::torch_sort;
use crate::methods::{Chunk, MergeJob};

/// Which elements of one task vector survive sparsification.
enum Keep {
    All,
    Top(TopK),
    /// Breadcrumbs: among the `upper` largest but not among the `lower` largest.
    Band {
        upper: TopK,
        lower: TopK,
    },
    /// Exactly these elements (small tensors: torch's sort order replayed).
    Mask(Vec<bool>),
    Random {
        p: f32,
        rng: Stream,
    },
    Della {
        density: f32,
        epsilon: f32,
        rng: Stream,
    },
}

/// The per-input state the elementwise passes need.
pub(super) struct TaskVector {
    pub(super) input: usize,
    pub(super) weight: f32,
    keep: Keep,
    /// L1-preserving rescale factor (1 when rescale is off).
    scale: f32,
}

/// `k` for a fraction of `n` elements, as mergekit's `int(density * n)`.
fn count(fraction: f64, n: u64) -> u64 {
    (fraction * n as f64) as u64
}

/// How many of `n` elements TIES keeps at `density`.
pub(super) fn magnitude_k(density: f64, n: u64) -> u64 {
    if density >= 1.0 {
        n
    } else if density <= 0.0 {
        0
    } else {
        count(density, n).max(1)
    }
}

impl TaskVector {
    /// Fills `mask` with the survivors of this task vector within chunk `c`
    /// (`c` is row-aligned for DELLA).
    fn fill_mask(&self, c: Chunk, x: &[&[f32]], base: usize, row_len: usize, mask: &mut [bool]) {
        let delta = |e: usize| x[self.input][e] - x[base][e];
        match &self.keep {
            Keep::All => mask.fill(true),
            Keep::Mask(m) => mask.copy_from_slice(&m[c.start..c.start + c.len]),
            Keep::Top(t) => {
                let mut q = t.chunk_quota(c);
                for (e, m) in mask.iter_mut().enumerate() {
                    *m = t.keep(c.start + e, select::magnitude_key(delta(e)), &mut q);
                }
            }
            Keep::Band { upper, lower } => {
                let (mut qu, mut ql): (TieQuota, TieQuota) =
                    (upper.chunk_quota(c), lower.chunk_quota(c));
                for (e, m) in mask.iter_mut().enumerate() {
                    let key = select::magnitude_key(delta(e));
                    let up = upper.keep(c.start + e, key, &mut qu);
                    let low = lower.keep(c.start + e, key, &mut ql);
                    *m = up && !low;
                }
            }
            Keep::Random { p, rng } => {
                for (e, m) in mask.iter_mut().enumerate() {
                    *m = rng.keep((c.start + e) as u64, *p);
                }
            }
            Keep::Della {
                density,
                epsilon,
                rng,
            } => {
                let mut order: Vec<u32> = Vec::with_capacity(row_len);
                let mut keys: Vec<u32> = Vec::with_capacity(row_len);
                for r0 in (0..c.len).step_by(row_len.max(1)) {
                    let r1 = (r0 + row_len).min(c.len);
                    keys.clear();
                    keys.extend((r0..r1).map(|e| select::magnitude_key(delta(e))));
                    // Ranks by ascending magnitude. mergekit ranks with torch's
                    // `argsort`: on rows up to `EXACT_LIMIT` its order among equal
                    // magnitudes is replayed (each element's keep probability is
                    // then mergekit's); longer rows break ties by position.
                    if keys.len() <= select::EXACT_LIMIT {
                        order = torch_sort::argsort_ascending(&keys);
                    } else {
                        order.clear();
                        order.extend(0..keys.len() as u32);
                        order.sort_by_key(|&i| (keys[i as usize], i));
                    }
                    let n = keys.len();
                    for (rank, &i) in order.iter().enumerate() {
                        // mergekit's (rank − min)/(max − min); a row of one element
                        // is 0/0 there (an error): we take the middle.
                        let norm = if n > 1 {
                            rank as f32 / (n - 1) as f32
                        } else {
                            0.5
                        };
                        let p = (density - epsilon) + 2.0 * epsilon * norm;
                        let e = r0 + i as usize;
                        mask[e] = rng.keep((c.start + e) as u64, p);
                    }
                }
            }
        }
    }
}

impl TaskVector {
    /// Writes this task vector's surviving, rescaled and weighted deltas for
    /// chunk `c` into `w` (zero where pruned): `(x − base)·scale·weight`.
    pub(super) fn weighted(
        &self,
        c: Chunk,
        x: &[&[f32]],
        base: usize,
        row_len: usize,
        w: &mut [f32],
    ) {
        let (xi, xb) = (&x[self.input][..c.len], &x[base][..c.len]);
        let (scale, weight) = (self.scale, self.weight);
        match &self.keep {
            Keep::All | Keep::Top(TopK::All) => {
                for ((o, &a), &b) in w.iter_mut().zip(xi).zip(xb) {
                    *o = (a - b) * scale * weight;
                }
            }
            Keep::Top(TopK::Nothing) => w.fill(0.0),
            Keep::Top(TopK::Threshold { key, quota }) => {
                let t = *key;
                for ((o, &a), &b) in w.iter_mut().zip(xi).zip(xb) {
                    let d = a - b;
                    *o = if select::magnitude_key(d) > t {
                        d * scale * weight
                    } else {
                        0.0
                    };
                }
                // Keys equal to the threshold: this chunk's share of the ties.
                let mut q = quota.get(c.index).copied().unwrap_or_default();
                if q.take > 0 {
                    for ((o, &a), &b) in w.iter_mut().zip(xi).zip(xb) {
                        let d = a - b;
                        if select::magnitude_key(d) == t {
                            if q.skip > 0 {
                                q.skip -= 1;
                            } else if q.take > 0 {
                                q.take -= 1;
                                *o = d * scale * weight;
                            } else {
                                break;
                            }
                        }
                    }
                }
            }
            _ => MASK.with(|m| {
                let mut mask = m.borrow_mut();
                mask.clear();
                mask.resize(c.len, false);
                self.fill_mask(c, x, base, row_len, &mut mask);
                for (((o, &a), &b), &m) in w.iter_mut().zip(xi).zip(xb).zip(mask.iter()) {
                    *o = if m { (a - b) * scale * weight } else { 0.0 };
                }
            }),
        }
    }
}

thread_local! {
    /// Per-thread survivor mask for the sparsifiers that decide element by element.
    static MASK: std::cell::RefCell<Vec<bool>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Gta {
    /// The task vectors of `job`: each non-base input's weight and survivors,
    /// and (with rescale) the factor that keeps its L1 norm.
    pub(super) fn task_vectors(&self, job: &MergeJob, base: usize) -> Vec<TaskVector> {
        let others = job.non_base();
        let n = job.numel() as u64;
        let param =
            |i: usize, name: &str, default: f64| job.params.input_f64(i, name).unwrap_or(default);
        let magnitude_keys = |s: usize, x: &[&[f32]], out: &mut [u32]| {
            for ((o, &v), &b) in out.iter_mut().zip(x[others[s]]).zip(x[base]) {
                *o = select::magnitude_key(v - b);
            }
        };
        let keeps: Vec<Keep> = match self.sparsify {
            Sparsify::None => others.iter().map(|_| Keep::All).collect(),
            Sparsify::Magnitude => {
                let ks: Vec<u64> = others
                    .iter()
                    .map(|&i| magnitude_k(param(i, "density", 1.0), n))
                    .collect();
                select::top_k(job, &ks, magnitude_keys)
                    .into_iter()
                    .map(Keep::Top)
                    .collect()
            }
            Sparsify::MagnitudeOutliers => others
                .iter()
                .enumerate()
                .map(|(s, &i)| {
                    let d = param(i, "density", 1.0);
                    if d >= 1.0 {
                        return Keep::All;
                    }
                    let keep = count(d, n);
                    let top = count(param(i, "gamma", 0.01), n);
                    let bot = n.saturating_sub(keep + top);
                    if job.numel() <= select::EXACT_LIMIT {
                        // Sorted ascending positions [bot, bot + keep), in torch's order.
                        let keys: Vec<u32> = chunked::reduce(job, |c, x| {
                            let mut buf = vec![0u32; c.len];
                            magnitude_keys(s, x, &mut buf);
                            buf
                        })
                        .concat();
                        let order = torch_sort::argsort_ascending(&keys);
                        let mut mask = vec![false; job.numel()];
                        for &e in &order[bot as usize..(bot + keep) as usize] {
                            mask[e as usize] = true;
                        }
                        Keep::Mask(mask)
                    } else {
                        let single = |k: u64| -> TopK {
                            select::top_k(job, &[k], |_, x, out| magnitude_keys(s, x, out))
                                .pop()
                                .unwrap_or(TopK::Nothing)
                        };
                        Keep::Band {
                            upper: single(n - bot),
                            lower: single(n - bot - keep),
                        }
                    }
                })
                .collect(),
            Sparsify::Random => others
                .iter()
                .map(|&i| {
                    let d = param(i, "density", 1.0);
                    if d >= 1.0 {
                        Keep::All
                    } else {
                        Keep::Random {
                            p: d as f32,
                            rng: Stream::new(job.seed, job.name, i),
                        }
                    }
                })
                .collect(),
            Sparsify::DellaMagprune => others
                .iter()
                .map(|&i| {
                    let d = param(i, "density", 1.0);
                    if d >= 1.0 {
                        Keep::All
                    } else if d <= 0.0 {
                        Keep::Top(TopK::Nothing)
                    } else {
                        Keep::Della {
                            density: d as f32,
                            epsilon: param(i, "epsilon", 0.15) as f32,
                            rng: Stream::new(job.seed, job.name, i),
                        }
                    }
                })
                .collect(),
        };
        let mut tvs: Vec<TaskVector> = others
            .iter()
            .zip(keeps)
            .map(|(&input, keep)| TaskVector {
                input,
                weight: param(input, "weight", 0.0) as f32,
                keep,
                scale: 1.0,
            })
            .collect();
        if self.rescales(job) {
            let row_len = job.row_len();
            let parts = chunked::reduce_sized(job, self.chunk_size(job), |c, x| {
                let mut mask = vec![false; c.len];
                tvs.iter()
                    .map(|tv| {
                        tv.fill_mask(c, x, base, row_len, &mut mask);
                        let (mut before, mut after) = (0.0f64, 0.0f64);
                        for (e, &m) in mask.iter().enumerate() {
                            let d = (x[tv.input][e] - x[base][e]).abs() as f64;
                            before += d;
                            if m {
                                after += d;
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
                // mergekit: rescale only when both norms are at least 1e-7.
                if before >= 1e-7 && after >= 1e-7 {
                    tv.scale = (before / after) as f32;
                }
            }
        }
        tvs
    }
}
