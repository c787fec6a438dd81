//! Tensor element types as safetensors names them, and the conversions between
//! their bit patterns and the f32 values every kernel computes in. Packed
//! block formats (MXFP4: codes in U8 tensors with a scale per block) are in
//! [`packed`].

pub mod packed;

use serde::{Deserialize, Serialize};
use std::fmt;

/// An element type of a safetensors tensor.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum DType {
    BOOL,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
    F8_E4M3,
    F8_E5M2,
}

impl DType {
    /// Parses a safetensors header dtype string.
    pub fn from_safetensors(s: &str) -> Option<DType> {
        Some(match s {
            "BOOL" => DType::BOOL,
            "U8" => DType::U8,
            "I8" => DType::I8,
            "I16" => DType::I16,
            "U16" => DType::U16,
            "I32" => DType::I32,
            "U32" => DType::U32,
            "I64" => DType::I64,
            "U64" => DType::U64,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F32" => DType::F32,
            "F64" => DType::F64,
            "F8_E4M3" => DType::F8_E4M3,
            "F8_E5M2" => DType::F8_E5M2,
            _ => return None,
        })
    }

    /// The name safetensors uses in its header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::BOOL => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::F8_E4M3 => "F8_E4M3",
            DType::F8_E5M2 => "F8_E5M2",
        }
    }

    /// Parses a mergekit/torch dtype name (`bfloat16`, `torch.float16`, `float32`, ...).
    pub fn from_torch_name(s: &str) -> Option<DType> {
        let s = s.strip_prefix("torch.").unwrap_or(s);
        Some(match s {
            "bfloat16" | "bf16" => DType::BF16,
            "float16" | "fp16" | "f16" | "half" => DType::F16,
            "float32" | "fp32" | "f32" | "float" => DType::F32,
            "float64" | "fp64" | "f64" | "double" => DType::F64,
            "int64" => DType::I64,
            _ => return None,
        })
    }

    /// The name transformers writes as `torch_dtype` in config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::BOOL => "bool",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::F8_E4M3 => "float8_e4m3fn",
            DType::F8_E5M2 => "float8_e5m2",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::BOOL | DType::U8 | DType::I8 | DType::F8_E4M3 | DType::F8_E5M2 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// Whether merge kernels can read this type as f32 values.
    /// An 8-bit float (FP8: E4M3 or E5M2).
    pub fn is_fp8(self) -> bool {
        matches!(self, DType::F8_E4M3 | DType::F8_E5M2)
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// The wider of two float types, as torch's `promote_types` picks it
    /// (bf16 with f16 promotes to f32).
    pub fn promote(self, other: DType) -> DType {
        if self == other {
            return self;
        }
        let rank = |d: DType| match d {
            DType::F64 => 3,
            DType::F32 => 2,
            _ => 1,
        };
        match (rank(self), rank(other)) {
            (a, b) if a > b => self,
            (a, b) if b > a => other,
            // bf16 vs f16 (or anything else of rank 1): neither holds the other.
            _ => DType::F32,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// bf16 bits to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 to bf16 bits, round to nearest even; NaN stays NaN (quiet).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// Converts `src` (raw little-endian elements of `dtype`) into f32 values.
/// `src.len()` must be `dst.len() * dtype.size()`.
pub fn decode_f32(dtype: DType, src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * dtype.size());
    match dtype {
        DType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16_to_f32(u16::from_le_bytes([s[0], s[1]]));
            }
        }
        DType::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
            }
        }
        DType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        DType::F64 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(s);
                *d = f64::from_le_bytes(b) as f32;
            }
        }
        DType::F8_E4M3 => {
            let table = e4m3_table();
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = table[s as usize];
            }
        }
        DType::F8_E5M2 => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = f8_e5m2_to_f32(s);
            }
        }
        other => unreachable!("decode_f32 called on non-float dtype {other}"),
    }
}

fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|b| f8_e4m3_to_f32(b as u8)))
}

/// An OCP FP8 E4M3 ("e4m3fn": no infinities, 0x7f/0xff are NaN) value as f32.
pub fn f8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// Largest finite E4M3 value.
pub const F8_E4M3_MAX: f32 = 448.0;

/// The E4M3 ("e4m3fn") byte nearest to `x`, ties to even; values beyond the
/// largest finite one saturate to ±448 (the format has no infinities); NaN
/// stays NaN.
pub fn f32_to_f8_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= F8_E4M3_MAX {
        return sign | 0x7e;
    }
    const MIN_NORMAL: f32 = 1.0 / 64.0;
    if a < MIN_NORMAL {
        // Subnormals: multiples of 2^-9 (a result of 8 is the smallest normal).
        let m = (a * 512.0).round_ties_even() as u8;
        return sign | m;
    }
    let mut e = ((a.to_bits() >> 23) as i32) - 127;
    let frac = a / 2f32.powi(e) - 1.0;
    let mut m = (frac * 8.0).round_ties_even() as i32;
    if m == 8 {
        m = 0;
        e += 1;
    }
    let biased = e + 7;
    if biased > 15 || (biased == 15 && m == 7) {
        return sign | 0x7e;
    }
    sign | ((biased as u8) << 3) | m as u8
}

