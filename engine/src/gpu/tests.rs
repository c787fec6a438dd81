//! The GPU path on the host emulator (emu.rs) against the CPU path, byte for
//! byte.

use super::*;
use crate::methods::chunked::CHUNK;
use crate::methods::testing::{num, params};
use crate::methods::{self, TensorView};
use crate::unit::TensorParams;

/// Runs `method` on `job` on the CPU and through the emulated GPU path
/// (which must take it) into `out_dtype`; returns both outputs.
fn cpu_and_gpu(method: &str, job: &MergeJob, out_dtype: DType) -> (Vec<u8>, Vec<u8>) {
    let n = job.numel() * out_dtype.size();
    let (mut cpu, mut gpu) = (vec![0u8; n], vec![0u8; n]);
    methods::get(method)
        .unwrap()
        .merge(
            job,
            &mut OutputView {
                dtype: out_dtype,
                bytes: &mut cpu,
            },
        )
        .unwrap();
    let mut out = OutputView {
        dtype: out_dtype,
        bytes: &mut gpu,
    };
    let op = accept(methods::get(method).unwrap(), job, &out)
        .unwrap_or_else(|| panic!("{method} not on the GPU path"));
    run(&emu::Emu::new(), &op, job, &mut out).unwrap();
    (cpu, gpu)
}

/// [`cpu_and_gpu`] on f32 values stored as `in_dtype`.
fn both(
    method: &str,
    shape: &[u64],
    inputs: &[Vec<f32>],
    base: Option<usize>,
    p: &TensorParams,
    in_dtype: DType,
    out_dtype: DType,
) -> (Vec<u8>, Vec<u8>) {
    let encoded = crate::methods::testing::encode(inputs, in_dtype);
    let job = MergeJob {
        name: "model.layers.3.mlp.down_proj.weight",
        shape,
        inputs: encoded
            .iter()
            .map(|b| TensorView {
                dtype: in_dtype,
                bytes: b,
                scale: None,
                lora: None,
                packed: None,
            })
            .collect(),
        base,
        params: p,
        seed: 1234,
        stream: None,
    };
    cpu_and_gpu(method, &job, out_dtype)
}

/// Task-vector-like inputs: a base and fine-tunes that move part of it,
/// in bf16 steps so that many magnitudes tie.
fn models(n: usize, count: usize) -> Vec<Vec<f32>> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let base: Vec<f32> = (0..n).map(|_| next() * 0.05).collect();
    let mut out = vec![base.clone()];
    for m in 1..count {
        out.push(
            base.iter()
                .enumerate()
                .map(|(i, &b)| {
                    if (i + m) % 7 == 0 {
                        b
                    } else {
                        b + (next() * 0.01 * m as f32)
                    }
                })
                .collect(),
        );
    }
    // Base last, as the planner appends it.
    out.rotate_left(1);
    out
}

#[test]
fn emulated_gpu_merges_are_byte_identical_to_the_cpu() {
    // 3 chunks and a tail; above EXACT_LIMIT so TIES selects on the GPU.
    let (rows, cols) = (300u64, 331u64);
    let n = (rows * cols) as usize;
    let inputs = models(n, 4);
    let base = Some(3);
    // Per fine-tune: weight and density (a negative weight; density 1 keeps all).
    let family = |shared: &[(&str, crate::unit::ParamValue)]| {
        params(
            shared,
            &[
                &[("weight", num(0.7)), ("density", num(0.3))],
                &[("weight", num(-0.4)), ("density", num(0.55))],
                &[("weight", num(1.1)), ("density", num(1.0))],
                &[],
            ],
        )
    };
    let flag = crate::methods::testing::flag;
    let cases: Vec<(&str, TensorParams)> = vec![
        (
            "linear",
            params(
                &[],
                &[
                    &[("weight", num(0.7))],
                    &[("weight", num(-0.4))],
                    &[("weight", num(1.1))],
                    &[("weight", num(0.2))],
                ],
            ),
        ),
        ("ties", family(&[])),
        ("dare_ties", family(&[])),
        ("dare_linear", family(&[("lambda", num(0.8))])),
        ("task_arithmetic", family(&[("normalize", flag(true))])),
        // TIES with DARE's rescale switched on, and lambda.
        (
            "ties",
            family(&[("rescale", flag(true)), ("lambda", num(1.5))]),
        ),
    ];
    for (method, p) in &cases {
        for (i, o) in [
            (DType::BF16, DType::BF16),
            (DType::F32, DType::F32),
            (DType::F16, DType::F16),
            (DType::BF16, DType::F16),
        ] {
            let (cpu, gpu) = both(method, &[rows, cols], &inputs, base, p, i, o);
            let differ = cpu
                .chunks(o.size())
                .zip(gpu.chunks(o.size()))
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(
                differ, 0,
                "{method} {i}->{o}: {differ} of {n} elements differ"
            );
        }
    }
}

