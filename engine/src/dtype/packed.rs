//! Packed block formats: weights stored as small codes in blocks that share
//! one scale, decoded to f32 on read and (optionally) encoded again on write.
//! Today: MXFP4 as gpt-oss ships its experts (OCP Microscaling, E2M1 values
//! with an E8M0 exponent per 32-value block). A later format of the same
//! shape (MXFP8, NVFP4) needs a [`BlockFormat`] variant, its value decoder
//! and encoder; the layout code ([`PackedLayout`]) is shared.
//!
//! # Layout (gpt-oss, as transformers reads it)
//!
//! A packed weight `X` is two U8 tensors: `X_blocks` `[E, R, G, 16]` (two
//! E2M1 codes per byte, low nibble first: 32 values per block) and
//! `X_scales` `[E, R, G]` (E8M0: the block's values are multiplied by
//! `2^(s - 127)`). Decoded, row `r` of expert `e` holds the `G · 32` values of
//! its blocks in order, and the tensor is transposed in its last two axes:
//! the logical (merged, written) tensor is `[E, G · 32, R]`
//! (`transformers.integrations.mxfp4.convert_moe_packed_tensors`: for
//! `gate_up_proj` `[E, 2I, H/32, 16]` gives `[E, H, 2I]`).
//!
//! # Decoding
//!
//! Exactly transformers': the code's value from the E2M1 table
//! (`FP4_VALUES`), times `2^(s - 127)` computed in f32 (`torch.ldexp`): exact
//! for every code and scale (2^-127 is an f32 subnormal), except that a scale
//! of 255 (2^128) and a large code at scale 254 overflow to infinity, and 0·∞
//! is NaN, as in torch.
//!
//! # Encoding (the rounding rule)
//!
//! Per block of 32 values: the shared exponent is the OCP MX spec's,
//! `floor(log2(amax)) - 2` (2 is E2M1's largest exponent), clamped to the
//! E8M0 range `[-127, 127]`; each value divided by `2^exp` is rounded to the
//! nearest E2M1 value, ties to the even code, saturating at ±6. One
//! refinement keeps every value within half an E2M1 step of its input: when
//! the block's amax would round above 6 (`amax / 2^exp >= 7`, where OCP would
//! saturate it to 6), the block takes the next exponent (twice the scale).
//! An all-zero block gets exponent 0 (`s = 127`) and zero codes. NaN or
//! infinite values cannot be encoded: [`encode_mxfp4`] refuses them.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A packed block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockFormat {
    /// OCP MXFP4: E2M1 codes, an E8M0 exponent per 32 values.
    Mxfp4,
}

impl fmt::Display for BlockFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockFormat::Mxfp4 => "MXFP4",
        })
    }
}

impl BlockFormat {
    /// Values per block (one scale each).
    pub fn block_values(self) -> u64 {
        match self {
            BlockFormat::Mxfp4 => 32,
        }
    }

    /// Bytes of one block's codes.
    pub fn block_bytes(self) -> u64 {
        match self {
            BlockFormat::Mxfp4 => 16,
        }
    }

    /// The name suffixes of the codes and the scales tensors.
    pub fn suffixes(self) -> (&'static str, &'static str) {
        match self {
            BlockFormat::Mxfp4 => ("_blocks", "_scales"),
        }
    }

    /// The layout of a `blocks` tensor of this format, if its shape is one:
    /// `[E, R, G, block_bytes]` with non-zero sizes.
    pub fn layout(self, blocks: &[u64]) -> Option<PackedLayout> {
        match *blocks {
            [e, r, g, b] if b == self.block_bytes() && e > 0 && r > 0 && g > 0 => {
                Some(PackedLayout {
                    format: self,
                    experts: e,
                    rows: r,
                    groups: g,
                })
            }
            _ => None,
        }
    }

    /// The packed layout whose decoded tensor has `shape` `[E, C, R]`, if `C`
    /// is a whole number of blocks.
    pub fn layout_for(self, shape: &[u64]) -> Option<PackedLayout> {
        match *shape {
            [e, c, r] if e > 0 && r > 0 && c > 0 && c % self.block_values() == 0 => {
                Some(PackedLayout {
                    format: self,
                    experts: e,
                    rows: r,
                    groups: c / self.block_values(),
                })
            }
            _ => None,
        }
    }
}

