//! `--max-memory`: the merge stays within it (peak RSS of the real process, as
//! the kernel accounts it, mapped input pages included), gives the same bytes
//! as an unlimited run, and a budget too small for the largest tensor is
//! refused before anything is written.
//!
//! A test binary of its own, apart from tests/it: a child's peak RSS as wait4
//! reports it starts from the spawning process's (the kernel charges the
//! parent's address space to the child until it execs), so the parent must
//! stay small, which a test process running every other area's tests at once
//! is not (220 MiB seen).

#[path = "it/common/mod.rs"]
mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// Runs `fleetmerge ARGS` in `cwd`; returns (success, stderr, peak RSS bytes).
fn run_measured(cwd: &Path, args: &[&str]) -> (bool, String, u64) {
    // Reaped by wait4 below (which also reports its resource usage).
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_fleetmerge"))
        .current_dir(cwd)
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the fleetmerge binary runs");
    let pid = child.id() as libc::pid_t;
    let mut stderr = child.stderr.expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).ok();
        s
    });
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed");
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    // ru_maxrss is in KiB on Linux.
    (ok, reader.join().unwrap(), usage.ru_maxrss as u64 * 1024)
}

/// Whether two files hold the same bytes, compared a piece at a time (reading
/// them whole would raise this process's RSS, which the kernel charges to the
/// children it spawns next).
fn same_bytes(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (mut a, mut b) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = a.read(&mut x).unwrap();
        let mut m = 0;
        while m < n {
            match b.read(&mut y[m..n]).unwrap() {
                0 => return false,
                k => m += k,
            }
        }
        if x[..n] != y[..n] {
            return false;
        }
        if n == 0 {
            return b.read(&mut y).unwrap() == 0;
        }
    }
}

/// Writes a bf16 model of `count` tensors of `numel` elements one tensor at a
/// time. (The kernel charges a child the peak RSS of this test process up to
/// the spawn, so the test itself must stay small.)
fn write_streamed(dir: &Path, seed: u64, count: usize, numel: usize) {
    let tensors: Vec<(String, [usize; 2])> = (0..count)
        .map(|t| {
            let name = format!(
                "model.layers.{}.mlp.{}.weight",
                t / 2,
                ["up_proj", "down_proj"][t % 2]
            );
            (name, [numel / 1024, 1024])
        })
        .collect();
    write_tensors(dir, seed, count / 2, &tensors);
}

/// Writes a bf16 model of the given 2-D tensors, one tensor at a time: model
/// `seed` 0 is the base, the others move 60 % of its elements.
fn write_tensors(dir: &Path, seed: u64, layers: usize, tensors: &[(String, [usize; 2])]) {
    use std::io::Write;
    std::fs::create_dir_all(dir).unwrap();
    let mut header = serde_json::Map::new();
    let mut start = 0;
    for (name, [rows, cols]) in tensors {
        let len = rows * cols * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": [rows, cols],
                               "data_offsets": [start, start + len]}),
        );
        start += len;
    }
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(dir.join("model.safetensors")).unwrap());
    f.write_all(&safetensors_prefix(&header)).unwrap();
    // In pieces of 64 Ki elements, so that this process stays small.
    const PIECE: usize = 1 << 16;
    for (t, (_, [rows, cols])) in tensors.iter().enumerate() {
        let numel = rows * cols;
        for p in 0..numel.div_ceil(PIECE) {
            let len = PIECE.min(numel - p * PIECE);
            let key = (t as u64) << 32 | p as u64;
            let base = noise(100 + key, len, 0.02);
            let delta = noise((1000 * (seed + 1)) << 48 | key, len, 0.004);
            for (i, (b, d)) in base.iter().zip(delta).enumerate() {
                // The base model is the base; fine-tunes move 60 % of elements.
                let v = if seed == 0 || i % 5 < 2 { *b } else { b + d };
                f.write_all(&half::bf16::from_f32(v).to_bits().to_le_bytes())
                    .unwrap();
            }
        }
    }
    f.flush().unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": layers, "torch_dtype": "bfloat16"
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
}

