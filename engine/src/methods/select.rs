//! Exact top-k selection over a tensor streamed in chunks, without sorting and
//! without an f32 copy of the tensor: non-negative f32 magnitudes order like
//! their bit patterns, so the k-th largest is found digit by digit with a
//! histogram pass over the top 12 bits and a pass that collects the keys of
//! the one bucket holding the k-th largest. Which of several elements equal to the
//! threshold mergekit keeps depends on the torch call that selects them
//! ([`TorchOrder`]: `argsort` for TIES' magnitudes, `topk` for SCE's
//! variances): for tensors of up to [`EXACT_LIMIT`] elements we replay that call
//! ([`super::torch_sort`], [`super::torch_topk`]) and keep exactly mergekit's
//! elements; above it, ties are kept from the highest index down
//! (deterministic, and a handful of equal magnitudes out of millions).

use super::chunked;
use super::{torch_sort, torch_topk};
use super::{Chunk, MergeJob};

/// Largest tensor whose top-k replays torch's sort (cost: one sort per task vector).
pub const EXACT_LIMIT: usize = 1 << 16;

/// The first digit of a key (bits 19..31: sign-free exponent and 4 mantissa
/// bits), then the rest when its bucket is too crowded to collect.
const FIRST: (u32, u32) = (19, 12);
const REST: [(u32, u32); 2] = [(9, 10), (0, 9)];

/// How one stream's top-k is applied: keep keys above `key`; of the keys equal
/// to it, each chunk skips its first `skip` and keeps the rest of its `take`.
#[derive(Debug, Clone, PartialEq)]
pub enum TopK {
    /// k >= n: everything is kept.
    All,
    /// k == 0: nothing is kept.
    Nothing,
    Threshold {
        key: u32,
        quota: Vec<TieQuota>,
    },
    /// Exactly these elements (small tensors, replayed torch order).
    Mask(Vec<bool>),
}

/// Within one chunk: how many threshold-equal keys to pass over before keeping
/// `take` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TieQuota {
    pub skip: u32,
    pub take: u32,
}

impl TopK {
    /// Decides element by element within one chunk; `left` starts at
    /// [`TopK::chunk_quota`] and counts down.
    #[inline]
    pub fn keep(&self, index: usize, key: u32, left: &mut TieQuota) -> bool {
        match self {
            TopK::All => true,
            TopK::Nothing => false,
            TopK::Mask(m) => m.get(index).copied().unwrap_or(false),
            TopK::Threshold { key: t, .. } => {
                if key > *t {
                    true
                } else if key == *t {
                    if left.skip > 0 {
                        left.skip -= 1;
                        false
                    } else if left.take > 0 {
                        left.take -= 1;
                        true
                    } else {
                        false
                    }
                } else {
                    false
                }
            }
        }
    }

    pub fn chunk_quota(&self, chunk: Chunk) -> TieQuota {
        match self {
            TopK::Threshold { quota, .. } => quota.get(chunk.index).copied().unwrap_or_default(),
            _ => TieQuota::default(),
        }
    }
}

/// Key of a magnitude: the bit pattern of `|x|`.
#[inline(always)]
pub fn magnitude_key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// For each stream `s` (with `ks[s]` elements to keep), finds the top-k of the
/// keys that `keys(s, inputs, out)` writes for each chunk.
///
/// Two passes over the tensor in the common case: a histogram of the top
/// [`FIRST`] bits finds the bucket that holds the k-th largest key; a second
/// pass collects the keys of that bucket per chunk, from which the exact
/// threshold and each chunk's share of the ties follow. When that bucket is too
/// crowded to collect (e.g. a task vector that is mostly exact zeros), the
/// remaining bits are resolved by further histogram passes instead.
///
/// Ties at the threshold of tensors up to [`EXACT_LIMIT`] elements are kept as
/// torch's `argsort(descending=True)[:k]` keeps them.
pub fn top_k(
    job: &MergeJob,
    ks: &[u64],
    keys: impl Fn(usize, &[&[f32]], &mut [u32]) + Sync + Send,
) -> Vec<TopK> {
    top_k_as(job, ks, TorchOrder::Argsort, keys)
}

