//! Planner tests on the example models: parameter resolution (precedence,
//! gradients, filters, pre/post weights at t = 0, per-slice t), layer
//! renumbering, tied heads, sharding, and the errors raised before any work.

use super::*;
use crate::config::MergeConfig;
use crate::unit::OutputTensor;
use std::path::PathBuf;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn plan_yaml(yaml: &str) -> Result<Plan, PlanError> {
    let cfg = MergeConfig::parse("test.yaml", yaml).map_err(PlanError::Config)?;
    plan(
        &cfg,
        &PlanOptions {
            unit_size: None,
            out_shard_size: DEFAULT_SHARD_SIZE,
            seed: 0,
            allow_crimes: false,
            keep_fp8: false,
            base_dir: examples(),
        },
    )
}

fn tensor<'a>(p: &'a Plan, name: &str) -> &'a OutputTensor {
    p.units
        .iter()
        .flat_map(|u| &u.tensors)
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no output tensor {name}"))
}

fn shared(p: &Plan, name: &str, param: &str) -> f64 {
    tensor(p, name).params.shared_f64(param).unwrap()
}

fn per(p: &Plan, name: &str, input: usize, param: &str) -> f64 {
    tensor(p, name).params.input_f64(input, param).unwrap()
}

const SLERP_GRADIENT: &str = "
slices:
  - sources:
      - model: models/llama-ft-a
        layer_range: [0, 6]
      - model: models/llama-ft-c
        layer_range: [0, 6]
merge_method: slerp
base_model: models/llama-ft-a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
";

#[test]
fn gradients_interpolate_across_layers() {
    let p = plan_yaml(SLERP_GRADIENT).unwrap();
    // Layer k of 6: t = k/5; s = t*4. Layer 3: s = 2.4 → 0.6*0.3 + 0.4*0.7 = 0.46.
    let at = |l: u32, suffix: &str| shared(&p, &format!("model.layers.{l}.{suffix}"), "t");
    assert!((at(3, "self_attn.q_proj.weight") - 0.46).abs() < 1e-12);
    // Layer 1: s = 0.8 → 0.2*0 + 0.8*0.5 = 0.4.
    assert!((at(1, "self_attn.k_proj.weight") - 0.4).abs() < 1e-12);
    assert_eq!(at(0, "self_attn.q_proj.weight"), 0.0);
    assert_eq!(at(5, "self_attn.q_proj.weight"), 1.0);
    // mlp gradient at layer 3: 0.6*0.7 + 0.4*0.3 = 0.54.
    assert!((at(3, "mlp.up_proj.weight") - 0.54).abs() < 1e-12);
    // Neither filter: the catch-all.
    assert_eq!(at(2, "input_layernorm.weight"), 0.5);
    // Embeddings and the head take position t = 0 (mergekit's pre/post rule).
    assert_eq!(shared(&p, "model.embed_tokens.weight", "t"), 0.5);
    assert_eq!(shared(&p, "lm_head.weight", "t"), 0.5);
}

#[test]
fn precedence_source_over_slice_over_global() {
    let yaml = "
slices:
  - sources:
      - model: models/llama-ft-a
        layer_range: [0, 3]
        parameters: {weight: 0.9}
      - model: models/llama-ft-b
        layer_range: [0, 3]
    parameters: {weight: 0.4}
  - sources:
      - model: models/llama-ft-a
        layer_range: [3, 6]
      - model: models/llama-ft-b
        layer_range: [3, 6]
merge_method: linear
parameters:
  weight: 0.1
  normalize: false
";
    let p = plan_yaml(yaml).unwrap();
    let l = "model.layers.1.mlp.up_proj.weight";
    assert_eq!(per(&p, l, 0, "weight"), 0.9); // source level
    assert_eq!(per(&p, l, 1, "weight"), 0.4); // slice level
    let l = "model.layers.4.mlp.up_proj.weight";
    assert_eq!(per(&p, l, 0, "weight"), 0.1); // global
    assert_eq!(tensor(&p, l).params.shared_bool("normalize"), Some(false));
}

