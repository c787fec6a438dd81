//! One output tensor from its inputs' bytes: copied (a non-float tensor every
//! model holds the same), given (a literal's bytes, e.g. a built MoE's router), or merged by the unit's method — on the device when
//! it takes the tensor ([`Device::merge`]), else on the CPU — and, for a
//! re-quantized FP8 weight, merged in f32 and quantized with fresh block
//! scales ([`requantize`]); packed (MXFP4) inputs are decoded from their codes
//! and scales, and a packed output half is merged in f32 and encoded
//! ([`repack`]). An adapted input's LoRA factors are decoded once
//! per tensor ([`lora_factors`]) and its delta added to each decoded chunk. A
//! vocabulary tensor merges its inputs re-indexed into the output vocabulary:
//! [`compute_loaded`] aligns the rows a window read (`vocab.rs`), a streamed
//! one is aligned segment by segment; an adapted input's rows get their delta
//! as they are decoded, before they are re-indexed, and stay f32.

use super::read::Inputs;
use super::{vocab, Device, ExecError};
use crate::dtype::packed::{encode_mxfp4, BlockFormat, PackedView};
use crate::dtype::DType;
use crate::methods::lora::{Factor, LoraFactors};
use crate::methods::{self, BlockScale, MergeJob, OutputView, Segments, TensorView};
use crate::unit::{OutputTensor, TensorOp, WorkUnit};
use rayon::prelude::*;

/// Computes `t` from the inputs a window loaded into `out`: a vocabulary
/// tensor's rows are aligned first.
pub(super) fn compute_loaded(
    unit: &WorkUnit,
    method: &dyn methods::MergeMethod,
    t: &OutputTensor,
    inputs: &Inputs,
    out: &mut [u8],
    device: &Device,
) -> Result<(), ExecError> {
    match (inputs, &t.vocab) {
        (Inputs::Whole(bytes), _) => compute(unit, method, t, bytes, out, None, device),
        (Inputs::Rows { rows, side }, Some(v)) => {
            let factors = lora_factors(t, side);
            let aligned = vocab::align_whole(t, v, rows, &factors);
            let bytes: Vec<&[u8]> = aligned.iter().map(Vec::as_slice).collect();
            compute(unit, method, t, &bytes, out, None, device)
        }
        (Inputs::Rows { .. }, None) => Err(ExecError::Internal(format!(
            "{}: rows read for a tensor without a vocabulary alignment",
            t.name
        ))),
    }
}

