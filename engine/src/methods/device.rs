//! What a method asks of a compute device.
//!
//! A method that a device can compute says so in
//! [`MergeMethod::device_op`](super::MergeMethod::device_op): for one tensor it
//! returns the [`DeviceOp`] that gives the bytes of its CPU merge (the same
//! arithmetic in the same order), with the job's parameters resolved as the CPU
//! merge resolves them. A method without one, or a job it cannot describe (e.g.
//! TIES on a tensor small enough to replay torch's sort), is merged on the CPU.
//! A device backend ([`crate::gpu`]) implements every [`DeviceOp`], and may still
//! decline a job (an input it cannot decode, more inputs than its kernels take,
//! no room on the device): the CPU merges it then.
//!
//! To compute a method on a device: return its op from its `device_op` (with a
//! new [`DeviceOp`] variant when none describes it) and implement the variant in
//! the backend, whose match over [`DeviceOp`] is exhaustive, so the compiler
//! points there. Nothing matches method names.
//!
//! What a top-k keeps stays the method's even when a device counts the keys:
//! [`top_k_counted`] is the exact selection of `select.rs` (threshold and
//! per-chunk tie quotas) driven by the device's histograms ([`KeyCounts`]).

use super::select::{self, DigitState};
pub use super::select::{TieQuota, TopK};

/// One tensor's merge, as a device computes it.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceOp {
    /// `linear`'s weighted sum.
    WeightedSum(WeightedSumOp),
    /// Task vectors against a base (task_arithmetic, ties, dare_linear,
    /// dare_ties: methods/gta).
    TaskVectors(TaskVectorOp),
}

/// `y = Σ_i fma(x_i, w_i, ·)` accumulated in input order, then divided by `sum`
/// when `normalize`.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedSumOp {
    /// One weight per input, in input order.
    pub weights: Vec<f32>,
    pub normalize: bool,
    /// The weights' f32 sum, added in input order.
    pub sum: f32,
}

/// Task vectors `δ_i = x_i − base`, each sparsified (with the L1-preserving
/// rescale when `rescale`) and weighted; with `sign_consensus`, only the
/// weighted deltas that agree with the sign of their sum are added (and
/// `normalize` divides by the agreeing weights), without it all are (and
/// `normalize` divides by `plain_divisor`); the result is scaled by `lambda`
/// and added to the base.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskVectorOp {
    /// The base model's input.
    pub base: usize,
    /// One per non-base input, in input order.
    pub streams: Vec<TaskStream>,
    /// Elements per chunk: a top-k's tie quotas and the L1 norms' partial sums
    /// are per chunk of this many elements (in chunk order).
    pub chunk: usize,
    pub normalize: bool,
    pub rescale: bool,
    pub lambda: f32,
    pub sign_consensus: bool,
    /// What `normalize` divides by without sign consensus.
    pub plain_divisor: f32,
}

/// One task vector: its input, weight and sparsification.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskStream {
    pub input: usize,
    pub weight: f32,
    pub keep: StreamKeep,
}

/// Which elements of a task vector survive sparsification.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamKeep {
    All,
    /// The k largest magnitudes `|δ|`, selected as [`top_k_counted`] does.
    Top(u64),
    /// Each element `e` with probability `p`: kept when `Stream::uniform(e) < p`
    /// for the counter-based stream of key `key` (methods/rng.rs).
    Random {
        p: f32,
        key: u64,
    },
}

/// The counts a top-k needs over keys a device holds (a key is a magnitude's
/// bit pattern, see select.rs).
pub trait KeyCounts {
    type Error;
    /// Of stream `stream`'s keys `k` with `k & mask == prefix`: how many have
    /// each value `d` of the digit `(k >> shift) & (buckets - 1)` (`buckets`
    /// counts, indexed by `d`).
    fn histogram(
        &mut self,
        stream: usize,
        prefix: u32,
        mask: u32,
        shift: u32,
        buckets: usize,
    ) -> Result<Vec<u64>, Self::Error>;
    /// How many of stream `stream`'s keys equal `key`, per chunk.
    fn ties(&mut self, stream: usize, key: u32) -> Result<Vec<u32>, Self::Error>;
}