#[test]
fn filters_fall_through_to_lower_levels() {
    let yaml = "
models:
  - model: models/llama-ft-a
    parameters:
      weight:
        - filter: mlp
          value: 2
  - model: models/llama-ft-b
    parameters: {weight: 1}
merge_method: linear
parameters:
  weight: 0.25
";
    let p = plan_yaml(yaml).unwrap();
    assert_eq!(
        per(&p, "model.layers.0.mlp.down_proj.weight", 0, "weight"),
        2.0
    );
    // No filter matched at the model level: the global value applies.
    assert_eq!(
        per(&p, "model.layers.0.self_attn.o_proj.weight", 0, "weight"),
        0.25
    );
}

#[test]
fn gradient_restarts_in_every_slice_and_single_layer_slices_use_t_1() {
    let yaml = "
slices:
  - sources:
      - {model: models/llama-ft-a, layer_range: [0, 3]}
      - {model: models/llama-ft-b, layer_range: [0, 3]}
  - sources:
      - {model: models/llama-ft-a, layer_range: [3, 4]}
      - {model: models/llama-ft-b, layer_range: [3, 4]}
merge_method: slerp
base_model: models/llama-ft-a
parameters:
  t: [0, 1]
";
    let p = plan_yaml(yaml).unwrap();
    let t = |l: u32| shared(&p, &format!("model.layers.{l}.mlp.up_proj.weight"), "t");
    assert_eq!((t(0), t(1), t(2)), (0.0, 0.5, 1.0));
    assert_eq!(t(3), 1.0);
}

#[test]
fn slices_renumber_layers_and_take_pre_and_post_from_the_ends() {
    let yaml = "
slices:
  - sources:
      - {model: models/llama-ft-a, layer_range: [0, 4]}
  - sources:
      - {model: models/llama-ft-b, layer_range: [2, 6]}
merge_method: passthrough
";
    let p = plan_yaml(yaml).unwrap();
    let t = tensor(&p, "model.layers.5.self_attn.q_proj.weight");
    assert_eq!(t.inputs[0].name, "model.layers.3.self_attn.q_proj.weight");
    assert!(t.inputs[0].location.contains("llama-ft-b"));
    assert!(tensor(&p, "model.embed_tokens.weight").inputs[0]
        .location
        .contains("llama-ft-a"));
    assert!(tensor(&p, "lm_head.weight").inputs[0]
        .location
        .contains("llama-ft-b"));
    assert_eq!(p.output.layers, Some(("num_hidden_layers".to_string(), 8)));
    assert_eq!(p.tensor_count(), 1 + 8 * 9 + 2);
}

#[test]
fn base_model_outside_models_is_appended_and_is_the_base() {
    let yaml = "
models:
  - model: models/llama-ft-a
    parameters: {weight: 1, density: 0.5}
merge_method: ties
base_model: models/llama-base
";
    let p = plan_yaml(yaml).unwrap();
    let t = tensor(&p, "model.norm.weight");
    assert_eq!(t.inputs.len(), 2);
    assert_eq!(t.base, Some(1));
    // Per-model parameters are not resolved for the base (mergekit's non_base scope).
    assert!(t.params.per_input[1].is_empty());
    assert_eq!(per(&p, "model.norm.weight", 0, "density"), 0.5);
    assert_eq!(shared(&p, "model.norm.weight", "lambda"), 1.0);
    assert!(p.output.config_dir.ends_with("llama-base"));
}

#[test]
fn tokenizer_source_base_without_a_base_model_takes_the_first_model() {
    for (first, second) in [("tok-chatml", "tok-base"), ("tok-base", "tok-chatml")] {
        let yaml = format!(
            "
models:
  - model: models/{first}
    parameters: {{weight: 1}}
  - model: models/{second}
    parameters: {{weight: 1}}
merge_method: linear
tokenizer_source: base
"
        );
        let p = plan_yaml(&yaml).unwrap();
        assert!(
            p.output.tokenizer_dir.ends_with(first),
            "{}",
            p.output.tokenizer_dir
        );
    }
    // As in mergekit, the vocabulary starts from the base's tokenizer: a base
    // without one is an error naming the file.
    let yaml = "
models:
  - model: models/llama-ft-b
    parameters: {weight: 1}
  - model: models/llama-ft-a
    parameters: {weight: 1}
merge_method: linear
tokenizer_source: base
";
    let err = plan_yaml(yaml).unwrap_err().to_string();
    assert!(err.contains("llama-ft-b/tokenizer.json"), "{err}");
}

