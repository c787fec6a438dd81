//! fleetmerge's benchmark: generates four model sets deterministically (dense
//! Llama and Mixtral-style MoE, bf16, base + three fine-tunes) and a LoRA
//! adapter of the dense base, runs a linear and a TIES merge of each set with
//! the fleetmerge binary (and of the dense set with `base+lora` in place of
//! the first fine-tune), and prints wall time, input throughput, peak RSS, and
//! the ratio to a plain sequential read of the same input files measured in the
//! same run.
//!
//!     cargo build --release && cargo run --release -p fleetmerge-bench -- [--dir D] [--runs N]
//!
//! `coordinator-scale` instead serves a DeepSeek-V3-sized merge to simulated
//! workers and measures the coordinator (bench/src/scale.rs):
//!
//!     cargo run --release -p fleetmerge-bench -- coordinator-scale [--workers 64]

mod scale;

use anyhow::{bail, Context, Result};
use clap::Parser;
use rayon::prelude::*;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Where the models and outputs go (about 8 GB).
    #[arg(long, default_value = "/tmp/fleetmerge-bench")]
    dir: PathBuf,
    /// Runs per merge (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The fleetmerge binary.
    #[arg(long, default_value = "target/release/fleetmerge")]
    bin: PathBuf,
    /// Only these merges (dense-linear, dense-ties, dense-linear-lora,
    /// dense-ties-lora, moe-linear, moe-ties).
    #[arg(long)]
    only: Vec<String>,
    /// Compute device passed to `fleetmerge run` (cuda:0 needs a binary built
    /// with the cuda feature); also `--compare-cpu` to check its bytes.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// After each merge on --device, merge once more on the CPU and require
    /// byte-identical shards.
    #[arg(long)]
    compare_cpu: bool,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(clap::Subcommand)]
enum Mode {
    /// The coordinator at DeepSeek-V3 scale with simulated workers (see
    /// bench/src/scale.rs); the merge benchmark is not run.
    CoordinatorScale(scale::ScaleArgs),
}

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

fn generate(
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

/// Runs `bin args`, returning (wall seconds, peak RSS bytes).
fn timed(bin: &Path, args: &[&str], cwd: &Path) -> Result<(f64, u64)> {
    let t = Instant::now();
    let child = std::process::Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; pointers are to live locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let wall = t.elapsed().as_secs_f64();
    if pid < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{} {:?} failed (status {status})", bin.display(), args);
    }
    Ok((wall, usage.ru_maxrss as u64 * 1024))
}

