//! MXFP4 (gpt-oss) inputs: expert weights stored as `X_blocks` + `X_scales`
//! are decoded on read and merged in f32. Without torch: merges of the kit's
//! gpt-oss models equal, bit for bit, the same merges of their BF16
//! dequantized copies (every decoded value is exact in BF16), for every
//! method family and for a mix of packed and dequantized inputs, locally and
//! in cluster mode; `out_dtype: mxfp4` writes blocks and scales that decode to
//! within half an E2M1 step of the f32 merge; U8 tensors that are not MXFP4
//! are copied only when identical. With torch (`FLEETMERGE_TORCH_PYTHON`, see
//! `common::torch_python`): tiny models written by tests/fixtures/gptoss.py load in
//! transformers and decode there to our values, merges match transformers'
//! dequantized inputs merged in f32, and both output formats load.

use crate::common::*;
use fleetmerge_engine::dtype::packed::{e8m0_to_f32, BlockFormat, PackedView};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MODELS: [&str; 4] = ["gptoss-base", "gptoss-ft-a", "gptoss-ft-b", "gptoss-ft-c"];

fn run_ok(cwd: &Path, args: &[&str]) {
    let o = fleetmerge(cwd, args);
    assert!(o.status.success(), "fleetmerge {args:?}: {}", stderr(&o));
}

/// Merges `yaml` (model paths relative to `cwd`) into `out`.
fn merge(cwd: &Path, yaml: &str, out: &Path, extra: &[&str]) {
    let config = out.with_extension("yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut args = vec![
        "run",
        config.to_str().unwrap(),
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    run_ok(cwd, &args);
}

/// The BF16 dequantized copy of each kit model (a weight-1 linear merge: the
/// decoded values are exact in BF16), under `dir/NAME-bf16`.
fn dequantized_copies(dir: &Path) {
    for m in MODELS {
        let out = dir.join(format!("{m}-bf16"));
        let yaml = format!(
            "models:\n  - model: {}\n    parameters: {{weight: 1.0}}\nmerge_method: linear\n\
             dtype: float32\nout_dtype: bfloat16\n",
            examples().join("models").join(m).display()
        );
        merge(dir, &yaml, &out, &[]);
    }
}

/// A merge config of `method` over the base and three fine-tunes; `path(m)`
/// is where model `m` is.
fn config(method: &str, path: &dyn Fn(&str) -> String, out_dtype: &str) -> String {
    let (base, a, b, c) = (
        path(MODELS[0]),
        path(MODELS[1]),
        path(MODELS[2]),
        path(MODELS[3]),
    );
    match method {
        "slerp" => format!(
            "slices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 2]\n      \
             - model: {a}\n        layer_range: [0, 2]\nmerge_method: slerp\n\
             base_model: {base}\nparameters:\n  t: [0.2, 0.7]\ndtype: float32\n\
             out_dtype: {out_dtype}\n"
        ),
        "linear" => format!(
            "models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {base}\n    \
             parameters: {{weight: 0.2}}\n  - model: {c}\n    parameters: {{weight: 0.3}}\n\
             merge_method: linear\ndtype: float32\nout_dtype: {out_dtype}\n"
        ),
        _ => format!(
            "models:\n  - model: {a}\n    parameters: {{weight: 1.0, density: 0.4}}\n  \
             - model: {b}\n    parameters: {{weight: 0.5, density: 0.7}}\n  - model: {c}\n    \
             parameters: {{weight: 0.25, density: 0.3}}\nmerge_method: {method}\n\
             base_model: {base}\nparameters:\n  normalize: true\ndtype: float32\n\
             out_dtype: {out_dtype}\n"
        ),
    }
}

const METHODS: [&str; 5] = ["linear", "ties", "slerp", "dare_ties", "breadcrumbs_ties"];

fn packed(m: &str) -> String {
    examples().join("models").join(m).display().to_string()
}

#[test]
fn packed_inputs_merge_as_their_dequantized_copies() {
    let dir = tempfile::tempdir().unwrap();
    dequantized_copies(dir.path());
    let copy = |m: &str| dir.path().join(format!("{m}-bf16")).display().to_string();
    // ft-a and ft-c packed, the base and ft-b dequantized.
    let mixed = |m: &str| match m {
        "gptoss-ft-a" | "gptoss-ft-c" => packed(m),
        _ => copy(m),
    };
    for method in METHODS {
        let mut outputs = Vec::new();
        for (label, path) in [
            ("packed", &packed as &dyn Fn(&str) -> String),
            ("bf16", &copy),
            ("mixed", &mixed),
        ] {
            let out = dir.path().join(format!("{method}-{label}"));
            let extra: &[&str] = if label == "packed" {
                &["--random-seed", "3"]
            } else {
                &["--random-seed", "3", "--threads", "1"]
            };
            merge(dir.path(), &config(method, path, "bfloat16"), &out, extra);
            outputs.push((label, read_model(&out)));
        }
        let (_, want) = &outputs[1];
        for (label, got) in &outputs {
            assert!(
                got == want,
                "{method}: the {label} inputs' merge differs from the dequantized copies': {:?}",
                compare(got, want, Mode::Exact)
            );
        }
        // Transformers' dequantized layout, every tensor BF16.
        let got = &outputs[0].1;
        assert!(got
            .keys()
            .all(|k| !k.ends_with("_blocks") && !k.ends_with("_scales")));
        let gate_up = &got["model.layers.1.mlp.experts.gate_up_proj"];
        assert_eq!(
            (gate_up.dtype.as_str(), &gate_up.shape[..]),
            ("BF16", &[4, 64, 128][..])
        );
        let down = &got["model.layers.0.mlp.experts.down_proj"];
        assert_eq!(
            (down.dtype.as_str(), &down.shape[..]),
            ("BF16", &[4, 64, 64][..])
        );
        assert!(got.values().all(|t| t.dtype == "BF16"));
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("ties-packed/config.json")).unwrap())
            .unwrap();
    assert!(config.get("quantization_config").is_none(), "{config}");
    assert_eq!(config["torch_dtype"], "bfloat16");
}