#[test]
fn a_tokenizer_setting_aligns_the_vocabulary_tensors() {
    let yaml = |tok: &str| {
        format!(
            "
models:
  - model: models/tok-base
    parameters: {{weight: 1}}
  - model: models/tok-chatml
    parameters: {{weight: 1}}
merge_method: linear
base_model: models/tok-base
{tok}"
        )
    };
    // Without one, the row counts 64 and 66 are an error about the vocabularies.
    let err = plan_yaml(&yaml("")).unwrap_err().to_string();
    assert!(err.contains("vocabularies differ"), "{err}");
    let p = plan_yaml(&yaml("tokenizer_source: union\n")).unwrap();
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let t = tensor(&p, name);
        let a = t
            .vocab
            .as_ref()
            .unwrap_or_else(|| panic!("{name} has no alignment"));
        assert_eq!(t.shape, vec![a.rows, 64], "{name}");
        assert_eq!(
            a.rows, 66,
            "{name}: the base's 64 tokens and the 2 chat tokens"
        );
        assert_eq!(a.runs.len(), 2);
    }
    assert!(tensor(&p, "model.norm.weight").vocab.is_none());
    assert_eq!(p.output.vocab_size, Some(66));
    let names: Vec<&str> = p
        .output
        .tokenizer_files
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(names.contains(&"tokenizer.json"), "{names:?}");
    // Padded to a multiple of 32: the rows grow, the tokens do not.
    let p = plan_yaml(&yaml(
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 32\n",
    ))
    .unwrap();
    let a = tensor(&p, "model.embed_tokens.weight")
        .vocab
        .clone()
        .unwrap();
    assert_eq!((a.tokens, a.rows), (66, 96));
    assert_eq!(p.output.vocab_size, Some(96));
    // An override naming a model outside the merge: its key and line.
    let err = plan_yaml(&yaml(
        "tokenizer:\n  tokens:\n    x: {source: models/llama-base}\n",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tokenizer.tokens.x.source") && err.contains("not one of the models"),
        "{err}"
    );
}

#[test]
fn linear_needs_a_weight_for_an_appended_base() {
    // mergekit 0.1.5: `weight` is resolved for every input of linear, base included.
    let yaml = "
models:
  - model: models/llama-ft-a
    parameters: {weight: 1}
merge_method: linear
base_model: models/llama-base
";
    let err = plan_yaml(yaml).unwrap_err().to_string();
    assert!(
        err.contains("missing required parameter `weight`") && err.contains("base_model"),
        "{err}"
    );
}