/// The top-k of each stream (`ks[s]` of its `n` keys, which lie in `chunks`
/// chunks) with the thresholds and tie quotas of the CPU's exact selection
/// (select.rs), every digit resolved by a histogram from `counts`.
pub fn top_k_counted<C: KeyCounts>(
    ks: &[u64],
    n: u64,
    chunks: usize,
    counts: &mut C,
) -> Result<Vec<TopK>, C::Error> {
    let mut state: Vec<DigitState> = select::initial_state(ks, n);
    for &(shift, bits) in &select::DIGITS {
        let buckets = 1usize << bits;
        let mut hist = vec![0u64; state.len() * buckets];
        for (s, st) in state.iter().enumerate() {
            let Some((prefix, mask, _)) = *st else {
                continue;
            };
            let h = counts.histogram(s, prefix, mask, shift, buckets)?;
            hist[s * buckets..(s + 1) * buckets].copy_from_slice(&h);
        }
        select::apply_digit(&mut state, &hist, (shift, bits));
    }
    let thresholds: Vec<Option<(u32, u64)>> = state
        .iter()
        .map(|st| st.map(|(key, _, left)| (key, left)))
        .collect();
    let mut eq = vec![Vec::new(); state.len()];
    for (s, t) in thresholds.iter().enumerate() {
        if let Some((key, _)) = *t {
            eq[s] = counts.ties(s, key)?;
        }
    }
    Ok(select::finish(ks, &thresholds, chunks, |c, s| {
        eq[s].get(c).copied().unwrap_or(0)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::methods::chunked::CHUNK;
    use crate::methods::{MergeJob, TensorView};
    use crate::unit::TensorParams;

    /// Counts on the host, as a device does.
    struct HostCounts<'a> {
        keys: &'a [Vec<u32>],
    }

    impl KeyCounts for HostCounts<'_> {
        type Error = std::convert::Infallible;

        fn histogram(
            &mut self,
            stream: usize,
            prefix: u32,
            mask: u32,
            shift: u32,
            buckets: usize,
        ) -> Result<Vec<u64>, Self::Error> {
            let mut h = vec![0u64; buckets];
            for &k in self.keys[stream].iter().filter(|&&k| k & mask == prefix) {
                h[((k >> shift) as usize) & (buckets - 1)] += 1;
            }
            Ok(h)
        }

        fn ties(&mut self, stream: usize, key: u32) -> Result<Vec<u32>, Self::Error> {
            Ok(self.keys[stream]
                .chunks(CHUNK)
                .map(|c| c.iter().filter(|&&k| k == key).count() as u32)
                .collect())
        }
    }

    /// The device's selection (every digit by histogram) keeps what the CPU's
    /// keeps (which collects its candidates): same thresholds, same tie quotas,
    /// on keys with thousands of ties across chunks and on keys without.
    #[test]
    fn counted_top_k_is_the_cpus_top_k() {
        let n = 5 * CHUNK + 77;
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let tied: Vec<f32> = (0..n).map(|i| [0.5, -0.25, 0.125, 0.0][i % 4]).collect();
        let spread: Vec<f32> = (0..n)
            .map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
            .collect();
        let bytes: Vec<Vec<u8>> = [&tied, &spread]
            .iter()
            .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let params = TensorParams::default();
        let shape = [n as u64];
        let job = MergeJob {
            name: "t",
            shape: &shape,
            inputs: bytes
                .iter()
                .map(|b| TensorView {
                    dtype: DType::F32,
                    bytes: b,
                    scale: None,
                    lora: None,
                    packed: None,
                })
                .collect(),
            base: None,
            params: &params,
            seed: 0,
            stream: None,
        };
        let keys: Vec<Vec<u32>> = [&tied, &spread]
            .iter()
            .map(|v| v.iter().map(|&x| select::magnitude_key(x)).collect())
            .collect();
        let nn = n as u64;
        for ks in [[nn / 3, nn / 2], [1, nn - 1], [0, nn], [nn / 4 + 5, 77]] {
            let cpu = select::top_k(&job, &ks, |s, x, out| {
                for (o, &v) in out.iter_mut().zip(x[s]) {
                    *o = select::magnitude_key(v);
                }
            });
            let Ok(counted) =
                top_k_counted(&ks, nn, n.div_ceil(CHUNK), &mut HostCounts { keys: &keys });
            assert_eq!(counted, cpu, "k = {ks:?}");
        }
    }
}