#[test]
fn cluster_workers_decode_packed_inputs_as_a_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = config("ties", &packed, "bfloat16");
    let (local, cluster) = (dir.path().join("local"), dir.path().join("cluster"));
    merge(dir.path(), &yaml, &local, &[]);
    merge(
        dir.path(),
        &yaml,
        &cluster,
        &["--workers", "2", "--out-shard-size", "60K"],
    );
    let (a, b) = (read_model(&local), read_model(&cluster));
    assert!(a == b, "{:?}", compare(&a, &b, Mode::Exact));
}

/// Every packed expert weight of `dir` decoded (the transposed [E, C, R]).
fn decode_packed(model: &BTreeMap<String, Tensor>) -> BTreeMap<String, (Vec<f32>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for (name, t) in model {
        let Some(x) = name.strip_suffix("_blocks") else {
            continue;
        };
        let scales = &model[&format!("{x}_scales")];
        let layout = BlockFormat::Mxfp4.layout(&t.shape).unwrap();
        assert_eq!((t.dtype.as_str(), scales.dtype.as_str()), ("U8", "U8"));
        assert_eq!(scales.shape, layout.scales_shape());
        let mut v = vec![0f32; layout.numel() as usize];
        PackedView {
            layout,
            blocks: &t.bytes,
            scales: &scales.bytes,
        }
        .decode(0, &mut v);
        // Each decoded element's scale, in the same order.
        let (rows, cols) = (layout.rows as usize, (layout.groups * 32) as usize);
        let s: Vec<u8> = (0..v.len())
            .map(|i| {
                let (e, rem) = (i / (cols * rows), i % (cols * rows));
                let (c, r) = (rem / rows, rem % rows);
                scales.bytes[(e * rows + r) * layout.groups as usize + c / 32]
            })
            .collect();
        out.insert(x.to_string(), (v, s));
    }
    out
}

