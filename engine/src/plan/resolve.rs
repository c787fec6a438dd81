//! Parameters: the names in the YAML checked against the method's, and the
//! resolution of every parameter of one output tensor with mergekit's
//! precedence (source > slice > global; the first level whose setting yields a
//! value wins, a filter list that matches nothing falls through) and its
//! scopes (shared parameters are looked up without a model against the output
//! tensor name; per-model ones against that model's input tensor name), then
//! the method's own checks of the values.

use super::build::{cfg_err, Planner};
use super::slices::Slice;
use super::PlanError;
use crate::config::{ConfigError, MergeConfig, ModelInputs, Params};
use crate::methods::{MergeMethod, ParamDefault, ParamKind, ParamSpec, Scope};
use crate::unit::{ParamValue, TensorParams};
use crate::yaml::Span;
use std::collections::BTreeMap;

/// Every parameter named in the YAML must belong to the method, and shared
/// parameters must not sit under a model (mergekit silently ignores both).
pub(super) fn check_parameter_names(
    cfg: &MergeConfig,
    method: &dyn MergeMethod,
) -> Result<(), PlanError> {
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

/// The value of one parameter and the YAML setting it came from (none for a default).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Resolved {
    pub value: Option<ParamValue>,
    pub origin: Option<(String, Span)>,
}

/// Resolves `spec` for a tensor named `tensor` at gradient position `t` through
/// `levels` (highest precedence first). `who` describes the model for messages.
pub(crate) fn resolve(
    file: &str,
    spec: &ParamSpec,
    levels: &[&Params],
    tensor: &str,
    t: f64,
    who: &str,
    missing_at: (&str, Span),
) -> Result<Resolved, ConfigError> {
    for level in levels {
        let Some(setting) = level.get(spec.name) else {
            continue;
        };
        let key_path = format!("{}.{}", level.key_path, spec.name);
        let err = |message: String| ConfigError {
            file: file.to_string(),
            key_path: key_path.clone(),
            span: Some(setting.span),
            message,
        };
        let value = match spec.kind {
            ParamKind::Bool => setting
                .evaluate_bool(tensor, t)
                .map_err(|e| err(e.to_string()))?
                .map(ParamValue::Bool),
            ParamKind::Number { min, max } => {
                match setting
                    .evaluate_number(tensor, t)
                    .map_err(|e| err(e.to_string()))?
                {
                    None => None,
                    Some(v) if !v.is_finite() => {
                        return Err(err(format!(
                            "{} must be a finite number, got {v}",
                            spec.name
                        )))
                    }
                    Some(v) if v < min || v > max => {
                        return Err(err(format!(
                            "{} must be between {min} and {max}, got {v}{}",
                            spec.name,
                            if tensor.is_empty() {
                                String::new()
                            } else {
                                format!(" (for {tensor})")
                            }
                        )))
                    }
                    Some(v) => Some(ParamValue::Number(v)),
                }
            }
        };
        if let Some(v) = value {
            return Ok(Resolved {
                value: Some(v),
                origin: Some((key_path, setting.span)),
            });
        }
    }
    match spec.default {
        ParamDefault::Value(v) => Ok(Resolved {
            value: Some(v),
            origin: None,
        }),
        ParamDefault::Absent => Ok(Resolved {
            value: None,
            origin: None,
        }),
        ParamDefault::Required => Err(ConfigError {
            file: file.to_string(),
            key_path: missing_at.0.to_string(),
            span: Some(missing_at.1),
            message: format!(
                "missing required parameter `{}` for {who} (tensor {tensor}); set it under \
                 that model's `parameters` or in the top-level `parameters`",
                spec.name
            ),
        }),
    }
}

impl Planner<'_> {
    /// Resolves every parameter of the method for one tensor and runs the
    /// method's own checks on the result.
    pub(super) fn params(
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
}
