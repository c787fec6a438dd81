//! Counts the NaN and infinite values a unit writes, per tensor, as the writer
//! passes the bytes on (a bit test per element, far below the cost of the
//! shard's sha256 next to it). Weights near f32's limit, or a lambda that
//! overflows, produce them silently otherwise.

use crate::dtype::DType;
use crate::output::ShardLayout;
use crate::unit::NonFinite;

/// Follows the output bytes of a shard in order and counts per tensor.
pub(crate) struct FiniteScan<'a> {
    layout: &'a ShardLayout,
    /// Offset in the file of the next byte.
    pos: u64,
    /// The tensor `pos` falls in.
    tensor: usize,
    /// An element split across two buffers.
    carry: Vec<u8>,
    counts: Vec<(u64, u64)>,
}

impl<'a> FiniteScan<'a> {
    pub(crate) fn new(layout: &'a ShardLayout) -> Self {
        FiniteScan {
            layout,
            pos: layout.header.len() as u64,
            tensor: 0,
            carry: Vec::new(),
            counts: vec![(0, 0); layout.tensors.len()],
        }
    }

    /// The next bytes of the data section.
    pub(crate) fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.tensor < self.layout.tensors.len() {
            let (_, dtype, _, start, len) = &self.layout.tensors[self.tensor];
            let end = start + len;
            if self.pos >= end {
                self.tensor += 1;
                self.carry.clear();
                continue;
            }
            let take = ((end - self.pos) as usize).min(bytes.len());
            let (part, rest) = bytes.split_at(take);
            self.count(*dtype, part);
            self.pos += take as u64;
            bytes = rest;
        }
    }

    fn count(&mut self, dtype: DType, mut part: &[u8]) {
        let size = dtype.size();
        if !self.carry.is_empty() {
            let need = (size - self.carry.len()).min(part.len());
            self.carry.extend_from_slice(&part[..need]);
            part = &part[need..];
            if self.carry.len() == size {
                let carry = std::mem::take(&mut self.carry);
                let (n, i) = count_elements(dtype, &carry);
                self.add(n, i);
            }
        }
        let whole = part.len() / size * size;
        let (n, i) = count_elements(dtype, &part[..whole]);
        self.add(n, i);
        self.carry.extend_from_slice(&part[whole..]);
    }

    fn add(&mut self, nan: u64, inf: u64) {
        let c = &mut self.counts[self.tensor];
        c.0 += nan;
        c.1 += inf;
    }

    /// Tensors with at least one non-finite value.
    pub(crate) fn finish(self) -> Vec<NonFinite> {
        self.layout
            .tensors
            .iter()
            .zip(self.counts)
            .filter(|(_, (n, i))| n + i > 0)
            .map(|((name, ..), (nan, inf))| NonFinite {
                tensor: name.clone(),
                nan,
                inf,
            })
            .collect()
    }
}