#[test]
fn max_memory_bounds_the_peak_and_keeps_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // 3 models x 24 tensors of 1M bf16 elements: 151 MB of input.
    for (i, m) in ["base", "a", "b"].into_iter().enumerate() {
        write_streamed(&dir.path().join(m), i as u64, 24, 1 << 20);
    }
    std::fs::write(dir.path().join("ties.yaml"), ties_config(0.5)).unwrap();

    // Whole-shard units (--unit-size): the budget, not the unit size, is
    // what differs between the two runs.
    let (ok, err, free_peak) = run_measured(
        dir.path(),
        &["run", "ties.yaml", "free", "--unit-size", "1G"],
    );
    assert!(ok, "{err}");
    let limit = 130u64 << 20;
    let (ok, err, limited_peak) = run_measured(
        dir.path(),
        &[
            "run",
            "ties.yaml",
            "limited",
            "--max-memory",
            "130MiB",
            "--unit-size",
            "1G",
        ],
    );
    assert!(ok, "{err}");
    eprintln!(
        "peak RSS: {} MiB without a budget, {} MiB within 130 MiB",
        free_peak >> 20,
        limited_peak >> 20
    );
    assert!(
        limited_peak <= limit,
        "peak RSS {} MiB over the 130 MiB budget",
        limited_peak >> 20
    );
    assert!(
        free_peak > limited_peak,
        "without a budget the merge reads further ahead ({} vs {} MiB)",
        free_peak >> 20,
        limited_peak >> 20
    );
    assert!(
        same_bytes(
            &dir.path().join("free/model.safetensors"),
            &dir.path().join("limited/model.safetensors")
        ),
        "a memory budget changed the merged bytes"
    );

    // Too small for one tensor's inputs: refused up front, nothing written.
    let (ok, err, _) = run_measured(
        dir.path(),
        &["run", "ties.yaml", "tiny", "--max-memory", "20M"],
    );
    assert!(!ok);
    assert!(
        err.contains("needs at least") && err.contains("--max-memory"),
        "{err}"
    );
    assert!(!dir.path().join("tiny").exists());
    let (ok, err, _) = run_measured(
        dir.path(),
        &["run", "ties.yaml", "bad", "--max-memory", "lots"],
    );
    assert!(!ok);
    assert!(
        err.contains("'lots' is not a size") && err.contains("2GiB"),
        "{err}"
    );
}

#[test]
fn a_tensor_larger_than_the_budget_is_streamed_with_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // An embedding of 8192 x 4096 bf16 (64 MiB per model, 192 MiB for three)
    // and one small layer.
    let tensors = vec![
        ("model.embed_tokens.weight".to_string(), [8192, 4096]),
        ("model.layers.0.mlp.up_proj.weight".to_string(), [256, 1024]),
    ];
    for (i, m) in ["base", "a", "b"].into_iter().enumerate() {
        write_tensors(&dir.path().join(m), i as u64, 1, &tensors);
    }
    let models = "models:\n  - model: ./a\n    parameters: {weight: 0.6, density: 0.5}\n  \
                  - model: ./b\n    parameters: {weight: 0.4, density: 0.7}\n";
    let configs = [
        (
            "linear",
            "merge_method: linear\ndtype: bfloat16\nmodels:\n  - model: ./a\n    \
             parameters: {weight: 0.6}\n  - model: ./b\n    parameters: {weight: 0.4}\n"
                .to_string(),
        ),
        (
            "ties",
            format!("merge_method: ties\nbase_model: ./base\ndtype: bfloat16\n{models}"),
        ),
        (
            "dare_ties",
            format!("merge_method: dare_ties\nbase_model: ./base\ndtype: bfloat16\n{models}"),
        ),
        (
            "slerp",
            "merge_method: slerp\nbase_model: ./a\ndtype: bfloat16\nparameters: {t: 0.3}\n\
             models:\n  - model: ./a\n  - model: ./b\n"
                .to_string(),
        ),
    ];
    let budget = 150u64 << 20;
    for (name, yaml) in configs {
        std::fs::write(dir.path().join(format!("{name}.yaml")), yaml).unwrap();
        let config = format!("{name}.yaml");
        let (whole, limited) = (format!("{name}-whole"), format!("{name}-limited"));
        let (ok, err, whole_peak) = run_measured(dir.path(), &["run", &config, &whole]);
        assert!(ok, "{name}: {err}");
        let (ok, err, limited_peak) = run_measured(
            dir.path(),
            &["run", &config, &limited, "--max-memory", "150MiB"],
        );
        assert!(ok, "{name}: {err}");
        eprintln!(
            "{name}: peak RSS {} MiB reading whole, {} MiB streamed within 150 MiB",
            whole_peak >> 20,
            limited_peak >> 20
        );
        assert!(
            limited_peak <= budget,
            "{name}: peak RSS {} MiB over the budget",
            limited_peak >> 20
        );
        // The embedding's inputs alone (192 MiB) exceed the budget: it was
        // streamed, not read whole.
        assert!(
            whole_peak > (192 << 20) && limited_peak < (192 << 20),
            "{name}: {} MiB whole, {} MiB limited",
            whole_peak >> 20,
            limited_peak >> 20
        );
        assert!(
            same_bytes(
                &dir.path().join(&whole).join("model.safetensors"),
                &dir.path().join(&limited).join("model.safetensors")
            ),
            "{name}: streaming changed the merged bytes"
        );
    }
}