#[test]
fn emulated_top_k_keeps_the_cpu_tie_quotas() {
    // Every magnitude in a handful of values: the threshold key is shared
    // by thousands of elements across chunks.
    let n = 5 * CHUNK + 77;
    let base = vec![0.0f32; n];
    let a: Vec<f32> = (0..n).map(|i| [0.5, -0.25, 0.125, 0.0][i % 4]).collect();
    let b: Vec<f32> = (0..n)
        .map(|i| [0.25, 0.25, -0.5, 0.125][(i / 3) % 4])
        .collect();
    // One magnitude everywhere: every element ties, and every rank counts.
    let c: Vec<f32> = (0..n).map(|i| [0.25, -0.25][i % 2]).collect();
    let p = params(
        &[],
        &[
            &[("weight", num(1.0)), ("density", num(0.4))],
            &[("weight", num(0.5)), ("density", num(0.1))],
            &[("weight", num(0.8)), ("density", num(0.37))],
            &[],
        ],
    );
    let (cpu, gpu) = both(
        "ties",
        &[n as u64],
        &[a, b, c, base],
        Some(3),
        &p,
        DType::F32,
        DType::F32,
    );
    assert!(cpu == gpu, "tie handling differs");
}

/// F16 and BF16 conversions on the device match the CPU's (the half
/// crate) bit for bit: every F16 code decoded, and f32 values around every
/// rounding case (ties, subnormals, overflow, infinities, NaN payloads)
/// encoded, through a linear "merge" of one model with weight 1.
#[test]
fn emulated_conversions_match_the_cpu_bit_for_bit() {
    let p = params(&[], &[&[("weight", num(1.0))]]);
    let copy = |bytes: &[u8], from: DType, to: DType| -> (Vec<u8>, Vec<u8>) {
        let n = bytes.len() / from.size();
        let shape = [n as u64];
        let job = MergeJob {
            name: "t",
            shape: &shape,
            inputs: vec![TensorView {
                dtype: from,
                bytes,
                scale: None,
                lora: None,
                packed: None,
            }],
            base: None,
            params: &p,
            seed: 0,
            stream: None,
        };
        cpu_and_gpu("linear", &job, to)
    };
    // Every F16 code, decoded to f32.
    let codes: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    let (cpu, gpu) = copy(&codes, DType::F16, DType::F32);
    let nan_blind = |b: &[u8]| {
        let v = f32::from_le_bytes(b.try_into().unwrap());
        if v.is_nan() {
            u32::MAX
        } else {
            v.to_bits()
        }
    };
    for (i, (a, b)) in cpu.chunks(4).zip(gpu.chunks(4)).enumerate() {
        // fma(NaN, 1, 0) may quiet a NaN on either side: only NaN-ness must agree.
        assert_eq!(nan_blind(a), nan_blind(b), "f16 code {i:#06x}");
    }
    // f32 bit patterns around every f16 and bf16 rounding boundary.
    let mut values: Vec<u32> = Vec::new();
    for h in (0..=u16::MAX).step_by(7) {
        let f = half::f16::from_bits(h).to_f32().to_bits();
        for d in [
            0u32, 1, 0xfff, 0x1000, 0x1001, 0x2000, 0x7fff, 0x8000, 0x8001,
        ] {
            values.push(f.wrapping_add(d));
            values.push(f.wrapping_sub(d));
        }
    }
    values.extend([
        0x7f80_0000,
        0xff80_0000,
        0x7f80_0001,
        0x7fc0_1234,
        0x0000_0001,
        0x3380_0000,
    ]);
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    for to in [DType::F16, DType::BF16] {
        let (cpu, gpu) = copy(&bytes, DType::F32, to);
        for (i, (a, b)) in cpu.chunks(2).zip(gpu.chunks(2)).enumerate() {
            let v = f32::from_bits(values[i]);
            if v.is_nan() {
                // NaN payloads may differ (a GPU's arithmetic returns its
                // canonical NaN): both must be NaN.
                let is_nan = |b: &[u8]| {
                    let h = u16::from_le_bytes([b[0], b[1]]);
                    match to {
                        DType::F16 => half::f16::from_bits(h).is_nan(),
                        _ => half::bf16::from_bits(h).is_nan(),
                    }
                };
                assert!(is_nan(a) && is_nan(b), "{to} of NaN {:#010x}", values[i]);
                continue;
            }
            assert_eq!(a, b, "{to} of {:#010x} ({v:e})", values[i]);
        }
    }
}

