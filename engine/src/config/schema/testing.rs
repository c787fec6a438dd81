//! What the schema's tests share: parsing that must work, parsing that must
//! fail at a key and line, and verbatim conformance configs.

use super::{MergeConfig, ModelRef};

pub(super) fn parse(yaml: &str) -> MergeConfig {
    match MergeConfig::parse("t.yaml", yaml) {
        Ok(c) => c,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// Parses `yaml`, expecting an error at `key_path` on `line`; returns the message.
pub(super) fn fails(yaml: &str, key_path: &str, line: usize) -> String {
    let e = match MergeConfig::parse("t.yaml", yaml) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e,
    };
    let shown = e.to_string();
    assert_eq!(e.key_path, key_path, "{shown}");
    assert_eq!(e.span.map(|s| s.line), Some(line), "{shown}");
    let head = if key_path.is_empty() {
        format!("t.yaml (line {line}, ")
    } else {
        format!("t.yaml: {key_path} (line {line}, ")
    };
    assert!(shown.starts_with(&head), "{shown}");
    e.message
}

pub(super) fn mref(path: &str, revision: Option<&str>) -> ModelRef {
    ModelRef::new(path, revision.map(Into::into))
}

// Verbatim copies of /work/shared/conformance/cases/*/config.yaml (tests do
// not read /work/shared at run time).
pub(super) const SLERP_GRADIENT: &str = "slices:
  - sources:
      - model: ./models/llama-ft-a
        layer_range: [0, 6]
      - model: ./models/llama-ft-c
        layer_range: [0, 6]
merge_method: slerp
base_model: ./models/llama-ft-a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
out_dtype: bfloat16
";

pub(super) const TIES: &str = "models:
  - model: ./models/llama-ft-a
    parameters: {weight: 1.0, density: 0.5}
  - model: ./models/llama-ft-b
    parameters: {weight: 0.5, density: 0.7}
  - model: ./models/llama-ft-c
    parameters: {weight: 0.8, density: 0.3}
merge_method: ties
base_model: ./models/llama-base
parameters:
  normalize: true
dtype: float32
out_dtype: bfloat16
";

pub(super) const KARCHER: &str = "models:
  - model: ./models/llama-ft-a
  - model: ./models/llama-ft-b
  - model: ./models/llama-ft-c
merge_method: karcher
parameters:
  max_iter: 10
  tol: 1.0e-5
dtype: float32
out_dtype: bfloat16
";

pub(super) const ERR_LAYER_RANGE: &str = "slices:
  - sources:
      - model: ./models/llama-ft-a
        layer_range: [0, 9]
merge_method: passthrough
dtype: bfloat16
";

pub(super) const ERR_UNKNOWN_METHOD: &str = "models:
  - model: ./models/llama-ft-a
  - model: ./models/llama-ft-b
merge_method: averaging
dtype: float32
";
