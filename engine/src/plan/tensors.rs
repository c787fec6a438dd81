//! The output tensors, in output order: the tensors before the layer stack,
//! those of each output layer of each slice (renumbered from 0), and those
//! after it. For each: the input tensor of every source (a tied output head
//! falls back to the input embedding; an input of a `model+adapter` reference
//! carries its LoRA factors, or is the adapter's own tensor where the adapter
//! replaces it), the block scales of FP8 inputs, the
//! shape and dtype checks, and what produces it (a merge, or the copy of a
//! non-float buffer). With a tokenizer setting, a vocabulary tensor (input
//! embedding, output head) has the output vocabulary's rows and the alignment
//! of its inputs' rows. With `--keep-fp8`, a block-scaled weight becomes two
//! outputs: the weight in E4M3 and, right after it, its fresh scales.
//!
//! Packed inputs (gpt-oss's MXFP4 experts: `X_blocks` + `X_scales` in a model
//! whose config says `quant_method: mxfp4`) are one input `X` of the decoded,
//! transposed shape `[E, G·32, R]` (see [`crate::dtype::packed`]); a model
//! holding a dequantized `X` instead is merged with them. The output is `X`
//! in a float dtype, or with `out_dtype: mxfp4` `X_blocks` and `X_scales`
//! again (each computes the merge and keeps its half).

use super::build::{tokenizer_err, Planner};
use super::layout::TIED_HEADS;
use super::slices::Slice;
use super::PlanError;
use crate::checkpoint::Adapted;
use crate::dtype::packed::{BlockFormat, PackedLayout};
use crate::dtype::DType;
use crate::tokenizer::Vocabulary;
use crate::unit::{
    LoraRef, OutputTensor, Packed, PackedOut, Requant, TensorOp, TensorParams, TensorRef,
    VocabAlignment,
};
use std::collections::{BTreeSet, HashSet};

