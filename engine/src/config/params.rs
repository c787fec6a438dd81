//! Parameter settings (`weight: 0.5`, gradients `[0, 0.5, 1]`, filtered lists
//! `[{filter: mlp, value: 0.3}, {value: 0.7}]`): reading them from YAML and
//! evaluating them for one tensor exactly like mergekit 0.1.5's `evaluate_setting`.

use std::fmt;

use super::{ConfigError, Spanned};
use crate::yaml::{key_text, Node, NodeKind, Span};

/// One YAML scalar as written; mergekit 0.1.5 keeps the raw type and converts
/// it only when the parameter's type is known (at evaluation).
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

/// A parameter setting at one level of the config.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamSetting {
    Scalar(Scalar),
    /// A list of scalars: interpolated along the layers (numbers) or picked
    /// from (booleans).
    Gradient(Vec<Scalar>),
    /// Entries tried in order; the first whose filter matches the tensor wins.
    Conditional(Vec<Conditional>),
}

/// One `{filter, value}` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Conditional {
    /// `None` (or `*`) matches every tensor; otherwise a substring of the tensor name.
    pub filter: Option<String>,
    /// Only `Scalar` or `Gradient` (mergekit does not nest filters).
    pub value: ParamSetting,
    pub span: Span,
}

/// A setting that cannot be evaluated for a tensor: its value does not fit
/// the parameter's type (mergekit keeps YAML's raw types until the type is
/// known). The caller, who knows the file, key and line, reports it there.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SettingError {
    #[error("expected a number, got {0}")]
    NotANumber(Scalar),
    #[error(
        "{0} is not a finite number a 32-bit float can hold (merges compute in f32, |x| <= \
         3.4e38)"
    )]
    NotF32(Scalar),
    #[error("expected true or false, got {0}")]
    NotABool(Scalar),
    #[error("gradient position t={0} is outside [0, 1]")]
    Position(f64),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Bool(b) => write!(f, "the boolean {b}"),
            Scalar::Int(i) => write!(f, "the number {i}"),
            Scalar::Float(x) => write!(f, "the number {x}"),
            Scalar::Str(s) => write!(f, "the string '{s}'"),
        }
    }
}

impl Scalar {
    /// The scalar of a YAML node, or `None` for null and collections.
    pub fn from_node(node: &Node) -> Option<Scalar> {
        match &node.kind {
            NodeKind::Bool(b) => Some(Scalar::Bool(*b)),
            NodeKind::Int(i) => Some(Scalar::Int(*i)),
            NodeKind::Float(x) => Some(Scalar::Float(*x)),
            NodeKind::Str(s) => Some(Scalar::Str(s.clone())),
            NodeKind::Null | NodeKind::Seq(_) | NodeKind::Map(_) => None,
        }
    }

    /// Converts like a pydantic (lax) `float` field: booleans count as 0/1 and
    /// numeric strings such as "1e-3" (a string for PyYAML) are parsed.
    /// Numbers that f32 cannot hold (NaN, infinities, |x| > 3.4e38) are
    /// refused: the merge computes in f32 and would write Inf or NaN.
    pub fn to_number(&self) -> Result<f64, SettingError> {
        let x = match self {
            Scalar::Bool(b) => Ok(if *b { 1.0 } else { 0.0 }),
            Scalar::Int(i) => Ok(*i as f64),
            Scalar::Float(x) => Ok(*x),
            Scalar::Str(s) => s
                .trim()
                .parse::<f64>()
                .map_err(|_| SettingError::NotANumber(self.clone())),
        }?;
        if !x.is_finite() || x.abs() > f64::from(f32::MAX) {
            return Err(SettingError::NotF32(self.clone()));
        }
        Ok(x)
    }

    /// Converts like a pydantic (lax) `bool` field: 0/1 and the usual words.
    pub fn to_bool(&self) -> Result<bool, SettingError> {
        let bad = || SettingError::NotABool(self.clone());
        match self {
            Scalar::Bool(b) => Ok(*b),
            Scalar::Int(0) => Ok(false),
            Scalar::Int(1) => Ok(true),
            Scalar::Float(x) if *x == 0.0 => Ok(false),
            Scalar::Float(x) if *x == 1.0 => Ok(true),
            Scalar::Str(s) => match s.to_ascii_lowercase().as_str() {
                "0" | "off" | "f" | "false" | "n" | "no" => Ok(false),
                "1" | "on" | "t" | "true" | "y" | "yes" => Ok(true),
                _ => Err(bad()),
            },
            Scalar::Int(_) | Scalar::Float(_) => Err(bad()),
        }
    }
}

