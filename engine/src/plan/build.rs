//! The planner proper: normalises `models:` into one output slice (appending the
//! base model as mergekit does), validates the method's input contract, walks the
//! output tensors (pre-stack, each output layer of each slice with its layer
//! renumbering, post-stack), resolves every parameter, and groups the tensors
//! into shards. Only checkpoint headers are read.

use super::layout::{Layout, TIED_HEADS};
use super::resolve::{resolve, Resolved};
use super::{OutputMeta, Plan, PlanError, PlannedModel};
use crate::checkpoint::Checkpoint;
use crate::config::{ConfigError, MergeConfig, ModelInputs, ModelRef, Params, TokenizerSource};
use crate::dtype::DType;
use crate::methods::{self, BasePolicy, MergeMethod, ParamSpec, Scope};
use crate::storage;
use crate::unit::{
    OutputTensor, ParamValue, Requant, TensorOp, TensorParams, TensorRef, WorkUnit, PLAN_FORMAT,
};
use crate::yaml::Span;
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;

/// Knobs of the planner that come from the command line.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Bytes per output shard (`--out-shard-size`).
    pub out_shard_size: u64,
    /// Seed of the randomized methods (`--random-seed`).
    pub seed: u64,
    /// Merge models whose `architectures` differ (`--allow-crimes`).
    pub allow_crimes: bool,
    /// Directory that relative model paths are resolved against (mergekit: the
    /// current directory).
    pub base_dir: PathBuf,
    /// Write FP8 inputs' weights back as FP8 with fresh block scales.
    pub keep_fp8: bool,
}

/// One input of an output slice after normalisation.
struct Source<'a> {
    model: usize,
    range: (u64, u64),
    params: Option<&'a Params>,
    key_path: String,
    span: Span,
}

/// An output slice after normalisation.
struct Slice<'a> {
    sources: Vec<Source<'a>>,
    params: Option<&'a Params>,
    /// The configured base model (index into the model list), if any.
    base: Option<usize>,
    key_path: String,
    span: Span,
}

struct Model {
    reference: ModelRef,
    location: String,
    checkpoint: Checkpoint,
    layout: Layout,
    layers: u64,
}

struct Planner<'a> {
    cfg: &'a MergeConfig,
    method: &'static dyn MergeMethod,
    models: Vec<Model>,
    keep_fp8: bool,
}

fn cfg_err(cfg: &MergeConfig, key_path: &str, span: Option<Span>, message: String) -> PlanError {
    PlanError::Config(ConfigError {
        file: cfg.file.clone(),
        key_path: key_path.to_string(),
        span,
        message,
    })
}

