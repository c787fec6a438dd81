//! Shared helpers of the integration tests: run the real `fleetmerge` binary,
//! read safetensors outputs back, and judge them against mergekit's reference
//! outputs the way the conformance kit's `compare.py` does. `procs`: processes
//! of a test; `servers`: S3/GCS servers and proxies; `faults`: the chaos
//! test's seeded fault-injecting S3 proxy and random numbers; `torch`: `.bin`
//! inputs written as torch.save writes them.
#![allow(dead_code)]

pub mod faults;
pub mod grpc;
pub mod procs;
pub mod servers;
pub mod torch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The example models (a copy of the conformance kit's `models/`).
pub fn examples() -> PathBuf {
    root().join("examples")
}

pub fn fixture(case: &str) -> PathBuf {
    root().join("tests/fixtures/cases").join(case)
}

/// Runs `fleetmerge ARGS` in `cwd`.
/// The test venv's python: scripts/test.sh installs huggingface_hub (the real
/// client, tests/it/hub.rs) and transformers (tests/it/transformers.rs) there.
pub fn venv_python() -> PathBuf {
    let venv = std::env::var("FLEETMERGE_VENV").unwrap_or_else(|_| "/tmp/fleetmerge-venv".into());
    let p = PathBuf::from(venv).join("bin/python");
    assert!(
        p.exists(),
        "{} not found: run `bash scripts/test.sh` (it creates the test venv with huggingface_hub \
         and transformers) or set FLEETMERGE_VENV",
        p.display()
    );
    p
}

/// A python with torch and transformers (`FLEETMERGE_TORCH_PYTHON`; scripts/test.sh
/// makes a venv with them and sets it): for loading merged models in
/// transformers and comparing their logits.
pub fn torch_python() -> PathBuf {
    let p = std::env::var("FLEETMERGE_TORCH_PYTHON").map(PathBuf::from);
    match p {
        Ok(p) if p.exists() => p,
        _ => panic!(
            "FLEETMERGE_TORCH_PYTHON must name a python with torch, transformers, safetensors and \
             numpy: run `bash scripts/test.sh` (it makes /tmp/fleetmerge-torch-venv and sets it), \
             or set it to such a python"
        ),
    }
}

pub fn fleetmerge(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetmerge"))
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("the fleetmerge binary runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One tensor read back: dtype name, shape, raw bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: String,
    pub shape: Vec<u64>,
    pub bytes: Vec<u8>,
}

impl Tensor {
    pub fn values(&self) -> Vec<f64> {
        match self.dtype.as_str() {
            "BF16" => self
                .bytes
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16) as f64)
                .collect(),
            "F16" => self
                .bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64())
                .collect(),
            "F32" => self
                .bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect(),
            other => panic!("test helper cannot read {other}"),
        }
    }
}

fn read_file(path: &Path) -> BTreeMap<String, Tensor> {
    let raw = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&raw[8..8 + n]).expect("header JSON");
    let data = &raw[8 + n..];
    let mut out = BTreeMap::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let offs = info["data_offsets"].as_array().unwrap();
        let (a, b) = (
            offs[0].as_u64().unwrap() as usize,
            offs[1].as_u64().unwrap() as usize,
        );
        out.insert(
            name,
            Tensor {
                dtype: info["dtype"].as_str().unwrap().to_string(),
                shape: info["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect(),
                bytes: data[a..b].to_vec(),
            },
        );
    }
    out
}

/// Every tensor of a model directory (index + shards, or model.safetensors).
pub fn read_model(dir: &Path) -> BTreeMap<String, Tensor> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let idx: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        let map = idx["weight_map"].as_object().unwrap();
        let mut files: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
        files.sort();
        files.dedup();
        let mut out = BTreeMap::new();
        for f in files {
            for (name, t) in read_file(&dir.join(f)) {
                assert_eq!(
                    map[&name].as_str(),
                    Some(f),
                    "index places {name} elsewhere"
                );
                out.insert(name, t);
            }
        }
        assert_eq!(out.len(), map.len(), "index and shards disagree");
        out
    } else {
        read_file(&dir.join("model.safetensors"))
    }
}

/// How an output is judged (the conformance kit's modes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Exact,
    Close,
    Bf16,
}

