//! Parameter resolution for one output tensor, with mergekit's precedence
//! (source > slice > global; the first level whose setting yields a value wins,
//! a filter list that matches nothing falls through) and its scopes (shared
//! parameters are looked up without a model against the output tensor name;
//! per-model ones against that model's input tensor name).

use crate::config::{ConfigError, Params};
use crate::methods::{ParamDefault, ParamKind, ParamSpec};
use crate::unit::ParamValue;
use crate::yaml::Span;

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
                .map_err(err)?
                .map(ParamValue::Bool),
            ParamKind::Number { min, max } => {
                match setting.evaluate_number(tensor, t).map_err(err)? {
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
