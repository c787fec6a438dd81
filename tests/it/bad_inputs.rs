//! Corrupt checkpoints and bad configs through the real binary: each is a clear
//! one-paragraph error naming the file (and tensor), never a panic, and no model
//! is written.

use crate::common::*;
use std::path::Path;

/// Copies the example base and fine-tune into `dir` and returns a TIES config over them.
fn setup(dir: &Path) -> std::path::PathBuf {
    for m in ["llama-base", "llama-ft-a"] {
        let to = dir.join(m);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(examples().join("models").join(m)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        "models:\n  - model: llama-ft-a\n    parameters: {weight: 1.0, density: 0.5}\nmerge_method: ties\nbase_model: llama-base\n",
    )
    .unwrap();
    config
}

fn run_expecting_error(dir: &Path, config: &Path) -> String {
    let out = dir.join("out");
    let o = fleetmerge(
        dir,
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure");
    assert_eq!(
        o.status.code(),
        Some(1),
        "a clean error exit, not a crash: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        !out.join("model.safetensors").exists()
            && !out.join("model.safetensors.index.json").exists(),
        "a model was written"
    );
    err
}

/// Rewrites `llama-ft-a/model.safetensors` with `f(bytes)`.
fn corrupt(dir: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join("llama-ft-a/model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    f(&mut bytes);
    std::fs::write(&path, bytes).unwrap();
}

fn header(bytes: &[u8]) -> (usize, serde_json::Map<String, serde_json::Value>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (n, serde_json::from_slice(&bytes[8..8 + n]).unwrap())
}

/// Replaces the header JSON, keeping the data section where it is (padding with spaces).
fn set_header(bytes: &mut [u8], h: &serde_json::Map<String, serde_json::Value>) {
    let (n, _) = header(bytes);
    let mut json = serde_json::to_vec(h).unwrap();
    assert!(json.len() <= n, "new header must fit");
    json.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&json);
}

#[test]
fn truncated_shard() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    corrupt(dir.path(), |b| b.truncate(b.len() - 1000));
    let err = run_expecting_error(dir.path(), &config);
    assert!(
        err.contains("llama-ft-a/model.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn huge_header_length() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    corrupt(dir.path(), |b| {
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    let err = run_expecting_error(dir.path(), &config);
    assert!(
        err.contains("llama-ft-a/model.safetensors") && err.contains("header length"),
        "{err}"
    );
}

#[test]
fn overlapping_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    corrupt(dir.path(), |b| {
        let (_, mut h) = header(b);
        // Point the second tensor at the first one's bytes.
        let names: Vec<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
        let first = h[&names[0]]["data_offsets"].clone();
        let second = names[1].clone();
        let e = h.get_mut(&second).unwrap().as_object_mut().unwrap();
        e.insert("data_offsets".into(), first);
        let shape = h[&names[0]]["shape"].clone();
        h.get_mut(&second)
            .unwrap()
            .as_object_mut()
            .unwrap()
            .insert("shape".into(), shape);
        set_header(b, &h);
    });
    let err = run_expecting_error(dir.path(), &config);
    assert!(err.contains("overlap"), "{err}");
}

#[test]
fn shape_disagrees_with_byte_length() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    corrupt(dir.path(), |b| {
        let (_, mut h) = header(b);
        let e = h
            .get_mut("model.norm.weight")
            .unwrap()
            .as_object_mut()
            .unwrap();
        e.insert("shape".into(), serde_json::json!([65]));
        set_header(b, &h);
    });
    let err = run_expecting_error(dir.path(), &config);
    assert!(
        err.contains("model.norm.weight") && err.contains("bytes"),
        "{err}"
    );
}

#[test]
fn header_that_is_not_json() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    corrupt(dir.path(), |b| b[8..20].copy_from_slice(b"not json!!!!"));
    let err = run_expecting_error(dir.path(), &config);
    assert!(err.contains("JSON"), "{err}");
}

#[test]
fn unknown_config_key_names_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    std::fs::write(
        &config,
        "models:\n  - model: llama-ft-a\n    parameters: {weight: 1.0}\nmerge_method: ties\nbase_model: llama-base\nnormalise: true\n",
    )
    .unwrap();
    let err = run_expecting_error(dir.path(), &config);
    assert!(err.contains("normalise") && err.contains("line 6"), "{err}");
}

#[test]
fn density_out_of_range_names_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    std::fs::write(
        &config,
        "models:\n  - model: llama-ft-a\n    parameters:\n      weight: 1.0\n      density: -0.5\nmerge_method: ties\nbase_model: llama-base\n",
    )
    .unwrap();
    let err = run_expecting_error(dir.path(), &config);
    assert!(
        err.contains("models[0].parameters.density") && err.contains("line 5"),
        "{err}"
    );
}

