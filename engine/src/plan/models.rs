//! The input models: the models a config references (each once, in YAML
//! order), where each one is (a local directory, an object-store URL, a Hub
//! commit), its headers, `config.json` and tensor layout, the adapter of a
//! `model+adapter` reference mapped onto its tensors, the architecture check,
//! and what `fleetmerge plan` shows of each ([`ModelFacts`]).

use super::build::{cfg_err, PlanOptions, Planner};
use super::layout::Layout;
use super::PlanError;
use crate::checkpoint::{Adapted, Adapter, Checkpoint};
use crate::config::{MergeConfig, ModelInputs, ModelRef, TokenizerSource};
use crate::storage;
use crate::yaml::Span;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// An opened input model.
pub(super) struct Model {
    pub(super) reference: ModelRef,
    pub(super) location: String,
    pub(super) checkpoint: Checkpoint,
    pub(super) layout: Layout,
    pub(super) layers: u64,
    /// The LoRA adapter of a `model+adapter` reference.
    pub(super) adapter: Option<ModelAdapter>,
}

/// An adapter folder and what it does to each base tensor it touches.
pub(super) struct ModelAdapter {
    pub(super) location: String,
    pub(super) adapter: Adapter,
    /// By base tensor name.
    pub(super) map: BTreeMap<String, Adapted>,
}

/// A model reference with the key path and span of its first mention.
type Mention = (ModelRef, String, Span);

/// The models the config names, each once, in YAML order, with a key path and
/// span for messages; plus the tokenizer source when it is a model of its own.
pub(super) fn model_references(cfg: &MergeConfig) -> (Vec<Mention>, Option<(ModelRef, Span)>) {
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
    let tokenizer = match cfg
        .tokenizer
        .as_ref()
        .map(|t| (&t.source.value, t.source.span))
    {
        Some((TokenizerSource::Model(r), span)) => Some((r.clone(), span)),
        _ => None,
    };
    (refs, tokenizer)
}

/// Finds a model as mergekit does: an existing local directory (a revision is
/// then ignored, as mergekit ignores it), an object-store URL, else a Hugging
/// Face Hub id resolved to a commit (`hf://repo@commit`, see [`crate::storage::hub`]).
/// For a `model+adapter` reference, the model's folder (see [`locate_adapter`]).
pub(super) fn locate(
    cfg: &MergeConfig,
    opts: &PlanOptions,
    r: &ModelRef,
    key: &str,
    span: Span,
) -> Result<String, PlanError> {
    locate_path(
        cfg,
        opts,
        &r.path,
        r.revision.as_deref(),
        "model",
        key,
        span,
    )
}

/// The adapter folder of a `model+adapter` reference, found as a model is.
pub(super) fn locate_adapter(
    cfg: &MergeConfig,
    opts: &PlanOptions,
    r: &ModelRef,
    key: &str,
    span: Span,
) -> Result<Option<String>, PlanError> {
    r.lora
        .as_ref()
        .map(|l| {
            locate_path(
                cfg,
                opts,
                &l.path,
                l.revision.as_deref(),
                "adapter",
                key,
                span,
            )
        })
        .transpose()
}

fn locate_path(
    cfg: &MergeConfig,
    opts: &PlanOptions,
    path_str: &str,
    revision: Option<&str>,
    what: &str,
    key: &str,
    span: Span,
) -> Result<String, PlanError> {
    let shown = match revision {
        Some(rev) if !rev.is_empty() => format!("{path_str}@{rev}"),
        _ => path_str.to_string(),
    };
    if storage::is_url(path_str) {
        if revision.is_some() {
            return Err(cfg_err(
                cfg,
                key,
                Some(span),
                format!(
                    "{what} '{shown}': a revision (@...) only applies to Hugging Face Hub ids, \
                     not to a URL"
                ),
            ));
        }
        // Checked when its files are opened (a missing model is a NotFound there).
        return Ok(path_str.trim_end_matches('/').to_string());
    }
    let path = std::path::Path::new(path_str.strip_prefix("file://").unwrap_or(path_str));
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else {
        opts.base_dir.join(path)
    };
    // `./models/a` → `models/a` (lexically; `..` and symlinks are left alone).
    let full: std::path::PathBuf = full.components().collect();
    if full.is_dir() {
        if let Some(rev) = revision {
            tracing::warn!(
                "{key}: '{path_str}' is a local directory; its revision '@{rev}' is ignored (as \
                 mergekit does)"
            );
        }
        return Ok(full.to_string_lossy().into_owned());
    }
    if crate::storage::hub::is_repo_id(path_str) {
        return crate::storage::hub::resolve(path_str, revision)
            .map(|h| h.location)
            .map_err(|m| cfg_err(cfg, key, Some(span), format!("{what} '{shown}': {m}")));
    }
    Err(cfg_err(
        cfg,
        key,
        Some(span),
        format!(
            "{what} '{path_str}' not found: {} is not a directory, and '{path_str}' is not a \
             Hugging Face Hub id (ORG/NAME: letters, digits, '-', '_', '.')",
            full.display(),
        ),
    ))
}

