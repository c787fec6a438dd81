//! What `fleetmerge plan` reports before a merge: how the inputs compare
//! (architectures, layers, vocabularies, tensor shapes, with the fix for each
//! mismatch), and, for a merge that plans, what it will read, write and hold
//! in memory. The memory figures come from the executor's estimate
//! (`exec::memory::peak`), through [`PeakMemory`]: the plan does not look up
//! into the executor.

use super::models::ModelFacts;
use super::Plan;
use serde::Serialize;
use std::collections::BTreeMap;

/// A difference between the input models, and what to do about it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mismatch {
    pub what: String,
    pub fix: String,
}

/// What happens to packed (MXFP4) inputs: which tensors, what they decode
/// to, the decoded f32 size the merge holds, and the output format.
fn packed_lines<'a>(tensors: impl Iterator<Item = &'a crate::unit::OutputTensor>) -> Vec<String> {
    let mut lines = Vec::new();
    let (mut decoded, mut repacked, mut f32_bytes) = (Vec::new(), 0usize, 0u64);
    let mut example = None;
    for t in tensors {
        let Some(p) = &t.packed else { continue };
        let Some(first) = t.inputs.iter().zip(&t.scales).find(|(_, s)| s.is_some()) else {
            continue;
        };
        match &p.out {
            Some(po) if po.scales => continue,
            Some(_) => repacked += 1,
            None => decoded.push(t.dtype),
        }
        let shape = p
            .out
            .as_ref()
            .map_or(t.shape.clone(), |po| po.merged_shape.clone());
        f32_bytes += 4 * shape.iter().product::<u64>();
        if example.is_none() {
            let (r, s) = (first.0, first.1.as_ref().map_or("", |s| s.name.as_str()));
            example = Some(format!(
                "{} U8 {:?} + {s} -> {:?} f32",
                r.name, r.shape, shape
            ));
        }
    }
    let n = decoded.len() + repacked;
    if n == 0 {
        return lines;
    }
    lines.push(format!(
        "{n} MXFP4 tensors (gpt-oss experts, e.g. {}) are decoded on read as transformers \
         dequantizes them (E2M1 codes times 2^(scale-127), transposed) and merged in f32 \
         ({} decoded)",
        example.unwrap_or_default(),
        {
            let (mut v, mut unit) = (f32_bytes as f64, 0);
            while v >= 1000.0 && unit < 4 {
                v /= 1000.0;
                unit += 1;
            }
            format!("{v:.3} {}", ["B", "KB", "MB", "GB", "TB"][unit])
        }
    ));
    if let Some(d) = decoded.first() {
        lines.push(format!(
            "{} MXFP4 tensors are written as {} under their dequantized names (`_blocks` dropped, \
             no `_scales`); config.json loses quantization_config",
            decoded.len(),
            d.torch_name()
        ));
    }
    if repacked > 0 {
        lines.push(format!(
            "{repacked} MXFP4 tensors are written as MXFP4 again (out_dtype: mxfp4): E8M0 scale \
             from each 32-value block's amax (OCP rule), values rounded to nearest even E2M1; \
             each is merged twice (codes, then scales)"
        ));
    }
    lines
}

