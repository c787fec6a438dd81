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

/// A shard written in parts (`--unit-size`) by a run killed midway: the
/// rerun keeps the journaled parts (in the hidden parts' file), writes the
/// rest, and finishes the shard byte for byte as whole units write it; no
/// parts' file is left, and `verify` hashes every part.
#[test]
fn a_killed_merge_of_parts_resumes_into_the_same_shard() {
    let dir = tempfile::tempdir().unwrap();
    make_models(dir.path());
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, config(0.5)).unwrap();
    let args = |out: &Path, unit: &str| {
        vec![
            "run".to_string(),
            cfg.to_string_lossy().into_owned(),
            out.to_string_lossy().into_owned(),
            "--quiet".into(),
            "--threads".into(),
            "1".into(),
            "--workers".into(),
            "1".into(),
            "--out-shard-size".into(),
            "1G".into(),
            "--unit-size".into(),
            unit.into(),
        ]
    };
    let run = |out: &Path, unit: &str| {
        let a = args(out, unit);
        fleetmerge(
            dir.path(),
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    let whole = dir.path().join("whole");
    let o = run(&whole, "100G");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(journal_entries(&whole), 1, "one unit for the one shard");

    let out = dir.path().join("out");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fleetmerge"))
        .current_dir(dir.path())
        .args(args(&out, "18M"))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while journal_entries(&out) < 2 {
        assert!(Instant::now() < deadline, "no progress within 120 s");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the merge finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done_before = journal_entries(&out);
    assert!(done_before < 12, "killed too late ({done_before}/12)");
    assert!(
        !out.join("model.safetensors").exists(),
        "an unfinished shard is not in place"
    );
    assert!(out.join(".model.safetensors.fleetmerge-parts").exists());

    let o = run(&out, "18M");
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("resumed: {done_before} of 12 units")),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(whole.join("model.safetensors")).unwrap()
    );
    assert!(!out.join(".model.safetensors.fleetmerge-parts").exists());
    let o = fleetmerge(dir.path(), &["verify", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &stderr(&o);
    assert!(text.contains("sha256 of 12 shards (or parts"), "{text}");
}
