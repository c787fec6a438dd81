//! Synthetic DeepSeek-V3 checkpoints: DeepSeek-V3's tensor layout and full
//! tensor count (61 layers, 3 dense then 58 MoE layers of 256 routed experts +
//! a shared expert, MLA attention, FP8 weights with F32 block scales,
//! `e_score_correction_bias`, the multi-token-prediction layer 61) in 163
//! shards with an index. The shards are sparse files: a real header and the
//! full data length, no data blocks (all data reads as zeros). Used by the
//! planning test (tests/it/giant_plan.rs) and the coordinator benchmark
//! (`coordinator-scale`, bench/src/scale.rs).

use std::io::Write;
use std::path::Path;

/// The safetensors prefix of `header`: its length (u64 LE), then the JSON
/// padded with spaces to a multiple of 8.
pub fn safetensors_prefix(header: &serde_json::Map<String, serde_json::Value>) -> Vec<u8> {
    let mut json = serde_json::to_vec(header).expect("a JSON map serializes");
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

pub const LAYERS: u64 = 61;
pub const DENSE: u64 = 3;
pub const EXPERTS: u64 = 256;
pub const HIDDEN: u64 = 7168;
pub const MOE_INTER: u64 = 2048;
pub const INTER: u64 = 18432;
pub const VOCAB: u64 = 129280;
pub const SHARDS: usize = 163;

/// (name, dtype, shape) of every tensor, in checkpoint order.
pub fn tensors() -> Vec<(String, &'static str, Vec<u64>)> {
    let mut t = Vec::new();
    let block = |n: u64| n.div_ceil(128);
    let fp8 =
        |t: &mut Vec<(String, &'static str, Vec<u64>)>, name: String, rows: u64, cols: u64| {
            t.push((format!("{name}.weight"), "F8_E4M3", vec![rows, cols]));
            t.push((
                format!("{name}.weight_scale_inv"),
                "F32",
                vec![block(rows), block(cols)],
            ));
        };
    t.push((
        "model.embed_tokens.weight".into(),
        "BF16",
        vec![VOCAB, HIDDEN],
    ));
    for l in 0..=LAYERS {
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.input_layernorm.weight"), "BF16", vec![HIDDEN]));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            "BF16",
            vec![HIDDEN],
        ));
        fp8(&mut t, format!("{p}.self_attn.q_a_proj"), 1536, HIDDEN);
        t.push((
            format!("{p}.self_attn.q_a_layernorm.weight"),
            "BF16",
            vec![1536],
        ));
        fp8(&mut t, format!("{p}.self_attn.q_b_proj"), 24576, 1536);
        fp8(
            &mut t,
            format!("{p}.self_attn.kv_a_proj_with_mqa"),
            576,
            HIDDEN,
        );
        t.push((
            format!("{p}.self_attn.kv_a_layernorm.weight"),
            "BF16",
            vec![512],
        ));
        fp8(&mut t, format!("{p}.self_attn.kv_b_proj"), 32768, 512);
        fp8(&mut t, format!("{p}.self_attn.o_proj"), HIDDEN, 16384);
        if l < DENSE {
            for m in ["gate_proj", "up_proj"] {
                fp8(&mut t, format!("{p}.mlp.{m}"), INTER, HIDDEN);
            }
            fp8(&mut t, format!("{p}.mlp.down_proj"), HIDDEN, INTER);
            continue;
        }
        t.push((
            format!("{p}.mlp.gate.weight"),
            "BF16",
            vec![EXPERTS, HIDDEN],
        ));
        t.push((
            format!("{p}.mlp.gate.e_score_correction_bias"),
            "F32",
            vec![EXPERTS],
        ));
        for e in 0..EXPERTS {
            for m in ["gate_proj", "up_proj"] {
                fp8(
                    &mut t,
                    format!("{p}.mlp.experts.{e}.{m}"),
                    MOE_INTER,
                    HIDDEN,
                );
            }
            fp8(
                &mut t,
                format!("{p}.mlp.experts.{e}.down_proj"),
                HIDDEN,
                MOE_INTER,
            );
        }
        for m in ["gate_proj", "up_proj"] {
            fp8(
                &mut t,
                format!("{p}.mlp.shared_experts.{m}"),
                MOE_INTER,
                HIDDEN,
            );
        }
        fp8(
            &mut t,
            format!("{p}.mlp.shared_experts.down_proj"),
            HIDDEN,
            MOE_INTER,
        );
        if l == LAYERS {
            // The multi-token-prediction module.
            t.push((format!("{p}.enorm.weight"), "BF16", vec![HIDDEN]));
            t.push((format!("{p}.hnorm.weight"), "BF16", vec![HIDDEN]));
            t.push((
                format!("{p}.eh_proj.weight"),
                "BF16",
                vec![HIDDEN, 2 * HIDDEN],
            ));
            t.push((
                format!("{p}.embed_tokens.weight"),
                "BF16",
                vec![VOCAB, HIDDEN],
            ));
            t.push((format!("{p}.shared_head.norm.weight"), "BF16", vec![HIDDEN]));
            t.push((
                format!("{p}.shared_head.head.weight"),
                "BF16",
                vec![VOCAB, HIDDEN],
            ));
        }
    }
    t.push(("model.norm.weight".into(), "BF16", vec![HIDDEN]));
    t.push(("lm_head.weight".into(), "BF16", vec![VOCAB, HIDDEN]));
    t
}

pub fn dtype_size(dtype: &str) -> u64 {
    match dtype {
        "F8_E4M3" => 1,
        "BF16" => 2,
        _ => 4,
    }
}

/// Writes a header-only (sparse) DeepSeek-V3-layout checkpoint into `dir`:
/// its 163 shards, index and config. Returns (tensors, data bytes).
pub fn write_model(dir: &Path) -> std::io::Result<(usize, u64)> {
    std::fs::create_dir_all(dir)?;
    let all = tensors();
    let total: u64 = all
        .iter()
        .map(|(_, d, s)| dtype_size(d) * s.iter().product::<u64>())
        .sum();
    let per_shard = total.div_ceil(SHARDS as u64);
    let mut weight_map = serde_json::Map::new();
    let mut shard = 0;
    let mut i = 0;
    while i < all.len() {
        shard += 1;
        let name = format!("model-{shard:05}-of-{SHARDS:06}.safetensors");
        let mut header = serde_json::Map::new();
        let mut offset = 0u64;
        while i < all.len() && (offset < per_shard || shard == SHARDS) {
            let (n, d, s) = &all[i];
            let len = dtype_size(d) * s.iter().product::<u64>();
            header.insert(
                n.clone(),
                serde_json::json!({"dtype": d, "shape": s, "data_offsets": [offset, offset + len]}),
            );
            weight_map.insert(n.clone(), name.clone().into());
            offset += len;
            i += 1;
        }
        let prefix = safetensors_prefix(&header);
        let mut f = std::fs::File::create(dir.join(&name))?;
        f.write_all(&prefix)?;
        // The data section as a hole: the file has its full size, no blocks.
        f.set_len(prefix.len() as u64 + offset)?;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    let config = serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "num_hidden_layers": LAYERS, "num_nextn_predict_layers": 1,
        "hidden_size": HIDDEN, "vocab_size": VOCAB, "n_routed_experts": EXPERTS,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
        "torch_dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    Ok((all.len(), total))
}
