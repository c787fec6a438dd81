//! A merge killed midway (SIGKILL) resumes from its journal: finished shards are
//! kept, the rest computed, and the result is bit-identical to an uninterrupted
//! run. A changed config is refused instead of being mixed with the old shards.

use crate::common::*;
use std::path::Path;
use std::time::{Duration, Instant};

const LAYERS: u64 = 12;

fn make_models(dir: &Path) {
    make_ties_models(dir, LAYERS);
}

fn config(density: f64) -> String {
    ties_config(density)
}

/// Committed journal records; a record being written is a hidden temporary
/// sibling (`.NAME.partial-...`) and does not count.
fn journal_entries(out: &Path) -> usize {
    std::fs::read_dir(out.join(".fleetmerge/units"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn killed_merge_resumes_and_matches_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    make_models(dir.path());
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, config(0.5)).unwrap();
    let args = |out: &Path| {
        vec![
            "run".to_string(),
            cfg.to_string_lossy().into_owned(),
            out.to_string_lossy().into_owned(),
            "--quiet".into(),
            "--threads".into(),
            "1".into(),
            "--out-shard-size".into(),
            "4M".into(),
        ]
    };

    // Reference: one uninterrupted run.
    let clean = dir.path().join("clean");
    let o = fleetmerge(
        dir.path(),
        &args(&clean).iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let units = journal_entries(&clean);
    assert_eq!(units, (LAYERS * 2) as usize, "one shard per tensor");

    // Kill a second run once two units are journaled.
    let out = dir.path().join("out");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fleetmerge"))
        .current_dir(dir.path())
        .args(args(&out))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal_entries(&out) < 2 {
        assert!(Instant::now() < deadline, "no progress within 60 s");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the merge finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done_before = journal_entries(&out);
    assert!(
        done_before < units,
        "killed too late to test resuming ({done_before}/{units})"
    );
    assert!(
        !out.join("model.safetensors.index.json").exists(),
        "an unfinished merge has no index"
    );

    // A different config is refused rather than mixed with the old shards.
    std::fs::write(&cfg, config(0.6)).unwrap();
    let o = fleetmerge(
        dir.path(),
        &args(&out).iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--restart"), "{}", stderr(&o));
    std::fs::write(&cfg, config(0.5)).unwrap();

    // Resume: the journaled units are kept, the rest computed.
    let o = fleetmerge(
        dir.path(),
        &args(&out).iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("resumed: {done_before} of {units} units")),
        "{err}"
    );
    assert_eq!(read_model(&out), read_model(&clean));
    for f in ["model.safetensors.index.json", "config.json", "README.md"] {
        assert_eq!(
            std::fs::read(out.join(f)).is_ok(),
            std::fs::read(clean.join(f)).is_ok(),
            "{f}"
        );
    }
    assert_eq!(
        std::fs::read(out.join("model.safetensors.index.json")).unwrap(),
        std::fs::read(clean.join("model.safetensors.index.json")).unwrap()
    );

    // --restart recomputes everything and gives the same model.
    let o = fleetmerge(
        dir.path(),
        &args(&out)
            .iter()
            .map(String::as_str)
            .chain(["--restart"])
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("resumed"));
    assert_eq!(read_model(&out), read_model(&clean));
}