#[test]
fn mxfp4_output_is_within_half_a_step_of_the_f32_merge() {
    let dir = tempfile::tempdir().unwrap();
    let (f32_out, mx_out) = (dir.path().join("f32"), dir.path().join("mx"));
    merge(
        dir.path(),
        &config("ties", &packed, "float32"),
        &f32_out,
        &[],
    );
    merge(dir.path(), &config("ties", &packed, "mxfp4"), &mx_out, &[]);
    let (reference, got) = (read_model(&f32_out), read_model(&mx_out));
    let decoded = decode_packed(&got);
    assert_eq!(decoded.len(), 4);
    for (name, (values, scales)) in &decoded {
        // The inputs' layout again.
        let input = read_model(&examples().join("models/gptoss-ft-a"));
        assert_eq!(
            got[&format!("{name}_blocks")].shape,
            input[&format!("{name}_blocks")].shape
        );
        let want = reference[name].values();
        for (i, ((&v, &s), &w)) in values.iter().zip(scales).zip(&want).enumerate() {
            let x = e8m0_to_f32(s) as f64;
            let q = (w / x).abs();
            let half = if q < 2.0 {
                0.25
            } else if q < 4.0 {
                0.5
            } else {
                1.0
            } * x;
            assert!(
                (v as f64 - w).abs() <= half,
                "{name}[{i}]: {v} decodes from the f32 merge's {w} (scale 2^{})",
                s as i32 - 127
            );
        }
        // Each block's scale is the OCP one (from its amax) or twice that.
        let shape = &got[&format!("{name}_blocks")].shape;
        let (experts, rows, groups) = (shape[0] as usize, shape[1] as usize, shape[2] as usize);
        let cols = groups * 32;
        for e in 0..experts {
            for r in 0..rows {
                for g in 0..groups {
                    let at = |c: usize| (e * cols + c) * rows + r;
                    let amax = (g * 32..(g + 1) * 32)
                        .map(|c| want[at(c)].abs())
                        .fold(0f64, f64::max);
                    if amax == 0.0 {
                        continue;
                    }
                    let ocp = amax.log2().floor() as i32 - 2;
                    let got = scales[at(g * 32)] as i32 - 127;
                    assert!(
                        got == ocp || got == ocp + 1,
                        "{name}: block ({e}, {r}, {g}) with amax {amax} has scale 2^{got}"
                    );
                }
            }
        }
    }
    // The rest keeps the inputs' BF16; config.json keeps quantization_config.
    assert!(got.iter().all(|(k, t)| t.dtype
        == if k.ends_with("_blocks") || k.ends_with("_scales") {
            "U8"
        } else {
            "BF16"
        }));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(mx_out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["quant_method"], "mxfp4");
}

#[test]
fn a_packed_model_written_packed_again_decodes_to_the_same_values() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("again");
    let yaml = format!(
        "models:\n  - model: {}\n    parameters: {{weight: 1.0}}\nmerge_method: linear\n\
         dtype: float32\nout_dtype: mxfp4\n",
        packed("gptoss-ft-b")
    );
    merge(dir.path(), &yaml, &out, &[]);
    let input = read_model(&examples().join("models/gptoss-ft-b"));
    let got = read_model(&out);
    let (a, b) = (decode_packed(&input), decode_packed(&got));
    for (name, (v, _)) in &a {
        assert_eq!(&b[name].0, v, "{name}");
    }
    // Everything else is the input's, bit for bit.
    for (name, t) in &input {
        if !name.ends_with("_blocks") && !name.ends_with("_scales") {
            assert_eq!(&got[name], t, "{name}");
        }
    }
}

/// Copies of the kit's models `names` into `dir`, their config.json
/// changed by `edit`.
fn edited_copies(
    dir: &Path,
    names: &[&str],
    edit: &dyn Fn(&mut serde_json::Value),
) -> Vec<PathBuf> {
    names
        .iter()
        .map(|m| {
            let src = examples().join("models").join(m);
            let dst = dir.join(m);
            std::fs::create_dir_all(&dst).unwrap();
            for e in std::fs::read_dir(&src).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
            }
            let path = dst.join("config.json");
            let mut c: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            edit(&mut c);
            std::fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
            dst
        })
        .collect()
}