/// The torch call whose choice among threshold-equal keys a top-k reproduces
/// on tensors of up to [`EXACT_LIMIT`] elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchOrder {
    /// `argsort(descending=True)[:k]` (mergekit's magnitude sparsification).
    Argsort,
    /// `topk(k, largest=True)` (mergekit's SCE selection).
    Topk,
}

/// [`top_k`], keeping small tensors' ties as `order` says.
pub fn top_k_as(
    job: &MergeJob,
    ks: &[u64],
    order: TorchOrder,
    keys: impl Fn(usize, &[&[f32]], &mut [u32]) + Sync + Send,
) -> Vec<TopK> {
    top_k_limited(job, ks, order, keys, candidate_limit(job.numel() as u64))
}

/// [`top_k_as`], collecting a bucket of at most `limit` keys.
fn top_k_limited(
    job: &MergeJob,
    ks: &[u64],
    order: TorchOrder,
    keys: impl Fn(usize, &[&[f32]], &mut [u32]) + Sync + Send,
    limit: u64,
) -> Vec<TopK> {
    let n = job.numel() as u64;
    let streams = ks.len();
    if job.numel() <= EXACT_LIMIT {
        return top_k_exact(job, ks, order, &keys);
    }
    let mut state = initial_state(ks, n);
    if state.iter().all(Option::is_none) {
        return finish(ks, &vec![None; streams], 0, |_, _| 0);
    }
    let crowded = digit_pass(job, &mut state, FIRST, &keys)
        .iter()
        .any(|&count| count > limit);
    let thresholds: Vec<Option<(u32, u64)>>;
    let per_chunk: Vec<Vec<u32>>;
    if crowded {
        for &digit in &DIGITS[1..] {
            digit_pass(job, &mut state, digit, &keys);
        }
        thresholds = state
            .iter()
            .map(|s| s.map(|(key, _, left)| (key, left)))
            .collect();
        // Ties: count keys equal to the threshold per chunk.
        per_chunk = chunked::reduce(job, |c, x| {
            let mut eq = vec![0u32; streams];
            with_keys(c.len, |buf| {
                for (s, t) in thresholds.iter().enumerate() {
                    if let Some((key, _)) = t {
                        keys(s, x, buf);
                        eq[s] = buf.iter().map(|&k| (k == *key) as u32).sum();
                    }
                }
            });
            eq
        });
    } else {
        // Collect the keys of each stream's bucket, chunk by chunk.
        let candidates: Vec<Vec<Vec<u32>>> = chunked::reduce(job, |c, x| {
            with_keys(c.len, |buf| {
                state
                    .iter()
                    .enumerate()
                    .map(|(s, st)| match st {
                        Some((prefix, mask, _)) => {
                            keys(s, x, buf);
                            buf.iter()
                                .copied()
                                .filter(|&k| k & mask == *prefix)
                                .collect()
                        }
                        None => Vec::new(),
                    })
                    .collect()
            })
        });
        thresholds = state
            .iter()
            .enumerate()
            .map(|(s, st)| {
                st.map(|(_, _, left)| {
                    let mut all: Vec<u32> = candidates
                        .iter()
                        .flat_map(|c| c[s].iter().copied())
                        .collect();
                    // `left` is at least 1 and at most the bucket's count.
                    let i = (left as usize).clamp(1, all.len()) - 1;
                    let (_, &mut key, _) = all.select_nth_unstable_by(i, |a, b| b.cmp(a));
                    let above = all.iter().filter(|&&k| k > key).count() as u64;
                    (key, left - above)
                })
            })
            .collect();
        per_chunk = candidates
            .iter()
            .map(|c| {
                thresholds
                    .iter()
                    .zip(c)
                    .map(|(t, keys)| match t {
                        Some((key, _)) => keys.iter().filter(|&&k| k == *key).count() as u32,
                        None => 0,
                    })
                    .collect()
            })
            .collect();
    }
    finish(ks, &thresholds, per_chunk.len(), |c, s| per_chunk[c][s])
}

