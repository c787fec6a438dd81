//! The planner proper: [`plan`] opens the input models (`models`), turns
//! `models:` or `slices:` into output slices and checks the method's input
//! contract (`slices`), walks the output tensors (`tensors`) with every
//! parameter resolved (`resolve`), groups them into shards (`shards`) and
//! describes what the output needs besides tensors (`meta`). Only checkpoint
//! headers are read.

use super::models::{check_architectures, model_references, open_models, Model};
use super::resolve::check_parameter_names;
use super::shards::shard;
use super::{Plan, PlanError, PlannedModel};
use crate::config::{ConfigError, MergeConfig, TokenizerSource};
use crate::methods::{self, MergeMethod};
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
}

/// One planning: the config, its method and the opened input models.
pub(super) struct Planner<'a> {
    pub(super) cfg: &'a MergeConfig,
    pub(super) method: &'static dyn MergeMethod,
    pub(super) models: Vec<Model>,
    pub(super) keep_fp8: bool,
}

/// A planning error at `key_path` of the config.
/// The plan takes a tokenizer's files from one model (`base` or a model
/// source) and does not re-index embedding rows yet: the settings that need
/// that are refused at their key and line.
fn check_tokenizer_supported(cfg: &MergeConfig) -> Result<(), PlanError> {
    let Some(t) = &cfg.tokenizer else {
        return Ok(());
    };
    if t.source.value == TokenizerSource::Union {
        return Err(cfg_err(
            cfg,
            &t.source_key,
            Some(t.source.span),
            "union is not supported yet; use base or a model path".into(),
        ));
    }
    if let Some(first) = t.tokens.first() {
        return Err(cfg_err(
            cfg,
            "tokenizer.tokens",
            Some(first.span),
            "`tokenizer.tokens` is not supported yet".into(),
        ));
    }
    if let Some(p) = &t.pad_to_multiple_of {
        return Err(cfg_err(
            cfg,
            "tokenizer.pad_to_multiple_of",
            Some(p.span),
            "`tokenizer.pad_to_multiple_of` is not supported yet".into(),
        ));
    }
    Ok(())
}

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
    check_tokenizer_supported(cfg)?;
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
