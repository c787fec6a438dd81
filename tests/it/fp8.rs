//! FP8 block-scaled inputs (DeepSeek-V3 / Kimi-K2 style: `X.weight` in F8_E4M3
//! plus `X.weight_scale_inv` in F32, `weight_block_size` in config.json) are
//! dequantized on read. Reference: the test dequantizes the same checkpoints
//! itself into F32 ones; merging those must give exactly the same bytes, for
//! linear, TIES and DARE. Block sizes that do not divide the shapes are covered.

use crate::common::*;
use std::collections::BTreeMap;
use std::path::Path;

const BLOCK: u64 = 16;

/// The f32 value of an E4M3 byte (OCP "e4m3fn").
fn e4m3(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// The nearest E4M3 byte (finite values only).
fn to_e4m3(x: f32) -> u8 {
    let mag = (0u8..0x7f)
        .min_by(|&a, &b| {
            (e4m3(a) - x.abs())
                .abs()
                .total_cmp(&(e4m3(b) - x.abs()).abs())
        })
        .unwrap();
    if x < 0.0 {
        mag | 0x80
    } else {
        mag
    }
}

enum Data {
    Bf16(Vec<f32>),
    F32(Vec<f32>),
    /// FP8 bytes and their F32 block scales.
    Fp8(Vec<u8>, Vec<f32>),
}

/// One model: tensors in DeepSeek-V3 layout (MLA attention, a dense layer, an
/// MoE layer with experts and the router's correction bias, an MTP layer 2).
fn model(seed: u64) -> Vec<(String, Vec<u64>, Data)> {
    let mut out = Vec::new();
    let n = std::cell::Cell::new(0u64);
    let next = |len: usize, scale: f32| {
        n.set(n.get() + 1);
        noise(seed * 1000 + n.get(), len, scale)
    };
    let fp8 = |out: &mut Vec<_>, name: &str, rows: u64, cols: u64| {
        let scales: Vec<f32> = next((rows.div_ceil(BLOCK) * cols.div_ceil(BLOCK)) as usize, 0.5)
            .iter()
            .map(|s| 1.0 + s)
            .collect();
        let values = next((rows * cols) as usize, 300.0);
        // Fine-tunes differ from the base in 60 % of the elements.
        let base = noise(7 + rows * cols, (rows * cols) as usize, 300.0);
        let mixed: Vec<u8> = values
            .iter()
            .zip(&base)
            .enumerate()
            .map(|(i, (v, b))| to_e4m3(if seed == 0 || i % 5 < 2 { *b } else { *v }))
            .collect();
        out.push((
            format!("{name}.weight"),
            vec![rows, cols],
            Data::Fp8(mixed, scales),
        ));
    };
    out.push((
        "model.embed_tokens.weight".into(),
        vec![64, 36],
        Data::Bf16(next(64 * 36, 0.02)),
    ));
    for l in 0..3u64 {
        let p = format!("model.layers.{l}");
        out.push((
            format!("{p}.input_layernorm.weight"),
            vec![36],
            Data::Bf16(next(36, 1.0)),
        ));
        fp8(&mut out, &format!("{p}.self_attn.q_a_proj"), 24, 36);
        fp8(&mut out, &format!("{p}.self_attn.kv_b_proj"), 40, 20);
        if l == 0 {
            fp8(&mut out, &format!("{p}.mlp.up_proj"), 48, 36);
        } else {
            out.push((
                format!("{p}.mlp.gate.weight"),
                vec![4, 36],
                Data::Bf16(next(4 * 36, 0.1)),
            ));
            out.push((
                format!("{p}.mlp.gate.e_score_correction_bias"),
                vec![4],
                Data::F32(next(4, 1.0)),
            ));
            for e in 0..4 {
                fp8(&mut out, &format!("{p}.mlp.experts.{e}.down_proj"), 36, 40);
            }
        }
    }
    out.push((
        "model.norm.weight".into(),
        vec![36],
        Data::Bf16(next(36, 1.0)),
    ));
    out.push((
        "lm_head.weight".into(),
        vec![64, 36],
        Data::Bf16(next(64 * 36, 0.02)),
    ));
    out
}

/// Writes `tensors` as a checkpoint; `dequantize` writes FP8 weights as F32
/// (fp8 · block scale), without scales or quantization_config.
fn write(dir: &Path, tensors: &[(String, Vec<u64>, Data)], dequantize: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    let mut add = |name: String, dtype: &str, shape: &[u64], bytes: Vec<u8>, data: &mut Vec<u8>| {
        let start = data.len();
        data.extend_from_slice(&bytes);
        header.insert(
            name,
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    };
    for (name, shape, d) in tensors {
        match d {
            Data::Bf16(v) => add(
                name.clone(),
                "BF16",
                shape,
                v.iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
                    .collect(),
                &mut data,
            ),
            Data::F32(v) => add(
                name.clone(),
                "F32",
                shape,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                &mut data,
            ),
            Data::Fp8(bytes, scales) if dequantize => {
                let cols = shape[1];
                let scale_cols = cols.div_ceil(BLOCK);
                let values: Vec<u8> = bytes
                    .iter()
                    .enumerate()
                    .flat_map(|(i, &b)| {
                        let (r, c) = (i as u64 / cols, i as u64 % cols);
                        let s = scales[((r / BLOCK) * scale_cols + c / BLOCK) as usize];
                        (e4m3(b) * s).to_le_bytes()
                    })
                    .collect();
                add(name.clone(), "F32", shape, values, &mut data);
            }
            Data::Fp8(bytes, scales) => {
                add(name.clone(), "F8_E4M3", shape, bytes.clone(), &mut data);
                add(
                    format!("{name}_scale_inv"),
                    "F32",
                    &[shape[0].div_ceil(BLOCK), shape[1].div_ceil(BLOCK)],
                    scales.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    &mut data,
                );
            }
        }
    }
    let mut file = safetensors_prefix(&header);
    file.extend_from_slice(&data);
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
    let mut config = serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "num_hidden_layers": 2, "num_nextn_predict_layers": 1, "hidden_size": 36,
        "vocab_size": 64, "torch_dtype": "bfloat16"
    });
    if !dequantize {
        config["quantization_config"] = serde_json::json!({
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK]
        });
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn tensor_map(dir: &Path) -> BTreeMap<String, Tensor> {
    read_model(dir)
}

#[test]
fn fp8_inputs_merge_like_their_dequantized_f32_selves() {
    let dir = tempfile::tempdir().unwrap();
    for (name, seed) in [("base", 0u64), ("ft-a", 1), ("ft-b", 2)] {
        let tensors = model(seed);
        write(&dir.path().join("fp8").join(name), &tensors, false);
        write(&dir.path().join("f32").join(name), &tensors, true);
    }
    let configs = [
        (
            "linear",
            "merge_method: linear\n",
            "{weight: 0.6}",
            "{weight: 0.4}",
        ),
        (
            "ties",
            "merge_method: ties\nbase_model: base\n",
            "{weight: 1.0, density: 0.5}",
            "{weight: 0.5, density: 0.5}",
        ),
        (
            "dare",
            "merge_method: dare_ties\nbase_model: base\n",
            "{weight: 1.0, density: 0.6}",
            "{weight: 0.7, density: 0.6}",
        ),
    ];
    for (method, head, pa, pb) in configs {
        let mut outs = Vec::new();
        for set in ["fp8", "f32"] {
            let cfg = format!(
                "models:\n  - model: ft-a\n    parameters: {pa}\n  - model: ft-b\n    \
                 parameters: {pb}\n{head}dtype: bfloat16\n"
            );
            let cwd = dir.path().join(set);
            std::fs::write(cwd.join("m.yaml"), cfg).unwrap();
            let out = dir.path().join(format!("{method}-{set}"));
            let o = fleetmerge(&cwd, &["run", "m.yaml", out.to_str().unwrap(), "--quiet"]);
            assert!(o.status.success(), "{method} {set}: {}", stderr(&o));
            outs.push(out);
        }
        let (fp8, f32) = (tensor_map(&outs[0]), tensor_map(&outs[1]));
        assert!(
            fp8.keys().eq(f32.keys()),
            "{method}: the scales are not outputs: {:?}",
            fp8.keys()
                .filter(|k| k.contains("scale"))
                .collect::<Vec<_>>()
        );
        assert!(
            fp8.contains_key("model.layers.2.self_attn.q_a_proj.weight"),
            "MTP layer kept"
        );
        assert!(fp8.contains_key("model.layers.1.mlp.gate.e_score_correction_bias"));
        for (name, t) in &fp8 {
            assert_eq!(t.dtype, f32[name].dtype, "{method} {name}");
            assert!(
                t.values() == f32[name].values(),
                "{method}: {name} differs from the merge of the dequantized inputs"
            );
        }
        let w = &fp8["model.layers.0.mlp.up_proj.weight"];
        assert_eq!(w.dtype, "BF16");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(outs[0].join("config.json")).unwrap()).unwrap();
        assert!(config.get("quantization_config").is_none(), "{config}");
    }
}