/// Per stream of a top-k: the high bits decided so far, their mask, and how
/// many of the k are left to find below them (`None`: k is 0 or n).
pub type DigitState = Option<(u32, u32, u64)>;

/// The digits a top-k resolves, one histogram each, when it does not collect.
pub const DIGITS: [(u32, u32); 3] = [FIRST, REST[0], REST[1]];

/// The starting state of a top-k keeping `ks[s]` of `n` keys per stream.
pub fn initial_state(ks: &[u64], n: u64) -> Vec<DigitState> {
    ks.iter()
        .map(|&k| (k > 0 && k < n).then_some((0u32, 0u32, k)))
        .collect()
}

/// Fixes the `(shift, bits)` digit of every active stream from its histogram
/// (`hist[s * 2^bits + digit]`: keys matching the stream's decided prefix) and
/// returns, per stream, how many keys share the decided prefix afterwards.
pub fn apply_digit(state: &mut [DigitState], hist: &[u64], (shift, bits): (u32, u32)) -> Vec<u64> {
    let buckets = 1usize << bits;
    let mut counts = vec![0u64; state.len()];
    for (s, st) in state.iter_mut().enumerate() {
        let Some((prefix, mask, remaining)) = *st else {
            continue;
        };
        let h = &hist[s * buckets..(s + 1) * buckets];
        let mut left = remaining;
        let mut digit = 0usize;
        for d in (0..buckets).rev() {
            if h[d] >= left {
                digit = d;
                break;
            }
            left -= h[d];
        }
        let digit_mask = ((buckets as u32) - 1) << shift;
        *st = Some((prefix | ((digit as u32) << shift), mask | digit_mask, left));
        counts[s] = h[digit];
    }
    counts
}

/// The top-k of each stream from its threshold key and the number of
/// threshold-equal keys to keep (`None`: keep all or nothing, as `ks` says),
/// given `eq(chunk, stream)`, the threshold-equal keys of each of `chunks`
/// chunks. The ties are handed out from the last chunk backwards (highest
/// indices first).
pub fn finish(
    ks: &[u64],
    thresholds: &[Option<(u32, u64)>],
    chunks: usize,
    eq: impl Fn(usize, usize) -> u32,
) -> Vec<TopK> {
    (0..ks.len())
        .map(|s| match thresholds[s] {
            None if ks[s] == 0 => TopK::Nothing,
            None => TopK::All,
            Some((key, mut ties)) => {
                let mut quota: Vec<TieQuota> = (0..chunks)
                    .rev()
                    .map(|c| {
                        let eq = eq(c, s);
                        let take = (eq as u64).min(ties);
                        ties -= take;
                        TieQuota {
                            skip: eq - take as u32,
                            take: take as u32,
                        }
                    })
                    .collect();
                quota.reverse();
                TopK::Threshold { key, quota }
            }
        })
        .collect()
}

/// The most keys a stream's threshold bucket may hold to be collected rather
/// than resolved by more histogram passes (bounds the memory of the candidates).
pub fn candidate_limit(n: u64) -> u64 {
    (n / 16).clamp(1 << 16, 1 << 22)
}