/// A tokenizer merge whose vocabulary tensors exceed the budget: tok-base
/// (64 tokens) and a model with 8000 tokens more, `tokenizer_source: union`
/// padded to a multiple of 100 (8100 rows of 4096 bf16: 66 MB per aligned
/// input; the base's missing rows are filled from the other model's, the
/// padding rows are each input's mean). Within 150 MiB the embedding and the
/// output head are streamed, their rows read and aligned a segment at a time:
/// the peak RSS stays within the budget (read whole it does not) and the
/// bytes are those of the run without a budget.
#[test]
fn vocabulary_tensors_larger_than_the_budget_stream_with_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (width, extra) = (4096usize, 8000usize);
    for (i, (name, rows)) in [("base", 64), ("wide", 64 + extra)].into_iter().enumerate() {
        let path = dir.path().join(name);
        let tensors = vec![
            ("model.embed_tokens.weight".to_string(), [rows, width]),
            ("lm_head.weight".to_string(), [rows, width]),
            (
                "model.layers.0.mlp.up_proj.weight".to_string(),
                [256, width],
            ),
        ];
        write_tensors(&path, i as u64, 1, &tensors);
        let extra = if name == "wide" { extra as u64 } else { 0 };
        write_tok_files(&path, "tok-base", extra, width as u64, 1);
    }
    std::fs::write(
        dir.path().join("union.yaml"),
        "models:\n  - model: ./base\n    parameters: {weight: 0.5}\n  - model: ./wide\n    \
         parameters: {weight: 0.5}\nmerge_method: linear\nbase_model: ./base\ndtype: bfloat16\n\
         tokenizer:\n  source: union\n  pad_to_multiple_of: 100\n",
    )
    .unwrap();
    let (ok, err, whole_peak) = run_measured(
        dir.path(),
        &["run", "union.yaml", "whole", "--threads", "2"],
    );
    assert!(ok, "{err}");
    let budget = 150u64 << 20;
    let (ok, err, limited_peak) = run_measured(
        dir.path(),
        &[
            "run",
            "union.yaml",
            "limited",
            "--threads",
            "2",
            "--max-memory",
            "150MiB",
        ],
    );
    assert!(ok, "{err}");
    eprintln!(
        "tokenizer union: peak RSS {} MiB read whole, {} MiB streamed within 150 MiB",
        whole_peak >> 20,
        limited_peak >> 20
    );
    assert!(
        limited_peak <= budget,
        "peak RSS {} MiB over the budget",
        limited_peak >> 20
    );
    assert!(
        whole_peak > budget,
        "read whole, the vocabulary tensors need more ({} MiB)",
        whole_peak >> 20
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("limited/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["vocab_size"], 8100);
    for f in ["model.safetensors", "tokenizer.json", "config.json"] {
        assert!(
            same_bytes(
                &dir.path().join("whole").join(f),
                &dir.path().join("limited").join(f)
            ),
            "streaming changed {f}"
        );
    }
}
