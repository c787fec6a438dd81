//! Output shard file names and `model.safetensors.index.json`, as mergekit's
//! tensor writer names and writes them.

use super::model_config::pretty_ascii_json;
use serde_json::{Map, Value};

/// The index's file name: written last, it marks a sharded model complete.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// `model.safetensors.index.json` (only written with two or more shards): 2-space
/// indentation, no trailing newline, `weight_map` in the given (write) order.
pub fn index_json(total_size: u64, weight_map: &[(String, String)]) -> String {
    let mut metadata = Map::new();
    metadata.insert("total_size".into(), Value::from(total_size));
    metadata.insert(
        "fleetmerge_version".into(),
        Value::from(env!("CARGO_PKG_VERSION")),
    );
    let map: Map<String, Value> = weight_map
        .iter()
        .map(|(tensor, file)| (tensor.clone(), Value::from(file.as_str())))
        .collect();
    let mut top = Map::new();
    top.insert("metadata".into(), Value::Object(metadata));
    top.insert("weight_map".into(), Value::Object(map));
    pretty_ascii_json(&Value::Object(top))
}

/// Final shard names: one shard is `model.safetensors`; several are
/// `model-00001-of-0000N.safetensors`.
pub fn shard_file_names(count: usize) -> Vec<String> {
    match count {
        0 => Vec::new(),
        1 => vec!["model.safetensors".to_string()],
        n => (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(shard_file_names(0).is_empty());
        assert_eq!(shard_file_names(1), vec!["model.safetensors"]);
        assert_eq!(
            shard_file_names(2),
            vec![
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        assert_eq!(
            shard_file_names(123456)[123455],
            "model-123456-of-123456.safetensors"
        );
    }

    #[test]
    fn index_text() {
        let map = vec![
            (
                "z.weight".to_string(),
                "model-00001-of-00002.safetensors".to_string(),
            ),
            (
                "a.weight".to_string(),
                "model-00002-of-00002.safetensors".to_string(),
            ),
        ];
        let expected = format!(
            "{{\n  \"metadata\": {{\n    \"total_size\": 1234,\n    \"fleetmerge_version\": \"{}\"\n  }},\n  \"weight_map\": {{\n    \"z.weight\": \"model-00001-of-00002.safetensors\",\n    \"a.weight\": \"model-00002-of-00002.safetensors\"\n  }}\n}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(index_json(1234, &map), expected);
    }

    #[test]
    fn non_ascii_is_escaped_like_python() {
        let map = vec![("é😀".to_string(), "m.safetensors".to_string())];
        assert!(index_json(0, &map).contains(r#""\u00e9\ud83d\ude00": "m.safetensors""#));
    }
}
