//! The output `config.json`: the donor's config with exactly the dtype and the
//! layer count patched, in the donor's key order.

use crate::dtype::DType;
use serde_json::{Map, Value};

/// Copies the donor's config and patches the dtype (`torch_dtype` and/or `dtype`,
/// whichever the donor has; `torch_dtype` if neither) and, for slices configs,
/// the layer-count key (a dotted key such as `text_config.num_hidden_layers`
/// patches the nested object).
pub fn output_config(
    donor: &Map<String, Value>,
    out_dtype: Option<DType>,
    layers: Option<(&str, u64)>,
) -> Map<String, Value> {
    let mut config = donor.clone();
    if let Some(dtype) = out_dtype {
        let name = Value::from(dtype.torch_name());
        // transformers v4 writes torch_dtype, v5 writes dtype; a reader looks at
        // whichever its version knows, so every one present must agree.
        let mut patched = false;
        for key in ["torch_dtype", "dtype"] {
            if let Some(v) = config.get_mut(key) {
                *v = name.clone();
                patched = true;
            }
        }
        if !patched {
            config.insert("torch_dtype".into(), name);
        }
    }
    if let Some((key, n)) = layers {
        set_dotted(&mut config, key, Value::from(n));
    }
    config
}

/// Sets `a.b.c`, creating missing intermediate objects (mergekit errors there,
/// but the caller found the key in this very config, so they exist).
fn set_dotted(config: &mut Map<String, Value>, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            config.insert(key.to_string(), value);
        }
        Some((head, rest)) => {
            let child = config
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !child.is_object() {
                *child = Value::Object(Map::new());
            }
            if let Value::Object(inner) = child {
                set_dotted(inner, rest, value);
            }
        }
    }
}

/// A JSON file as transformers writes it: 2-space indentation, non-ASCII escaped
/// (Python's `ensure_ascii`), and a trailing newline.
pub fn to_pretty_json(map: &Map<String, Value>) -> String {
    let mut text = pretty_ascii_json(&Value::Object(map.clone()));
    text.push('\n');
    text
}

/// 2-space indented JSON with non-ASCII characters escaped as `\uXXXX`, as
/// Python's `json.dumps(indent=2)` writes it. Non-ASCII can only occur inside
/// strings, so escaping every such character in the output is safe.
pub(crate) fn pretty_ascii_json(value: &Value) -> String {
    // Serializing a Value cannot fail.
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    if text.is_ascii() {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut units = [0u16; 2];
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn patches_only_dtype_and_keeps_order() {
        let donor =
            map(json!({"z": 1, "torch_dtype": "float32", "a": [1, 2], "num_hidden_layers": 6}));
        let out = output_config(&donor, Some(DType::BF16), None);
        let keys: Vec<&str> = out.keys().map(String::as_str).collect();
        assert_eq!(keys, ["z", "torch_dtype", "a", "num_hidden_layers"]);
        assert_eq!(out["torch_dtype"], "bfloat16");
        assert_eq!(out["num_hidden_layers"], 6);
        assert!(!out.contains_key("dtype"));
    }

    #[test]
    fn v5_dtype_key_and_both_keys() {
        let v5 = map(json!({"dtype": "float32"}));
        let out = output_config(&v5, Some(DType::F16), None);
        assert_eq!(Value::Object(out), json!({"dtype": "float16"}));
        let both = map(json!({"dtype": "float32", "torch_dtype": "float32"}));
        let out = output_config(&both, Some(DType::BF16), None);
        assert_eq!(
            Value::Object(out),
            json!({"dtype": "bfloat16", "torch_dtype": "bfloat16"})
        );
    }

    #[test]
    fn adds_torch_dtype_when_absent_and_leaves_it_without_out_dtype() {
        let none = map(json!({"a": 1}));
        let out = output_config(&none, Some(DType::F32), None);
        assert_eq!(
            Value::Object(out),
            json!({"a": 1, "torch_dtype": "float32"})
        );
        let out = output_config(&none, None, None);
        assert_eq!(Value::Object(out), json!({"a": 1}));
    }

    #[test]
    fn patches_layer_count_including_nested() {
        let donor =
            map(json!({"num_hidden_layers": 6, "text_config": {"num_hidden_layers": 6, "x": 1}}));
        let out = output_config(&donor, None, Some(("num_hidden_layers", 11)));
        assert_eq!(out["num_hidden_layers"], 11);
        let out = output_config(&donor, None, Some(("text_config.num_hidden_layers", 3)));
        assert_eq!(out["num_hidden_layers"], 6);
        assert_eq!(out["text_config"], json!({"num_hidden_layers": 3, "x": 1}));
    }

    #[test]
    fn pretty_json_format() {
        let m = map(json!({"b": {"c": [1, "é"]}, "a": null}));
        assert_eq!(
            to_pretty_json(&m),
            "{\n  \"b\": {\n    \"c\": [\n      1,\n      \"\\u00e9\"\n    ]\n  },\n  \"a\": null\n}\n"
        );
    }
}
