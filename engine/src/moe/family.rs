//! The output families of mergekit-moe (`mergekit/moe/{mixtral,deepseek,qwen,qwen3}.py`):
//! which inputs each takes (first compatible wins, in mergekit's order, so
//! Mixtral when it can), the per-expert tensor names each writes (the layout
//! the Hub and transformers' conversion mapping load; mergekit 0.1.5 writes
//! Mixtral and Qwen3-MoE in transformers v5's fused layout instead), and its
//! config.json.

use super::config::MoeConfig;
use crate::dtype::DType;
use serde_json::{json, Map, Value};

/// An output family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Family {
    Mixtral,
    DeepSeek,
    Qwen2Moe,
    Qwen3Moe,
}

/// The MLP projections of a dense layer, as (dense name, role).
pub const PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

impl Family {
    /// mergekit's order (`ALL_OUTPUT_ARCHITECTURES`).
    pub const ALL: [Family; 4] = [
        Family::Mixtral,
        Family::DeepSeek,
        Family::Qwen2Moe,
        Family::Qwen3Moe,
    ];

    /// mergekit's name (what `architecture:` matches by prefix).
    pub fn name(self) -> &'static str {
        match self {
            Family::Mixtral => "Mixtral",
            Family::DeepSeek => "DeepSeek MoE",
            Family::Qwen2Moe => "Qwen MoE",
            Family::Qwen3Moe => "Qwen3 MoE",
        }
    }

    /// Whether the family takes this config and these inputs' `model_type`s
    /// (base, experts, shared experts); `Err` says why not (mergekit's
    /// `supports_config` explanations).
    pub fn supports(self, cfg: &MoeConfig, model_types: &[String]) -> Result<(), String> {
        let shared = cfg.shared_experts.len();
        let all_same = model_types.iter().all(|t| *t == model_types[0]);
        let first = model_types.first().map(String::as_str).unwrap_or("");
        let types = || {
            let mut t: Vec<&str> = model_types.iter().map(String::as_str).collect();
            t.dedup();
            t.join(", ")
        };
        match self {
            Family::Mixtral => {
                if shared > 0 {
                    return Err("Mixtral does not support shared experts".into());
                }
                if !all_same {
                    return Err(format!(
                        "Mixtral requires all input models to have the same architecture \
                         (model types: {})",
                        types()
                    ));
                }
                if !matches!(first, "llama" | "mistral") {
                    return Err(format!(
                        "Mixtral requires all input models to be Llama or Mistral models \
                         (model type: {first})"
                    ));
                }
            }
            Family::DeepSeek => {
                if shared > 1 {
                    return Err(
                        "DeepSeek MoE merge does not support more than one shared expert".into(),
                    );
                }
                if let Some(s) = cfg.shared_experts.first() {
                    let prompted =
                        |p: &Option<Vec<String>>| p.as_ref().is_some_and(|p| !p.is_empty());
                    if prompted(&s.positive_prompts) || prompted(&s.negative_prompts) {
                        return Err(
                            "DeepSeek MoE merge does not support gating shared experts".into()
                        );
                    }
                }
                if !all_same {
                    return Err(format!(
                        "Deepseek MoE requires all input models to have the same architecture \
                         (model types: {})",
                        types()
                    ));
                }
                if !matches!(first, "llama" | "mistral") {
                    return Err(format!(
                        "Deepseek MoE requires all input models to be Llama or Mistral models \
                         (model type: {first})"
                    ));
                }
            }
            Family::Qwen2Moe => {
                if shared != 1 {
                    return Err(format!(
                        "Qwen MoE merge requires exactly one shared expert (the config has {shared})"
                    ));
                }
                if !cfg.gate_mode.value.is_random()
                    && cfg.shared_experts[0]
                        .positive_prompts
                        .as_ref()
                        .is_none_or(Vec::is_empty)
                {
                    return Err("Qwen MoE requires the shared expert to have prompts".into());
                }
                if !all_same {
                    return Err(format!(
                        "Qwen MoE requires all input models to have the same architecture \
                         (model types: {})",
                        types()
                    ));
                }
                if !matches!(first, "llama" | "mistral" | "qwen2") {
                    return Err(format!(
                        "Qwen MoE requires all input models to be Qwen2, Llama or Mistral models \
                         (model type: {first})"
                    ));
                }
            }
            Family::Qwen3Moe => {
                if shared != 0 {
                    return Err("Qwen3 MoE merge does not support shared experts".into());
                }
                if let Some(t) = model_types.iter().find(|t| *t != "qwen3") {
                    return Err(format!(
                        "Qwen3 MoE only supports Qwen3 input models (model type: {t})"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The name of expert `e`'s projection `proj` (`gate_proj`, `up_proj`,
    /// `down_proj`) in layer `layer`.
    pub fn expert_tensor(self, layer: u64, e: usize, proj: &str) -> String {
        match self {
            Family::Mixtral => {
                let w = match proj {
                    "gate_proj" => "w1",
                    "down_proj" => "w2",
                    _ => "w3",
                };
                format!("model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight")
            }
            _ => format!("model.layers.{layer}.mlp.experts.{e}.{proj}.weight"),
        }
    }

    /// The shared expert's projection, for the families that have one.
    pub fn shared_tensor(self, layer: u64, proj: &str) -> Option<String> {
        match self {
            Family::Qwen2Moe => Some(format!(
                "model.layers.{layer}.mlp.shared_expert.{proj}.weight"
            )),
            Family::DeepSeek => Some(format!(
                "model.layers.{layer}.mlp.shared_experts.{proj}.weight"
            )),
            _ => None,
        }
    }

    /// The router of layer `layer` (`[experts, hidden]`).
    pub fn router_tensor(self, layer: u64) -> String {
        match self {
            Family::Mixtral => format!("model.layers.{layer}.block_sparse_moe.gate.weight"),
            _ => format!("model.layers.{layer}.mlp.gate.weight"),
        }
    }

    /// Qwen2-MoE's gate of the shared expert (`[1, hidden]`).
    pub fn shared_router_tensor(self, layer: u64) -> Option<String> {
        (self == Family::Qwen2Moe)
            .then(|| format!("model.layers.{layer}.mlp.shared_expert_gate.weight"))
    }

    /// Whether the family needs attention biases (`q/k/v_proj.bias`): Qwen2-MoE
    /// (mergekit synthesises zeros for inputs that lack them).
    pub fn needs_qkv_bias(self) -> bool {
        self == Family::Qwen2Moe
    }

    /// config.json of the output: the base's, turned into the family's (as
    /// mergekit builds it from the base config's `to_dict()`).
    pub fn config_json(
        self,
        base: &Map<String, Value>,
        experts: usize,
        shared: usize,
        experts_per_token: i64,
        dtype: Option<DType>,
    ) -> Map<String, Value> {
        let mut c = base.clone();
        let set = |c: &mut Map<String, Value>, k: &str, v: Value| {
            c.insert(k.to_string(), v);
        };
        let intermediate = c.get("intermediate_size").cloned().unwrap_or(Value::Null);
        match self {
            Family::Mixtral => {
                set(&mut c, "architectures", json!(["MixtralForCausalLM"]));
                set(&mut c, "model_type", json!("mixtral"));
                set(&mut c, "num_local_experts", json!(experts));
                set(&mut c, "num_experts_per_tok", json!(experts_per_token));
                set(&mut c, "sliding_window", Value::Null);
            }
            Family::DeepSeek => {
                set(&mut c, "architectures", json!(["DeepseekForCausalLM"]));
                set(&mut c, "model_type", json!("deepseek"));
                set(&mut c, "n_routed_experts", json!(experts));
                set(
                    &mut c,
                    "n_shared_experts",
                    if shared > 0 {
                        json!(shared)
                    } else {
                        Value::Null
                    },
                );
                set(&mut c, "num_experts_per_tok", json!(experts_per_token));
                set(&mut c, "first_k_dense_replace", json!(0));
                set(&mut c, "moe_layer_freq", json!(1));
                set(&mut c, "scoring_func", json!("softmax"));
                set(&mut c, "norm_topk_prob", json!(true));
                set(&mut c, "moe_intermediate_size", intermediate);
                set(
                    &mut c,
                    "auto_map",
                    json!({
                        "AutoConfig": "deepseek-ai/deepseek-moe-16b-base--configuration_deepseek.DeepseekConfig",
                        "AutoModel": "deepseek-ai/deepseek-moe-16b-base--modeling_deepseek.DeepseekModel",
                        "AutoModelForCausalLM": "deepseek-ai/deepseek-moe-16b-base--modeling_deepseek.DeepseekForCausalLM"
                    }),
                );
            }
            Family::Qwen2Moe => {
                set(&mut c, "architectures", json!(["Qwen2MoeForCausalLM"]));
                set(&mut c, "model_type", json!("qwen2_moe"));
                set(&mut c, "num_experts", json!(experts));
                set(&mut c, "num_experts_per_tok", json!(experts_per_token));
                set(&mut c, "decoder_sparse_step", json!(1));
                set(&mut c, "norm_topk_prob", json!(true));
                set(&mut c, "sliding_window", Value::Null);
                set(&mut c, "use_sliding_window", json!(false));
                set(
                    &mut c,
                    "shared_expert_intermediate_size",
                    intermediate.clone(),
                );
                set(&mut c, "moe_intermediate_size", intermediate);
                set(&mut c, "qkv_bias", json!(true));
            }
            Family::Qwen3Moe => {
                set(&mut c, "architectures", json!(["Qwen3MoeForCausalLM"]));
                set(&mut c, "model_type", json!("qwen3_moe"));
                set(&mut c, "num_experts", json!(experts));
                set(&mut c, "num_experts_per_tok", json!(experts_per_token));
                set(&mut c, "decoder_sparse_step", json!(1));
                set(&mut c, "norm_topk_prob", json!(true));
                set(&mut c, "moe_intermediate_size", intermediate);
            }
        }
        if let Some(d) = dtype {
            // transformers v5 writes `dtype`; older versions read `torch_dtype`.
            let key = if c.contains_key("dtype") && !c.contains_key("torch_dtype") {
                "dtype"
            } else {
                "torch_dtype"
            };
            set(&mut c, key, json!(d.torch_name()));
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::config::MoeConfig;

    fn cfg(extra: &str) -> MoeConfig {
        MoeConfig::parse(
            "moe.yml",
            &format!(
                "base_model: b\ngate_mode: random\nexperts:\n  - source_model: x\n  - source_model: y\n{extra}"
            ),
        )
        .unwrap()
    }

    #[test]
    fn mergekits_choice_of_family() {
        let llama = vec!["llama".to_string(); 3];
        let c = cfg("");
        assert_eq!(Family::Mixtral.supports(&c, &llama), Ok(()));
        assert_eq!(Family::DeepSeek.supports(&c, &llama), Ok(()));
        assert!(Family::Qwen2Moe
            .supports(&c, &llama)
            .unwrap_err()
            .contains("exactly one shared"));
        assert!(Family::Qwen3Moe
            .supports(&c, &llama)
            .unwrap_err()
            .contains("only supports Qwen3"));
        let mixed = vec!["llama".to_string(), "mistral".into(), "llama".into()];
        assert!(Family::Mixtral
            .supports(&c, &mixed)
            .unwrap_err()
            .contains("same architecture"));
        let shared = cfg("shared_experts:\n  - source_model: s\n");
        let with = vec!["qwen2".to_string(); 4];
        assert!(Family::Mixtral
            .supports(&shared, &with)
            .unwrap_err()
            .contains("shared experts"));
        assert!(Family::DeepSeek
            .supports(&shared, &with)
            .unwrap_err()
            .contains("Llama or Mistral"));
        assert_eq!(Family::Qwen2Moe.supports(&shared, &with), Ok(()));
        let qwen3 = vec!["qwen3".to_string(); 3];
        assert_eq!(Family::Qwen3Moe.supports(&c, &qwen3), Ok(()));
    }

    #[test]
    fn names_and_config() {
        assert_eq!(
            Family::Mixtral.expert_tensor(3, 1, "down_proj"),
            "model.layers.3.block_sparse_moe.experts.1.w2.weight"
        );
        assert_eq!(
            Family::Qwen2Moe.shared_tensor(0, "up_proj").unwrap(),
            "model.layers.0.mlp.shared_expert.up_proj.weight"
        );
        assert_eq!(
            Family::Mixtral.router_tensor(2),
            "model.layers.2.block_sparse_moe.gate.weight"
        );
        let base: Map<String, Value> = serde_json::from_str(
            r#"{"model_type":"llama","architectures":["LlamaForCausalLM"],"intermediate_size":176,"torch_dtype":"float32"}"#,
        )
        .unwrap();
        let c = Family::Mixtral.config_json(&base, 4, 0, 2, Some(DType::BF16));
        assert_eq!(c["architectures"], json!(["MixtralForCausalLM"]));
        assert_eq!(c["num_local_experts"], json!(4));
        assert_eq!(c["torch_dtype"], json!("bfloat16"));
        assert_eq!(c["sliding_window"], Value::Null);
        let q = Family::Qwen2Moe.config_json(&base, 2, 1, 1, None);
        assert_eq!(q["shared_expert_intermediate_size"], json!(176));
        assert_eq!(q["torch_dtype"], json!("float32"));
    }
}