#[test]
fn u8_tensors_that_are_not_mxfp4_are_copied_only_when_identical() {
    // Without quant_method: mxfp4 the blocks and scales are plain U8 tensors.
    let dir = tempfile::tempdir().unwrap();
    let models = edited_copies(dir.path(), &["gptoss-ft-a", "gptoss-ft-b"], &|c| {
        c.as_object_mut().unwrap().remove("quantization_config");
    });
    let yaml = |a: &Path, b: &Path| {
        format!(
            "models:\n  - model: {}\n  - model: {}\nmerge_method: linear\n\
             parameters: {{weight: 1.0}}\ndtype: bfloat16\n",
            a.display(),
            b.display()
        )
    };
    let config = dir.path().join("differ.yaml");
    std::fs::write(&config, yaml(&models[0], &models[1])).unwrap();
    let out = dir.path().join("differ");
    let o = fleetmerge(
        dir.path(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("_blocks") || err.contains("_scales"),
        "names the tensor: {err}"
    );
    assert!(err.contains("non-float tensor can only be copied"), "{err}");
    assert!(
        err.contains("gptoss-ft-a") && err.contains("gptoss-ft-b"),
        "names the inputs: {err}"
    );
    // The same model twice: copied as they are.
    let same = dir.path().join("same");
    merge(dir.path(), &yaml(&models[0], &models[0]), &same, &[]);
    let (got, input) = (read_model(&same), read_model(&models[0]));
    assert_eq!(
        got["model.layers.0.mlp.experts.down_proj_blocks"],
        input["model.layers.0.mlp.experts.down_proj_blocks"]
    );
}

#[test]
fn plan_describes_the_mxfp4_tensors_and_refuses_mxfp4_output_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, self::config("ties", &packed, "mxfp4")).unwrap();
    let o = fleetmerge(dir.path(), &["plan", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &stderr(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("4 MXFP4 tensors (gpt-oss experts"), "{text}");
    assert!(text.contains("down_proj_blocks U8 [4, 64, 2, 16] + model.layers.0.mlp.experts.down_proj_scales -> [4, 64, 64] f32"), "{text}");
    assert!(text.contains("written as MXFP4 again"), "{text}");
    // A float out_dtype: dequantized names, config without quantization_config.
    std::fs::write(&config, self::config("ties", &packed, "bfloat16")).unwrap();
    let o = fleetmerge(dir.path(), &["plan", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &stderr(&o);
    assert!(
        text.contains("written as bfloat16 under their dequantized names"),
        "{text}"
    );
    // out_dtype: mxfp4 of models without MXFP4 tensors.
    let llama = examples().join("models/llama-base");
    std::fs::write(
        &config,
        format!(
            "models:\n  - model: {}\nmerge_method: linear\nparameters: {{weight: 1.0}}\n\
             out_dtype: mxfp4\n",
            llama.display()
        ),
    )
    .unwrap();
    let o = fleetmerge(dir.path(), &["plan", config.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no merged tensor has them"),
        "{}",
        stderr(&o)
    );
}

fn py(args: &[&str]) -> String {
    let o = std::process::Command::new(torch_python())
        .arg(root().join("tests/fixtures/gptoss.py"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "gptoss.py {args:?}: {}{}",
        text,
        String::from_utf8_lossy(&o.stderr)
    );
    text
}

/// Tiny gpt-oss models written by the fixture script: a base and three
/// fine-tunes, under `dir`.
fn tiny_models(dir: &Path) -> Vec<String> {
    let names = ["base", "ft1", "ft2", "ft3"];
    for (i, n) in names.iter().enumerate() {
        let out = dir.join(n).display().to_string();
        let seed = (10 + i).to_string();
        let base = dir.join("base").display().to_string();
        let mut args = vec!["make", out.as_str(), "--seed", seed.as_str()];
        if i > 0 {
            args.extend(["--base", base.as_str()]);
        }
        py(&args);
    }
    names
        .iter()
        .map(|n| dir.join(n).display().to_string())
        .collect()
}

#[test]
fn torch_tiny_models_load_in_transformers_and_decode_to_our_values() {
    let dir = tempfile::tempdir().unwrap();
    let models = tiny_models(dir.path());
    for m in &models {
        let out = dir.path().join(format!(
            "{}-ours",
            Path::new(m).file_name().unwrap().to_str().unwrap()
        ));
        let yaml = format!(
            "models:\n  - model: {m}\n    parameters: {{weight: 1.0}}\nmerge_method: linear\n\
             dtype: float32\nout_dtype: float32\n"
        );
        merge(dir.path(), &yaml, &out, &[]);
        let theirs = out.with_extension("transformers.safetensors");
        py(&["dequantize", m, theirs.to_str().unwrap()]);
        let (ours, theirs) = (read_model(&out), read_safetensors_file(&theirs));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>()
        );
        for (name, t) in &ours {
            assert!(
                t.bytes == theirs[name].bytes,
                "{m}: {name} decodes differently in transformers"
            );
        }
    }
}

/// The tensors of one safetensors file.
fn read_safetensors_file(path: &Path) -> BTreeMap<String, Tensor> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(path, dir.path().join("model.safetensors")).unwrap();
    read_model(dir.path())
}

#[test]
fn torch_merges_match_transformers_dequantized_inputs_merged_in_f32() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_models(dir.path());
    let (base, a, b, c) = (&m[0], &m[1], &m[2], &m[3]);
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "linear",
            format!(
                "models:\n  - model: {base}\n    parameters: {{weight: 0.2}}\n  - model: {a}\n    \
                 parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.3}}\n\
                 merge_method: linear\ndtype: float32\nout_dtype: float32\n"
            ),
            vec!["linear", base, a, b, "--base-weight", "0.2", "--weights", "0.5", "0.3"],
        ),
        (
            "ties",
            format!(
                "models:\n  - model: {a}\n    parameters: {{weight: 1.0, density: 0.3}}\n  \
                 - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {c}\n    \
                 parameters: {{weight: 0.25, density: 0.7}}\nmerge_method: ties\n\
                 base_model: {base}\nparameters:\n  normalize: true\ndtype: float32\n\
                 out_dtype: float32\n"
            ),
            vec!["ties", base, a, b, c, "--weights", "1", "0.5", "0.25", "--densities", "0.3", "0.5", "0.7"],
        ),
        (
            "dare_ties",
            format!(
                "models:\n  - model: {a}\n    parameters: {{weight: 1.0, density: 1.0}}\n  \
                 - model: {b}\n    parameters: {{weight: 0.5, density: 1.0}}\nmerge_method: dare_ties\n\
                 base_model: {base}\nparameters:\n  normalize: true\ndtype: float32\n\
                 out_dtype: float32\n"
            ),
            vec!["dare_ties", base, a, b, "--weights", "1", "0.5", "--densities", "1", "1"],
        ),
        (
            "slerp",
            format!(
                "models:\n  - model: {base}\n  - model: {a}\nmerge_method: slerp\n\
                 base_model: {base}\nparameters:\n  t: 0.3\ndtype: float32\nout_dtype: float32\n"
            ),
            vec!["slerp", base, a, "--t", "0.3"],
        ),
    ];
    for (method, yaml, args) in cases {
        let ours = dir.path().join(format!("{method}-ours"));
        merge(dir.path(), &yaml, &ours, &[]);
        let reference = dir.path().join(format!("{method}-ref.safetensors"));
        let mut full = vec!["reference"];
        full.push(args[0]);
        full.push(reference.to_str().unwrap());
        full.extend(&args[1..]);
        py(&full);
        let (got, want) = (read_model(&ours), read_safetensors_file(&reference));
        let problems = compare(&got, &want, Mode::Close);
        assert!(problems.is_empty(), "{method}: {problems:#?}");
        // The expert weights themselves, to f32 rounding.
        for name in got.keys().filter(|k| k.ends_with("_proj")) {
            let (g, w) = (got[name].values(), want[name].values());
            let worst = g
                .iter()
                .zip(&w)
                .map(|(x, y)| (x - y).abs() - 1e-5 * y.abs())
                .fold(0f64, f64::max);
            assert!(
                worst <= 1e-7,
                "{method}: {name} off by {worst} beyond f32 rounding"
            );
        }
    }
}

