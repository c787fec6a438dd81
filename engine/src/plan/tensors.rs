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

use super::build::{tokenizer_err, Planner};
use super::layout::TIED_HEADS;
use super::slices::Slice;
use super::PlanError;
use crate::checkpoint::Adapted;
use crate::dtype::DType;
use crate::tokenizer::Vocabulary;
use crate::unit::{
    LoraRef, OutputTensor, Requant, TensorOp, TensorParams, TensorRef, VocabAlignment,
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
        let pre: BTreeSet<&String> = first
            .sources
            .iter()
            .flat_map(|s| self.models[s.model].layout.pre.iter())
            .collect();
        for name in pre {
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
                let suffixes: BTreeSet<&String> = s
                    .sources
                    .iter()
                    .filter_map(|src| self.models[src.model].layout.layers.get(&(src.range.0 + k)))
                    .flatten()
                    .collect();
                for suffix in suffixes {
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
            post.extend(m.layout.post.iter().cloned());
            for (&l, suffixes) in m.layout.layers.range(m.layers..) {
                post.extend(suffixes.iter().map(|s| m.layout.layer_tensor(l, s)));
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
        for (src, input) in s.sources.iter().zip(inputs) {
            let m = &self.models[src.model];
            let loc = m.checkpoint.tensors.get(input).ok_or_else(|| {
                PlanError::Inputs(format!(
                    "tensor {input} is missing from {} ({}), but {name} needs it from every \
                     model of {}",
                    m.reference, m.location, s.key_path
                ))
            })?;
            stored.push(loc.info.dtype);
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
        let scales = self.block_scales(s, name, &refs)?;
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
        if let Some(bad) = refs.iter().find(|r| !same_shape(&r.shape, &first.shape)) {
            let hint = if name.contains("embed") || TIED_HEADS.contains(&name) {
                " (the vocabularies differ: set `tokenizer_source: union` (or `base`, or a \
                 model) to align every input to one output vocabulary)"
            } else {
                ""
            };
            return Err(PlanError::Inputs(format!(
                "shapes differ for {name}: {} has {:?} but {} has {:?}{hint}",
                self.models[first.model].reference,
                first.shape,
                self.models[bad.model].reference,
                bad.shape
            )));
        }
        // Block-scaled FP8 inputs are dequantized on read and count as bf16.
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
            let dtype = cfg
                .out_dtype
                .as_ref()
                .filter(|d| !d.value.is_fp8())
                .or(cfg.dtype.as_ref())
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
        let mut shape = first.shape.clone();
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
            block: scales
                .iter()
                .any(Option::is_some)
                .then(|| self.block_size(s)),
            requant: None,
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