#[test]
fn errors_name_the_key_and_line() {
    let unknown = "models:\n  - model: models/llama-ft-a\n    parameters: {weight: 1}\nmerge_method: averaging\n";
    let err = plan_yaml(unknown).unwrap_err().to_string();
    assert!(
        err.contains("merge_method") && err.contains("line 4"),
        "{err}"
    );

    let no_base =
        "models:\n  - model: models/llama-ft-a\n    parameters: {weight: 1}\nmerge_method: ties\n";
    let err = plan_yaml(no_base).unwrap_err().to_string();
    assert!(err.contains("base_model"), "{err}");

    let range = "slices:\n  - sources:\n      - model: models/llama-ft-a\n        layer_range: [0, 9]\nmerge_method: passthrough\n";
    let err = plan_yaml(range).unwrap_err().to_string();
    assert!(
        err.contains("layer_range") && err.contains("line 4") && err.contains("6 layers"),
        "{err}"
    );

    let missing =
        "models:\n  - model: models/nope\n    parameters: {weight: 1}\nmerge_method: linear\n";
    let err = plan_yaml(missing).unwrap_err().to_string();
    assert!(
        err.contains("models/nope") && err.contains("line 2"),
        "{err}"
    );

    let foreign = "models:\n  - model: models/llama-ft-a\n    parameters: {weight: 1, density: 0.5}\nmerge_method: linear\n";
    let err = plan_yaml(foreign).unwrap_err().to_string();
    assert!(
        err.contains("`density` is not a parameter of linear"),
        "{err}"
    );

    let shared_under_model =
        "models:\n  - model: models/llama-ft-a\n    parameters: {weight: 1, normalize: true}\nmerge_method: linear\n";
    let err = plan_yaml(shared_under_model).unwrap_err().to_string();
    assert!(err.contains("shared parameter"), "{err}");

    let zero_sum = "models:\n  - model: models/llama-ft-a\n    parameters: {weight: 1}\n  - model: models/llama-ft-b\n    parameters: {weight: -1}\nmerge_method: linear\n";
    let err = plan_yaml(zero_sum).unwrap_err().to_string();
    assert!(err.contains("sum to 0"), "{err}");
}

#[test]
fn mixtral_experts_keep_their_per_expert_layout() {
    let yaml = "
models:
  - model: models/mixtral-ft-a
    parameters: {weight: 0.5}
  - model: models/mixtral-ft-b
    parameters: {weight: 0.5}
merge_method: linear
";
    let p = plan_yaml(yaml).unwrap();
    let t = tensor(&p, "model.layers.1.block_sparse_moe.experts.3.w2.weight");
    assert_eq!(t.shape, vec![64, 96]);
    assert_eq!(p.tensor_count(), 2 + 2 * (4 * 3 + 1 + 6) + 1);
}

#[test]
fn plans_are_deterministic_and_serialize() {
    let a = plan_yaml(SLERP_GRADIENT).unwrap();
    let b = plan_yaml(SLERP_GRADIENT).unwrap();
    assert_eq!(a, b);
    let unit = &a.units[0];
    let json = serde_json::to_string(unit).unwrap();
    let back: WorkUnit = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, unit);
}

#[test]
fn shards_split_by_bytes() {
    let cfg = MergeConfig::parse(
        "t.yaml",
        "models:\n  - model: models/llama-ft-a\n    parameters: {weight: 1}\nmerge_method: linear\n",
    )
    .unwrap();
    let p = plan(
        &cfg,
        &PlanOptions {
            unit_size: None,
            out_shard_size: 100_000,
            seed: 0,
            allow_crimes: false,
            keep_fp8: false,
            base_dir: examples(),
        },
    )
    .unwrap();
    assert!(p.units.len() > 1);
    for u in &p.units {
        assert!(u.data_bytes() <= 100_000 || u.tensors.len() == 1);
    }
    assert_eq!(p.total_size(), 685_696);
}

#[test]
fn della_epsilon_resolves_from_every_level() {
    let yaml = "
models:
  - model: models/llama-ft-a
    parameters: {weight: 1.0, epsilon: 0.05}
  - model: models/llama-ft-b
    parameters: {weight: 1.0}
merge_method: della
base_model: models/llama-base
parameters:
  density: 0.5
  epsilon: [0.1, 0.3]
";
    let p = plan_yaml(yaml).unwrap();
    // Per model beats global; the global gradient interpolates across layers
    // (6 layers: layer 5 is t = 1) and pre/post weights take t = 0.
    let l5 = "model.layers.5.mlp.up_proj.weight";
    assert_eq!(per(&p, l5, 0, "epsilon"), 0.05);
    assert!((per(&p, l5, 1, "epsilon") - 0.3).abs() < 1e-12);
    assert!((per(&p, "model.layers.1.mlp.up_proj.weight", 1, "epsilon") - 0.14).abs() < 1e-12);
    assert!((per(&p, "lm_head.weight", 1, "epsilon") - 0.1).abs() < 1e-12);
    assert_eq!(per(&p, l5, 1, "density"), 0.5);
    // density ± epsilon outside (0, 1) names both keys and the line.
    let bad = yaml.replace("epsilon: 0.05", "epsilon: 0.6");
    let err = plan_yaml(&bad).unwrap_err().to_string();
    assert!(
        err.contains("epsilon") && err.contains("density") && err.contains("line 4"),
        "{err}"
    );
}

