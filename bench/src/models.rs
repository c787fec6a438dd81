//! The benchmark's model sets, generated deterministically: dense
//! Llama-style and Mixtral-style MoE checkpoints (bf16, a base and three
//! fine-tunes, each one shard plus an index and a config.json) and a PEFT LoRA
//! adapter of the dense base. Generated once under the benchmark's folder
//! (a `.complete-v1` marker says a set is whole); both the local benchmark
//! (main.rs) and the cluster benchmark (cluster.rs) merge them.

use anyhow::Result;
use rayon::prelude::*;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// One tensor of a generated checkpoint.
struct Spec {
    name: String,
    shape: Vec<usize>,
}

fn dense_specs() -> Vec<Spec> {
    let (h, i, layers, vocab) = (2048, 4096, 8, 32000);
    let mut v = vec![Spec {
        name: "model.embed_tokens.weight".into(),
        shape: vec![vocab, h],
    }];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            v.push(Spec {
                name: format!("{p}.self_attn.{n}.weight"),
                shape: vec![h, h],
            });
        }
        v.push(Spec {
            name: format!("{p}.mlp.gate_proj.weight"),
            shape: vec![i, h],
        });
        v.push(Spec {
            name: format!("{p}.mlp.up_proj.weight"),
            shape: vec![i, h],
        });
        v.push(Spec {
            name: format!("{p}.mlp.down_proj.weight"),
            shape: vec![h, i],
        });
        v.push(Spec {
            name: format!("{p}.input_layernorm.weight"),
            shape: vec![h],
        });
        v.push(Spec {
            name: format!("{p}.post_attention_layernorm.weight"),
            shape: vec![h],
        });
    }
    v.push(Spec {
        name: "model.norm.weight".into(),
        shape: vec![h],
    });
    v.push(Spec {
        name: "lm_head.weight".into(),
        shape: vec![vocab, h],
    });
    v
}

fn moe_specs() -> Vec<Spec> {
    let (h, i, layers, experts, vocab) = (1024, 512, 4, 64, 32000);
    let mut v = vec![Spec {
        name: "model.embed_tokens.weight".into(),
        shape: vec![vocab, h],
    }];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            v.push(Spec {
                name: format!("{p}.self_attn.{n}.weight"),
                shape: vec![h, h],
            });
        }
        v.push(Spec {
            name: format!("{p}.block_sparse_moe.gate.weight"),
            shape: vec![experts, h],
        });
        for e in 0..experts {
            let x = format!("{p}.block_sparse_moe.experts.{e}");
            v.push(Spec {
                name: format!("{x}.w1.weight"),
                shape: vec![i, h],
            });
            v.push(Spec {
                name: format!("{x}.w2.weight"),
                shape: vec![h, i],
            });
            v.push(Spec {
                name: format!("{x}.w3.weight"),
                shape: vec![i, h],
            });
        }
        v.push(Spec {
            name: format!("{p}.input_layernorm.weight"),
            shape: vec![h],
        });
        v.push(Spec {
            name: format!("{p}.post_attention_layernorm.weight"),
            shape: vec![h],
        });
    }
    v.push(Spec {
        name: "model.norm.weight".into(),
        shape: vec![h],
    });
    v.push(Spec {
        name: "lm_head.weight".into(),
        shape: vec![vocab, h],
    });
    v
}

/// splitmix64: the generator of every value, keyed by (tensor, model, element).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn unit(x: u64) -> f64 {
    ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// A standard normal from two uniforms (Box-Muller).
fn normal(key: u64) -> f64 {
    let (a, b) = (unit(mix(key)), unit(mix(key ^ 0x5555_5555_5555_5555)));
    (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
}

fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Value `j` of tensor `t` in model `m` (0 = base): base ~ N(0, 0.02²); a
/// fine-tune adds N(0, 0.004²) on a random 60 % of the elements.
fn value(t: u64, m: u64, j: u64) -> u16 {
    let key = (t << 40) ^ j;
    let mut x = 0.02 * normal(key.wrapping_mul(3));
    if m > 0 {
        let k = key ^ (m << 56);
        if unit(mix(k ^ 0x1234_5678)) < 0.6 {
            x += 0.004 * normal(k.wrapping_mul(7));
        }
    }
    bf16(x as f32)
}

/// Writes model `m` of a set as one shard plus an index.
fn write_model(
    dir: &Path,
    specs: &[Spec],
    m: u64,
    arch: &str,
    config: serde_json::Value,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let shard = "model-00001-of-00001.safetensors";
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for s in specs {
        let len = s.shape.iter().product::<usize>() as u64 * 2;
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": s.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut h = serde_json::to_vec(&header)?;
    while (h.len() + 8) % 8 != 0 {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(dir.join(shard))?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    for (ti, s) in specs.iter().enumerate() {
        let n = s.shape.iter().product::<usize>();
        let norm = s.shape.len() == 1;
        let mut buf = vec![0u16; n];
        buf.par_chunks_mut(1 << 16)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (k, v) in chunk.iter_mut().enumerate() {
                    let j = (c << 16) + k;
                    *v = if norm {
                        bf16(1.0)
                    } else {
                        value(ti as u64, m, j as u64)
                    };
                }
            });
        let bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
        f.write_all(&bytes)?;
    }
    f.flush()?;
    let weight_map: serde_json::Map<String, serde_json::Value> = specs
        .iter()
        .map(|s| (s.name.clone(), serde_json::Value::from(shard)))
        .collect();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(
            &serde_json::json!({"metadata": {"total_size": offset}, "weight_map": weight_map}),
        )?,
    )?;
    let mut cfg = config;
    cfg["architectures"] = serde_json::json!([arch]);
    cfg["torch_dtype"] = serde_json::json!("bfloat16");
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg)?)?;
    Ok(())
}