impl ParamSetting {
    /// Value of a numeric (float) parameter for one tensor, or None when no filter matched.
    pub fn evaluate_number(&self, tensor_name: &str, t: f64) -> Result<Option<f64>, SettingError> {
        match self.select(tensor_name) {
            None => Ok(None),
            Some(ParamSetting::Scalar(s)) => s.to_number().map(Some),
            Some(ParamSetting::Gradient(values)) => interpolate(values, t),
            // `select` never returns a conditional list.
            Some(ParamSetting::Conditional(_)) => Ok(None),
        }
    }

    /// Value of a boolean parameter.
    pub fn evaluate_bool(&self, tensor_name: &str, t: f64) -> Result<Option<bool>, SettingError> {
        match self.select(tensor_name) {
            None => Ok(None),
            Some(ParamSetting::Scalar(s)) => s.to_bool().map(Some),
            Some(ParamSetting::Gradient(values)) => pick(values, t, Scalar::to_bool),
            Some(ParamSetting::Conditional(_)) => Ok(None),
        }
    }

    /// Resolves filters: the setting that applies to `tensor_name`, or None
    /// when no entry matched. Like mergekit, the first matching entry wins
    /// even if its own value later turns out absent (an empty list).
    fn select(&self, tensor_name: &str) -> Option<&ParamSetting> {
        match self {
            ParamSetting::Conditional(entries) => entries
                .iter()
                .find(|c| c.matches(tensor_name))
                .and_then(|c| c.value.select(tensor_name)),
            other => Some(other),
        }
    }

    /// Reads a setting from YAML. The error's `file` is left empty for the
    /// caller (who knows the file name) to fill in.
    pub fn from_node(node: &Node, key_path: &str) -> Result<Spanned<ParamSetting>, ConfigError> {
        let setting = match &node.kind {
            NodeKind::Seq(items) => list_setting(items, key_path)?,
            NodeKind::Map(_) => ParamSetting::Conditional(vec![conditional(node, key_path)?]),
            _ => ParamSetting::Scalar(scalar(node, key_path, SETTING_SHAPES)?),
        };
        Ok(Spanned::new(setting, node.span))
    }
}

impl Conditional {
    /// mergekit: no filter, `*`, or a substring of a (non-empty) tensor name.
    fn matches(&self, tensor_name: &str) -> bool {
        match &self.filter {
            None => true,
            Some(f) => f == "*" || (!tensor_name.is_empty() && tensor_name.contains(f.as_str())),
        }
    }
}

/// Linear interpolation along a gradient, in f64 exactly as mergekit computes it.
fn interpolate(values: &[Scalar], t: f64) -> Result<Option<f64>, SettingError> {
    if values.is_empty() {
        return Ok(None);
    }
    // mergekit validates every element, not just the two it uses.
    let v: Vec<f64> = values
        .iter()
        .map(Scalar::to_number)
        .collect::<Result<_, _>>()?;
    let i0 = position(v.len(), t)?;
    let scaled = t * (v.len() - 1) as f64;
    let i1 = (v.len() - 1).min(i0 + 1);
    let frac = scaled - i0 as f64;
    Ok(Some((1.0 - frac) * v[i0] + frac * v[i1]))
}

/// Discrete selection `v[trunc(t·(L−1))]` for non-numeric gradients.
fn pick<T>(
    values: &[Scalar],
    t: f64,
    convert: impl Fn(&Scalar) -> Result<T, SettingError>,
) -> Result<Option<T>, SettingError> {
    if values.is_empty() {
        return Ok(None);
    }
    let mut v: Vec<T> = values.iter().map(convert).collect::<Result<_, _>>()?;
    let i = position(v.len(), t)?;
    Ok(Some(v.swap_remove(i)))
}

/// `trunc(t·(L−1))`, refusing a `t` outside [0, 1] (which mergekit never
/// produces and which would index outside the list).
fn position(len: usize, t: f64) -> Result<usize, SettingError> {
    if !(0.0..=1.0).contains(&t) {
        return Err(SettingError::Position(t));
    }
    let i = (t * (len - 1) as f64).trunc() as usize;
    Ok(i.min(len - 1))
}

const SETTING_SHAPES: &str =
    "a number, a list of numbers (a gradient) or a list of {filter, value} entries";