pub(super) fn open_models(
    cfg: &MergeConfig,
    opts: &PlanOptions,
    refs: &[Mention],
) -> Result<Vec<Model>, PlanError> {
    type Located = (ModelRef, String, Option<String>);
    let located: Vec<Located> = refs
        .iter()
        .map(|(r, key, span)| {
            let location = locate(cfg, opts, r, key, *span)?;
            Ok((
                r.clone(),
                location,
                locate_adapter(cfg, opts, r, key, *span)?,
            ))
        })
        .collect::<Result<_, PlanError>>()?;
    located
        .into_par_iter()
        .map(|(reference, location, adapter)| {
            let st = storage::for_location(&location);
            let checkpoint = Checkpoint::open(st.as_ref(), &location)?;
            let layout = Layout::infer(checkpoint.tensors.keys());
            checkpoint.check_layer_count(layout.layer_count())?;
            let layers = checkpoint
                .num_layers()
                .map(|(_, n)| n)
                .unwrap_or_else(|| layout.layer_count());
            let adapter = match adapter {
                Some(location) => {
                    let st = storage::for_location(&location);
                    let adapter = Adapter::open(st.as_ref(), &location)?;
                    let map = adapter.map_onto(&checkpoint.tensors)?;
                    Some(ModelAdapter {
                        location,
                        adapter,
                        map,
                    })
                }
                None => None,
            };
            Ok(Model {
                reference,
                location,
                checkpoint,
                layout,
                layers,
                adapter,
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

pub(super) fn check_architectures(models: &[Model], allow_crimes: bool) -> Result<(), PlanError> {
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

impl Planner<'_> {
    /// The index of a referenced model in the model list.
    pub(super) fn index_of(&self, r: &ModelRef) -> usize {
        self.models
            .iter()
            .position(|m| &m.reference == r)
            .unwrap_or(0)
    }
}

/// What `fleetmerge plan` shows of one input model (from its headers and
/// config.json only).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelFacts {
    pub reference: String,
    pub location: String,
    /// `safetensors`, `torch zip`, or `safetensors + torch zip` (an index
    /// naming shards of both).
    pub format: String,
    pub architectures: Vec<String>,
    pub layers: u64,
    pub vocab_size: Option<u64>,
    pub hidden_size: Option<u64>,
    pub tie_word_embeddings: bool,
    pub tensors: usize,
    pub parameters: u64,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// The LoRA adapter of a `model+adapter` reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterFacts>,
    #[serde(skip)]
    pub shapes: std::collections::BTreeMap<String, Vec<u64>>,
}

/// What `fleetmerge plan` shows of a LoRA adapter.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AdapterFacts {
    /// The adapter part of the reference (`path[@revision]`).
    pub reference: String,
    pub location: String,
    /// `r` and `lora_alpha` of the config, and the scale they give
    /// (`rank_pattern` / `alpha_pattern` may change them per module).
    pub rank: u64,
    pub alpha: f64,
    pub scale: f64,
    pub rslora: bool,
    /// Base tensors adapted by LoRA factors, and the distinct module names
    /// they belong to (`q_proj`, `v_proj`, ...).
    pub adapted: usize,
    pub modules: Vec<String>,
    /// Base tensors the adapter replaces (`modules_to_save`, trained biases).
    pub replaced: usize,
    /// Bytes of adapter tensors.
    pub bytes: u64,
}

impl AdapterFacts {
    fn of(reference: &ModelRef, a: &ModelAdapter) -> AdapterFacts {
        let c = &a.adapter.config;
        let scale = if c.use_rslora {
            c.lora_alpha / (c.r as f64).sqrt()
        } else {
            c.lora_alpha / c.r as f64
        };
        let mut modules: Vec<String> = a
            .map
            .iter()
            .filter(|(_, x)| matches!(x, Adapted::Lora { .. }))
            .map(|(name, _)| {
                let module = name.strip_suffix(".weight").unwrap_or(name);
                module.rsplit('.').next().unwrap_or(module).to_string()
            })
            .collect();
        modules.sort();
        modules.dedup();
        let adapted = a
            .map
            .values()
            .filter(|x| matches!(x, Adapted::Lora { .. }))
            .count();
        AdapterFacts {
            reference: reference
                .lora
                .as_ref()
                .map(|l| l.to_string())
                .unwrap_or_default(),
            location: a.location.clone(),
            rank: c.r,
            alpha: c.lora_alpha,
            scale,
            rslora: c.use_rslora,
            adapted,
            modules,
            replaced: a.map.len() - adapted,
            bytes: a.adapter.tensors.values().map(|t| t.info.len).sum(),
        }
    }
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
                format: m.checkpoint.format(),
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
                adapter: m
                    .adapter
                    .as_ref()
                    .map(|a| AdapterFacts::of(&m.reference, a)),
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