/// Plans the merge described by `cfg`.
pub fn plan(cfg: &MergeConfig, opts: &PlanOptions) -> Result<Plan, PlanError> {
    let method = methods::get(&cfg.merge_method).ok_or_else(|| {
        cfg_err(
            cfg,
            "merge_method",
            Some(cfg.merge_method.span),
            format!(
                "unknown merge method '{}'; fleetmerge knows: {}",
                cfg.merge_method.value,
                methods::names().join(", ")
            ),
        )
    })?;
    check_parameter_names(cfg, method)?;
    // `run` resolves the template when it writes the tokenizer: the same check
    // here, so that `plan` refuses what `run` would.
    if let Some(t) = &cfg.chat_template {
        crate::output::resolve_chat_template(&t.value)
            .map_err(|e| cfg_err(cfg, "chat_template", Some(t.span), e.to_string()))?;
    }
    let (refs, tokenizer_ref) = model_references(cfg);
    let models = open_models(cfg, opts, &refs)?;
    check_architectures(&models, opts.allow_crimes)?;
    // `out_dtype: fp8` in the YAML is `--keep-fp8`.
    let fp8_out = cfg.out_dtype.as_ref().filter(|d| d.value.is_fp8());
    let planner = Planner {
        cfg,
        method,
        models,
        keep_fp8: opts.keep_fp8 || fp8_out.is_some(),
    };
    let slices = planner.normalize()?;
    for s in &slices {
        planner.check_contract(s)?;
    }
    let tensors = planner.output_tensors(&slices)?;
    let units = shard(tensors, opts, &cfg.merge_method);
    let mut output = planner.output_meta(&slices, tokenizer_ref, opts)?;
    output.dequantized = units.iter().any(|u| {
        u.tensors
            .iter()
            .any(|t| !t.scales.is_empty() && t.requant.is_none())
    });
    if planner.keep_fp8
        && !units
            .iter()
            .flat_map(|u| &u.tensors)
            .any(|t| t.requant.is_some())
    {
        let message = "FP8 output re-quantizes the inputs' block-scaled FP8 weights (DeepSeek-V3 \
                       layout: F8_E4M3 `X.weight` with `X.weight_scale_inv`), and no merged \
                       tensor has them; set a float `out_dtype` instead"
            .to_string();
        return Err(match fp8_out {
            Some(d) => cfg_err(cfg, "out_dtype", Some(d.span), message),
            None => PlanError::Inputs(format!("--keep-fp8: {message}")),
        });
    }
    Ok(Plan {
        format: PLAN_FORMAT,
        merge_method: cfg.merge_method.value.clone(),
        models: planner
            .models
            .iter()
            .map(|m| PlannedModel {
                reference: m.reference.to_string(),
                location: m.location.clone(),
            })
            .collect(),
        units,
        output,
    })
}

