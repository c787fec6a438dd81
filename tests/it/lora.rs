//! LoRA adapters (`model+adapter` references) through the real binary: an
//! identity merge is the folded weights rounded once; tensors streamed under
//! `--max-memory` (the adapted ones included) give the same bytes; an
//! `adapter_model.bin` merges to the bytes of the same adapter in
//! safetensors; adapters that cannot be applied are refused, naming the kind
//! and the file, with nothing written. (The kit's LoRA cases are in `conformance`, cluster mode
//! in `cluster`, adapters in S3 in `object_storage`, on the Hub in `hub`.)

use crate::common::*;
use std::collections::BTreeMap;
use std::path::Path;

/// The values of an F32 or BF16 tensor as f32.
fn f32s(t: &Tensor) -> Vec<f32> {
    t.values().into_iter().map(|v| v as f32).collect()
}

/// bf16 rounding (to nearest, ties to even), as the output is written.
fn bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// `merge_method: linear` of one model with weight 1 is the model itself: for
/// `llama-base+lora-qv`, every adapted weight is `W + 2 · B·A` folded in f32
/// (the product summed in rank order with fused multiply-adds, then times the
/// scale, then added) and rounded once to bf16; the other tensors are the
/// base's bytes.
#[test]
fn an_identity_merge_is_the_folded_weights_rounded_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("identity.yaml");
    std::fs::write(
        &config,
        "models:\n  - model: ./models/llama-base+./models/lora-qv\n    parameters: {weight: 1.0}\n\
         merge_method: linear\ndtype: bfloat16\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = fleetmerge(
        &examples(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = read_model(&out);
    let base = read_model(&examples().join("models/llama-base"));
    let adapter = read_adapter(&examples().join("models/lora-qv"));
    let mut adapted = 0;
    for (name, t) in &base {
        let key = |f: &str| {
            format!(
                "base_model.model.{}.{f}.weight",
                name.trim_end_matches(".weight")
            )
        };
        let Some(a) = adapter.get(&key("lora_A")) else {
            assert_eq!(&got[name], t, "{name} is not adapted: the base's bytes");
            continue;
        };
        let b = &adapter[&key("lora_B")];
        let (w, av, bv) = (f32s(t), f32s(a), f32s(b));
        let (rows, cols, rank) = (
            t.shape[0] as usize,
            t.shape[1] as usize,
            a.shape[0] as usize,
        );
        let want: Vec<u16> = (0..rows * cols)
            .map(|e| {
                let (i, j) = (e / cols, e % cols);
                let mut p = 0f32;
                for k in 0..rank {
                    p = bv[i * rank + k].mul_add(av[k * cols + j], p);
                }
                bf16(w[e] + p * 2.0)
            })
            .collect();
        let out: Vec<u16> = got[name]
            .bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(got[name].dtype, "BF16");
        let differ = out.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ, 0,
            "{name}: {differ} elements differ from the folded weight"
        );
        // The adapter changes the weight (this is not the base again).
        assert_ne!(&got[name], t, "{name}");
        adapted += 1;
    }
    assert_eq!(adapted, 12, "q_proj and v_proj of 6 layers");
}