#[test]
fn torch_both_output_formats_load_in_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_models(dir.path());
    let path = |name: &str| {
        let i = MODELS.iter().position(|x| *x == name).unwrap();
        m[i].clone()
    };
    for (out_dtype, check) in [
        ("bfloat16", None),
        ("float32", None),
        ("mxfp4", Some("float32")),
    ] {
        let out = dir.path().join(format!("ties-{out_dtype}"));
        merge(dir.path(), &config("ties", &path, out_dtype), &out, &[]);
        let out = out.display().to_string();
        match check {
            None => {
                let text = py(&["load", &out]);
                assert!(text.contains("finite"), "{text}");
            }
            Some(reference) => {
                let f32_model = dir
                    .path()
                    .join(format!("ties-{reference}/model.safetensors"));
                let text = py(&["load", &out, "--packed-vs", f32_model.to_str().unwrap()]);
                assert!(text.contains("within half an E2M1 step"), "{text}");
            }
        }
    }
}

/// Rewrites the header of `dir/model.safetensors` with `edit` (the data is
/// kept).
fn edit_header(dir: &Path, edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("model.safetensors");
    let raw = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&raw[8..8 + n]).unwrap();
    edit(&mut header);
    let mut out = safetensors_prefix(&header);
    out.extend_from_slice(&raw[8 + n..]);
    std::fs::write(&path, out).unwrap();
}