/// The kit's `stat` mode for randomized methods: our output must be an
/// independent draw from the distribution mergekit samples. Its distance to the
/// reference must be 0.6-1.5x the distance between two reference seeds, and the
/// fraction of elements changed from the base must match within 0.03.
pub fn compare_stat(
    ours: &BTreeMap<String, Tensor>,
    reference: &BTreeMap<String, Tensor>,
    alt: &BTreeMap<String, Tensor>,
    base: &BTreeMap<String, Tensor>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if ours.keys().ne(reference.keys()) {
        problems.push("tensor names differ".to_string());
        return problems;
    }
    let (mut num, mut den, mut kept_dev) = (0.0f64, 0.0f64, 0.0f64);
    for (name, o) in ours {
        let (o, r, x) = (o.values(), reference[name].values(), alt[name].values());
        let b = base
            .get(name)
            .map(Tensor::values)
            .unwrap_or_else(|| vec![0.0; o.len()]);
        for i in 0..o.len() {
            num += (o[i] - r[i]).powi(2);
            den += (x[i] - r[i]).powi(2);
        }
        if o.len() >= 4096 {
            let changed = |v: &[f64]| {
                v.iter().zip(&b).filter(|(a, b)| a != b).count() as f64 / v.len() as f64
            };
            kept_dev = kept_dev.max((changed(&o) - changed(&r)).abs());
        }
    }
    let ratio = if den > 0.0 {
        (num / den).sqrt()
    } else {
        f64::INFINITY
    };
    if !(0.6..=1.5).contains(&ratio) {
        problems.push(format!(
            "distance to the reference is {ratio:.3}x the seed-to-seed distance"
        ));
    }
    if kept_dev > 0.03 {
        problems.push(format!(
            "fraction of changed elements differs by {kept_dev:.3}"
        ));
    }
    problems
}