#[test]
fn missing_weight_is_reported_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    std::fs::write(
        &config,
        "models:\n  - model: llama-ft-a\nmerge_method: ties\nbase_model: llama-base\n",
    )
    .unwrap();
    let err = run_expecting_error(dir.path(), &config);
    assert!(err.contains("weight") && err.contains("models[0]"), "{err}");
}

#[test]
fn slerp_with_three_models_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    std::fs::write(
        &config,
        "models:\n  - model: llama-ft-a\n  - model: llama-base\nmerge_method: slerp\nbase_model: llama-ft-a\nparameters: {t: 0.5}\n",
    )
    .unwrap();
    // Two models is fine...
    let out = dir.path().join("ok");
    let o = fleetmerge(
        dir.path(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // ...a third is not.
    std::fs::create_dir_all(dir.path().join("third")).unwrap();
    for e in std::fs::read_dir(dir.path().join("llama-base")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join("third").join(e.file_name())).unwrap();
    }
    std::fs::write(
        &config,
        "models:\n  - model: llama-ft-a\n  - model: llama-base\n  - model: third\nmerge_method: slerp\nbase_model: llama-ft-a\nparameters: {t: 0.5}\n",
    )
    .unwrap();
    let err = run_expecting_error(dir.path(), &config);
    assert!(err.contains("exactly 2"), "{err}");
}

/// `--device`: a bad name, or CUDA in a build without it (the default build),
/// is refused before anything is written.
#[test]
fn unusable_devices_are_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = fixture("linear").join("config.yaml");
    let cfg = cfg.to_str().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    for (device, expect) in [
        ("tpu:0", "expected cpu, cuda or cuda:N"),
        ("cuda:x", "expected cpu, cuda or cuda:N"),
        (
            "cuda:0",
            if cfg!(feature = "cuda") {
                "--device cuda:0"
            } else {
                "this build computes on the CPU only"
            },
        ),
    ] {
        let o = fleetmerge(&examples(), &["run", cfg, out, "--device", device]);
        assert!(!o.status.success(), "{device}");
        assert!(stderr(&o).contains(expect), "{device}: {}", stderr(&o));
        assert!(!Path::new(out).exists(), "{device}: output created");
        let o = fleetmerge(
            &examples(),
            &[
                "worker",
                "--coordinator",
                "http://127.0.0.1:9",
                "--device",
                device,
            ],
        );
        assert!(!o.status.success(), "{device}");
        assert!(
            stderr(&o).contains(expect),
            "worker {device}: {}",
            stderr(&o)
        );
    }
    // cpu is fine.
    let o = fleetmerge(
        &examples(),
        &["run", cfg, out, "--device", "cpu", "--quiet"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn an_unsafe_pickle_is_refused_naming_the_file_and_the_global() {
    // The kit's llama-bin-evil: a valid pytorch_model.bin whose pickle also
    // calls posix.system("echo unsafe-pickle-executed").
    let dir = tempfile::tempdir().unwrap();
    let evil = dir.path().join("llama-bin-evil");
    std::fs::create_dir_all(&evil).unwrap();
    for f in ["config.json", "pytorch_model.bin"] {
        std::fs::copy(
            examples().join("models/llama-bin-evil").join(f),
            evil.join(f),
        )
        .unwrap();
    }
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "models:\n  - model: llama-bin-evil\n    parameters: {weight: 1.0}\nmerge_method: linear\n",
    )
    .unwrap();
    let err = run_expecting_error(dir.path(), &config);
    assert!(
        err.contains("llama-bin-evil/pytorch_model.bin") && err.contains("posix.system"),
        "{err}"
    );
    assert!(!err.contains("unsafe-pickle-executed"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_corrupt_pytorch_model_bin_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("llama-bin-a");
    std::fs::create_dir_all(&m).unwrap();
    let src = examples().join("models/llama-bin-a");
    std::fs::copy(src.join("config.json"), m.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("pytorch_model.bin")).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "models:\n  - model: llama-bin-a\n    parameters: {weight: 1.0}\nmerge_method: linear\n",
    )
    .unwrap();
    // Truncated (no central directory), a non-contiguous (transposed) view.
    let mut transposed = bytes.clone();
    let pkl = transposed
        .windows(b"\x86q\x08K@K\x01\x86".len())
        .position(|w| w == b"\x86q\x08K@K\x01\x86")
        .expect("the embedding's stride (64, 1) in the pickle");
    // (64, 1) -> (1, 64): a column-major view.
    transposed[pkl + 4] = 1;
    transposed[pkl + 6] = 64;
    for (bytes, want) in [
        (
            bytes[..bytes.len() / 2].to_vec(),
            "not a readable torch checkpoint",
        ),
        (transposed, "non-contiguous"),
    ] {
        std::fs::write(m.join("pytorch_model.bin"), bytes).unwrap();
        let err = run_expecting_error(dir.path(), &config);
        assert!(
            err.contains("llama-bin-a/pytorch_model.bin") && err.contains(want),
            "{err}"
        );
    }
}
