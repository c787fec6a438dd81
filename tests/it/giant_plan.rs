//! Planning at DeepSeek-V3 scale: two checkpoints with DeepSeek-V3's tensor
//! layout and full tensor count (61 layers, 3 dense then 58 MoE layers of 256
//! routed experts + a shared expert, MLA attention, FP8 weights with F32 block
//! scales, `e_score_correction_bias`, the multi-token-prediction layer 61) in
//! 163 shards with an index. The shards are sparse files: a real header and the
//! full data length, no data (planning reads headers only). `fleetmerge plan`
//! plans them from the headers alone; the time it takes is printed, not asserted
//! (about 2.5 s on the project's 2-core machine).

use crate::common::*;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

const LAYERS: u64 = 61;
const DENSE: u64 = 3;
const EXPERTS: u64 = 256;
const HIDDEN: u64 = 7168;
const MOE_INTER: u64 = 2048;
const INTER: u64 = 18432;
const VOCAB: u64 = 129280;
const SHARDS: usize = 163;

/// (name, dtype, shape) of every tensor, in checkpoint order.
fn tensors() -> Vec<(String, &'static str, Vec<u64>)> {
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

fn size(dtype: &str) -> u64 {
    match dtype {
        "F8_E4M3" => 1,
        "BF16" => 2,
        _ => 4,
    }
}

/// Writes a header-only (sparse) DeepSeek-V3-layout checkpoint into `dir`.
fn write_model(dir: &Path) -> (usize, u64) {
    std::fs::create_dir_all(dir).unwrap();
    let all = tensors();
    let total: u64 = all
        .iter()
        .map(|(_, d, s)| size(d) * s.iter().product::<u64>())
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
            let len = size(d) * s.iter().product::<u64>();
            header.insert(
                n.clone(),
                serde_json::json!({"dtype": d, "shape": s, "data_offsets": [offset, offset + len]}),
            );
            weight_map.insert(n.clone(), name.clone().into());
            offset += len;
            i += 1;
        }
        let prefix = safetensors_prefix(&header);
        let mut f = std::fs::File::create(dir.join(&name)).unwrap();
        f.write_all(&prefix).unwrap();
        // The data section as a hole: the file has its full size, no blocks.
        f.set_len(prefix.len() as u64 + offset).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let config = serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "num_hidden_layers": LAYERS, "num_nextn_predict_layers": 1,
        "hidden_size": HIDDEN, "vocab_size": VOCAB, "n_routed_experts": EXPERTS,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
        "torch_dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    (all.len(), total)
}

#[test]
fn a_deepseek_v3_sized_merge_is_planned_from_headers_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (count, total) = write_model(&dir.path().join("ds-a"));
    write_model(&dir.path().join("ds-b"));
    assert!(count > 90_000, "{count} tensors");
    assert!(total > 600_000_000_000, "{total} bytes");
    std::fs::write(
        dir.path().join("m.yaml"),
        "models:\n  - model: ds-a\n    parameters: {weight: 0.5}\n  - model: ds-b\n    \
         parameters: {weight: 0.5}\nmerge_method: linear\ndtype: bfloat16\n",
    )
    .unwrap();
    let started = Instant::now();
    let o = fleetmerge(dir.path(), &["plan", "m.yaml", "--json"]);
    let took = started.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let p = &v["plan"];
    // Every FP8 weight is dequantized: its scale is not an output of its own.
    let scales = tensors()
        .iter()
        .filter(|(n, _, _)| n.ends_with("_scale_inv"))
        .count();
    assert_eq!(
        p["output_tensors"].as_u64().unwrap() as usize,
        count - scales
    );
    assert_eq!(p["read_total"].as_u64().unwrap(), 2 * total);
    eprintln!(
        "planned {count} tensors, {} units, {:.0} GB per model in {took:.2?}",
        p["work_units"],
        total as f64 / 1e9
    );
    // No time limit asserted (timings belong in benchmarks); the time is printed
    // and recorded in the notes: about 2.5 s on the project's 2-core machine.
    let _: Duration = took;
    let warnings = p["warnings"].to_string();
    assert!(
        warnings.contains(&format!("{scales} FP8 weights are dequantized")),
        "{warnings}"
    );
}