/// One histogram pass over the `(shift, bits)` digit of every active stream's
/// keys (those matching its decided prefix); fixes that digit in `state` and
/// returns, per stream, how many keys share the decided prefix afterwards.
fn digit_pass(
    job: &MergeJob,
    state: &mut [Option<(u32, u32, u64)>],
    (shift, bits): (u32, u32),
    keys: &(impl Fn(usize, &[&[f32]], &mut [u32]) + Sync + Send),
) -> Vec<u64> {
    let streams = state.len();
    let buckets = 1usize << bits;
    let snapshot = state.to_vec();
    let hist = chunked::fold_exact(
        job,
        || vec![0u64; streams * buckets],
        |h, c, x| {
            with_keys(c.len, |buf| {
                for (s, st) in snapshot.iter().enumerate() {
                    let Some((prefix, mask, _)) = *st else {
                        continue;
                    };
                    keys(s, x, buf);
                    let h = &mut h[s * buckets..(s + 1) * buckets];
                    if mask == 0 {
                        for &k in buf.iter() {
                            h[((k >> shift) as usize) & (buckets - 1)] += 1;
                        }
                    } else {
                        for &k in buf.iter() {
                            if k & mask == prefix {
                                h[((k >> shift) as usize) & (buckets - 1)] += 1;
                            }
                        }
                    }
                }
            })
        },
        |mut a, b| {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
            a
        },
    );
    apply_digit(state, &hist, (shift, bits))
}