/// FP8 inputs as DeepSeek-V3 stores them (E4M3 with F32 scales per
/// 128 x 128 block, on a shape that is no multiple of the block), and every
/// E4M3 / E5M2 code: the same bytes on the emulated GPU as on the CPU.
#[test]
fn emulated_fp8_inputs_match_the_cpu() {
    use crate::methods::BlockScale;
    let (rows, cols) = (300usize, 331usize);
    let n = rows * cols;
    let (sr, sc) = (rows.div_ceil(128), cols.div_ceil(128));
    let mut x = 0x9e37_79b9u32;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    // Four models' codes (never the NaN codes 0x7f, 0xff) and F32 scales.
    let codes: Vec<Vec<u8>> = (0..4)
        .map(|_| {
            (0..n)
                .map(|_| match (next() % 254) as u8 {
                    c if c >= 0x7f => c + 1,
                    c => c,
                })
                .collect()
        })
        .collect();
    let scales: Vec<Vec<u8>> = (0..4)
        .map(|_| {
            (0..sr * sc)
                .flat_map(|_| ((next() % 1000) as f32 * 1e-5 + 1e-4).to_le_bytes())
                .collect()
        })
        .collect();
    let p4 = params(
        &[],
        &[
            &[("weight", num(0.7)), ("density", num(0.3))],
            &[("weight", num(0.5)), ("density", num(0.6))],
            &[("weight", num(0.2)), ("density", num(0.9))],
            &[("weight", num(0.1))],
        ],
    );
    let run = |method: &str,
               dtype: DType,
               codes: &[&[u8]],
               scales: Option<&[Vec<u8>]>,
               shape: &[u64],
               base: Option<usize>,
               p: &TensorParams,
               out_dtype: DType| {
        let job = MergeJob {
            name: "model.layers.5.mlp.experts.3.up_proj.weight",
            shape,
            inputs: codes
                .iter()
                .enumerate()
                .map(|(i, b)| TensorView {
                    dtype,
                    bytes: b,
                    scale: scales.map(|s| BlockScale {
                        dtype: DType::F32,
                        bytes: &s[i],
                        cols,
                        block_rows: 128,
                        block_cols: 128,
                        scale_cols: sc,
                    }),
                    lora: None,
                    packed: None,
                })
                .collect(),
            base,
            params: p,
            seed: 99,
            stream: None,
        };
        cpu_and_gpu(method, &job, out_dtype)
    };
    let refs: Vec<&[u8]> = codes.iter().map(|c| c.as_slice()).collect();
    let shape = [rows as u64, cols as u64];
    for method in ["linear", "ties", "dare_ties"] {
        let base = (method != "linear").then_some(3);
        let (cpu, gpu) = run(
            method,
            DType::F8_E4M3,
            &refs,
            Some(&scales),
            &shape,
            base,
            &p4,
            DType::BF16,
        );
        assert!(cpu == gpu, "{method}: block-scaled E4M3 differs");
    }
    // Every code of both formats, decoded (weight 1, no scale).
    let all: Vec<u8> = (0..=255).collect();
    let one = params(&[], &[&[("weight", num(1.0))]]);
    for dtype in [DType::F8_E4M3, DType::F8_E5M2] {
        let (cpu, gpu) = run(
            "linear",
            dtype,
            &[&all],
            None,
            &[256],
            None,
            &one,
            DType::F32,
        );
        for (code, (a, b)) in cpu.chunks(4).zip(gpu.chunks(4)).enumerate() {
            let (a, b) = (
                f32::from_le_bytes(a.try_into().unwrap()),
                f32::from_le_bytes(b.try_into().unwrap()),
            );
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{dtype} code {code:#04x}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn kernels_are_listed_in_index_order() {
    for (i, k) in Kernel::ALL.iter().enumerate() {
        assert_eq!(k.index(), i, "{}", k.name());
    }
}

#[test]
fn the_gpu_path_declines_what_it_does_not_compute() {
    let v = vec![0u8; 8];
    let p = TensorParams::default();
    let view = |dtype| TensorView {
        dtype,
        bytes: &v,
        scale: None,
        lora: None,
        packed: None,
    };
    let job = |dtype, base| MergeJob {
        name: "t",
        shape: &[4],
        inputs: vec![view(dtype), view(dtype)],
        base,
        params: &p,
        seed: 0,
        stream: None,
    };
    let mut bytes = vec![0u8; 8];
    let out = OutputView {
        dtype: DType::BF16,
        bytes: &mut bytes,
    };
    let supports = |method: &str, job: &MergeJob, out: &OutputView| {
        accept(methods::get(method).unwrap(), job, out).is_some()
    };
    assert!(supports("linear", &job(DType::BF16, None), &out));
    assert!(supports("linear", &job(DType::F16, None), &out));
    assert!(supports("linear", &job(DType::F8_E4M3, None), &out));
    assert!(!supports("linear", &job(DType::I32, None), &out));
    assert!(!supports("slerp", &job(DType::BF16, Some(1)), &out));
    assert!(!supports("task_arithmetic", &job(DType::BF16, None), &out));
    // 4 elements: TIES replays torch's sort on the CPU.
    assert!(!supports("ties", &job(DType::BF16, Some(1)), &out));
    assert!(supports("dare_ties", &job(DType::BF16, Some(1)), &out));
    // More task vectors than gta_merge takes.
    let many = |inputs: usize| MergeJob {
        inputs: vec![view(DType::BF16); inputs],
        base: Some(inputs - 1),
        ..job(DType::BF16, None)
    };
    assert!(supports("dare_ties", &many(MAX_STREAMS + 1), &out));
    assert!(!supports("dare_ties", &many(MAX_STREAMS + 2), &out));
}