/// (NaN, infinite) among whole little-endian elements of `dtype`.
fn count_elements(dtype: DType, bytes: &[u8]) -> (u64, u64) {
    // Exponent all ones: NaN when the mantissa is not zero, else infinity.
    fn by_mask<const N: usize>(bytes: &[u8], exp: u64, man: u64) -> (u64, u64) {
        let (mut nan, mut inf) = (0u64, 0u64);
        for c in bytes.chunks_exact(N) {
            let mut b = [0u8; 8];
            b[..N].copy_from_slice(c);
            let v = u64::from_le_bytes(b);
            if v & exp == exp {
                if v & man != 0 {
                    nan += 1;
                } else {
                    inf += 1;
                }
            }
        }
        (nan, inf)
    }
    match dtype {
        DType::BF16 => {
            // The common case: blocks of 256 bytes are screened four lanes per
            // u64 without branches (a lane whose exponent is all ones becomes a
            // zero lane of `d`, found by the classic has-zero test, which can
            // only err towards "maybe"); only blocks that may hold one are
            // counted exactly.
            const EXP: u64 = 0x7f80_7f80_7f80_7f80;
            const LOW: u64 = 0x0001_0001_0001_0001;
            const HIGH: u64 = 0x8000_8000_8000_8000;
            let (mut nan, mut inf) = (0, 0);
            for block in bytes.chunks(256) {
                let mut maybe = 0u64;
                let words = block.chunks_exact(8);
                let tail = words.remainder();
                for w in words {
                    let d = (u64::from_le_bytes(w.try_into().unwrap_or([0; 8])) & EXP) ^ EXP;
                    maybe |= d.wrapping_sub(LOW) & !d & HIGH;
                }
                if maybe != 0 || !tail.is_empty() {
                    let (n, i) = by_mask::<2>(block, 0x7f80, 0x007f);
                    nan += n;
                    inf += i;
                }
            }
            (nan, inf)
        }
        DType::F16 => by_mask::<2>(bytes, 0x7c00, 0x03ff),
        DType::F32 => by_mask::<4>(bytes, 0x7f80_0000, 0x007f_ffff),
        DType::F64 => by_mask::<8>(bytes, 0x7ff0_0000_0000_0000, 0x000f_ffff_ffff_ffff),
        // E4M3 (fn): no infinities; NaN is S.1111.111.
        DType::F8_E4M3 => (
            bytes.iter().filter(|&&b| b & 0x7f == 0x7f).count() as u64,
            0,
        ),
        DType::F8_E5M2 => by_mask::<1>(bytes, 0x7c, 0x03),
        _ => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_tensor_across_buffer_boundaries() {
        let layout = ShardLayout::new(&[
            ("a".into(), DType::BF16, vec![4]),
            ("b".into(), DType::F32, vec![3]),
            ("c".into(), DType::F16, vec![2]),
            ("d".into(), DType::I64, vec![1]),
        ]);
        let mut data = Vec::new();
        for v in [1.0f32, f32::INFINITY, f32::NAN, -f32::INFINITY] {
            data.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
        }
        for v in [f32::NAN, 2.0, 3.4e38] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        for v in [half::f16::from_f32(65504.0), half::f16::INFINITY] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        data.extend_from_slice(&(-1i64).to_le_bytes());
        // every way to cut the data in two buffers gives the same counts
        for cut in 0..=data.len() {
            let mut s = FiniteScan::new(&layout);
            s.update(&data[..cut]);
            s.update(&data[cut..]);
            let got = s.finish();
            assert_eq!(
                got,
                vec![
                    NonFinite {
                        tensor: "a".into(),
                        nan: 1,
                        inf: 2
                    },
                    NonFinite {
                        tensor: "b".into(),
                        nan: 1,
                        inf: 0
                    },
                    NonFinite {
                        tensor: "c".into(),
                        nan: 0,
                        inf: 1
                    },
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn bf16_screen_finds_every_special_value_in_every_lane() {
        // One special value at each position of a 1000-element buffer, among
        // values that come close (largest finite, subnormals, -0).
        let ordinary = [
            half::bf16::MAX,
            half::bf16::MIN,
            half::bf16::from_f32(-0.0),
            half::bf16::from_bits(1),
        ];
        for special in [
            half::bf16::INFINITY,
            half::bf16::NEG_INFINITY,
            half::bf16::NAN,
            half::bf16::from_bits(0xff81),
        ] {
            for at in 0..1000 {
                let mut b = Vec::new();
                for i in 0..1000 {
                    let v = if i == at { special } else { ordinary[i % 4] };
                    b.extend_from_slice(&v.to_le_bytes());
                }
                let (n, i) = count_elements(DType::BF16, &b);
                assert_eq!(n + i, 1, "{special} at {at}");
                assert_eq!(n == 1, special.is_nan());
            }
        }
    }

    #[test]
    fn fp8_and_f64_codes() {
        assert_eq!(
            count_elements(DType::F8_E4M3, &[0x7f, 0xff, 0x7e, 0x00]),
            (2, 0)
        );
        assert_eq!(
            count_elements(DType::F8_E5M2, &[0x7c, 0xfc, 0x7d, 0x7b]),
            (1, 2)
        );
        let mut b = Vec::new();
        for v in [f64::NAN, f64::NEG_INFINITY, f64::MAX] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(count_elements(DType::F64, &b), (1, 1));
    }
}