fn err(key_path: &str, span: Span, message: String) -> ConfigError {
    ConfigError {
        file: String::new(),
        key_path: key_path.to_string(),
        span: Some(span),
        message,
    }
}

fn scalar(node: &Node, key_path: &str, expected: &str) -> Result<Scalar, ConfigError> {
    Scalar::from_node(node).ok_or_else(|| {
        err(
            key_path,
            node.span,
            format!("expected {expected}, got {}", node.describe()),
        )
    })
}

/// A list is a gradient (all scalars) or a filter list (all mappings); an
/// empty list is an (always absent) gradient.
fn list_setting(items: &[Node], key_path: &str) -> Result<ParamSetting, ConfigError> {
    let is_map = |n: &Node| matches!(n.kind, NodeKind::Map(_));
    match items.first() {
        Some(first) if is_map(first) => {
            let mut entries = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let path = format!("{key_path}[{i}]");
                if !is_map(item) {
                    return Err(mixed_list(&path, item));
                }
                entries.push(conditional(item, &path)?);
            }
            Ok(ParamSetting::Conditional(entries))
        }
        _ => gradient(items, key_path, true).map(ParamSetting::Gradient),
    }
}

fn mixed_list(path: &str, item: &Node) -> ConfigError {
    err(
        path,
        item.span,
        format!(
            "a parameter list must be all numbers (a gradient) or all {{filter, value}} \
             entries, but this entry is {}",
            item.describe()
        ),
    )
}

/// The scalars of a gradient. `top_level` says whether mappings may appear
/// (then the message is about mixing).
fn gradient(items: &[Node], key_path: &str, top_level: bool) -> Result<Vec<Scalar>, ConfigError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let path = format!("{key_path}[{i}]");
            match &item.kind {
                NodeKind::Map(_) if top_level => Err(mixed_list(&path, item)),
                _ => scalar(item, &path, "a number"),
            }
        })
        .collect()
}