/// Computes `t` from its inputs' bytes (then its scales' bytes) into `out`;
/// a vocabulary tensor's inputs come aligned. Streamed (`stream`), the
/// inputs' bytes are empty and come (aligned) segment by segment from
/// `stream`, and `out` holds one segment.
pub(super) fn compute(
    unit: &WorkUnit,
    method: &dyn methods::MergeMethod,
    t: &OutputTensor,
    inputs: &[&[u8]],
    out: &mut [u8],
    stream: Option<&dyn Segments>,
    device: &Device,
) -> Result<(), ExecError> {
    match &t.op {
        TensorOp::Literal { hex } => {
            // Validated: exactly the tensor's bytes (and never streamed: it
            // reads nothing).
            hex::decode_to_slice(hex, out)
                .map_err(|e| ExecError::Internal(format!("{}: literal tensor data: {e}", t.name)))
        }
        TensorOp::CopyIdentical => {
            let differ = || ExecError::BuffersDiffer {
                tensor: t.name.clone(),
                models: t
                    .inputs
                    .iter()
                    .map(|r| format!("{} in {}", r.name, r.location))
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            if let Some(stream) = stream {
                let mut same = true;
                let numel = t.numel() as usize;
                let seg = stream.elements().max(1);
                for start in (0..numel).step_by(seg) {
                    stream.with_inputs(start..(start + seg).min(numel), &mut |ins| {
                        same &= ins.iter().all(|b| *b == ins[0]);
                        if same {
                            stream.emit(ins[0]);
                        }
                    });
                    if !same {
                        return Err(differ());
                    }
                }
                return Ok(());
            }
            let inputs = &inputs[..t.inputs.len().min(inputs.len())];
            if inputs.iter().any(|b| *b != inputs[0]) {
                return Err(differ());
            }
            out.copy_from_slice(inputs[0]);
            Ok(())
        }
        TensorOp::Merge => {
            // `inputs` holds the inputs, then the scales of the block-scaled
            // ones, then the LoRA factors (A, B) of the adapted ones.
            let n = t.inputs.len();
            let (own, side) = inputs.split_at(n.min(inputs.len()));
            let n_scales = t.scales.iter().flatten().count();
            let (scale_bytes, lora_bytes) = side.split_at(n_scales.min(side.len()));
            let mut scale_bytes = scale_bytes.iter();
            // A vocabulary tensor's inputs come aligned, an adapted one's
            // delta already added (validated units carry no scales with it).
            let factors = match t.vocab {
                Some(_) => vec![None; n],
                None => lora_factors(t, lora_bytes),
            };
            let block = t.block.unwrap_or([128, 128]);
            let mut views = Vec::with_capacity(n);
            for (i, r) in t.inputs.iter().enumerate() {
                if t.vocab.is_some() {
                    views.push(TensorView {
                        dtype: vocab::aligned_dtype(r),
                        bytes: own.get(i).copied().unwrap_or_default(),
                        scale: None,
                        lora: None,
                        packed: None,
                    });
                    continue;
                }
                // A packed input: its codes, decoded with its scales.
                if let (Some(p), Some(Some(_))) = (&t.packed, t.scales.get(i)) {
                    let scales = scale_bytes.next().copied().unwrap_or_default();
                    let layout = p.format.layout(&r.shape).ok_or_else(|| {
                        ExecError::Internal(format!(
                            "{}: input {} of shape {:?} is not {}",
                            t.name, r.name, r.shape, p.format
                        ))
                    })?;
                    views.push(TensorView {
                        dtype: r.dtype,
                        bytes: &[],
                        scale: None,
                        lora: None,
                        packed: Some(PackedView {
                            layout,
                            blocks: own.get(i).copied().unwrap_or_default(),
                            scales,
                        }),
                    });
                    continue;
                }
                let scale = match t.scales.get(i) {
                    Some(Some(sr)) => Some(BlockScale {
                        dtype: sr.dtype,
                        bytes: scale_bytes.next().copied().unwrap_or_default(),
                        cols: r.shape.get(1).copied().unwrap_or(1) as usize,
                        block_rows: block[0].max(1) as usize,
                        block_cols: block[1].max(1) as usize,
                        scale_cols: sr.shape.get(1).copied().unwrap_or(1) as usize,
                    }),
                    _ => None,
                };
                views.push(TensorView {
                    dtype: r.dtype,
                    bytes: own.get(i).copied().unwrap_or_default(),
                    scale,
                    lora: factors[i].as_ref().map(LoraFactors::delta),
                    packed: None,
                });
            }
            // A re-quantized FP8 output, or a half of a packed one, merges as
            // its weight (name and shape key the method and its random
            // streams).
            let packed_out = t
                .packed
                .as_ref()
                .and_then(|p| Some((p.format, p.out.as_ref()?)));
            let (name, shape) = match (&t.requant, packed_out) {
                (Some(rq), _) => (rq.weight.as_str(), rq.weight_shape.as_slice()),
                (None, Some((_, po))) => (po.merged.as_str(), po.merged_shape.as_slice()),
                (None, None) => (t.name.as_str(), t.shape.as_slice()),
            };
            let job = MergeJob {
                name,
                shape,
                inputs: views,
                base: t.base,
                params: &t.params,
                seed: unit.seed,
                stream,
            };
            if let Some((format, po)) = packed_out {
                return repack(method, &job, t, format, po, out);
            }
            let Some(rq) = &t.requant else {
                let mut view = OutputView {
                    dtype: t.dtype,
                    bytes: out,
                };
                if let Some(done) = device.merge(method, &job, &mut view) {
                    return Ok(done?);
                }
                method.merge(&job, &mut view)?;
                return Ok(());
            };
            let numel = job.numel();
            let mut merged = vec![0u8; numel * 4];
            method.merge(
                &job,
                &mut OutputView {
                    dtype: DType::F32,
                    bytes: &mut merged,
                },
            )?;
            let mut values = vec![0f32; numel];
            crate::dtype::decode_f32(DType::F32, &merged, &mut values);
            drop(merged);
            requantize(&values, shape, rq, out);
            Ok(())
        }
    }
}

/// Merges `job` in f32 and writes half of the packed result `po`: the codes
/// or the block scales of `t` in `format` (see [`crate::dtype::packed`] for
/// the rounding rule). A non-finite merged value is an error naming the
/// tensor.
fn repack(
    method: &dyn methods::MergeMethod,
    job: &MergeJob,
    t: &OutputTensor,
    format: BlockFormat,
    po: &crate::unit::PackedOut,
    out: &mut [u8],
) -> Result<(), ExecError> {
    let layout = format.layout_for(&po.merged_shape).ok_or_else(|| {
        ExecError::Internal(format!(
            "{}: {:?} is not a shape {format} can hold",
            t.name, po.merged_shape
        ))
    })?;
    let numel = job.numel();
    let mut merged = vec![0u8; numel * 4];
    method.merge(
        job,
        &mut OutputView {
            dtype: DType::F32,
            bytes: &mut merged,
        },
    )?;
    let mut values = vec![0f32; numel];
    crate::dtype::decode_f32(DType::F32, &merged, &mut values);
    drop(merged);
    let (blocks, scales): (&mut [u8], &mut [u8]) = if po.scales {
        (&mut [], out)
    } else {
        (out, &mut [])
    };
    match format {
        BlockFormat::Mxfp4 => encode_mxfp4(&layout, &values, blocks, scales),
    }
    .map_err(|e| ExecError::Unencodable {
        tensor: t.name.clone(),
        message: format!("the merge of {}: {e}", po.merged),
    })
}

/// The LoRA factors of each input of `t` (`None` for an input without an
/// adapter), decoded from `bytes` (A then B of each adapted input, in input
/// order).
pub(super) fn lora_factors(t: &OutputTensor, bytes: &[&[u8]]) -> Vec<Option<LoraFactors>> {
    let mut bytes = bytes.iter();
    t.inputs
        .iter()
        .map(|r| {
            let l = r.lora.as_deref()?;
            let mut factor = |f: &crate::unit::TensorRef| Factor {
                dtype: f.dtype,
                bytes: bytes.next().copied().unwrap_or_default(),
                shape: [
                    f.shape.first().copied().unwrap_or(0) as usize,
                    f.shape.get(1).copied().unwrap_or(0) as usize,
                ],
            };
            let (a, b) = (factor(&l.a), factor(&l.b));
            Some(LoraFactors::decode(&a, &b, l.scale, l.transposed))
        })
        .collect()
}

/// Writes `values` (a merged 2-D weight) as E4M3 with per-block scales
/// `amax / 448`, or (`rq.scales`) those scales as F32: DeepSeek-V3's layout,
/// where the weight is `fp8 · weight_scale_inv` per block.
fn requantize(values: &[f32], shape: &[u64], rq: &crate::unit::Requant, out: &mut [u8]) {
    let (rows, cols) = (
        shape.first().copied().unwrap_or(1) as usize,
        shape.get(1).copied().unwrap_or(1).max(1) as usize,
    );
    let (br, bc) = (rq.block[0].max(1) as usize, rq.block[1].max(1) as usize);
    let (sr, sc) = (rows.div_ceil(br), cols.div_ceil(bc));
    // Block scales, one row of blocks at a time.
    let scales: Vec<f32> = (0..sr)
        .into_par_iter()
        .flat_map_iter(|b| {
            let mut amax = vec![0f32; sc];
            for r in b * br..((b + 1) * br).min(rows) {
                for (c, v) in values[r * cols..(r + 1) * cols].iter().enumerate() {
                    let a = &mut amax[c / bc];
                    *a = a.max(v.abs());
                }
            }
            amax.into_iter().map(|a| {
                if a > 0.0 && a.is_finite() {
                    a / crate::dtype::F8_E4M3_MAX
                } else {
                    1.0
                }
            })
        })
        .collect();
    if rq.scales {
        for (o, s) in out.chunks_exact_mut(4).zip(&scales) {
            o.copy_from_slice(&s.to_le_bytes());
        }
        return;
    }
    out.par_chunks_mut(cols)
        .zip(values.par_chunks(cols))
        .enumerate()
        .for_each(|(r, (o, v))| {
            let srow = &scales[(r / br) * sc..(r / br + 1) * sc];
            for (c, (o, &x)) in o.iter_mut().zip(v).enumerate() {
                *o = crate::dtype::f32_to_f8_e4m3(x / srow[c / bc]);
            }
        });
}