/// The tensors of an adapter's `adapter_model.safetensors`.
fn read_adapter(dir: &Path) -> BTreeMap<String, Tensor> {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.join("adapter_model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    read_model(tmp.path())
}

/// Writes an adapter folder: `config` over a plain LoRA config, and F32
/// tensors.
fn write_adapter(dir: &Path, config: serde_json::Value, tensors: &[(String, Vec<u64>, Vec<f32>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut c = serde_json::json!({"peft_type": "LORA", "r": 16, "lora_alpha": 32,
        "fan_in_fan_out": false, "use_rslora": false, "task_type": "CAUSAL_LM"});
    for (k, v) in config.as_object().unwrap() {
        c[k] = v.clone();
    }
    std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let start = data.len();
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut file = safetensors_prefix(&header);
    file.extend_from_slice(&data);
    std::fs::write(dir.join("adapter_model.safetensors"), file).unwrap();
}

/// A TIES merge of big models with an adapted one (layer 0's up_proj adapted,
/// layer 1's down_proj adapted transposed, layer 1's up_proj replaced), whose
/// tensors exceed the budget: streamed a segment at a time, the adapted ones
/// with their factors read whole, with the bytes of the merge that reads every
/// tensor whole.
#[test]
fn adapted_tensors_streamed_under_a_memory_budget_give_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let layers = 2;
    make_ties_models(dir.path(), layers);
    let (rows, cols, r) = (TIES_ROWS, TIES_COLS, 16u64);
    let key =
        |l: u64, m: &str, what: &str| format!("base_model.model.model.layers.{l}.mlp.{m}.{what}");
    write_adapter(
        &dir.path().join("adapter"),
        serde_json::json!({"modules_to_save": null}),
        &[
            (
                key(0, "up_proj", "lora_A.weight"),
                vec![r, cols],
                noise(7, (r * cols) as usize, 0.05),
            ),
            (
                key(0, "up_proj", "lora_B.weight"),
                vec![rows, r],
                noise(8, (rows * r) as usize, 0.05),
            ),
            // [1024, 1536] stored [in, out]: A [r, 1024], B [1536, r].
            (
                key(1, "down_proj", "lora_A.weight"),
                vec![r, rows],
                noise(9, (r * rows) as usize, 0.05),
            ),
            (
                key(1, "down_proj", "lora_B.weight"),
                vec![cols, r],
                noise(10, (cols * r) as usize, 0.05),
            ),
            (
                "base_model.model.model.layers.1.mlp.up_proj.weight".to_string(),
                vec![rows, cols],
                noise(11, (rows * cols) as usize, 0.02),
            ),
        ],
    );
    let config = dir.path().join("lora-ties.yaml");
    std::fs::write(
        &config,
        "models:\n  - model: a\n    parameters: {weight: 1.0, density: 0.5}\n  - model: b+adapter\n    \
         parameters: {weight: 0.5, density: 0.5}\nmerge_method: ties\nbase_model: base\n",
    )
    .unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let o = fleetmerge(dir.path(), &args);
        assert!(o.status.success(), "{}", stderr(&o));
        read_model(out)
    };
    let whole = run(&dir.path().join("whole"), &[]);
    let budget = "80MiB";
    let o = fleetmerge(
        dir.path(),
        &[
            "plan",
            config.to_str().unwrap(),
            "--json",
            "--max-memory",
            budget,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let streamed = plan["plan"]["streamed_tensors"].as_u64().unwrap();
    assert!(
        streamed >= 2 * layers,
        "{streamed} tensors streamed:\n{plan}"
    );
    let adapter = &plan["models"][1]["adapter"];
    assert_eq!(adapter["rank"], 16, "{plan}");
    assert_eq!(adapter["scale"], 2.0, "{plan}");
    assert_eq!(
        (adapter["adapted"].as_u64(), adapter["replaced"].as_u64()),
        (Some(2), Some(1))
    );
    let streamed = run(
        &dir.path().join("streamed"),
        &["--max-memory", budget, "--threads", "2"],
    );
    assert!(whole == streamed, "streamed bytes differ from whole ones");
    // The adapter matters: without it the merge differs where it adapts.
    let plain_config = dir.path().join("plain.yaml");
    std::fs::write(
        &plain_config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("b+adapter", "b"),
    )
    .unwrap();
    let out = dir.path().join("plain");
    let o = fleetmerge(
        dir.path(),
        &[
            "run",
            plain_config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let plain = read_model(&out);
    for (name, t) in &whole {
        let changed =
            name.starts_with("model.layers.0.mlp.up_proj") || name.starts_with("model.layers.1.");
        assert_eq!(&plain[name] != t, changed, "{name}");
    }
}

/// Adapters that are not plain LoRA, `.bin` adapters that are not torch
/// checkpoints or whose pickle imports other code, and adapters of another
/// model are refused before anything is written, naming the kind (or key,
/// or global) and the file.
#[test]
fn adapters_that_cannot_be_applied_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let kit = examples().join("models/lora-qv");
    let copy = |name: &str, config: serde_json::Value| {
        let to = dir.path().join(name);
        std::fs::create_dir_all(&to).unwrap();
        std::fs::copy(
            kit.join("adapter_model.safetensors"),
            to.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(kit.join("adapter_config.json")).unwrap())
                .unwrap();
        for (k, v) in config.as_object().unwrap() {
            c[k] = v.clone();
        }
        std::fs::write(to.join("adapter_config.json"), c.to_string()).unwrap();
        to
    };
    let dora = copy("dora", serde_json::json!({"use_dora": true}));
    let loha = copy("loha", serde_json::json!({"peft_type": "LOHA"}));
    let bin = copy("bin", serde_json::json!({}));
    std::fs::rename(
        bin.join("adapter_model.safetensors"),
        bin.join("adapter_model.bin"),
    )
    .unwrap();
    let evil = copy("evil", serde_json::json!({}));
    std::fs::remove_file(evil.join("adapter_model.safetensors")).unwrap();
    std::fs::copy(
        examples().join("models/llama-bin-evil/pytorch_model.bin"),
        evil.join("adapter_model.bin"),
    )
    .unwrap();
    let other_model = examples().join("models/tok-base");
    for (model, adapter, words) in [
        (
            examples().join("models/llama-base"),
            &dora,
            vec!["DoRA", "dora/adapter_config.json"],
        ),
        (
            examples().join("models/llama-base"),
            &loha,
            vec!["LOHA", "loha/adapter_config.json"],
        ),
        (
            examples().join("models/llama-base"),
            &bin,
            vec!["bin/adapter_model.bin", "not a torch.save checkpoint"],
        ),
        (
            examples().join("models/llama-base"),
            &evil,
            vec!["evil/adapter_model.bin", "posix.system"],
        ),
        (
            other_model,
            &kit,
            vec![
                "lora-qv/adapter_model.safetensors",
                "base_model.model.model.layers.",
                "the base model does not have",
            ],
        ),
    ] {
        let config = dir.path().join("c.yaml");
        std::fs::write(
            &config,
            format!(
                "models:\n  - model: {}+{}\n    parameters: {{weight: 1.0}}\nmerge_method: linear\n",
                model.display(),
                adapter.display()
            ),
        )
        .unwrap();
        let out = dir.path().join("out");
        for cmd in ["plan", "run"] {
            let mut args = vec![cmd, config.to_str().unwrap()];
            if cmd == "run" {
                args.extend([out.to_str().unwrap(), "--quiet"]);
            }
            let o = fleetmerge(dir.path(), &args);
            let e = stderr(&o);
            assert!(!o.status.success(), "{cmd} {}: {e}", adapter.display());
            for w in &words {
                assert!(e.contains(w), "{cmd}: {e} (wanted {w})");
            }
            assert!(!out.exists(), "nothing written");
        }
    }
}

/// An adapter saved by PEFT with `safe_serialization=False` (`adapter_model.bin`,
/// a torch zip checkpoint) is read through the `.bin` reader: the kit's
/// `lora_ties` with `lora-wide` (bf16) saved that way merges to the bytes of
/// the safetensors adapter (also on one thread), and `plan` lists the
/// adapter and its factors.
#[test]
fn a_bin_adapter_merges_to_the_bytes_of_the_safetensors_one() {
    let dir = tempfile::tempdir().unwrap();
    let kit = examples().join("models/lora-wide");
    let bin = dir.path().join("lora-wide-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(
        kit.join("adapter_config.json"),
        bin.join("adapter_config.json"),
    )
    .unwrap();
    let tensors: Vec<(String, Vec<u64>, Vec<f32>)> = read_adapter(&kit)
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype, "BF16", "{name}: torch_save writes bf16");
            let values = f32s(&t);
            (name, t.shape, values)
        })
        .collect();
    assert_eq!(tensors.len(), 84);
    std::fs::write(bin.join("adapter_model.bin"), torch::torch_save(&tensors)).unwrap();
    let config = |adapter: &Path| {
        let models = examples().join("models");
        let c = std::fs::read_to_string(root().join("tests/fixtures/cases/lora_ties/config.yaml"))
            .unwrap()
            .replace("./models/lora-wide", &adapter.display().to_string())
            .replace("./models", &models.display().to_string());
        let path = dir.path().join(format!(
            "{}.yaml",
            adapter.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&path, c).unwrap();
        path
    };
    let (st, bt) = (config(&kit), config(&bin));
    assert!(std::fs::read_to_string(&bt)
        .unwrap()
        .contains("lora-wide-bin"));
    let run = |config: &Path, out: &str, extra: &[&str]| {
        let out = dir.path().join(out);
        let mut args = vec![
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let o = fleetmerge(dir.path(), &args);
        assert!(o.status.success(), "{}", stderr(&o));
        read_model(&out)
    };
    let want = run(&st, "safetensors", &[]);
    let got = run(&bt, "bin", &[]);
    assert_eq!(want.len(), got.len());
    for (name, t) in &want {
        assert!(
            got[name] == *t,
            "{name}: the .bin adapter gives other bytes"
        );
    }
    let threads = run(&bt, "bin-threads", &["--threads", "1"]);
    assert!(threads == want, "one thread: other bytes");
    let o = fleetmerge(dir.path(), &["plan", bt.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let adapter = &plan["models"][0]["adapter"];
    assert!(
        adapter["location"]
            .as_str()
            .is_some_and(|l| l.contains("lora-wide-bin")),
        "{plan}"
    );
    assert_eq!(adapter["rank"], 8, "{plan}");
    assert_eq!(adapter["adapted"], 42, "{plan}");
}
