//! What the output needs besides tensors ([`OutputMeta`]): the model whose
//! config.json is copied (the base model, else the first), the tokenizer's
//! folder, the dtype and layer count written into config.json, and the text of
//! the model card.

use super::build::{PlanOptions, Planner};
use super::models::locate;
use super::slices::Slice;
use super::{OutputMeta, PlanError};
use crate::config::{ModelInputs, ModelRef, TokenizerSource};
use crate::yaml::Span;

impl Planner<'_> {
    /// The output's side files and card, for `slices`.
    pub(super) fn output_meta(
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
        let tokenizer_dir = match cfg
            .tokenizer
            .as_ref()
            .map(|t| (&t.source.value, t.source.span))
        {
            // Without a base_model, the first model is the base of the
            // vocabulary, as in mergekit's build_tokenizer.
            Some((TokenizerSource::Base, _)) => self.models[config_donor].location.clone(),
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
        let (tokenizer_files, vocab_size) = match &self.vocab {
            Some(v) => {
                let template = cfg
                    .chat_template
                    .as_ref()
                    .map(|t| crate::output::resolve_chat_template(&t.value))
                    .transpose()
                    .map_err(|e| PlanError::Inputs(format!("chat_template: {e}")))?;
                let files = v
                    .output_files(template.as_deref())
                    .map_err(super::build::tokenizer_err)?;
                (files, Some(v.rows()))
            }
            None => (Vec::new(), None),
        };
        let spec = self.method.spec();
        Ok(OutputMeta {
            tokenizer_files,
            vocab_size,
            config_dir: self.models[config_donor].location.clone(),
            tokenizer_dir,
            // FP8 checkpoints keep a float torch_dtype (the compute dtype) next
            // to their quantization_config; re-packed MXFP4 ones keep the
            // donor's (their other tensors keep their type).
            config_dtype: cfg
                .out_dtype
                .as_ref()
                .filter(|d| !d.value.is_fp8())
                .or(cfg.dtype.as_ref().filter(|_| cfg.out_packed.is_none()))
                .map(|d| d.value),
            layers,
            dequantized: false,
            chat_template: cfg.chat_template.as_ref().map(|c| c.value.clone()),
            config_yaml: cfg.source.clone(),
            generated: None,
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