fn generate_set(
    dir: &Path,
    name: &str,
    specs: &[Spec],
    arch: &str,
    config: serde_json::Value,
) -> Result<()> {
    let marker = dir.join(name).join(".complete-v1");
    if marker.exists() {
        return Ok(());
    }
    let t = Instant::now();
    for (m, model) in ["base", "ft-a", "ft-b", "ft-c"].iter().enumerate() {
        write_model(
            &dir.join(name).join(model),
            specs,
            m as u64,
            arch,
            config.clone(),
        )?;
    }
    std::fs::write(&marker, b"")?;
    eprintln!("generated {name} in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// Rank and alpha of the generated adapter.
const LORA_RANK: usize = 16;
const LORA_ALPHA: usize = 32;

/// Writes a PEFT LoRA adapter (bf16, r 16, alpha 32) of every 2-D weight of
/// the layers (attention and MLP projections): `lora_A` ~ N(0, 0.02²),
/// `lora_B` ~ N(0, 0.001²) (a trained adapter's B is no longer zero).
fn generate_lora(dir: &Path, specs: &[Spec]) -> Result<()> {
    let marker = dir.join(".complete-v1");
    if marker.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    let mut modules = std::collections::BTreeSet::new();
    for (ti, s) in specs.iter().enumerate() {
        let (Some(module), &[out, inp]) = (s.name.strip_suffix(".weight"), &s.shape[..]) else {
            continue;
        };
        if !module.contains(".layers.") {
            continue;
        }
        modules.insert(module.rsplit('.').next().unwrap_or(module).to_string());
        for (f, shape, scale) in [
            ("lora_A", [LORA_RANK, inp], 0.02),
            ("lora_B", [out, LORA_RANK], 0.001),
        ] {
            let start = data.len();
            for j in 0..shape[0] * shape[1] {
                let key = ((ti as u64) << 40) ^ j as u64 ^ if f == "lora_A" { 1 << 62 } else { 0 };
                data.extend_from_slice(&bf16((scale * normal(key)) as f32).to_le_bytes());
            }
            header.insert(
                format!("base_model.model.{module}.{f}.weight"),
                serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
    }
    let mut h = serde_json::to_vec(&header)?;
    while (h.len() + 8) % 8 != 0 {
        h.push(b' ');
    }
    let mut f = std::fs::File::create(dir.join("adapter_model.safetensors"))?;
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    f.write_all(&data)?;
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "peft_type": "LORA", "r": LORA_RANK, "lora_alpha": LORA_ALPHA,
            "target_modules": modules, "fan_in_fan_out": false, "use_rslora": false,
            "use_dora": false, "bias": "none", "task_type": "CAUSAL_LM"
        }))?,
    )?;
    std::fs::write(&marker, b"")?;
    Ok(())
}

/// Generates set `name` (`dense` or `moe`) under `dir` unless it is there.
pub fn generate(dir: &Path, name: &str) -> Result<()> {
    match name {
        "dense" => generate_set(
            dir,
            "dense",
            &dense_specs(),
            "LlamaForCausalLM",
            serde_json::json!({"model_type": "llama", "hidden_size": 2048, "intermediate_size": 4096,
                "num_hidden_layers": 8, "num_attention_heads": 16, "vocab_size": 32000}),
        ),
        "moe" => generate_set(
            dir,
            "moe",
            &moe_specs(),
            "MixtralForCausalLM",
            serde_json::json!({"model_type": "mixtral", "hidden_size": 1024, "intermediate_size": 512,
                "num_hidden_layers": 4, "num_attention_heads": 16, "num_local_experts": 64,
                "num_experts_per_tok": 2, "vocab_size": 32000}),
        ),
        other => anyhow::bail!("no model set {other} (the sets are dense and moe)"),
    }
}

/// Generates the dense and MoE sets and the dense set's LoRA adapter under
/// `dir` (skipping those already there): about 8 GB, 2.5 minutes the first time.
pub fn generate_all(dir: &Path) -> Result<()> {
    generate(dir, "dense")?;
    generate_lora(&dir.join("dense").join("lora"), &dense_specs())?;
    generate(dir, "moe")
}

/// The models of a set, in the order the merges list them (the base last).
pub const MODELS: [&str; 4] = ["ft-a", "ft-b", "ft-c", "base"];

/// The file name of every generated model's one shard.
pub const SHARD: &str = "model-00001-of-00001.safetensors";

/// The config of a `method` merge (linear or TIES, density 0.5) of a set's
/// three fine-tunes, with its base as `base_model` when `with_base`; `refer`
/// gives the reference of each model by its name (`ft-a`, ..., `base`).
pub fn merge_yaml(method: &str, with_base: bool, refer: impl Fn(&str) -> String) -> String {
    let mut yaml = String::from("models:\n");
    for m in &MODELS[..3] {
        yaml += &format!("  - model: {}\n    parameters: {{weight: 1.0", refer(m));
        if method == "ties" {
            yaml += ", density: 0.5";
        }
        yaml += "}\n";
    }
    yaml += &format!("merge_method: {method}\ndtype: bfloat16\n");
    if with_base {
        yaml += &format!(
            "base_model: {}\nparameters: {{normalize: true}}\n",
            refer("base")
        );
    }
    yaml
}
