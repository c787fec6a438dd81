//! The input models: the models a config references (each once, in YAML
//! order), where each one is (a local directory, or an object-store URL), its
//! headers, `config.json` and tensor layout, the architecture check, and what
//! `fleetmerge plan` shows of each ([`ModelFacts`]).

use super::build::{cfg_err, PlanOptions, Planner};
use super::layout::Layout;
use super::PlanError;
use crate::checkpoint::Checkpoint;
use crate::config::{MergeConfig, ModelInputs, ModelRef, TokenizerSource};
use crate::storage;
use crate::yaml::Span;
use rayon::prelude::*;

/// An opened input model.
pub(super) struct Model {
    pub(super) reference: ModelRef,
    pub(super) location: String,
    pub(super) checkpoint: Checkpoint,
    pub(super) layout: Layout,
    pub(super) layers: u64,
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
pub(super) fn locate(
    cfg: &MergeConfig,
    opts: &PlanOptions,
    r: &ModelRef,
    key: &str,
    span: Span,
) -> Result<String, PlanError> {
    if storage::is_url(&r.path) {
        if r.revision.is_some() {
            return Err(cfg_err(
                cfg,
                key,
                Some(span),
                format!(
                    "model '{r}': a revision (@...) only applies to Hugging Face Hub ids, not to \
                     a URL"
                ),
            ));
        }
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
    if full.is_dir() {
        if let Some(rev) = &r.revision {
            tracing::warn!(
                "{key}: '{}' is a local directory; its revision '@{rev}' is ignored (as mergekit \
                 does)",
                r.path
            );
        }
        return Ok(full.to_string_lossy().into_owned());
    }
    if crate::storage::hub::is_repo_id(&r.path) {
        return crate::storage::hub::resolve(&r.path, r.revision.as_deref())
            .map(|h| h.location)
            .map_err(|m| cfg_err(cfg, key, Some(span), format!("model '{r}': {m}")));
    }
    Err(cfg_err(
        cfg,
        key,
        Some(span),
        format!(
            "model '{}' not found: {} is not a directory, and '{}' is not a Hugging Face Hub id \
             (ORG/NAME: letters, digits, '-', '_', '.')",
            r.path,
            full.display(),
            r.path
        ),
    ))
}

pub(super) fn open_models(
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
            checkpoint.check_layer_count(layout.layer_count())?;
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
