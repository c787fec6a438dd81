//! Output slices: `models:` as one slice (the base model appended when it is
//! not listed, as mergekit does) or each entry of `slices:`, with the layer
//! ranges checked against the models; and the merge method's input contract
//! (base model, number of inputs) checked for each slice.

use super::build::{cfg_err, Planner};
use super::PlanError;
use crate::config::{ModelInputs, Params};
use crate::methods::BasePolicy;
use crate::yaml::Span;

/// One input of an output slice after normalisation.
pub(super) struct Source<'a> {
    pub(super) model: usize,
    pub(super) range: (u64, u64),
    pub(super) params: Option<&'a Params>,
    pub(super) key_path: String,
    pub(super) span: Span,
}

/// An output slice after normalisation.
pub(super) struct Slice<'a> {
    pub(super) sources: Vec<Source<'a>>,
    pub(super) params: Option<&'a Params>,
    /// The configured base model (index into the model list), if any.
    pub(super) base: Option<usize>,
    pub(super) key_path: String,
    pub(super) span: Span,
}

impl<'a> Planner<'a> {
    /// Turns `models:` into one slice (base appended when not listed) and checks
    /// every layer range.
    pub(super) fn normalize(&self) -> Result<Vec<Slice<'a>>, PlanError> {
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
    pub(super) fn method_base(&self, s: &Slice) -> Option<usize> {
        if self.method.spec().base == BasePolicy::Ignored {
            return None;
        }
        s.base
            .and_then(|b| s.sources.iter().position(|src| src.model == b))
    }

    pub(super) fn check_contract(&self, s: &Slice) -> Result<(), PlanError> {
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
}