impl Planner<'_> {
    /// Every output tensor of `slices`, in output order.
    pub(super) fn output_tensors(&self, slices: &[Slice]) -> Result<Vec<OutputTensor>, PlanError> {
        let (Some(first), Some(last)) = (slices.first(), slices.last()) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        // The scales of dequantized FP8 weights are not outputs of their own.
        let dequantized_scale = |t: &OutputTensor| {
            t.name.ends_with("_scale_inv")
                && t.inputs.iter().all(|r| {
                    let weight = r.name.trim_end_matches("_scale_inv");
                    self.models[r.model]
                        .checkpoint
                        .tensors
                        .get(weight)
                        .is_some_and(|w| w.info.dtype.is_fp8())
                })
        };
        let mut push = |t: OutputTensor, out: &mut Vec<OutputTensor>| -> Result<(), PlanError> {
            if dequantized_scale(&t) {
                return Ok(());
            }
            if let Some(halves) = self.repacked(&t) {
                for t in halves {
                    if !seen.insert(t.name.clone()) {
                        return Err(PlanError::Inputs(format!(
                            "two output tensors would be named {}; check the slices' layer ranges",
                            t.name
                        )));
                    }
                    out.push(t);
                }
                return Ok(());
            }
            if self.keep_fp8 && !t.scales.is_empty() && t.shape.len() == 2 {
                // The weight in E4M3 and, right after it, its fresh scales.
                let block = t.block.unwrap_or([128, 128]);
                let mut weight = t;
                weight.requant = Some(Requant {
                    block,
                    weight: weight.name.clone(),
                    weight_shape: weight.shape.clone(),
                    scales: false,
                });
                let mut scale = weight.clone();
                scale.name = format!("{}_scale_inv", weight.name);
                scale.dtype = DType::F32;
                scale.shape = vec![
                    weight.shape[0].div_ceil(block[0]),
                    weight.shape[1].div_ceil(block[1]),
                ];
                if let Some(r) = scale.requant.as_mut() {
                    r.scales = true;
                }
                weight.dtype = DType::F8_E4M3;
                for t in [weight, scale] {
                    if !seen.insert(t.name.clone()) {
                        return Err(PlanError::Inputs(format!(
                            "two output tensors would be named {}; check the slices' layer ranges",
                            t.name
                        )));
                    }
                    out.push(t);
                }
                return Ok(());
            }
            if !seen.insert(t.name.clone()) {
                return Err(PlanError::Inputs(format!(
                    "two output tensors would be named {}; check the slices' layer ranges",
                    t.name
                )));
            }
            out.push(t);
            Ok(())
        };
        // Before the stack: names from the first slice's models, position t = 0.
        let pre: BTreeSet<String> = first
            .sources
            .iter()
            .flat_map(|s| {
                self.models[s.model]
                    .layout
                    .pre
                    .iter()
                    .filter_map(move |n| self.logical_name(s.model, n, n))
            })
            .collect();
        for name in &pre {
            let inputs: Vec<String> = first.sources.iter().map(|_| name.clone()).collect();
            push(self.tensor(first, name, &inputs, 0.0)?, &mut out)?;
        }
        // The stack, slice by slice; t restarts at 0 in every slice.
        let out_prefix = self.models[first.sources[0].model].layout.clone();
        let mut out_layer = 0u64;
        for s in slices {
            let n = s.sources[0].range.1 - s.sources[0].range.0;
            for k in 0..n {
                let t = if n > 1 {
                    k as f64 / (n - 1) as f64
                } else {
                    1.0
                };
                let suffixes: BTreeSet<String> = s
                    .sources
                    .iter()
                    .filter_map(|src| {
                        let l = src.range.0 + k;
                        let layout = &self.models[src.model].layout;
                        Some(layout.layers.get(&l)?.iter().filter_map(move |suffix| {
                            let full = layout.layer_tensor(l, suffix);
                            self.logical_name(src.model, &full, suffix)
                        }))
                    })
                    .flatten()
                    .collect();
                for suffix in &suffixes {
                    let inputs: Vec<String> = s
                        .sources
                        .iter()
                        .map(|src| {
                            self.models[src.model]
                                .layout
                                .layer_tensor(src.range.0 + k, suffix)
                        })
                        .collect();
                    let name = out_prefix.layer_tensor(out_layer, suffix);
                    push(self.tensor(s, &name, &inputs, t)?, &mut out)?;
                }
                out_layer += 1;
            }
        }
        // After the stack: names from the last slice's models, t = 0. Layers
        // beyond the configured count (e.g. multi-token-prediction layers) are
        // carried under their own names.
        let mut post: BTreeSet<String> = BTreeSet::new();
        for src in &last.sources {
            let m = &self.models[src.model];
            let logical = |n: &String| self.logical_name(src.model, n, n);
            post.extend(m.layout.post.iter().filter_map(logical));
            for (&l, suffixes) in m.layout.layers.range(m.layers..) {
                post.extend(
                    suffixes
                        .iter()
                        .map(|s| m.layout.layer_tensor(l, s))
                        .filter_map(|n| logical(&n)),
                );
            }
        }
        for name in post {
            let inputs: Vec<String> = last
                .sources
                .iter()
                .map(|src| {
                    let m = &self.models[src.model];
                    match (
                        m.checkpoint.tensors.contains_key(&name),
                        m.layout.tied_embedding(),
                    ) {
                        (false, Some(embed)) if TIED_HEADS.contains(&name.as_str()) => {
                            embed.to_string()
                        }
                        _ => name.clone(),
                    }
                })
                .collect();
            push(self.tensor(last, &name, &inputs, 0.0)?, &mut out)?;
        }
        Ok(out)
    }

    /// Plans one output tensor named `name` from `inputs[j]` of source j.
    fn tensor(
        &self,
        s: &Slice,
        name: &str,
        inputs: &[String],
        t: f64,
    ) -> Result<OutputTensor, PlanError> {
        let mut refs = Vec::with_capacity(inputs.len());
        // Each input's dtype in its model: an adapter's replacement tensor is
        // folded into a model of the base's dtype.
        let mut stored = Vec::with_capacity(inputs.len());
        // Packed inputs: their scales, and the shape the merge sees.
        let mut packed: Vec<Option<TensorRef>> = Vec::with_capacity(inputs.len());
        let mut format = None;
        let mut shapes = Vec::with_capacity(inputs.len());
        for (src, input) in s.sources.iter().zip(inputs) {
            let m = &self.models[src.model];
            if let Some(p) = self.packed_input(src.model, input)? {
                if m.adapter
                    .as_ref()
                    .is_some_and(|a| a.map.contains_key(input))
                {
                    return Err(PlanError::Inputs(format!(
                        "{name}: the adapter of {} changes {input}, which is {} in the model; \
                         adapters of packed weights are not supported",
                        m.reference, p.format
                    )));
                }
                let at = |n: &str, loc: &crate::checkpoint::TensorLocation| TensorRef {
                    model: src.model,
                    name: n.to_string(),
                    location: loc.file.clone(),
                    offset: loc.info.offset,
                    len: loc.info.len,
                    dtype: loc.info.dtype,
                    shape: loc.info.shape.clone(),
                    lora: None,
                };
                refs.push(at(&p.blocks, &m.checkpoint.tensors[&p.blocks]));
                packed.push(Some(at(&p.scales, &m.checkpoint.tensors[&p.scales])));
                shapes.push(p.layout.decoded_shape());
                stored.push(DType::BF16);
                format = Some(p.format);
                continue;
            }
            packed.push(None);
            let loc = m.checkpoint.tensors.get(input).ok_or_else(|| {
                PlanError::Inputs(format!(
                    "tensor {input} is missing from {} ({}), but {name} needs it from every \
                     model of {}",
                    m.reference, m.location, s.key_path
                ))
            })?;
            stored.push(loc.info.dtype);
            shapes.push(loc.info.shape.clone());
            let at =
                |model: usize, name: &str, loc: &crate::checkpoint::TensorLocation| TensorRef {
                    model,
                    name: name.to_string(),
                    location: loc.file.clone(),
                    offset: loc.info.offset,
                    len: loc.info.len,
                    dtype: loc.info.dtype,
                    shape: loc.info.shape.clone(),
                    lora: None,
                };
            let adapted = m
                .adapter
                .as_ref()
                .and_then(|a| Some((a, a.map.get(input)?)));
            refs.push(match adapted {
                None => at(src.model, input, loc),
                Some((a, Adapted::Replaced { key })) => at(src.model, key, &a.adapter.tensors[key]),
                Some((
                    a,
                    Adapted::Lora {
                        a: ka,
                        b: kb,
                        scale,
                        transposed,
                        ..
                    },
                )) => TensorRef {
                    lora: Some(Box::new(LoraRef {
                        a: at(src.model, ka, &a.adapter.tensors[ka]),
                        b: at(src.model, kb, &a.adapter.tensors[kb]),
                        scale: *scale,
                        transposed: *transposed,
                    })),
                    ..at(src.model, input, loc)
                },
            });
        }
        let mut scales = self.block_scales(s, name, &refs)?;
        if format.is_some() {
            if scales.iter().any(Option::is_some) {
                return Err(PlanError::Inputs(format!(
                    "{name}: some inputs are {} and some block-scaled FP8; merging the two \
                     formats in one tensor is not supported",
                    format.map(|f| f.to_string()).unwrap_or_default()
                )));
            }
            scales = packed;
        }
        let first = &refs[0];
        let vocab = match &self.vocab {
            Some(v) if self.is_vocab_tensor(s, name, inputs) => {
                Some(self.vocab_alignment(v, name, &refs)?)
            }
            _ => None,
        };
        let same_shape = |a: &[u64], b: &[u64]| match &vocab {
            // Rows follow each input's vocabulary; the rest must agree.
            Some(_) => a.len() == b.len() && a.get(1..) == b.get(1..),
            None => a == b,
        };
        if let Some((bad, bad_shape)) = refs
            .iter()
            .zip(&shapes)
            .find(|(_, sh)| !same_shape(sh, &shapes[0]))
        {
            let hint = if name.contains("embed") || TIED_HEADS.contains(&name) {
                " (the vocabularies differ: set `tokenizer_source: union` (or `base`, or a \
                 model) to align every input to one output vocabulary)"
            } else {
                ""
            };
            return Err(PlanError::Inputs(format!(
                "shapes differ for {name}: {} has {:?} but {} has {:?}{hint}",
                self.models[first.model].reference,
                shapes[0],
                self.models[bad.model].reference,
                bad_shape
            )));
        }
        // Block-scaled FP8 inputs are dequantized on read and count as bf16
        // (as packed ones do).
        let effective = |i: usize| match scales.get(i) {
            Some(Some(_)) => DType::BF16,
            _ => stored[i],
        };
        let all_float = (0..refs.len()).all(|i| effective(i).is_float());
        let (op, dtype) = if all_float {
            let promoted = (1..refs.len()).fold(effective(0), |a, i| a.promote(effective(i)));
            let cfg = self.cfg;
            // An FP8 `out_dtype` applies to block-scaled weights only (re-quantized
            // above); the other tensors keep `dtype` or their inputs' type.
            // With `out_dtype: mxfp4` the other tensors keep their inputs'
            // type (gpt-oss: BF16), as the packed checkpoint stores them.
            let dtype = cfg
                .out_dtype
                .as_ref()
                .filter(|d| !d.value.is_fp8())
                .or(cfg.dtype.as_ref().filter(|_| cfg.out_packed.is_none()))
                .map(|d| d.value)
                .unwrap_or(promoted);
            if dtype.is_fp8() {
                return Err(PlanError::Inputs(format!(
                    "{name}: writing FP8 ({dtype}) output is not supported yet; set `dtype` or \
                     `out_dtype` to bfloat16 (FP8 inputs are dequantized on read)"
                )));
            }
            (TensorOp::Merge, dtype)
        } else if refs.iter().all(|r| r.dtype == first.dtype) {
            (TensorOp::CopyIdentical, first.dtype)
        } else {
            return Err(PlanError::Inputs(format!(
                "{name} mixes floating-point and integer inputs ({}); cannot merge it",
                refs.iter()
                    .map(|r| r.dtype.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let base = self.method_base(s);
        let params = if op == TensorOp::Merge {
            self.params(s, name, inputs, t, base)?
        } else {
            TensorParams::default()
        };
        let mut shape = shapes[0].clone();
        if let Some(a) = &vocab {
            shape[0] = a.rows;
        }
        Ok(OutputTensor {
            name: name.to_string(),
            dtype,
            shape,
            op,
            inputs: refs,
            base,
            params,
            block: (format.is_none() && scales.iter().any(Option::is_some))
                .then(|| self.block_size(s)),
            requant: None,
            packed: format.map(|format| Packed { format, out: None }),
            vocab,
            scales: if scales.iter().any(Option::is_some) {
                scales
            } else {
                Vec::new()
            },
        })
    }

    /// Whether output tensor `name` (from `inputs[j]` of source j) has the
    /// vocabulary on its rows: an input embedding, or an output head (a tied
    /// head reads the embedding).
    fn is_vocab_tensor(&self, s: &Slice, name: &str, inputs: &[String]) -> bool {
        TIED_HEADS.contains(&name)
            || s.sources.iter().zip(inputs).any(|(src, input)| {
                self.models[src.model].layout.tied_embedding() == Some(input.as_str())
            })
    }

    /// The re-indexing of a vocabulary tensor's inputs into the output vocabulary.
    fn vocab_alignment(
        &self,
        v: &Vocabulary,
        name: &str,
        refs: &[TensorRef],
    ) -> Result<VocabAlignment, PlanError> {
        if let Some(r) = refs.iter().find(|r| r.shape.is_empty()) {
            return Err(PlanError::Inputs(format!(
                "{name}: {} in {} is a scalar, not a vocabulary tensor",
                r.name, self.models[r.model].reference
            )));
        }
        let models: Vec<usize> = refs.iter().map(|r| r.model).collect();
        let rows: Vec<u64> = refs.iter().map(|r| r.shape[0]).collect();
        let base = self
            .cfg
            .base_model
            .as_ref()
            .and_then(|b| self.models.iter().position(|m| m.reference == b.value));
        v.alignment(&models, base, &rows)
            .map_err(|e| PlanError::Inputs(format!("{name}: {}", tokenizer_err(e))))
    }

    /// The packed block format model `model` stores some weights in: its
    /// config's `quantization_config.quant_method` (`mxfp4`).
    fn packed_format(&self, model: usize) -> Option<BlockFormat> {
        let q = self.models[model]
            .checkpoint
            .config
            .get("quantization_config")?;
        match q.get("quant_method")?.as_str()? {
            "mxfp4" => Some(BlockFormat::Mxfp4),
            _ => None,
        }
    }

    /// The output name of tensor `full` of model `model` (known as `short`
    /// in its layer): itself, the packed tensor it holds the codes of (the
    /// suffix `_blocks` dropped), or `None` for the scales of a packed one.
    fn logical_name(&self, model: usize, full: &str, short: &str) -> Option<String> {
        let Some(format) = self.packed_format(model) else {
            return Some(short.to_string());
        };
        let (bs, ss) = format.suffixes();
        for (suffix, keep) in [(bs, true), (ss, false)] {
            if let (Some(x), Some(xs)) = (full.strip_suffix(suffix), short.strip_suffix(suffix)) {
                // A malformed pair stays as it is (and is refused when planned).
                if self.packed_input(model, x).is_ok_and(|p| p.is_some()) {
                    return keep.then(|| xs.to_string());
                }
            }
        }
        Some(short.to_string())
    }

    /// Packed tensor `x` of model `model`: its `x_blocks` and `x_scales`, when
    /// the model is packed and holds them; an error when they do not have the
    /// format's dtypes and shapes.
    fn packed_input(&self, model: usize, x: &str) -> Result<Option<PackedInput>, PlanError> {
        let Some(format) = self.packed_format(model) else {
            return Ok(None);
        };
        let m = &self.models[model];
        let (bs, ss) = format.suffixes();
        let (blocks, scales) = (format!("{x}{bs}"), format!("{x}{ss}"));
        let (Some(b), Some(sc)) = (
            m.checkpoint.tensors.get(&blocks),
            m.checkpoint.tensors.get(&scales),
        ) else {
            return Ok(None);
        };
        let layout = format
            .layout(&b.info.shape)
            .filter(|_| b.info.dtype == DType::U8);
        match layout {
            Some(layout)
                if sc.info.dtype == DType::U8 && sc.info.shape == layout.scales_shape() =>
            {
                Ok(Some(PackedInput {
                    format,
                    blocks,
                    scales,
                    layout,
                }))
            }
            _ => Err(PlanError::Inputs(format!(
                "{x}: {} ({}) is {format} (quant_method in its config.json), but {blocks} is \
                 {} {:?} and {scales} is {} {:?}; {format} weights are U8 codes \
                 [experts, rows, blocks, {}] with U8 scales [experts, rows, blocks]",
                m.reference,
                m.location,
                b.info.dtype,
                b.info.shape,
                sc.info.dtype,
                sc.info.shape,
                format.block_bytes()
            ))),
        }
    }

    /// With `out_dtype: mxfp4`, a merged tensor with packed inputs as its two
    /// packed halves (codes, then scales), in the first packed input's
    /// layout.
    fn repacked(&self, t: &OutputTensor) -> Option<[OutputTensor; 2]> {
        let p = t.packed.as_ref().filter(|_| self.keep_packed)?;
        let layout: PackedLayout = p.format.layout_for(&t.shape)?;
        let (bs, ss) = p.format.suffixes();
        let half = |scales: bool| {
            let mut h = t.clone();
            h.name = format!("{}{}", t.name, if scales { ss } else { bs });
            h.dtype = DType::U8;
            h.shape = if scales {
                layout.scales_shape()
            } else {
                layout.blocks_shape()
            };
            h.packed = Some(Packed {
                format: p.format,
                out: Some(PackedOut {
                    merged: t.name.clone(),
                    merged_shape: t.shape.clone(),
                    scales,
                }),
            });
            h
        };
        Some([half(false), half(true)])
    }

    /// `quantization_config.weight_block_size` of the slice's first model
    /// (DeepSeek-V3's [128, 128] when absent).
    fn block_size(&self, s: &Slice) -> [u64; 2] {
        let m = &self.models[s.sources[0].model];
        m.checkpoint
            .config
            .get("quantization_config")
            .and_then(|q| q.get("weight_block_size"))
            .and_then(|b| b.as_array())
            .and_then(|b| Some([b.first()?.as_u64()?, b.get(1)?.as_u64()?]))
            .filter(|b| b[0] > 0 && b[1] > 0)
            .unwrap_or([128, 128])
    }

    /// For each FP8 input `X.weight`, its `X.weight_scale_inv` block scales
    /// (checked against the weight's shape and the block size).
    fn block_scales(
        &self,
        s: &Slice,
        name: &str,
        refs: &[TensorRef],
    ) -> Result<Vec<Option<TensorRef>>, PlanError> {
        let block = self.block_size(s);
        refs.iter()
            .map(|r| {
                if !r.dtype.is_fp8() {
                    return Ok(None);
                }
                let m = &self.models[r.model];
                let scale_name = format!("{}_scale_inv", r.name);
                let Some(loc) = m.checkpoint.tensors.get(&scale_name) else {
                    return Ok(None);
                };
                let want: Vec<u64> = match r.shape.as_slice() {
                    [rows, cols] => vec![rows.div_ceil(block[0]), cols.div_ceil(block[1])],
                    _ => {
                        return Err(PlanError::Inputs(format!(
                            "{name}: {} in {} is FP8 with block scales but has shape {:?}; \
                             only 2-D weights are block-scaled",
                            r.name, m.reference, r.shape
                        )))
                    }
                };
                if loc.info.shape != want || !loc.info.dtype.is_float() {
                    return Err(PlanError::Inputs(format!(
                        "{name}: {scale_name} in {} is {} {:?}, but a {:?} weight in {}x{} \
                         blocks needs float scales of shape {:?}",
                        m.reference,
                        loc.info.dtype,
                        loc.info.shape,
                        r.shape,
                        block[0],
                        block[1],
                        want
                    )));
                }
                Ok(Some(TensorRef {
                    model: r.model,
                    name: scale_name,
                    location: loc.file.clone(),
                    offset: loc.info.offset,
                    len: loc.info.len,
                    dtype: loc.info.dtype,
                    shape: loc.info.shape.clone(),
                    lora: None,
                }))
            })
            .collect()
    }
}

/// The two tensors of a packed input `X` in its model, and their layout.
struct PackedInput {
    format: BlockFormat,
    blocks: String,
    scales: String,
    layout: PackedLayout,
}
