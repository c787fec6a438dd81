//! Counter-based random numbers for the randomized methods (DARE, DELLA): each
//! draw is a pure function of (seed, output tensor name, input index, element
//! index), so a merge gives the same bits whatever the thread count, the order
//! in which units run, the worker that runs them, or how often one is retried.
//! (mergekit draws from torch's global generator, in schedule order.)

/// SplitMix64's finaliser: a bijective mix of 64 bits with full avalanche.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a: a stable 64-bit hash of a tensor name (the same on every platform).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The draws of one input of one output tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream {
    key: u64,
}

impl Stream {
    pub fn new(seed: u64, tensor: &str, input: usize) -> Self {
        let key = mix(seed ^ 0x6a09_e667_f3bc_c909)
            ^ mix(fnv1a(tensor))
            ^ mix((input as u64).wrapping_add(0x3c6e_f372_fe94_f82b));
        Stream { key: mix(key) }
    }

    /// The stream's key: `uniform(i)` is a function of it and `i` alone (for
    /// device kernels that draw the same numbers).
    pub fn key(&self) -> u64 {
        self.key
    }

    /// A uniform draw in [0, 1) for element `index` (24 random bits, exact in f32).
    #[inline(always)]
    pub fn uniform(&self, index: u64) -> f32 {
        let z = mix(self
            .key
            .wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// A Bernoulli(p) draw for element `index`.
    #[inline(always)]
    pub fn keep(&self, index: u64, p: f32) -> bool {
        self.uniform(index) < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_depend_only_on_their_key() {
        let a = Stream::new(42, "model.layers.0.mlp.up_proj.weight", 1);
        let b = Stream::new(42, "model.layers.0.mlp.up_proj.weight", 1);
        assert_eq!(a.uniform(12345), b.uniform(12345));
        assert_ne!(a, Stream::new(43, "model.layers.0.mlp.up_proj.weight", 1));
        assert_ne!(a, Stream::new(42, "model.layers.1.mlp.up_proj.weight", 1));
        assert_ne!(a, Stream::new(42, "model.layers.0.mlp.up_proj.weight", 0));
    }

    #[test]
    fn bernoulli_frequencies_match_p() {
        let s = Stream::new(7, "t", 0);
        for p in [0.1f32, 0.5, 0.66] {
            let n = 200_000u64;
            let kept = (0..n).filter(|&i| s.keep(i, p)).count() as f64 / n as f64;
            assert!((kept - p as f64).abs() < 0.005, "p {p}: {kept}");
        }
        let mean = (0..100_000u64).map(|i| s.uniform(i) as f64).sum::<f64>() / 100_000.0;
        assert!((mean - 0.5).abs() < 0.005);
    }
}