#[test]
fn a_malformed_mxfp4_pair_is_refused_at_plan_naming_model_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let models = edited_copies(dir.path(), &["gptoss-ft-a"], &|_| {});
    // Same bytes, another shape: [4, 128, 2] scales read as [8, 64, 2].
    edit_header(&models[0], &|h| {
        h["model.layers.1.mlp.experts.gate_up_proj_scales"]["shape"] =
            serde_json::json!([8, 64, 2]);
    });
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "models:\n  - model: {}\n    parameters: {{weight: 1.0}}\n  - model: {}\n    \
             parameters: {{weight: 1.0}}\nmerge_method: linear\ndtype: bfloat16\n",
            models[0].display(),
            packed("gptoss-ft-b")
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = fleetmerge(
        dir.path(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("model.layers.1.mlp.experts.gate_up_proj_scales is U8 [8, 64, 2]")
            && err.contains(&models[0].display().to_string())
            && err.contains("is MXFP4"),
        "{err}"
    );
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn non_finite_decoded_values_are_kept_in_bf16_and_refused_by_mxfp4_output() {
    // A scale byte of 255 decodes to infinity (2^128), as in transformers.
    let dir = tempfile::tempdir().unwrap();
    let models = edited_copies(dir.path(), &["gptoss-ft-a"], &|_| {});
    let path = models[0].join("model.safetensors");
    let mut raw = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&raw[8..8 + n]).unwrap();
    let at = header["model.layers.0.mlp.experts.down_proj_scales"]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    raw[8 + n + at] = 255;
    std::fs::write(&path, raw).unwrap();
    let yaml = |out_dtype: &str| {
        format!(
            "models:\n  - model: {}\n    parameters: {{weight: 1.0}}\nmerge_method: linear\n\
             dtype: float32\nout_dtype: {out_dtype}\n",
            models[0].display()
        )
    };
    let bf16 = dir.path().join("bf16");
    merge(dir.path(), &yaml("bfloat16"), &bf16, &[]);
    let got = read_model(&bf16);
    let down = got["model.layers.0.mlp.experts.down_proj"].values();
    assert!(down.iter().any(|v| v.is_infinite()));
    let config = dir.path().join("mx.yaml");
    std::fs::write(&config, yaml("mxfp4")).unwrap();
    let out = dir.path().join("mx");
    let o = fleetmerge(
        dir.path(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("model.layers.0.mlp.experts.down_proj_blocks")
            && err.contains("MXFP4 cannot hold")
            && err.contains("float `out_dtype`"),
        "{err}"
    );
}
