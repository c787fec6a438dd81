//! The planner proper: [`plan`] opens the input models (`models`), turns
//! `models:` or `slices:` into output slices and checks the method's input
//! contract (`slices`), walks the output tensors (`tensors`) with every
//! parameter resolved (`resolve`), groups them into shards (`shards`) and
//! describes what the output needs besides tensors (`meta`). Only checkpoint
//! headers are read.

use super::models::{check_architectures, locate, model_references, open_models, Model};
use super::resolve::check_parameter_names;
use super::shards::shard;
use super::{Plan, PlanError, PlannedModel};
use crate::config::{ConfigError, MergeConfig, ModelRef, TokenizerConfig};
use crate::methods::{self, MergeMethod};
use crate::tokenizer::{
    build_vocabulary, config_vocab_size, TokenizerError, VocabModel, VocabRequest, Vocabulary,
};
use crate::unit::PLAN_FORMAT;
use crate::yaml::Span;
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
    /// Input bytes a work unit aims at (`--unit-size`); `None`: automatic
    /// (see [`super::shards`]).
    pub unit_size: Option<u64>,
}

/// One planning: the config, its method and the opened input models.
pub(super) struct Planner<'a> {
    pub(super) cfg: &'a MergeConfig,
    pub(super) method: &'static dyn MergeMethod,
    pub(super) models: Vec<Model>,
    pub(super) keep_fp8: bool,
    /// `out_dtype: mxfp4`: packed inputs' tensors are written packed again.
    pub(super) keep_packed: bool,
    /// The output vocabulary (with a tokenizer setting): built once from the
    /// models' tokenizer files; its models are `models`, in the same order.
    pub(super) vocab: Option<Vocabulary>,
}

/// The output vocabulary of a merge with `tokenizer_source` / `tokenizer:`.
fn plan_vocabulary(
    cfg: &MergeConfig,
    opts: &PlanOptions,
    settings: &TokenizerConfig,
    models: &[Model],
    tokenizer_ref: Option<&(ModelRef, Span)>,
) -> Result<Vocabulary, PlanError> {
    let vocab_models: Vec<VocabModel> = models
        .iter()
        .map(|m| VocabModel {
            reference: m.reference.clone(),
            location: m.location.clone(),
            vocab_size: config_vocab_size(&m.checkpoint.config),
        })
        .collect();
    let base = cfg
        .base_model
        .as_ref()
        .and_then(|b| models.iter().position(|m| m.reference == b.value));
    let source_location = match tokenizer_ref {
        Some((r, span)) => Some(match models.iter().find(|m| &m.reference == r) {
            Some(m) => m.location.clone(),
            None => locate(cfg, opts, r, &settings.source_key, *span)?,
        }),
        None => None,
    };
    build_vocabulary(&VocabRequest {
        config_file: &cfg.file,
        settings,
        models: &vocab_models,
        base,
        source_location: source_location.as_deref(),
    })
    .map_err(tokenizer_err)
}

/// A tokenizer error as a plan error (config keys keep their line).
pub(super) fn tokenizer_err(e: TokenizerError) -> PlanError {
    match e {
        TokenizerError::Config(c) => PlanError::Config(c),
        other => PlanError::Inputs(other.to_string()),
    }
}

/// A planning error at `key_path` of the config.
pub(super) fn cfg_err(
    cfg: &MergeConfig,
    key_path: &str,
    span: Option<Span>,
    message: String,
) -> PlanError {
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
    let vocab = match &cfg.tokenizer {
        Some(settings) => Some(plan_vocabulary(
            cfg,
            opts,
            settings,
            &models,
            tokenizer_ref.as_ref(),
        )?),
        None => None,
    };
    let planner = Planner {
        cfg,
        method,
        models,
        keep_fp8: opts.keep_fp8 || fp8_out.is_some(),
        keep_packed: cfg.out_packed.is_some(),
        vocab,
    };
    let slices = planner.normalize()?;
    for s in &slices {
        planner.check_contract(s)?;
    }
    let tensors = planner.output_tensors(&slices)?;
    let units = shard(tensors, opts, &cfg.merge_method);
    let mut output = planner.output_meta(&slices, tokenizer_ref, opts)?;
    output.dequantized = units.iter().any(|u| {
        u.tensors.iter().any(|t| {
            !t.scales.is_empty()
                && t.requant.is_none()
                && t.packed.as_ref().is_none_or(|p| p.out.is_none())
        })
    });
    if let Some(d) = &cfg.out_packed {
        if !units
            .iter()
            .flat_map(|u| &u.tensors)
            .any(|t| t.packed.as_ref().is_some_and(|p| p.out.is_some()))
        {
            return Err(cfg_err(
                cfg,
                "out_dtype",
                Some(d.span),
                format!(
                    "{} output re-encodes the inputs' {} tensors (gpt-oss layout: U8 \
                     `X_blocks` with `X_scales`, and `quant_method: mxfp4` in config.json), and \
                     no merged tensor has them; set a float `out_dtype` instead",
                    d.value, d.value
                ),
            ));
        }
    }
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
    let base = cfg
        .base_model
        .as_ref()
        .and_then(|b| planner.models.iter().position(|m| m.reference == b.value));
    let vocabulary = match &planner.vocab {
        Some(v) => Some(v.summary(base).map_err(tokenizer_err)?),
        None => None,
    };
    Ok(Plan {
        format: PLAN_FORMAT,
        vocabulary,
        merge_method: cfg.merge_method.value.clone(),
        models: planner
            .models
            .iter()
            .map(|m| PlannedModel {
                reference: m.reference.to_string(),
                location: m.location.clone(),
                adapter: m.adapter.as_ref().map(|a| a.location.clone()),
            })
            .collect(),
        units,
        output,
    })
}