/// An FP8 E5M2 value (IEEE-like: infinities and NaN) as f32.
pub fn f8_e5m2_to_f32(b: u8) -> f32 {
    // E5M2 is the top byte of an f16.
    half::f16::from_bits((b as u16) << 8).to_f32()
}

/// Converts f32 values into raw little-endian elements of `dtype`, rounding
/// to nearest even. `dst.len()` must be `src.len() * dtype.size()`.
pub fn encode_f32(dtype: DType, src: &[f32], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), src.len() * dtype.size());
    match dtype {
        DType::BF16 => {
            for (s, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
                d.copy_from_slice(&f32_to_bf16(*s).to_le_bytes());
            }
        }
        DType::F16 => {
            for (s, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
                d.copy_from_slice(&half::f16::from_f32(*s).to_bits().to_le_bytes());
            }
        }
        DType::F32 => {
            for (s, d) in src.iter().zip(dst.chunks_exact_mut(4)) {
                d.copy_from_slice(&s.to_le_bytes());
            }
        }
        DType::F64 => {
            for (s, d) in src.iter().zip(dst.chunks_exact_mut(8)) {
                d.copy_from_slice(&(*s as f64).to_le_bytes());
            }
        }
        other => unreachable!("encode_f32 called on non-float dtype {other}"),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn e4m3_round_trips_every_finite_code_and_saturates() {
        for b in 0u8..=255 {
            let x = f8_e4m3_to_f32(b);
            if x.is_nan() {
                assert!(f8_e4m3_to_f32(f32_to_f8_e4m3(x)).is_nan());
                continue;
            }
            let back = f32_to_f8_e4m3(x);
            // +0 and -0 are both zero; every other finite code is its own nearest.
            assert_eq!(f8_e4m3_to_f32(back), x, "code {b:#04x}");
        }
        assert_eq!(f32_to_f8_e4m3(1e6), 0x7e);
        assert_eq!(f32_to_f8_e4m3(-500.0), 0xfe);
        assert_eq!(f8_e4m3_to_f32(0x7e), 448.0);
        // Ties go to the even mantissa: 1 + 1/16 lies between 1 and 1.125.
        assert_eq!(f8_e4m3_to_f32(f32_to_f8_e4m3(1.0625)), 1.0);
        assert_eq!(f8_e4m3_to_f32(f32_to_f8_e4m3(1.1875)), 1.25);
        // Subnormals are multiples of 2^-9.
        assert_eq!(f8_e4m3_to_f32(f32_to_f8_e4m3(3.0 / 512.0)), 3.0 / 512.0);
    }

    #[test]
    fn e4m3_quantization_error_is_within_half_a_step() {
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = (x as f32 / u32::MAX as f32 - 0.5) * 800.0;
            let q = f8_e4m3_to_f32(f32_to_f8_e4m3(v));
            let a = v.abs().min(448.0);
            // Half a step: 2^(e-4) for normals, 2^-10 for subnormals.
            let half = if a >= 1.0 / 64.0 {
                2f32.powi(((a.to_bits() >> 23) as i32 - 127) - 4)
            } else {
                2f32.powi(-10)
            };
            assert!(
                (q - v.clamp(-448.0, 448.0)).abs() <= half * 1.0001,
                "{v} -> {q}"
            );
        }
    }

    use super::*;

    #[test]
    fn bf16_round_trip_is_exact() {
        for bits in (0u16..=u16::MAX).step_by(7) {
            let x = bf16_to_f32(bits);
            if x.is_nan() {
                assert!(bf16_to_f32(f32_to_bf16(x)).is_nan());
            } else {
                assert_eq!(f32_to_bf16(x), bits);
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies halfway between bf16 1.0 and 1.0078125: ties to even (1.0).
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3*2^-8 lies halfway between 1.0078125 (odd) and 1.015625 (even).
        assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        // Matches the half crate everywhere on a sweep.
        for i in 0..100_000u32 {
            let x = f32::from_bits(0x3000_0000 + i * 4099);
            assert_eq!(f32_to_bf16(x), half::bf16::from_f32(x).to_bits());
        }
    }

    #[test]
    fn encode_decode_all_float_types() {
        let vals = [0.0f32, -1.5, 3.25, 1e-3, -65504.0];
        for dt in [DType::BF16, DType::F16, DType::F32, DType::F64] {
            let mut bytes = vec![0u8; vals.len() * dt.size()];
            encode_f32(dt, &vals, &mut bytes);
            let mut back = vec![0f32; vals.len()];
            decode_f32(dt, &bytes, &mut back);
            for (a, b) in vals.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() * 1e-2, "{dt}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn promotion_follows_torch() {
        assert_eq!(DType::BF16.promote(DType::BF16), DType::BF16);
        assert_eq!(DType::BF16.promote(DType::F16), DType::F32);
        assert_eq!(DType::F16.promote(DType::F32), DType::F32);
        assert_eq!(DType::F64.promote(DType::BF16), DType::F64);
    }
}