/// Reads every file in full, sequentially; returns (bytes, seconds).
fn plain_read(files: &[PathBuf]) -> Result<(u64, f64)> {
    let t = Instant::now();
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0;
    for f in files {
        let mut r = std::fs::File::open(f)?;
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok((total, t.elapsed().as_secs_f64()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = std::fs::canonicalize(&args.bin)
        .with_context(|| format!("{} (run `cargo build --release` first)", args.bin.display()))?;
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::fs::canonicalize(&args.dir)?;
    if let Some(Mode::CoordinatorScale(scale)) = &args.mode {
        return scale::run(&bin, &dir, scale);
    }
    generate(
        &dir,
        "dense",
        &dense_specs(),
        "LlamaForCausalLM",
        serde_json::json!({"model_type": "llama", "hidden_size": 2048, "intermediate_size": 4096,
            "num_hidden_layers": 8, "num_attention_heads": 16, "vocab_size": 32000}),
    )?;
    generate_lora(&dir.join("dense").join("lora"), &dense_specs())?;
    generate(
        &dir,
        "moe",
        &moe_specs(),
        "MixtralForCausalLM",
        serde_json::json!({"model_type": "mixtral", "hidden_size": 1024, "intermediate_size": 512,
            "num_hidden_layers": 4, "num_attention_heads": 16, "num_local_experts": 64,
            "num_experts_per_tok": 2, "vocab_size": 32000}),
    )?;
    // (name, set, method, mergekit 0.1.5's time from the issue (none for the
    // LoRA merges: mergekit first writes the folded model to its cache), reads
    // the base, its first model is `base+lora`)
    let merges = [
        ("dense-linear", "dense", "linear", Some(11.7), false, false),
        ("dense-ties", "dense", "ties", Some(109.0), true, false),
        ("dense-linear-lora", "dense", "linear", None, false, true),
        ("dense-ties-lora", "dense", "ties", None, true, true),
        ("moe-linear", "moe", "linear", Some(16.4), false, false),
        ("moe-ties", "moe", "ties", Some(87.6), true, false),
    ];
    println!(
        "| merge | input | fleetmerge (median of {}) | input GB/s | peak RSS | plain read | merge / read | mergekit | speed-up |",
        args.runs
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (name, set, method, mergekit, with_base, lora) in merges {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == name) {
            continue;
        }
        let sdir = dir.join(set);
        let first = if lora { "base" } else { "ft-a" };
        let models: Vec<&str> = if with_base {
            vec![first, "ft-b", "ft-c", "base"]
        } else {
            vec![first, "ft-b", "ft-c"]
        };
        let mut yaml = String::from("models:\n");
        for m in [if lora { "base+lora" } else { "ft-a" }, "ft-b", "ft-c"] {
            yaml += &format!("  - model: {m}\n    parameters: {{weight: 1.0");
            if method == "ties" {
                yaml += ", density: 0.5";
            }
            yaml += "}\n";
        }
        yaml += &format!("merge_method: {method}\ndtype: bfloat16\n");
        if with_base {
            yaml += "base_model: base\nparameters: {normalize: true}\n";
        }
        let cfg = sdir.join(format!("{name}.yaml"));
        std::fs::write(&cfg, yaml)?;
        let mut files: Vec<PathBuf> = models
            .iter()
            .map(|m| sdir.join(m).join("model-00001-of-00001.safetensors"))
            .collect();
        if lora {
            files.push(sdir.join("lora").join("adapter_model.safetensors"));
        }
        plain_read(&files)?; // into the page cache
        let out = dir.join(format!("out-{name}"));
        let mut walls = Vec::new();
        let mut rss = 0;
        let mut reads = Vec::new();
        for _ in 0..args.runs {
            let (bytes, secs) = plain_read(&files)?;
            reads.push(bytes as f64 / secs);
            let _ = std::fs::remove_dir_all(&out);
            let (wall, peak) = timed(
                &bin,
                &[
                    "run",
                    cfg.to_str().unwrap(),
                    out.to_str().unwrap(),
                    "--quiet",
                    "--no-copy-tokenizer",
                    "--out-shard-size",
                    "2G",
                    "--device",
                    &args.device,
                ],
                &sdir,
            )?;
            walls.push(wall);
            rss = rss.max(peak);
        }
        if args.compare_cpu {
            let cpu = dir.join(format!("out-{name}-cpu"));
            let _ = std::fs::remove_dir_all(&cpu);
            timed(
                &bin,
                &[
                    "run",
                    cfg.to_str().unwrap(),
                    cpu.to_str().unwrap(),
                    "--quiet",
                    "--no-copy-tokenizer",
                    "--out-shard-size",
                    "2G",
                ],
                &sdir,
            )?;
            for entry in std::fs::read_dir(&cpu)? {
                let file = entry?.file_name();
                if file.to_string_lossy().ends_with(".safetensors")
                    && std::fs::read(cpu.join(&file))? != std::fs::read(out.join(&file))?
                {
                    bail!(
                        "{name}: {} differs between --device {} and the CPU",
                        file.to_string_lossy(),
                        args.device
                    );
                }
            }
            eprintln!(
                "{name}: shards identical on --device {} and the CPU",
                args.device
            );
            let _ = std::fs::remove_dir_all(&cpu);
        }
        let input: u64 = files
            .iter()
            .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        let wall = median(walls);
        let read_bps = median(reads);
        let read_secs = input as f64 / read_bps;
        let (mergekit, speedup) = match mergekit {
            Some(m) => (format!("{m} s"), format!("{:.1}x", m / wall)),
            None => ("-".to_string(), "-".to_string()),
        };
        println!(
            "| {name} | {:.2} GB | {wall:.2} s | {:.2} | {:.2} GB | {read_secs:.2} s ({:.1} GB/s) | {:.1}x | {mergekit} | {speedup} |",
            input as f64 / 1e9,
            input as f64 / 1e9 / wall,
            rss as f64 / 1e9,
            read_bps / 1e9,
            wall / read_secs,
        );
        let _ = std::fs::remove_dir_all(&out);
    }
    Ok(())
}