#[test]
fn fp8_output_and_bad_scales_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    for (name, seed) in [("ft-a", 1u64), ("ft-b", 2)] {
        write(&dir.path().join(name), &model(seed), false);
    }
    // FP8 output of models without block-scaled FP8 weights: refused at the key.
    let plain = dir.path().join("plain");
    write_bf16_model(
        &plain,
        1,
        &[("model.norm.weight".to_string(), vec![4], vec![1.0; 4])],
    );
    std::fs::write(
        dir.path().join("m.yaml"),
        "models:\n  - model: plain\n    parameters: {weight: 0.5}\n  - model: plain\n    \
         parameters: {weight: 0.5}\nmerge_method: linear\nout_dtype: float8_e4m3fn\n",
    )
    .unwrap();
    let o = fleetmerge(dir.path(), &["run", "m.yaml", "out"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("out_dtype (line 7") && err.contains("no merged tensor has them"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists());
    std::fs::write(
        dir.path().join("m0.yaml"),
        "models:\n  - model: plain\n    parameters: {weight: 0.5}\n  - model: plain\n    \
         parameters: {weight: 0.5}\nmerge_method: linear\n",
    )
    .unwrap();
    let o = fleetmerge(dir.path(), &["run", "m0.yaml", "out", "--keep-fp8"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--keep-fp8: FP8 output"),
        "{}",
        stderr(&o)
    );
    // A block size that does not match the scales' shape.
    let cfg_path = dir.path().join("ft-b/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["quantization_config"]["weight_block_size"] = serde_json::json!([8, 8]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    std::fs::write(
        dir.path().join("m2.yaml"),
        "models:\n  - model: ft-b\n    parameters: {weight: 0.5}\n  - model: ft-a\n    \
         parameters: {weight: 0.5}\nmerge_method: linear\ndtype: bfloat16\n",
    )
    .unwrap();
    let o = fleetmerge(dir.path(), &["run", "m2.yaml", "out2"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("weight_scale_inv") && err.contains("8x8 blocks"),
        "{err}"
    );
}

#[test]
fn filters_select_routed_and_shared_experts() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = model(1);
    let b = model(2);
    // A shared expert in layer 1 of both models.
    let shared = |seed| {
        let v: Vec<u8> = noise(seed, 36 * 40, 300.0)
            .iter()
            .map(|x| to_e4m3(*x))
            .collect();
        (
            "model.layers.1.mlp.shared_experts.down_proj.weight".to_string(),
            vec![36u64, 40],
            Data::Fp8(v, vec![1.5; 3 * 3]),
        )
    };
    a.push(shared(11));
    let mut b = b;
    b.push(shared(12));
    write(&dir.path().join("ft-a"), &a, false);
    write(&dir.path().join("ft-b"), &b, false);
    write(&dir.path().join("ref-a"), &a, true);
    write(&dir.path().join("ref-b"), &b, true);
    // Routed experts from ft-a, the shared expert from ft-b, the rest half and half
    // (the first matching filter wins, as in mergekit).
    std::fs::write(
        dir.path().join("m.yaml"),
        "models:\n  - model: ft-a\n    parameters:\n      weight:\n        - filter: shared_experts\n          \
         value: 0.0\n        - filter: experts\n          value: 1.0\n        - value: 0.5\n  - model: \
         ft-b\n    parameters:\n      weight:\n        - filter: shared_experts\n          value: 1.0\n        \
         - filter: experts\n          value: 0.0\n        - value: 0.5\nmerge_method: linear\ndtype: float32\n",
    )
    .unwrap();
    let o = fleetmerge(dir.path(), &["run", "m.yaml", "out", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = read_model(&dir.path().join("out"));
    let (ra, rb) = (
        read_model(&dir.path().join("ref-a")),
        read_model(&dir.path().join("ref-b")),
    );
    let routed = "model.layers.1.mlp.experts.2.down_proj.weight";
    let shared = "model.layers.1.mlp.shared_experts.down_proj.weight";
    assert!(
        out[routed].values() == ra[routed].values(),
        "routed experts come from ft-a"
    );
    assert!(
        out[shared].values() == rb[shared].values(),
        "the shared expert comes from ft-b"
    );
    let attn = "model.layers.1.self_attn.q_a_proj.weight";
    let mean: Vec<f64> = ra[attn]
        .values()
        .iter()
        .zip(rb[attn].values())
        .map(|(x, y)| ((*x as f32 * 0.5 + y as f32 * 0.5) / 1.0) as f64)
        .collect();
    let got = out[attn].values();
    let worst = got
        .iter()
        .zip(&mean)
        .map(|(g, m)| (g - m).abs() / m.abs().max(1e-3))
        .fold(0.0f64, f64::max);
    assert!(worst < 1e-6, "other tensors are averaged ({worst})");
}

#[test]
fn keep_fp8_requantizes_merged_weights_with_fresh_block_scales() {
    let dir = tempfile::tempdir().unwrap();
    let models = [("base", 0u64), ("ft-a", 1), ("ft-b", 2)];
    for (name, seed) in models {
        let tensors = model(seed);
        write(&dir.path().join("fp8").join(name), &tensors, false);
        write(&dir.path().join("f32").join(name), &tensors, true);
    }
    let input = read_model(&dir.path().join("fp8/ft-a"));
    for (method, head) in [
        ("ties", "merge_method: ties\nbase_model: base\n"),
        ("dare", "merge_method: dare_ties\nbase_model: base\n"),
    ] {
        let body = format!(
            "models:\n  - model: ft-a\n    parameters: {{weight: 1.0, density: 0.6}}\n  - model: \
             ft-b\n    parameters: {{weight: 0.5, density: 0.6}}\n{head}"
        );
        // No `dtype`: every tensor keeps its input's type (FP8 weights via --keep-fp8).
        std::fs::write(dir.path().join("fp8/m.yaml"), &body).unwrap();
        std::fs::write(
            dir.path().join("f32/m.yaml"),
            format!("{body}dtype: float32\n"),
        )
        .unwrap();
        let out = dir.path().join(format!("{method}-fp8"));
        let o = fleetmerge(
            &dir.path().join("fp8"),
            &[
                "run",
                "m.yaml",
                out.to_str().unwrap(),
                "--quiet",
                "--keep-fp8",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let reference = dir.path().join(format!("{method}-f32"));
        let o = fleetmerge(
            &dir.path().join("f32"),
            &["run", "m.yaml", reference.to_str().unwrap(), "--quiet"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let (got, want) = (read_model(&out), read_model(&reference));
        // The input's exact layout: same names, dtypes and shapes.
        for (name, t) in &input {
            assert_eq!(got[name].dtype, t.dtype, "{method} {name}");
            assert_eq!(got[name].shape, t.shape, "{method} {name}");
        }
        assert_eq!(got.len(), input.len());
        for (name, w) in got.iter().filter(|(_, t)| t.dtype == "F8_E4M3") {
            let cols = w.shape[1] as usize;
            let scale_cols = cols.div_ceil(BLOCK as usize);
            let scales = got[&format!("{name}_scale_inv")].values();
            let r = want[name].values();
            // Fresh scales: the block's largest magnitude / 448.
            let mut amax = vec![0f32; scales.len()];
            for (i, v) in r.iter().enumerate() {
                let b = (i / cols) / BLOCK as usize * scale_cols + (i % cols) / BLOCK as usize;
                amax[b] = amax[b].max((*v as f32).abs());
            }
            for (b, (s, a)) in scales.iter().zip(&amax).enumerate() {
                let expected = if *a > 0.0 { a / 448.0 } else { 1.0 };
                assert_eq!(*s as f32, expected, "{method} {name} block {b}");
            }
            // Each value within half an E4M3 step (times its scale) of the merge.
            for (i, (&q, &v)) in w.bytes.iter().zip(&r).enumerate() {
                let b = (i / cols) / BLOCK as usize * scale_cols + (i % cols) / BLOCK as usize;
                let s = scales[b] as f32;
                let x = (v as f32 / s).abs();
                let half = if x >= 1.0 / 64.0 {
                    2f32.powi(((x.to_bits() >> 23) as i32 - 127) - 4)
                } else {
                    2f32.powi(-10)
                };
                let d = (e4m3(q) * s - v as f32).abs();
                assert!(
                    d <= half * s * 1.001,
                    "{method} {name}[{i}]: {} vs {v}",
                    e4m3(q) * s
                );
            }
        }
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(
            config["quantization_config"]["weight_block_size"],
            serde_json::json!([BLOCK, BLOCK])
        );

        // `out_dtype: fp8` in the YAML is the same as --keep-fp8.
        std::fs::write(
            dir.path().join("fp8/m.yaml"),
            format!("{body}out_dtype: fp8\n"),
        )
        .unwrap();
        let yaml_out = dir.path().join(format!("{method}-yaml"));
        let o = fleetmerge(
            &dir.path().join("fp8"),
            &["run", "m.yaml", yaml_out.to_str().unwrap(), "--quiet"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        for file in ["model.safetensors", "config.json"] {
            assert!(
                std::fs::read(out.join(file)).unwrap()
                    == std::fs::read(yaml_out.join(file)).unwrap(),
                "{method}: out_dtype: fp8 and --keep-fp8 differ in {file}"
            );
        }
    }
}