/// Every parameter named in the YAML must belong to the method, and shared
/// parameters must not sit under a model (mergekit silently ignores both).
fn check_parameter_names(cfg: &MergeConfig, method: &dyn MergeMethod) -> Result<(), PlanError> {
    let spec = method.spec();
    let known = || {
        spec.params
            .iter()
            .map(|p| p.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut levels: Vec<(&Params, bool)> = vec![(&cfg.parameters, false)];
    match &cfg.inputs {
        ModelInputs::Models(ms) => levels.extend(ms.iter().map(|m| (&m.parameters, true))),
        ModelInputs::Slices(ss) => {
            for s in ss {
                levels.push((&s.parameters, false));
                levels.extend(s.sources.iter().map(|src| (&src.parameters, true)));
            }
        }
    }
    for (params, per_model) in levels {
        for (name, _) in &params.entries {
            let key_path = format!("{}.{}", params.key_path, name.value);
            match spec.param(&name.value) {
                None => {
                    return Err(cfg_err(
                        cfg,
                        &key_path,
                        Some(name.span),
                        format!(
                            "`{}` is not a parameter of {} (its parameters: {}); mergekit would \
                             ignore it silently",
                            name.value,
                            spec.name,
                            if spec.params.is_empty() {
                                "none".into()
                            } else {
                                known()
                            }
                        ),
                    ))
                }
                Some(p) if per_model && p.scope == Scope::Shared => {
                    return Err(cfg_err(
                        cfg,
                        &key_path,
                        Some(name.span),
                        format!(
                            "`{}` is a shared parameter of {}: under a model it would be ignored \
                             (mergekit ignores it silently); move it to the top-level \
                             `parameters`",
                            name.value, spec.name
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// A model reference with the key path and span of its first mention.
type Mention = (ModelRef, String, Span);

/// The models the config names, each once, in YAML order, with a key path and
/// span for messages; plus the tokenizer source when it is a model of its own.
fn model_references(cfg: &MergeConfig) -> (Vec<Mention>, Option<(ModelRef, Span)>) {
    let mut refs: Vec<Mention> = Vec::new();
    let mut add = |r: &ModelRef, key: String, span: Span| {
        if !refs.iter().any(|(x, _, _)| x == r) {
            refs.push((r.clone(), key, span));
        }
    };
    let mut entries: Vec<(Span, ModelRef, String)> = Vec::new();
    if let Some(b) = &cfg.base_model {
        entries.push((b.span, b.value.clone(), "base_model".into()));
    }
    match &cfg.inputs {
        ModelInputs::Models(ms) => {
            for m in ms {
                entries.push((
                    m.model.span,
                    m.model.value.clone(),
                    format!("{}.model", m.key_path),
                ));
            }
        }
        ModelInputs::Slices(ss) => {
            for s in ss {
                if let Some(b) = &s.base_model {
                    entries.push((
                        b.span,
                        b.value.clone(),
                        format!("{}.base_model", s.key_path),
                    ));
                }
                for src in &s.sources {
                    entries.push((
                        src.model.span,
                        src.model.value.clone(),
                        format!("{}.model", src.key_path),
                    ));
                }
            }
        }
    }
    entries.sort_by_key(|(span, _, _)| (span.line, span.col));
    for (span, r, key) in entries {
        add(&r, key, span);
    }
    let tokenizer = match cfg.tokenizer_source.as_ref().map(|t| (&t.value, t.span)) {
        Some((TokenizerSource::Model(r), span)) => Some((r.clone(), span)),
        _ => None,
    };
    (refs, tokenizer)
}

/// Resolves a model path against `base_dir`, checking that it exists.
fn locate(
    cfg: &MergeConfig,
    opts: &PlanOptions,
    r: &ModelRef,
    key: &str,
    span: Span,
) -> Result<String, PlanError> {
    if r.revision.is_some() {
        return Err(cfg_err(
            cfg,
            key,
            Some(span),
            format!(
                "model '{r}': a revision (@...) only applies to Hugging Face Hub models, which \
                 fleetmerge does not download; point at a local directory"
            ),
        ));
    }
    if storage::is_url(&r.path) {
        // Checked when its files are opened (a missing model is a NotFound there).
        return Ok(r.path.trim_end_matches('/').to_string());
    }
    let path = std::path::Path::new(r.path.strip_prefix("file://").unwrap_or(&r.path));
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else {
        opts.base_dir.join(path)
    };
    // `./models/a` → `models/a` (lexically; `..` and symlinks are left alone).
    let full: std::path::PathBuf = full.components().collect();
    if !full.is_dir() {
        return Err(cfg_err(
            cfg,
            key,
            Some(span),
            format!(
                "model '{}' not found: {} is not a directory (fleetmerge reads local model \
                 directories; it does not download from the Hugging Face Hub)",
                r.path,
                full.display()
            ),
        ));
    }
    Ok(full.to_string_lossy().into_owned())
}

fn open_models(
    cfg: &MergeConfig,
    opts: &PlanOptions,
    refs: &[Mention],
) -> Result<Vec<Model>, PlanError> {
    let located: Vec<(ModelRef, String)> = refs
        .iter()
        .map(|(r, key, span)| Ok((r.clone(), locate(cfg, opts, r, key, *span)?)))
        .collect::<Result<_, PlanError>>()?;
    located
        .into_par_iter()
        .map(|(reference, location)| {
            let st = storage::for_location(&location);
            let checkpoint = Checkpoint::open(st.as_ref(), &location)?;
            let layout = Layout::infer(checkpoint.tensors.keys());
            checkpoint
                .check_layer_count(layout.layer_count())
                .map_err(PlanError::Inputs)?;
            let layers = checkpoint
                .num_layers()
                .map(|(_, n)| n)
                .unwrap_or_else(|| layout.layer_count());
            Ok(Model {
                reference,
                location,
                checkpoint,
                layout,
                layers,
            })
        })
        .collect()
}

fn architectures(m: &Model) -> String {
    m.checkpoint
        .config
        .get("architectures")
        .map(|v| v.to_string())
        .unwrap_or_else(|| "(none)".into())
}

fn check_architectures(models: &[Model], allow_crimes: bool) -> Result<(), PlanError> {
    let Some(first) = models.first() else {
        return Ok(());
    };
    let want = architectures(first);
    if allow_crimes || models.iter().all(|m| architectures(m) == want) {
        return Ok(());
    }
    let list: Vec<String> = models
        .iter()
        .map(|m| format!("{}: {}", m.reference, architectures(m)))
        .collect();
    Err(PlanError::Inputs(format!(
        "the input models have different architectures ({}); pass --allow-crimes to merge them anyway",
        list.join(", ")
    )))
}

impl<'a> Planner<'a> {
    fn index_of(&self, r: &ModelRef) -> usize {
        self.models
            .iter()
            .position(|m| &m.reference == r)
            .unwrap_or(0)
    }

    /// Turns `models:` into one slice (base appended when not listed) and checks
    /// every layer range.
    fn normalize(&self) -> Result<Vec<Slice<'a>>, PlanError> {
        let cfg = self.cfg;
        let global_base = cfg.base_model.as_ref().map(|b| self.index_of(b));
        let slices = match &cfg.inputs {
            ModelInputs::Models(ms) => {
                let mut sources: Vec<Source> = ms
                    .iter()
                    .map(|m| {
                        let model = self.index_of(&m.model);
                        Source {
                            model,
                            range: (0, self.models[model].layers),
                            params: Some(&m.parameters),
                            key_path: m.key_path.clone(),
                            span: m.model.span,
                        }
                    })
                    .collect();
                if let (Some(base), Some(b)) = (global_base, &cfg.base_model) {
                    if !sources.iter().any(|s| s.model == base) {
                        sources.push(Source {
                            model: base,
                            range: (0, self.models[base].layers),
                            params: None,
                            key_path: "base_model".into(),
                            span: b.span,
                        });
                    }
                }
                vec![Slice {
                    sources,
                    params: None,
                    base: global_base,
                    key_path: "models".into(),
                    span: ms.first().map(|m| m.model.span).unwrap_or_default(),
                }]
            }
            ModelInputs::Slices(ss) => ss
                .iter()
                .map(|s| Slice {
                    sources: s
                        .sources
                        .iter()
                        .map(|src| Source {
                            model: self.index_of(&src.model),
                            range: src.layer_range.value,
                            params: Some(&src.parameters),
                            key_path: src.key_path.clone(),
                            span: src.layer_range.span,
                        })
                        .collect(),
                    params: Some(&s.parameters),
                    base: s
                        .base_model
                        .as_ref()
                        .map(|b| self.index_of(b))
                        .or(global_base),
                    key_path: s.key_path.clone(),
                    span: s.span,
                })
                .collect(),
        };
        for s in &slices {
            for src in &s.sources {
                let m = &self.models[src.model];
                if src.range.1 > m.layers || src.range.0 >= src.range.1 {
                    return Err(cfg_err(
                        cfg,
                        &format!("{}.layer_range", src.key_path),
                        Some(src.span),
                        format!(
                            "layer_range [{}, {}] does not fit {}, which has {} layers (valid: \
                             0 <= start < end <= {})",
                            src.range.0, src.range.1, m.reference, m.layers, m.layers
                        ),
                    ));
                }
            }
            let len = |src: &Source| src.range.1 - src.range.0;
            if let Some(first) = s.sources.first() {
                if let Some(bad) = s.sources.iter().find(|src| len(src) != len(first)) {
                    return Err(cfg_err(
                        cfg,
                        &format!("{}.layer_range", bad.key_path),
                        Some(bad.span),
                        format!(
                            "all sources of a slice must span the same number of layers: {} has \
                             {} but the first source has {}",
                            self.models[bad.model].reference,
                            len(bad),
                            len(first)
                        ),
                    ));
                }
            }
        }
        Ok(slices)
    }

    /// The base index the method sees for a slice (none for methods that treat
    /// the base as an ordinary input).
    fn method_base(&self, s: &Slice) -> Option<usize> {
        if self.method.spec().base == BasePolicy::Ignored {
            return None;
        }
        s.base
            .and_then(|b| s.sources.iter().position(|src| src.model == b))
    }

    fn check_contract(&self, s: &Slice) -> Result<(), PlanError> {
        let spec = self.method.spec();
        let cfg = self.cfg;
        let base = self.method_base(s);
        if spec.base == BasePolicy::Required && base.is_none() {
            let (key, span) = match &cfg.base_model {
                Some(b) => ("base_model", Some(b.span)),
                None => ("base_model", Some(cfg.merge_method.span)),
            };
            let message = match s.base {
                None => format!(
                    "merge method {} needs a base model: add `base_model: <path>` (the model the \
                     task vectors are taken against)",
                    spec.name
                ),
                Some(b) => format!(
                    "merge method {} needs its base model {} among the sources of {}",
                    spec.name, self.models[b].reference, s.key_path
                ),
            };
            return Err(cfg_err(cfg, key, span, message));
        }
        let n = s.sources.len();
        let non_base = n - usize::from(base.is_some());
        let count_err = |what: &str, min: usize, max: Option<usize>, got: usize| {
            let want = match max {
                Some(m) if m == min => format!("exactly {min}"),
                Some(m) => format!("between {min} and {m}"),
                None => format!("at least {min}"),
            };
            cfg_err(
                cfg,
                &s.key_path,
                Some(s.span),
                format!("merge method {} takes {want} {what}, got {got}", spec.name),
            )
        };
        if n < spec.min_inputs || spec.max_inputs.is_some_and(|m| n > m) {
            let what = if spec.name == "slerp" {
                "models (the base and one other)"
            } else {
                "input models"
            };
            return Err(count_err(what, spec.min_inputs, spec.max_inputs, n));
        }
        if non_base < spec.min_non_base || spec.max_non_base.is_some_and(|m| non_base > m) {
            return Err(count_err(
                "models besides the base",
                spec.min_non_base,
                spec.max_non_base,
                non_base,
            ));
        }
        Ok(())
    }

    fn output_tensors(&self, slices: &[Slice]) -> Result<Vec<OutputTensor>, PlanError> {
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
        for (src, input) in s.sources.iter().zip(inputs) {
            let m = &self.models[src.model];
            let loc = m.checkpoint.tensors.get(input).ok_or_else(|| {
                PlanError::Inputs(format!(
                    "tensor {input} is missing from {} ({}), but {name} needs it from every \
                     model of {}",
                    m.reference, m.location, s.key_path
                ))
            })?;
            refs.push(TensorRef {
                model: src.model,
                name: input.clone(),
                location: loc.file.clone(),
                offset: loc.info.offset,
                len: loc.info.len,
                dtype: loc.info.dtype,
                shape: loc.info.shape.clone(),
            });
        }
        let scales = self.block_scales(s, name, &refs)?;
        let first = &refs[0];
        if let Some(bad) = refs.iter().find(|r| r.shape != first.shape) {
            let hint = if name.contains("embed") || TIED_HEADS.contains(&name) {
                " (the vocabularies differ: merge models that share a tokenizer, or crop them \
                 to a common vocabulary first)"
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
            _ => refs[i].dtype,
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
        Ok(OutputTensor {
            name: name.to_string(),
            dtype,
            shape: first.shape.clone(),
            op,
            inputs: refs,
            base,
            params,
            block: scales
                .iter()
                .any(Option::is_some)
                .then(|| self.block_size(s)),
            requant: None,
            scales: if scales.iter().any(Option::is_some) {
                scales
            } else {
                Vec::new()
            },
        })
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
                }))
            })
            .collect()
    }

    /// Resolves every parameter of the method for one tensor and runs the
    /// method's own checks on the result.
    fn params(
        &self,
        s: &Slice,
        name: &str,
        inputs: &[String],
        t: f64,
        base: Option<usize>,
    ) -> Result<TensorParams, PlanError> {
        let spec = self.method.spec();
        let cfg = self.cfg;
        let file = cfg.file.as_str();
        let mut shared_levels: Vec<&Params> = Vec::new();
        shared_levels.extend(s.params);
        shared_levels.push(&cfg.parameters);
        let mut params = TensorParams::default();
        let mut origins: BTreeMap<(Option<usize>, &str), (String, Span)> = BTreeMap::new();
        let mut record = |key: (Option<usize>, &'static str),
                          r: Resolved,
                          map: &mut BTreeMap<String, ParamValue>| {
            if let Some(v) = r.value {
                map.insert(key.1.to_string(), v);
            }
            if let Some(o) = r.origin {
                origins.insert(key, o);
            }
        };
        for p in spec.params.iter().filter(|p| p.scope == Scope::Shared) {
            let r = resolve(
                file,
                p,
                &shared_levels,
                name,
                t,
                spec.name,
                ("parameters", cfg.merge_method.span),
            )?;
            record((None, p.name), r, &mut params.shared);
        }
        for (j, (src, input)) in s.sources.iter().zip(inputs).enumerate() {
            let mut map = BTreeMap::new();
            let is_base = s.base == Some(src.model);
            let mut levels: Vec<&Params> = s
                .sources
                .iter()
                .filter(|o| o.model == src.model)
                .filter_map(|o| o.params)
                .collect();
            levels.extend(shared_levels.iter().copied());
            let who = self.models[src.model].reference.to_string();
            let per_input = |p: &&ParamSpec| match p.scope {
                Scope::Shared => false,
                Scope::Input => true,
                Scope::NonBase => !is_base,
            };
            for p in spec.params.iter().filter(per_input) {
                let missing_at = (format!("{}.parameters", src.key_path), src.span);
                let r = resolve(
                    file,
                    p,
                    &levels,
                    input,
                    t,
                    &who,
                    (&missing_at.0, missing_at.1),
                )?;
                record((Some(j), p.name), r, &mut map);
            }
            params.per_input.push(map);
        }
        if let Err(problem) = self.method.validate(&params, base) {
            let param = problem.params.first().copied().unwrap_or("parameters");
            let (key_path, span) = origins
                .get(&(problem.input, param))
                .or_else(|| {
                    origins
                        .iter()
                        .find(|((_, n), _)| *n == param)
                        .map(|(_, o)| o)
                })
                .cloned()
                .unwrap_or_else(|| ("parameters".into(), cfg.merge_method.span));
            return Err(cfg_err(
                cfg,
                &key_path,
                Some(span),
                format!("{} (tensor {name})", problem.message),
            ));
        }
        Ok(params)
    }

    fn output_meta(
        &self,
        slices: &[Slice],
        tokenizer_ref: Option<(ModelRef, Span)>,
        opts: &PlanOptions,
    ) -> Result<OutputMeta, PlanError> {
        let cfg = self.cfg;
        let config_donor = cfg
            .base_model
            .as_ref()
            .map(|b| self.index_of(b))
            .unwrap_or(0);
        let tokenizer_dir = match cfg.tokenizer_source.as_ref().map(|t| (&t.value, t.span)) {
            Some((TokenizerSource::Base, span)) => {
                let base = cfg
                    .base_model
                    .as_ref()
                    .map(|b| self.index_of(b))
                    .ok_or_else(|| {
                        cfg_err(
                            cfg,
                            "tokenizer_source",
                            Some(span),
                            "tokenizer_source: base needs a base_model".into(),
                        )
                    })?;
                self.models[base].location.clone()
            }
            _ => match tokenizer_ref {
                // A tokenizer source need not be one of the merged models.
                Some((r, span)) => match self.models.iter().find(|m| m.reference == r) {
                    Some(m) => m.location.clone(),
                    None => locate(cfg, opts, &r, "tokenizer_source", span)?,
                },
                None => self.models[config_donor].location.clone(),
            },
        };
        let layers = match &cfg.inputs {
            ModelInputs::Slices(_) => {
                let total: u64 = slices
                    .iter()
                    .map(|s| s.sources[0].range.1 - s.sources[0].range.0)
                    .sum();
                let key = self.models[config_donor]
                    .checkpoint
                    .num_layers()
                    .map(|(k, _)| k)
                    .unwrap_or_else(|| "num_hidden_layers".into());
                Some((key, total))
            }
            ModelInputs::Models(_) => None,
        };
        let spec = self.method.spec();
        Ok(OutputMeta {
            config_dir: self.models[config_donor].location.clone(),
            tokenizer_dir,
            // FP8 checkpoints keep a float torch_dtype (the compute dtype) next
            // to their quantization_config.
            config_dtype: cfg
                .out_dtype
                .as_ref()
                .filter(|d| !d.value.is_fp8())
                .or(cfg.dtype.as_ref())
                .map(|d| d.value),
            layers,
            dequantized: false,
            chat_template: cfg.chat_template.as_ref().map(|c| c.value.clone()),
            config_yaml: cfg.source.clone(),
            method_pretty: spec.pretty_name.to_string(),
            method_url: spec.reference_url.map(str::to_string),
            base_reference: cfg.base_model.as_ref().map(|b| b.value.to_string()),
            references: self
                .models
                .iter()
                .map(|m| m.reference.to_string())
                .collect(),
        })
    }
}

/// Groups tensors into shards of at most `out_shard_size` bytes (a tensor larger
/// than that gets a shard of its own), in output order, as mergekit's writer does.
fn shard(tensors: Vec<OutputTensor>, opts: &PlanOptions, method: &str) -> Vec<WorkUnit> {
    let mut groups: Vec<Vec<OutputTensor>> = Vec::new();
    let mut current = 0u64;
    for t in tensors {
        let size = t.byte_len();
        match groups.last_mut() {
            Some(g) if !g.is_empty() && current + size <= opts.out_shard_size => {
                current += size;
                g.push(t);
            }
            _ => {
                current = size;
                groups.push(vec![t]);
            }
        }
    }
    let names = crate::output::shard_file_names(groups.len());
    groups
        .into_iter()
        .zip(names)
        .enumerate()
        .map(|(id, (tensors, file_name))| WorkUnit {
            format: PLAN_FORMAT,
            id,
            file_name,
            merge_method: method.to_string(),
            seed: opts.seed,
            tensors,
        })
        .collect()
}

/// What `fleetmerge plan` shows of one input model (from its headers and
/// config.json only).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelFacts {
    pub reference: String,
    pub location: String,
    pub architectures: Vec<String>,
    pub layers: u64,
    pub vocab_size: Option<u64>,
    pub hidden_size: Option<u64>,
    pub tie_word_embeddings: bool,
    pub tensors: usize,
    pub parameters: u64,
    /// Bytes of tensor data.
    pub bytes: u64,
    #[serde(skip)]
    pub shapes: std::collections::BTreeMap<String, Vec<u64>>,
}

/// Opens every model the config references (headers and config.json only), as
/// [`plan`] does, and describes each.
pub fn inspect_models(cfg: &MergeConfig, opts: &PlanOptions) -> Result<Vec<ModelFacts>, PlanError> {
    let (refs, _) = model_references(cfg);
    let models = open_models(cfg, opts, &refs)?;
    Ok(models
        .iter()
        .map(|m| {
            let config = &m.checkpoint.config;
            let num = |k: &str| {
                config.get(k).and_then(|v| v.as_u64()).or_else(|| {
                    config
                        .get("text_config")
                        .and_then(|t| t.get(k))
                        .and_then(|v| v.as_u64())
                })
            };
            ModelFacts {
                reference: m.reference.to_string(),
                location: m.location.clone(),
                architectures: config
                    .get("architectures")
                    .and_then(|v| v.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
                layers: m.layers,
                vocab_size: num("vocab_size"),
                hidden_size: num("hidden_size"),
                tie_word_embeddings: config
                    .get("tie_word_embeddings")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
                tensors: m.checkpoint.tensors.len(),
                parameters: m.checkpoint.tensors.values().map(|t| t.info.numel()).sum(),
                bytes: m.checkpoint.tensors.values().map(|t| t.info.len).sum(),
                shapes: m
                    .checkpoint
                    .tensors
                    .iter()
                    .map(|(n, t)| (n.clone(), t.info.shape.clone()))
                    .collect(),
            }
        })
        .collect())
}