/// Compares the input models with the first one. With `aligned` (the config
/// has `tokenizer_source` / `tokenizer:`), different vocabularies are what the
/// plan aligns: neither their sizes nor embedding shapes are a mismatch.
pub fn compare(models: &[ModelFacts], aligned: bool) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let Some(first) = models.first() else {
        return out;
    };
    let list = |f: &dyn Fn(&ModelFacts) -> String| -> String {
        models
            .iter()
            .map(|m| format!("{} {}", m.reference, f(m)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if models
        .iter()
        .any(|m| m.architectures != first.architectures)
    {
        out.push(Mismatch {
            what: format!(
                "architectures differ: {}",
                list(&|m| format!("{:?}", m.architectures))
            ),
            fix: "merge models of one architecture, or pass --allow-crimes if you mean it".into(),
        });
    }
    if models.iter().any(|m| m.layers != first.layers) {
        out.push(Mismatch {
            what: format!("layer counts differ: {}", list(&|m| m.layers.to_string())),
            fix: "use `slices:` with a `layer_range` per source to pair layers explicitly".into(),
        });
    }
    if !aligned && models.iter().any(|m| m.vocab_size != first.vocab_size) {
        out.push(Mismatch {
            what: format!(
                "vocabulary sizes differ: {}",
                list(&|m| m.vocab_size.map_or("unknown".into(), |v| v.to_string()))
            ),
            fix: "set `tokenizer_source` (e.g. `base`) so embeddings follow one tokenizer".into(),
        });
    }
    // Tensors by name: shape differences and tensors some models lack.
    let mut names: BTreeMap<&str, Vec<Option<&Vec<u64>>>> = BTreeMap::new();
    for (i, m) in models.iter().enumerate() {
        for (name, shape) in &m.shapes {
            names
                .entry(name)
                .or_insert_with(|| vec![None; models.len()])[i] = Some(shape);
        }
    }
    let (mut shape_diffs, mut missing) = (Vec::new(), Vec::new());
    for (name, shapes) in &names {
        let present: Vec<&Vec<u64>> = shapes.iter().flatten().copied().collect();
        if present.len() < models.len() {
            let lacking: Vec<&str> = shapes
                .iter()
                .zip(models)
                .filter(|(s, _)| s.is_none())
                .map(|(_, m)| m.reference.as_str())
                .collect();
            missing.push(format!("{name} (not in {})", lacking.join(", ")));
        } else if present.iter().any(|s| *s != present[0]) {
            shape_diffs.push(format!(
                "{name}: {}",
                shapes
                    .iter()
                    .zip(models)
                    .map(|(s, m)| format!("{} {:?}", m.reference, s.cloned().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let few = |v: &[String]| -> String {
        let mut s = v.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
        if v.len() > 5 {
            s.push_str(&format!("; and {} more", v.len() - 5));
        }
        s
    };
    let embeddings_only = shape_diffs
        .iter()
        .all(|d| d.contains("embed") || d.contains("lm_head") || d.contains("wte"));
    // With a tokenizer setting the plan aligns the embeddings' rows.
    let aligned_embeddings = aligned && embeddings_only;
    if !shape_diffs.is_empty() && !aligned_embeddings {
        out.push(Mismatch {
            what: format!(
                "{} tensors differ in shape: {}",
                shape_diffs.len(),
                few(&shape_diffs)
            ),
            fix: if embeddings_only {
                "only the embeddings differ: set `tokenizer_source` to pick one vocabulary".into()
            } else {
                "these are not fine-tunes of one base model; merge models that share their \
                 shapes, or use `slices:` to take such layers from one model"
                    .into()
            },
        });
    }
    if !missing.is_empty() {
        out.push(Mismatch {
            what: format!(
                "{} tensors are not in every model: {}",
                missing.len(),
                few(&missing)
            ),
            fix: "tensors missing from some inputs are taken from the models that have them; \
                  check that this is what you want"
                .into(),
        });
    }
    out
}

/// Bytes and counts of a planned merge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub merge_method: String,
    pub output_tensors: usize,
    pub parameters: u64,
    pub work_units: usize,
    /// Output shards, and those of them written by several units (parts).
    pub shards: usize,
    pub shards_in_parts: usize,
    /// Bytes read from each input model (its adapter's included), in model
    /// order (reference, bytes).
    pub read_per_model: Vec<(String, u64)>,
    pub read_total: u64,
    /// Tensor bytes written (the index's total_size).
    pub write_total: u64,
    pub largest_unit: Option<UnitSize>,
    /// Estimated peak memory of one worker slot running the largest unit.
    pub peak_memory_per_slot: u64,
    /// The threads that estimate assumes.
    pub threads: usize,
    /// Tensors too large for the memory budget whole, streamed in segments.
    pub streamed_tensors: usize,
    pub warnings: Vec<String>,
    /// With a tokenizer setting: the output vocabulary (its warnings are also
    /// in `warnings`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vocabulary: Option<crate::tokenizer::VocabSummary>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnitSize {
    pub file: String,
    pub tensors: usize,
    pub read: u64,
    pub write: u64,
}

/// The estimated peak memory of a plan's units, as a summary reports it
/// (`exec::memory::Peak` is one).
pub trait PeakMemory {
    /// Bytes of one worker slot at the peak.
    fn peak_bytes(&self) -> u64;
    /// Tensors streamed in segments under the budget, over all units.
    fn streamed_tensors(&self) -> usize;
}

/// Summarizes `plan`, whose peak memory per slot on `threads` compute threads
/// is `peak`.
pub fn summarize(
    plan: &Plan,
    models: &[ModelFacts],
    peak: &dyn PeakMemory,
    threads: usize,
) -> Summary {
    let tensors = || plan.units.iter().flat_map(|u| u.tensors.iter());
    let mut per_model = vec![0u64; plan.models.len()];
    for t in tensors() {
        // A vocabulary tensor reads only the rows its alignment uses; block
        // scales and LoRA factors count for their model.
        let read = t.inputs.iter().zip(t.input_read_bytes());
        for (r, read) in read.chain(t.side_refs().map(|r| (r, r.len))) {
            if let Some(b) = per_model.get_mut(r.model) {
                *b += read;
            }
        }
    }
    let largest = plan.units.iter().max_by_key(|u| u.input_bytes());
    let mut warnings = Vec::new();
    let mut conversions: BTreeMap<String, usize> = BTreeMap::new();
    let mut single = Vec::new();
    for t in tensors() {
        for (i, r) in t.inputs.iter().enumerate() {
            // Packed inputs are described below.
            let packed = t.packed.is_some() && t.scales.get(i).is_some_and(Option::is_some);
            if r.dtype != t.dtype && !packed {
                *conversions
                    .entry(format!("{} -> {}", r.dtype, t.dtype))
                    .or_default() += 1;
            }
        }
        if t.inputs.len() == 1 && plan.models.len() > 1 {
            single.push(t.name.clone());
        }
    }
    for (conv, n) in &conversions {
        warnings.push(format!(
            "dtype conversion {conv} on {n} input tensors (computed in f32, rounded once)"
        ));
    }
    let dequantized: Vec<&crate::unit::OutputTensor> = tensors()
        .filter(|t| !t.scales.is_empty() && t.requant.is_none() && t.packed.is_none())
        .collect();
    if let Some(t) = dequantized.first() {
        warnings.push(format!(
            "{} FP8 weights are dequantized with their block scales and written as {}; \
             config.json loses quantization_config",
            dequantized.len(),
            t.dtype.torch_name()
        ));
    }
    warnings.extend(packed_lines(tensors()));
    let requantized = tensors()
        .filter(|t| t.requant.as_ref().is_some_and(|r| !r.scales))
        .count();
    if requantized > 0 {
        warnings.push(format!(
            "{requantized} FP8 weights are merged in f32 and written back as E4M3 with fresh \
             block scales (--keep-fp8); each is merged twice (weight, then its scales)"
        ));
    }
    let unscaled = tensors()
        .filter(|t| t.scales.is_empty() && t.inputs.iter().any(|r| r.dtype.is_fp8()))
        .count();
    if unscaled > 0 {
        warnings.push(format!(
            "{unscaled} FP8 tensors have no block scales (`*_scale_inv`): they are copied, and \
             only where every model holds the same bytes"
        ));
    }
    if !single.is_empty() {
        warnings.push(format!(
            "{} output tensors come from one model only: {}{}",
            single.len(),
            single
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            if single.len() > 3 { ", ..." } else { "" }
        ));
    }
    let tied: Vec<&str> = models
        .iter()
        .filter(|m| m.tie_word_embeddings)
        .map(|m| m.reference.as_str())
        .collect();
    if !tied.is_empty() {
        warnings.push(format!(
            "tied embeddings (tie_word_embeddings) in {}: the output head is the merged embedding",
            tied.join(", ")
        ));
    }
    if let Some(v) = &plan.vocabulary {
        warnings.extend(v.warnings.iter().cloned());
    }
    Summary {
        merge_method: plan.merge_method.clone(),
        output_tensors: plan.tensor_count(),
        parameters: tensors().map(|t| t.numel()).sum(),
        work_units: plan.units.len(),
        shards: plan
            .units
            .iter()
            .map(|u| u.file_name.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        shards_in_parts: plan
            .units
            .iter()
            .filter(|u| u.part.as_ref().is_some_and(|p| p.index == 0))
            .count(),
        read_per_model: plan
            .models
            .iter()
            .zip(per_model)
            .map(|(m, b)| (m.reference.clone(), b))
            .collect(),
        read_total: plan.units.iter().map(|u| u.input_bytes()).sum(),
        write_total: plan.total_size(),
        largest_unit: largest.map(|u| UnitSize {
            file: u.file_name.clone(),
            tensors: u.tensors.len(),
            read: u.input_bytes(),
            write: u.data_bytes(),
        }),
        peak_memory_per_slot: peak.peak_bytes(),
        threads,
        streamed_tensors: peak.streamed_tensors(),
        warnings,
        vocabulary: plan.vocabulary.clone(),
    }
}