/// The shapes of one packed weight: `E` experts of `R` rows of `G` blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedLayout {
    pub format: BlockFormat,
    pub experts: u64,
    pub rows: u64,
    pub groups: u64,
}

impl PackedLayout {
    /// `[E, R, G, block_bytes]`.
    pub fn blocks_shape(&self) -> Vec<u64> {
        vec![
            self.experts,
            self.rows,
            self.groups,
            self.format.block_bytes(),
        ]
    }
    /// `[E, R, G]`.
    pub fn scales_shape(&self) -> Vec<u64> {
        vec![self.experts, self.rows, self.groups]
    }
    /// The decoded tensor, transposed: `[E, G · block_values, R]`.
    pub fn decoded_shape(&self) -> Vec<u64> {
        vec![
            self.experts,
            self.groups * self.format.block_values(),
            self.rows,
        ]
    }
    /// Elements of the decoded tensor.
    pub fn numel(&self) -> u64 {
        self.experts * self.rows * self.groups * self.format.block_values()
    }
}

/// The E2M1 values of the 16 codes (transformers' `FP4_VALUES`).
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Largest E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;

/// `2^(s - 127)` in f32, as `torch.ldexp` multiplies by it: exact for
/// `s <= 254` (2^-127 is subnormal), infinite for 255.
#[inline]
pub fn e8m0_to_f32(s: u8) -> f32 {
    match s {
        0 => f32::from_bits(1 << 22),
        255 => f32::INFINITY,
        s => f32::from_bits((s as u32) << 23),
    }
}

/// One packed input: its codes and scales bytes, decoded on read.
#[derive(Debug, Clone, Copy)]
pub struct PackedView<'a> {
    pub layout: PackedLayout,
    pub blocks: &'a [u8],
    pub scales: &'a [u8],
}

impl PackedView<'_> {
    /// Writes the decoded values of elements `start..start + out.len()` of
    /// the decoded (transposed) tensor `[E, C, R]` into `out`. Consecutive
    /// elements run over `r` for one column `c`: each reads one nibble of a
    /// different row's block, so the loop walks runs of one column.
    pub fn decode(&self, start: usize, out: &mut [f32]) {
        let l = &self.layout;
        let (rows, groups) = (l.rows as usize, l.groups as usize);
        let per = l.format.block_values() as usize;
        let bb = l.format.block_bytes() as usize;
        let cols = groups * per;
        let per_expert = cols * rows;
        let scale = e8m0_table();
        let (mut e, rem) = (start / per_expert, start % per_expert);
        let (mut c, mut r) = (rem / rows, rem % rows);
        let mut done = 0;
        while done < out.len() {
            let run = (rows - r).min(out.len() - done);
            let (g, k) = (c / per, c % per);
            let (byte_at, shift) = (k / 2, (k % 2) * 4);
            // Block of (e, r, g) is (e·R + r)·G + g.
            let first = (e * rows + r) * groups + g;
            for (j, o) in out[done..done + run].iter_mut().enumerate() {
                let block = first + j * groups;
                let byte = self.blocks.get(block * bb + byte_at).copied().unwrap_or(0);
                let s = self.scales.get(block).copied().unwrap_or(127);
                *o = E2M1_VALUES[((byte >> shift) & 0x0f) as usize] * scale[s as usize];
            }
            done += run;
            r = 0;
            c += 1;
            if c == cols {
                c = 0;
                e += 1;
            }
        }
    }
}

/// [`e8m0_to_f32`] of every byte.
fn e8m0_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|s| e8m0_to_f32(s as u8)))
}

/// The E2M1 code nearest to `x` (already divided by its block's scale), ties
/// to the even code, magnitudes above 6 saturating to ±6. Zero (and values
/// that round to it) get the code of +0.
pub fn f32_to_e2m1(x: f32) -> u8 {
    let a = x.abs();
    // Midpoints between neighbours; at a tie the even code wins (`<=` keeps
    // the lower neighbour when its code is even).
    let m = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    if m != 0 && x.is_sign_negative() {
        m | 0x8
    } else {
        m
    }
}

/// A value that packed formats cannot encode.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodeError {
    /// Flat index in the decoded tensor, and the value.
    pub index: usize,
    pub value: f32,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "element {} is {}, which MXFP4 cannot hold (its blocks encode finite values only)",
            self.index, self.value
        )
    }
}

