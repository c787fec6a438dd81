//! `--max-memory`: the merge stays within it (peak RSS of the real process, as
//! the kernel accounts it, mapped input pages included), gives the same bytes
//! as an unlimited run, and a budget too small for the largest tensor is
//! refused before anything is written.

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

/// Writes a bf16 model of `count` tensors of `numel` elements one tensor at a
/// time. (The kernel charges a child the peak RSS of this test process up to
/// the spawn, so the test itself must stay small.)
fn write_streamed(dir: &Path, seed: u64, count: usize, numel: usize) {
    use std::io::Write;
    std::fs::create_dir_all(dir).unwrap();
    let mut header = serde_json::Map::new();
    for t in 0..count {
        let start = t * numel * 2;
        header.insert(
            format!(
                "model.layers.{}.mlp.{}.weight",
                t / 2,
                ["up_proj", "down_proj"][t % 2]
            ),
            serde_json::json!({"dtype": "BF16", "shape": [numel / 1024, 1024],
                               "data_offsets": [start, start + numel * 2]}),
        );
    }
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(dir.join("model.safetensors")).unwrap());
    f.write_all(&safetensors_prefix(&header)).unwrap();
    for t in 0..count {
        let base = noise(100 + t as u64, numel, 0.02);
        let delta = noise(1000 * (seed + 1) + t as u64, numel, 0.004);
        for (i, (b, d)) in base.iter().zip(delta).enumerate() {
            // The base model is the base; fine-tunes move 60 % of elements.
            let v = if seed == 0 || i % 5 < 2 { *b } else { b + d };
            f.write_all(&half::bf16::from_f32(v).to_bits().to_le_bytes())
                .unwrap();
        }
    }
    f.flush().unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": count / 2, "torch_dtype": "bfloat16"
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

    let (ok, err, free_peak) = run_measured(dir.path(), &["run", "ties.yaml", "free"]);
    assert!(ok, "{err}");
    let limit = 130u64 << 20;
    let (ok, err, limited_peak) = run_measured(
        dir.path(),
        &["run", "ties.yaml", "limited", "--max-memory", "130MiB"],
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
    let a = std::fs::read(dir.path().join("free/model.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("limited/model.safetensors")).unwrap();
    assert!(a == b, "a memory budget changed the merged bytes");

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
    assert!(err.contains("is not a memory size"), "{err}");
}