/// One `{filter: STR, value: SCALAR_OR_GRADIENT}` mapping.
fn conditional(node: &Node, key_path: &str) -> Result<Conditional, ConfigError> {
    let entries = node.as_map().unwrap_or_default();
    let mut filter = None;
    let mut value = None;
    for (k, v) in entries {
        match k.as_str() {
            Some("filter") => filter = Some(v),
            Some("value") => value = Some(v),
            _ => {
                return Err(err(
                    key_path,
                    k.span,
                    format!(
                        "unknown key '{}' in a filter entry (allowed: filter, value)",
                        key_text(k)
                    ),
                ))
            }
        }
    }
    let filter = match filter {
        None => None,
        Some(f) if f.is_null() => None,
        Some(f) => match f.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                return Err(err(
                    &format!("{key_path}.filter"),
                    f.span,
                    format!(
                        "expected a string (part of a tensor name), got {}",
                        f.describe()
                    ),
                ))
            }
        },
    };
    let Some(value) = value else {
        return Err(err(
            key_path,
            node.span,
            "this filter entry has no `value`".to_string(),
        ));
    };
    let value_path = format!("{key_path}.value");
    let value = match &value.kind {
        NodeKind::Seq(items) => ParamSetting::Gradient(gradient(items, &value_path, false)?),
        _ => ParamSetting::Scalar(scalar(value, &value_path, "a number or a list of numbers")?),
    };
    Ok(Conditional {
        filter,
        value,
        span: node.span,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(yaml: &str) -> ParamSetting {
        let root = Node::parse("t.yaml", &format!("p: {yaml}\n")).unwrap();
        let node = &root.as_map().unwrap()[0].1;
        ParamSetting::from_node(node, "parameters.p").unwrap().value
    }

    fn setting_err(yaml: &str) -> ConfigError {
        let root = Node::parse("t.yaml", &format!("p: {yaml}\n")).unwrap();
        let node = &root.as_map().unwrap()[0].1;
        ParamSetting::from_node(node, "parameters.p").unwrap_err()
    }

    fn num(yaml: &str, tensor: &str, t: f64) -> Option<f64> {
        setting(yaml).evaluate_number(tensor, t).unwrap()
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-12)
    }

    #[test]
    fn scalar_is_returned() {
        assert_eq!(num("0.3", "x", 0.7), Some(0.3));
        assert_eq!(num("2", "x", 0.0), Some(2.0));
    }

    #[test]
    fn gradient_interpolates() {
        let g = "[0, 0.5, 0.3, 0.7, 1]";
        // s = 0.6·4 = 2.4: 0.6·0.3 + 0.4·0.7 = 0.46
        assert!(close(num(g, "x", 0.6), 0.46));
        assert_eq!(num(g, "x", 0.0), Some(0.0));
        assert_eq!(num(g, "x", 1.0), Some(1.0));
        // s = 0.5·4 = 2 exactly: v[2]
        assert_eq!(num(g, "x", 0.5), Some(0.3));
        assert_eq!(num("[0.25]", "x", 0.8), Some(0.25));
        // two elements at t = 0.25: 0.75·1 + 0.25·3 = 1.5
        assert_eq!(num("[1, 3]", "x", 0.25), Some(1.5));
        // bit-for-bit the same formula as Python
        let s = 0.6 * 4.0;
        let f = s - 2.0;
        assert_eq!(num(g, "x", 0.6), Some((1.0 - f) * 0.3 + f * 0.7));
        assert_eq!(num("[]", "x", 0.5), None);
    }

    #[test]
    fn gradient_position_outside_unit_interval_is_an_error() {
        assert_eq!(
            setting("[0, 1]").evaluate_number("x", 1.5),
            Err(SettingError::Position(1.5))
        );
        assert!(setting("[0, 1]").evaluate_number("x", f64::NAN).is_err());
    }

    #[test]
    fn boolean_gradient_selects_discretely() {
        let g = setting("[true, false, true]");
        // trunc(t·2): 0→0, 0.49→0, 0.5→1, 0.99→1, 1→2
        let at = |t| g.evaluate_bool("x", t).unwrap();
        assert_eq!(at(0.0), Some(true));
        assert_eq!(at(0.49), Some(true));
        assert_eq!(at(0.5), Some(false));
        assert_eq!(at(0.99), Some(false));
        assert_eq!(at(1.0), Some(true));
    }

    #[test]
    fn conditional_first_match_wins_and_falls_through() {
        let c = "[{filter: q_proj, value: 0.5}, {value: 0}]";
        assert_eq!(
            num(c, "model.layers.0.self_attn.q_proj.weight", 0.3),
            Some(0.5)
        );
        assert_eq!(num(c, "model.layers.0.mlp.up_proj.weight", 0.3), Some(0.0));
        let no_default = "[{filter: q_proj, value: 0.5}, {filter: k_proj, value: 0.2}]";
        assert_eq!(
            num(no_default, "model.layers.0.mlp.up_proj.weight", 0.3),
            None
        );
        assert_eq!(
            num(no_default, "model.layers.0.self_attn.k_proj.weight", 0.3),
            Some(0.2)
        );
        // order matters: the catch-all first shadows the filter
        assert_eq!(
            num("[{value: 1}, {filter: mlp, value: 2}]", "mlp", 0.0),
            Some(1.0)
        );
        assert_eq!(num("[{filter: '*', value: 3}]", "anything", 0.0), Some(3.0));
        // an empty tensor name matches only filter-less entries (mergekit's `tensor_name and ...`)
        assert_eq!(num("[{filter: '', value: 3}]", "", 0.0), None);
        // a matching entry whose value is absent stops the walk (no fallthrough)
        assert_eq!(
            num("[{filter: mlp, value: []}, {value: 1}]", "mlp", 0.0),
            None
        );
    }

    #[test]
    fn conditional_with_gradient_value() {
        let c = "[{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {value: 0.5}]";
        assert!(close(
            num(c, "model.layers.3.self_attn.o_proj.weight", 0.6),
            0.46
        ));
        assert_eq!(
            num(c, "model.layers.3.mlp.down_proj.weight", 0.6),
            Some(0.5)
        );
    }

    #[test]
    fn bare_conditional_mapping_is_a_one_element_list() {
        let s = setting("{filter: mlp, value: 2}");
        assert!(matches!(&s, ParamSetting::Conditional(v) if v.len() == 1));
        assert_eq!(
            s.evaluate_number("model.layers.1.mlp.up_proj.weight", 0.0),
            Ok(Some(2.0))
        );
        assert_eq!(
            s.evaluate_number("model.layers.1.self_attn.q_proj.weight", 0.0),
            Ok(None)
        );
    }

    #[test]
    fn numbers_f32_cannot_hold_are_refused() {
        for s in [
            Scalar::Float(f64::INFINITY),
            Scalar::Float(f64::NAN),
            Scalar::Float(-1e39),
            Scalar::Float(3.5e38),
            Scalar::Str("nan".into()),
            Scalar::Str("-inf".into()),
            Scalar::Str("1e300".into()),
        ] {
            let e = s.to_number().unwrap_err();
            assert!(matches!(e, SettingError::NotF32(_)), "{e:?}");
            assert!(e.to_string().contains("32-bit float"), "{e}");
        }
        assert_eq!(Scalar::Float(3.4e38).to_number(), Ok(3.4e38));
        assert_eq!(Scalar::Int(i64::MAX).to_number(), Ok(i64::MAX as f64));
        // a gradient with one such element is refused too
        let g = ParamSetting::Gradient(vec![Scalar::Int(0), Scalar::Float(1e39)]);
        assert!(g.evaluate_number("x", 0.0).is_err());
    }

    #[test]
    fn number_coercions() {
        assert_eq!(num("true", "x", 0.0), Some(1.0));
        assert_eq!(num("false", "x", 0.0), Some(0.0));
        assert_eq!(num("1e-3", "x", 0.0), Some(0.001));
        assert_eq!(num("'0.25'", "x", 0.0), Some(0.25));
        assert_eq!(num("[1e-3, 3e-3]", "x", 0.5), Some(0.002));
        let e = setting("abc").evaluate_number("x", 0.0).unwrap_err();
        assert_eq!(e.to_string(), "expected a number, got the string 'abc'");
        // every element is validated, even one the position does not use
        assert!(setting("[0, 1, abc]").evaluate_number("x", 0.0).is_err());
    }

    #[test]
    fn bool_coercions() {
        let b = |y: &str| setting(y).evaluate_bool("x", 0.0);
        assert_eq!(b("true"), Ok(Some(true)));
        assert_eq!(b("no"), Ok(Some(false)));
        assert_eq!(b("1"), Ok(Some(true)));
        assert_eq!(b("0.0"), Ok(Some(false)));
        assert_eq!(b("'Yes'"), Ok(Some(true)));
        assert_eq!(b("'OFF'"), Ok(Some(false)));
        assert_eq!(b("'0'"), Ok(Some(false)));
        let refused = |y: &str| b(y).unwrap_err().to_string();
        assert_eq!(refused("2"), "expected true or false, got the number 2");
        assert_eq!(refused("0.5"), "expected true or false, got the number 0.5");
        assert_eq!(
            refused("maybe"),
            "expected true or false, got the string 'maybe'"
        );
        assert_eq!(
            b("maybe"),
            Err(SettingError::NotABool(Scalar::Str("maybe".into())))
        );
    }

    #[test]
    fn parse_shapes() {
        assert_eq!(setting("0.5"), ParamSetting::Scalar(Scalar::Float(0.5)));
        assert_eq!(
            setting("[1, x]"),
            ParamSetting::Gradient(vec![Scalar::Int(1), Scalar::Str("x".into())])
        );
        match setting("[{filter: mlp, value: [0, 1]}, {value: 2}]") {
            ParamSetting::Conditional(v) => {
                assert_eq!(v[0].filter.as_deref(), Some("mlp"));
                assert_eq!(
                    v[0].value,
                    ParamSetting::Gradient(vec![Scalar::Int(0), Scalar::Int(1)])
                );
                assert_eq!(v[1].filter, None);
                assert_eq!(v[1].span.line, 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parse_errors() {
        let e = setting_err("[0.5, {value: 1}]");
        assert_eq!(e.key_path, "parameters.p[1]");
        assert!(e.message.contains("all numbers"), "{e}");
        let e = setting_err("[{value: 1}, 0.5]");
        assert_eq!(e.key_path, "parameters.p[1]");
        let e = setting_err("");
        assert!(e.message.contains("got nothing (null)"), "{e}");
        let e = setting_err("[[1, 2]]");
        assert_eq!(e.key_path, "parameters.p[0]");
        let e = setting_err("{filter: mlp}");
        assert!(e.message.contains("no `value`"), "{e}");
        let e = setting_err("{filter: mlp, value: 1, weight: 2}");
        assert!(e.message.contains("unknown key 'weight'"), "{e}");
        let e = setting_err("{filter: 3, value: 1}");
        assert_eq!(e.key_path, "parameters.p.filter");
        let e = setting_err("[{filter: mlp, value: [{value: 1}]}]");
        assert_eq!(e.key_path, "parameters.p[0].value[0]");
        let e = setting_err("[{value: {filter: x, value: 1}}]");
        assert_eq!(e.key_path, "parameters.p[0].value");
        assert_eq!(e.span.map(|s| s.line), Some(1));
    }
}