/// The E8M0 scale of a block whose largest magnitude is `amax` (finite), by
/// the rule of the module comment.
pub fn mxfp4_scale(amax: f32) -> u8 {
    if amax == 0.0 {
        return 127;
    }
    // floor(log2(amax)), subnormals included.
    let e = if amax.is_normal() {
        ((amax.to_bits() >> 23) as i32) - 127
    } else {
        -127 - (amax.to_bits().leading_zeros() as i32 - 9)
    };
    let mut exp = (e - 2).clamp(-127, 127);
    if exp < 127 && amax / e8m0_to_f32((exp + 127) as u8) >= 7.0 {
        exp += 1;
    }
    (exp + 127) as u8
}

/// Encodes `values`, the decoded (transposed) tensor `[E, C, R]` of
/// `layout`, into `blocks` (`[E, R, G, 16]` bytes) and `scales` (`[E, R, G]`),
/// either of which may be empty (not wanted). NaN or infinite values are
/// refused with the first one's index.
pub fn encode_mxfp4(
    layout: &PackedLayout,
    values: &[f32],
    blocks: &mut [u8],
    scales: &mut [u8],
) -> Result<(), EncodeError> {
    use rayon::prelude::*;
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(EncodeError {
            index,
            value: values[index],
        });
    }
    let (rows, groups) = (layout.rows as usize, layout.groups as usize);
    let per = 32usize;
    let cols = groups * per;
    let per_expert = cols * rows;
    // One (expert, row) at a time: its G blocks gather a column of the
    // decoded tensor.
    let n_rows = layout.experts as usize * rows;
    let encoded: Vec<(Vec<u8>, Vec<u8>)> = (0..n_rows)
        .into_par_iter()
        .map(|er| {
            let (e, r) = (er / rows, er % rows);
            let mut codes = vec![0u8; groups * 16];
            let mut sc = vec![0u8; groups];
            let mut block = [0f32; 32];
            for g in 0..groups {
                for (k, b) in block.iter_mut().enumerate() {
                    *b = values[e * per_expert + (g * per + k) * rows + r];
                }
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = mxfp4_scale(amax);
                sc[g] = s;
                let x = e8m0_to_f32(s);
                for k in 0..16 {
                    let lo = f32_to_e2m1(block[2 * k] / x);
                    let hi = f32_to_e2m1(block[2 * k + 1] / x);
                    codes[g * 16 + k] = lo | (hi << 4);
                }
            }
            (codes, sc)
        })
        .collect();
    for (er, (codes, sc)) in encoded.into_iter().enumerate() {
        if !blocks.is_empty() {
            blocks[er * groups * 16..(er + 1) * groups * 16].copy_from_slice(&codes);
        }
        if !scales.is_empty() {
            scales[er * groups..(er + 1) * groups].copy_from_slice(&sc);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(e: u64, r: u64, g: u64) -> PackedLayout {
        BlockFormat::Mxfp4.layout(&[e, r, g, 16]).unwrap()
    }

    /// Decodes a whole packed tensor.
    fn decode_all(l: &PackedLayout, blocks: &[u8], scales: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; l.numel() as usize];
        PackedView {
            layout: *l,
            blocks,
            scales,
        }
        .decode(0, &mut out);
        out
    }

    /// The straightforward decode, as transformers writes it: row-major
    /// `[E, R, G*32]` (low nibble first), then transposed.
    fn reference(l: &PackedLayout, blocks: &[u8], scales: &[u8]) -> Vec<f32> {
        let (e, r, g) = (l.experts as usize, l.rows as usize, l.groups as usize);
        let mut flat = Vec::new();
        for (i, b) in blocks.iter().enumerate() {
            let s = 2f64.powi(scales[i / 16] as i32 - 127) as f32;
            flat.push(E2M1_VALUES[(b & 15) as usize] * s);
            flat.push(E2M1_VALUES[(b >> 4) as usize] * s);
        }
        let c = g * 32;
        let mut out = vec![0f32; e * c * r];
        for x in 0..e {
            for row in 0..r {
                for col in 0..c {
                    out[(x * c + col) * r + row] = flat[(x * r + row) * c + col];
                }
            }
        }
        out
    }

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn decode_is_the_table_times_the_scale_transposed() {
        let l = layout(2, 3, 2);
        let mut seed = 7u64;
        let blocks: Vec<u8> = (0..2 * 3 * 2 * 16).map(|_| rng(&mut seed) as u8).collect();
        let scales: Vec<u8> = (0..12)
            .map(|i| [0u8, 1, 100, 127, 130, 254][i % 6])
            .collect();
        let all = decode_all(&l, &blocks, &scales);
        let want = reference(&l, &blocks, &scales);
        assert_eq!(l.decoded_shape(), vec![2, 64, 3]);
        for (a, b) in all.iter().zip(&want) {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{a} {b}"
            );
        }
        // Any chunk decodes as the whole does.
        let mut part = vec![0f32; 50];
        PackedView {
            layout: l,
            blocks: &blocks,
            scales: &scales,
        }
        .decode(77, &mut part);
        assert_eq!(part.as_slice(), &all[77..127]);
        // Low nibble first: byte 0x21 of block 0 is 0.5 (code 1) then 1.0 (code 2).
        let mut b = vec![0u8; 16];
        b[0] = 0x21;
        let one = layout(1, 1, 1);
        let v = decode_all(&one, &b, &[127]);
        assert_eq!(&v[..3], &[0.5, 1.0, 0.0]);
    }

    #[test]
    fn scale_edges_decode_like_torch_ldexp() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert_eq!(e8m0_to_f32(254), 2f32.powi(127));
        assert_eq!(e8m0_to_f32(255), f32::INFINITY);
        // 6 · 2^127 overflows f32, as in torch.
        let l = layout(1, 1, 1);
        let v = decode_all(&l, &[0x37; 16], &[254]);
        assert_eq!(v[0], f32::INFINITY);
        assert_eq!(v[1], 1.5 * 2f32.powi(127));
    }

    #[test]
    fn e2m1_rounds_to_nearest_even_and_saturates() {
        for (code, &v) in E2M1_VALUES.iter().enumerate() {
            let back = f32_to_e2m1(v);
            assert_eq!(E2M1_VALUES[back as usize], v, "code {code}");
        }
        // Ties go to the even code.
        for (x, want) in [
            (0.25, 0.0),
            (0.75, 1.0),
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (-5.0, -4.0),
            (0.26, 0.5),
            (100.0, 6.0),
            (-7.5, -6.0),
        ] {
            assert_eq!(E2M1_VALUES[f32_to_e2m1(x) as usize], want, "{x}");
        }
        assert_eq!(f32_to_e2m1(-0.1), 0);
    }

    /// Half an E2M1 step at `x`'s magnitude (scaled): 0.25 below 2, 0.5 below
    /// 4, 1 above.
    fn half_step(a: f32) -> f32 {
        if a < 2.0 {
            0.25
        } else if a < 4.0 {
            0.5
        } else {
            1.0
        }
    }

    #[test]
    fn encode_is_within_half_a_step_at_the_ocp_scale() {
        let l = layout(3, 5, 4);
        let n = l.numel() as usize;
        let mut seed = 99u64;
        let values: Vec<f32> = (0..n)
            .map(|i| {
                let u = (rng(&mut seed) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // Blocks of very different magnitudes.
                u * 2f32.powi((i / 32 % 40) as i32 - 20)
            })
            .collect();
        let mut blocks = vec![0u8; n / 2];
        let mut scales = vec![0u8; n / 32];
        encode_mxfp4(&l, &values, &mut blocks, &mut scales).unwrap();
        let back = decode_all(&l, &blocks, &scales);
        let (rows, cols) = (5usize, 128usize);
        for (i, (&v, &d)) in values.iter().zip(&back).enumerate() {
            let (e, rem) = (i / (cols * rows), i % (cols * rows));
            let (c, r) = (rem / rows, rem % rows);
            let s = scales[(e * rows + r) * 4 + c / 32];
            let x = e8m0_to_f32(s);
            assert!(
                (d - v).abs() <= half_step((v / x).abs()) * x,
                "element {i}: {v} -> {d} at scale 2^{}",
                s as i32 - 127
            );
            // The OCP exponent of the block, or one more.
            let block: Vec<f32> = (0..32)
                .map(|k| values[e * cols * rows + ((c / 32) * 32 + k) * rows + r])
                .collect();
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let ocp = amax.log2().floor() as i32 - 2;
            let got = s as i32 - 127;
            assert!(got == ocp || got == ocp + 1, "{amax}: 2^{got}");
        }
    }

    #[test]
    fn edge_blocks_round_trip() {
        // Zero blocks; saturation (the top code at every scale); subnormal
        // E2M1 codes (0.5); scales 0 and 254; mixed signs.
        let l = layout(1, 6, 1);
        let mut blocks = vec![0u8; 6 * 16];
        let mut scales = vec![0u8; 6];
        // Row 0: all zero, scale 200.
        scales[0] = 200;
        // Row 1: every code, scale 127.
        for k in 0..16 {
            blocks[16 + k] = (2 * k as u8 % 16) | (((2 * k as u8 + 1) % 16) << 4);
        }
        scales[1] = 127;
        // Row 2: only the subnormal code ±0.5, scale 0 (values 2^-128).
        for k in 0..16 {
            blocks[32 + k] = 0x91;
        }
        scales[2] = 0;
        // Row 3: codes up to 1.5 at scale 254 (larger ones overflow f32).
        for k in 0..16 {
            blocks[48 + k] = 0xb3;
        }
        scales[3] = 254;
        // Row 4: ±6 (saturated codes) at scale 10.
        for k in 0..16 {
            blocks[64 + k] = 0xf7;
        }
        scales[4] = 10;
        // Row 5: one 0.5 among zeros at scale 140.
        blocks[80] = 0x01;
        scales[5] = 140;
        let values = decode_all(&l, &blocks, &scales);
        assert!(values.iter().all(|v| v.is_finite()));
        let mut b2 = vec![0u8; blocks.len()];
        let mut s2 = vec![0u8; scales.len()];
        encode_mxfp4(&l, &values, &mut b2, &mut s2).unwrap();
        let again = decode_all(&l, &b2, &s2);
        for (i, (a, b)) in values.iter().zip(&again).enumerate() {
            assert_eq!(a, b, "element {i}");
        }
        // The zero block: scale 127, zero codes.
        assert_eq!(s2[0], 127);
        assert!(b2[..16].iter().all(|&b| b == 0));
        // The top code already at the OCP exponent keeps its bytes.
        assert_eq!(s2[4], 10);
        assert_eq!(&b2[64..80], &blocks[64..80]);
        // 2^-128 is 0.5 at the smallest scale.
        assert_eq!(s2[2], 0);
        assert_eq!(&b2[32..48], &blocks[32..48]);
        // A block whose amax would round above 6 takes twice the OCP scale
        // (7 at 2^0 would saturate to 6): 7 is 3.5 at 2^1, a tie that goes
        // to the even code (4, decoded 8).
        let mut seven = vec![0f32; 32];
        seven[3] = 7.0;
        seven[4] = -6.5;
        let one = layout(1, 1, 1);
        let (mut b, mut s) = (vec![0u8; 16], vec![0u8; 1]);
        encode_mxfp4(&one, &seven, &mut b, &mut s).unwrap();
        assert_eq!(s[0], 128);
        let v = decode_all(&one, &b, &s);
        assert_eq!((v[3], v[4]), (8.0, -6.0));
        assert_eq!(mxfp4_scale(6.9), 127);
        assert_eq!(mxfp4_scale(2f32.powi(-140)), 0);
    }

    #[test]
    fn non_finite_values_are_refused() {
        let l = layout(1, 1, 1);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = vec![1.0f32; 32];
            v[9] = bad;
            let e = encode_mxfp4(&l, &v, &mut [0u8; 16], &mut [0u8; 1]).unwrap_err();
            assert_eq!(e.index, 9);
            assert!(e.to_string().contains("MXFP4 cannot hold"), "{e}");
        }
    }

    #[test]
    fn layouts() {
        let l = BlockFormat::Mxfp4.layout(&[4, 128, 2, 16]).unwrap();
        assert_eq!(l.decoded_shape(), vec![4, 64, 128]);
        assert_eq!(l.scales_shape(), vec![4, 128, 2]);
        assert_eq!(BlockFormat::Mxfp4.layout_for(&[4, 64, 128]), Some(l));
        assert_eq!(BlockFormat::Mxfp4.layout(&[4, 128, 2, 8]), None);
        assert_eq!(BlockFormat::Mxfp4.layout(&[128, 2, 16]), None);
        assert_eq!(BlockFormat::Mxfp4.layout_for(&[4, 63, 128]), None);
    }
}