#[test]
fn non_finite_weights_are_rejected() {
    let yaml = "models:\n  - model: models/llama-ft-a\n    parameters: {weight: .nan}\nmerge_method: linear\n";
    let err = plan_yaml(yaml).unwrap_err().to_string();
    assert!(err.contains("weight") && err.contains("finite"), "{err}");
}

#[test]
fn plan_refuses_the_chat_template_run_would_refuse() {
    let base = "models:\n  - model: models/llama-ft-a\n    parameters: {weight: 1}\nmerge_method: linear\n";
    let e = plan_yaml(&format!("{base}chat_template: notatemplate\n")).unwrap_err();
    let shown = e.to_string();
    assert!(shown.contains("chat_template (line 5"), "{shown}");
    assert!(shown.contains("Invalid chat template"), "{shown}");
    assert!(plan_yaml(&format!("{base}chat_template: chatml\n")).is_ok());
}

/// A `model+adapter` reference is a model of its own: the base's tensors,
/// the adapted ones carrying the adapter's factors; the plain base stays a
/// model without them. The adapter folder is recorded for the journal.
#[test]
fn adapted_models_carry_their_factors() {
    let p = plan_yaml(
        "merge_method: linear\nmodels:\n  - model: models/llama-base+models/lora-qv\n    \
         parameters: {weight: 1}\n  - model: models/llama-base\n    parameters: {weight: 1}\n",
    )
    .unwrap();
    assert_eq!(p.models.len(), 2);
    assert_eq!(p.models[0].reference, "models/llama-base+models/lora-qv");
    assert!(p.models[0]
        .adapter
        .as_deref()
        .is_some_and(|a| a.ends_with("examples/models/lora-qv")));
    assert_eq!(p.models[0].location, p.models[1].location);
    assert_eq!(p.models[1].adapter, None);
    let q = tensor(&p, "model.layers.2.self_attn.q_proj.weight");
    let l = q.inputs[0].lora.as_deref().expect("adapted");
    assert_eq!(
        l.a.name,
        "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    );
    assert!(l.a.location.ends_with("lora-qv/adapter_model.safetensors"));
    assert_eq!(
        (l.a.shape.clone(), l.b.shape.clone()),
        (vec![4, 64], vec![64, 4])
    );
    assert_eq!((l.scale, l.transposed), (2.0, false));
    assert!(q.inputs[1].lora.is_none());
    // Tensors the adapter does not touch are read as they are.
    assert!(
        tensor(&p, "model.layers.2.self_attn.k_proj.weight").inputs[0]
            .lora
            .is_none()
    );
    // The bytes read count the factors, for the adapted model.
    assert!(p.units[0]
        .tensors
        .iter()
        .any(|t| t.side_refs().count() == 2));
}

#[test]
fn adapter_errors_name_the_key_or_the_file() {
    let e =
        plan_yaml("merge_method: linear\nmodels:\n  - model: models/llama-base+./models/nope\n")
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("models[0].model") && e.contains("adapter './models/nope' not found"),
        "{e}"
    );
    // A model folder is no adapter.
    let e = plan_yaml(
        "merge_method: linear\nmodels:\n  - model: models/llama-base+models/llama-ft-a\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("llama-ft-a/adapter_config.json: not found"),
        "{e}"
    );
    // An adapter of another model (tok-base has 2 layers, the adapter 6): the
    // file is named with the first key that fits nothing.
    let e =
        plan_yaml("merge_method: linear\nmodels:\n  - model: models/tok-base+models/lora-wide\n")
            .unwrap_err()
            .to_string();
    assert!(e.contains("lora-wide/adapter_model.safetensors"), "{e}");
}