thread_local! {
    static KEYS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's key buffer, `len` long.
fn with_keys<R>(len: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    KEYS.with(|k| {
        let mut k = k.borrow_mut();
        if k.len() < len {
            k.resize(len, 0);
        }
        f(&mut k[..len])
    })
}

/// Bytes a [`top_k`] over `streams` streams of `n` keys may hold at most.
pub fn working_memory(n: u64, streams: usize) -> u64 {
    let chunks = n.div_ceil(chunked::CHUNK as u64);
    if n as usize <= EXACT_LIMIT {
        // Every key, its sort order and a mask.
        return n * 9 * streams as u64;
    }
    // The collected keys, the tie quotas, per-thread histograms.
    streams as u64 * (candidate_limit(n) * 4 * 2 + chunks * 12 + (4 << 10) * 8)
}

/// Small tensors: the k indices torch's descending argsort or topk returns.
fn top_k_exact(
    job: &MergeJob,
    ks: &[u64],
    order: TorchOrder,
    keys: &(impl Fn(usize, &[&[f32]], &mut [u32]) + Sync + Send),
) -> Vec<TopK> {
    let n = job.numel();
    (0..ks.len())
        .map(|s| {
            let k = ks[s] as usize;
            if k == 0 {
                return TopK::Nothing;
            }
            if k >= n {
                return TopK::All;
            }
            let all: Vec<u32> = chunked::reduce(job, |c, x| {
                let mut buf = vec![0u32; c.len];
                keys(s, x, &mut buf);
                buf
            })
            .concat();
            let kept = match order {
                TorchOrder::Argsort => torch_sort::argsort_descending(&all)[..k].to_vec(),
                TorchOrder::Topk => torch_topk::topk_largest(&all, k),
            };
            let mut mask = vec![false; n];
            for i in kept {
                mask[i as usize] = true;
            }
            TopK::Mask(mask)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::methods::{chunked::CHUNK, testing::f32_bytes, TensorView};
    use crate::unit::TensorParams;

    fn select(values: &[f32], k: u64) -> Vec<bool> {
        select_limited(values, k, None, TorchOrder::Argsort)
    }

    fn select_limited(values: &[f32], k: u64, limit: Option<u64>, order: TorchOrder) -> Vec<bool> {
        let bytes = f32_bytes(values);
        let params = TensorParams::default();
        let shape = [values.len() as u64];
        let job = MergeJob {
            name: "t",
            shape: &shape,
            inputs: vec![TensorView {
                dtype: DType::F32,
                bytes: &bytes,
                scale: None,
                lora: None,
                packed: None,
            }],
            base: None,
            params: &params,
            seed: 0,
            stream: None,
        };
        let keys = |_: usize, x: &[&[f32]], out: &mut [u32]| {
            for (o, &v) in out.iter_mut().zip(x[0]) {
                *o = magnitude_key(v);
            }
        };
        let tk = match limit {
            Some(limit) => top_k_limited(&job, &[k], order, keys, limit),
            None => top_k_as(&job, &[k], order, keys),
        };
        let mut kept = Vec::new();
        for (ci, chunk) in values.chunks(CHUNK).enumerate() {
            let c = Chunk {
                index: ci,
                start: ci * CHUNK,
                len: chunk.len(),
            };
            let mut left = tk[0].chunk_quota(c);
            kept.extend(
                chunk
                    .iter()
                    .enumerate()
                    .map(|(e, &v)| tk[0].keep(c.start + e, magnitude_key(v), &mut left)),
            );
        }
        kept
    }

    #[test]
    fn keeps_exactly_the_k_largest_magnitudes() {
        let v = [0.5f32, -3.0, 2.0, 0.0, -1.0, 4.0];
        assert_eq!(select(&v, 3), vec![false, true, true, false, false, true]);
        assert_eq!(select(&v, 0), vec![false; 6]);
        assert_eq!(select(&v, 6), vec![true; 6]);
        assert_eq!(select(&v, 1), vec![false, false, false, false, false, true]);
    }

    #[test]
    fn ties_are_kept_from_the_highest_index_down_across_chunks() {
        let n = CHUNK * 2 + 10;
        let mut v = vec![1.0f32; n];
        v[5] = 2.0;
        // k = 1 + CHUNK + 20: 2.0 plus the last CHUNK + 20 ones.
        let kept = select(&v, 1 + CHUNK as u64 + 20);
        assert_eq!(kept.iter().filter(|&&b| b).count(), 1 + CHUNK + 20);
        assert!(kept[5]);
        assert!(kept[n - CHUNK - 20..].iter().all(|&b| b));
        assert!(kept[6..n - CHUNK - 20].iter().all(|&b| !b));
        // Small tensors replay torch's order: with 17 equal values and k = 2,
        // torch.argsort(descending=True) starts with [8, 16, ...].
        let kept = select(&[1.0; 17], 2);
        assert!(kept[8] && kept[16]);
        assert_eq!(kept.iter().filter(|&&b| b).count(), 2);
        // ... and torch.topk(torch.ones(17), 3) returns 10, 11, 12.
        let kept = select_limited(&[-1.0; 17], 3, None, TorchOrder::Topk);
        let kept: Vec<usize> = (0..17).filter(|&i| kept[i]).collect();
        assert_eq!(kept, [10, 11, 12]);
    }

    #[test]
    fn collected_and_histogram_thresholds_agree_with_many_ties() {
        // 200 distinct magnitudes over 4 chunks: thousands of keys equal the
        // threshold, spread over every chunk.
        let mut x = 99u64;
        let v: Vec<f32> = (0..CHUNK * 4 + 77)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x % 401) as f32 - 200.0) * 1e-3
            })
            .collect();
        for k in [1u64, 1000, 60_000, 131_000] {
            let collected = select_limited(&v, k, Some(u64::MAX), TorchOrder::Argsort);
            let histogram = select_limited(&v, k, Some(0), TorchOrder::Argsort);
            assert_eq!(collected.iter().filter(|&&b| b).count() as u64, k);
            assert!(collected == histogram, "k = {k}");
        }
    }

    #[test]
    fn matches_a_sort_on_random_data() {
        let mut x = 12345u64;
        let v: Vec<f32> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x % 20001) as f32 - 10000.0) * 1e-4
            })
            .collect();
        for k in [1u64, 17, 50_000, 99_999] {
            let kept = select(&v, k);
            assert_eq!(kept.iter().filter(|&&b| b).count() as u64, k);
            let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
            mags.sort_by(|a, b| b.total_cmp(a));
            let thr = mags[k as usize - 1];
            for (i, &b) in kept.iter().enumerate() {
                if v[i].abs() > thr {
                    assert!(b);
                }
                if v[i].abs() < thr {
                    assert!(!b);
                }
            }
        }
    }
}