/// Compares an output with a reference, returning the problems found.
pub fn compare(
    ours: &BTreeMap<String, Tensor>,
    reference: &BTreeMap<String, Tensor>,
    mode: Mode,
) -> Vec<String> {
    let mut problems = Vec::new();
    let names: Vec<_> = ours.keys().collect();
    let ref_names: Vec<_> = reference.keys().collect();
    if names != ref_names {
        problems.push(format!(
            "tensor names differ: ours {} vs reference {}",
            names.len(),
            ref_names.len()
        ));
        return problems;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (name, o) in ours {
        let r = &reference[name];
        if o.dtype != r.dtype || o.shape != r.shape {
            problems.push(format!(
                "{name}: {}{:?} vs {}{:?}",
                o.dtype, o.shape, r.dtype, r.shape
            ));
            continue;
        }
        if mode == Mode::Exact {
            if o.bytes != r.bytes {
                problems.push(format!("{name}: not bit-identical"));
            }
            continue;
        }
        let (ov, rv) = (o.values(), r.values());
        let (rtol, limit) = if mode == Mode::Close {
            (2f64.powi(-7), 0.01)
        } else {
            (2f64.powi(-5), 0.05)
        };
        let mut off = 0usize;
        for (&a, &b) in ov.iter().zip(&rv) {
            if !a.is_finite() {
                problems.push(format!("{name}: non-finite value"));
                break;
            }
            if (a - b).abs() > rtol * b.abs() + 1e-6 {
                off += 1;
            }
            num += (a - b) * (a - b);
            den += b * b;
        }
        let frac = off as f64 / ov.len().max(1) as f64;
        if frac > limit {
            problems.push(format!(
                "{name}: {:.2}% of elements off by more than {rtol}",
                frac * 100.0
            ));
        }
    }
    if mode != Mode::Exact && den > 0.0 {
        let rel = (num / den).sqrt();
        let limit = if mode == Mode::Close { 0.004 } else { 0.02 };
        if rel > limit {
            problems.push(format!("relative L2 error {rel} above {limit}"));
        }
    }
    problems
}

/// The start of a safetensors file for `header`: its length, then the JSON
/// padded with spaces to a multiple of 8 bytes. The tensor data follows.
pub fn safetensors_prefix(header: &serde_json::Map<String, serde_json::Value>) -> Vec<u8> {
    let mut json = serde_json::to_vec(header).unwrap();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

/// Writes a bf16 checkpoint (`model.safetensors` + a Llama-like `config.json`)
/// with the given tensors.
pub fn write_bf16_model(dir: &Path, layers: u64, tensors: &[(String, Vec<u64>, Vec<f32>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let start = data.len();
        for v in values {
            data.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut file = safetensors_prefix(&header);
    file.extend_from_slice(&data);
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": layers, "torch_dtype": "bfloat16"
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
}

/// Deterministic pseudo-random values (xorshift) in [-scale, scale).
pub fn noise(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

pub const TIES_ROWS: u64 = 1024;
pub const TIES_COLS: u64 = 1536;

/// Base + two fine-tunes (`base`, `a`, `b` under `dir`), `layers` layers of two
/// 1.5M-element tensors each (bf16): big enough that a unit takes a while.
pub fn make_ties_models(dir: &Path, layers: u64) {
    for (m, seed) in [("base", 1u64), ("a", 2), ("b", 3)] {
        let tensors: Vec<(String, Vec<u64>, Vec<f32>)> = (0..layers)
            .flat_map(|l| {
                ["mlp.up_proj.weight", "mlp.down_proj.weight"]
                    .into_iter()
                    .enumerate()
                    .map(move |(j, s)| {
                        let n = (TIES_ROWS * TIES_COLS) as usize;
                        let base = noise(100 + l * 2 + j as u64, n, 0.02);
                        let values = if seed == 1 {
                            base
                        } else {
                            let d = noise(seed * 1000 + l * 2 + j as u64, n, 0.004);
                            base.iter().zip(d).map(|(b, d)| b + d).collect()
                        };
                        (
                            format!("model.layers.{l}.{s}"),
                            vec![TIES_ROWS, TIES_COLS],
                            values,
                        )
                    })
            })
            .collect();
        write_bf16_model(&dir.join(m), layers, &tensors);
    }
}

/// A TIES merge of `make_ties_models`' models.
pub fn ties_config(density: f64) -> String {
    format!(
        "models:\n  - model: a\n    parameters: {{weight: 1.0, density: {density}}}\n  - model: b\n    \
         parameters: {{weight: 0.5, density: {density}}}\nmerge_method: ties\nbase_model: base\n"
    )
}

/// `fleetmerge run` of a kit case (from the example models) into `out` with
/// `--out-shard-size shard`; the run must succeed.
pub fn run_case(case: &str, out: &Path, shard: &str) {
    let config = fixture(case).join("config.yaml");
    let o = fleetmerge(
        &examples(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
            "--out-shard-size",
            shard,
        ],
    );
    assert!(o.status.success(), "{case}: {}", stderr(&o));
}

/// The tokenizer files and `config.json` of the kit's tokenizer model
/// `kit` (examples/models/tok-*) into `dir`: `extra` more tokens
/// (`_wide_0`, ... after its last id; meant for tok-base, whose ids are its
/// rows) appended to its vocabulary, and the config's `vocab_size` (`extra`
/// more rows), `hidden_size` and `num_hidden_layers` set to match.
pub fn write_tok_files(dir: &Path, kit: &str, extra: u64, width: u64, layers: u64) {
    let from = examples().join("models").join(kit);
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(from.join(f), dir.join(f)).unwrap();
    }
    let mut tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(from.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let added = tok["added_tokens"].as_array().unwrap();
    let next = vocab
        .values()
        .chain(added.iter().map(|t| &t["id"]))
        .map(|v| v.as_u64().unwrap() + 1)
        .max()
        .unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    for k in 0..extra {
        vocab.insert(format!("_wide_{k}"), (next + k).into());
    }
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec_pretty(&tok).unwrap(),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(from.join("config.json")).unwrap()).unwrap();
    let rows = config["vocab_size"].as_u64().unwrap();
    config["vocab_size"] = (rows + extra).into();
    config["hidden_size"] = width.into();
    config["num_hidden_layers"] = layers.into();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
}

/// The kit's tokenizer models (`tok-base`, `tok-chatml`, `tok-padded`:
/// their tokenizers and vocabularies) under `dir/models/`, with embeddings
/// and output heads of `width` columns (bf16; the kit's have 64) and one
/// layer of norms, so that the kit's `tok_*` configs run on them from `dir`
/// with vocabulary tensors as large as a test needs; and `tok-wide`:
/// tok-base's vocabulary and `extra` more tokens.
pub fn write_wide_tok_models(dir: &Path, width: u64, extra: u64) {
    let kit = examples().join("models");
    let models = [
        ("tok-base", "tok-base", 0u64, 1u64),
        ("tok-chatml", "tok-chatml", 0, 2),
        ("tok-padded", "tok-padded", 0, 3),
        ("tok-wide", "tok-base", extra, 4),
    ];
    for (name, from, extra, seed) in models {
        let rows = read_model(&kit.join(from))["model.embed_tokens.weight"].shape[0] + extra;
        let tensor = |t: &str, k: u64, shape: Vec<u64>| {
            let n = shape.iter().product::<u64>() as usize;
            // Shared by the models, and a small difference of each.
            let base = noise(1000 + k, n, 0.02);
            let delta = noise(seed << 32 | k, n, 0.004);
            let values = base.iter().zip(delta).map(|(b, d)| b + d).collect();
            (t.to_string(), shape, values)
        };
        let tensors = vec![
            tensor("model.embed_tokens.weight", 0, vec![rows, width]),
            tensor("lm_head.weight", 1, vec![rows, width]),
            tensor("model.layers.0.input_layernorm.weight", 2, vec![width]),
            tensor("model.norm.weight", 3, vec![width]),
        ];
        let dir = dir.join("models").join(name);
        write_bf16_model(&dir, 1, &tensors);
        write_tok_files(&dir, from, extra, width, 1);
    }
}

/// Whether two output folders hold the same shards, index, config and
/// tokenizer files, byte for byte (how many files were compared).
pub fn same_output_files(got: &Path, want: &Path) -> usize {
    let mut compared = 0;
    for e in std::fs::read_dir(want).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") || name.ends_with(".json") {
            let (a, b) = (
                std::fs::read(got.join(&name)),
                std::fs::read(want.join(&name)),
            );
            assert!(a.is_ok(), "{name} missing from {}", got.display());
            assert!(
                a.unwrap() == b.unwrap(),
                "{name} differs from {}",
                want.display()
            );
            compared += 1;
        }
    }
    compared
}
