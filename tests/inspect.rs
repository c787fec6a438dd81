//! `fleetmerge verify` and `fleetmerge status` on real outputs: a whole model
//! verifies; a corrupted, a truncated and a missing shard, a wrong total_size
//! and NaN values (with --scan) are each found and named; status reads a
//! finished and an interrupted merge from the journal.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// A TIES merge of the example models into `dir/NAME`, in 4 shards.
fn merged(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let config = fixture("ties").join("config.yaml");
    let o = fleetmerge(
        &examples(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
            "--out-shard-size",
            "200K",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

fn verify(out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["verify", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = fleetmerge(Path::new("."), &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

fn status(target: &str) -> (bool, String) {
    let o = fleetmerge(Path::new("."), &["status", target]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

const SHARDS: [&str; 4] = [
    "model-00001-of-00004.safetensors",
    "model-00002-of-00004.safetensors",
    "model-00003-of-00004.safetensors",
    "model-00004-of-00004.safetensors",
];

#[test]
fn verify_passes_a_whole_model_and_names_every_damaged_shard() {
    let dir = tempfile::tempdir().unwrap();
    let out = merged(dir.path(), "out");
    let (ok, text) = verify(&out, &["--scan"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("ok:") && text.contains("4 shards, 57 tensors"),
        "{text}"
    );
    assert!(
        text.contains("sha256 of 4 shards match the journal"),
        "{text}"
    );
    assert!(
        text.contains("57 float tensors scanned, no NaN or Inf"),
        "{text}"
    );

    // One flipped byte in the last tensor of shard 2, shard 3 gone, shard 4 cut short.
    let shard2 = out.join(SHARDS[1]);
    let mut bytes = std::fs::read(&shard2).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x10;
    std::fs::write(&shard2, bytes).unwrap();
    std::fs::remove_file(out.join(SHARDS[2])).unwrap();
    let shard4 = out.join(SHARDS[3]);
    let len = std::fs::metadata(&shard4).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard4)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let (ok, text) = verify(&out, &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("3 problems"), "{text}");
    assert!(
        text.contains(&format!("{}: sha256", SHARDS[1])) && text.contains("journal recorded"),
        "{text}"
    );
    assert!(text.contains(&format!("{}: missing", SHARDS[2])), "{text}");
    assert!(
        text.contains(SHARDS[3]) && text.contains("truncated"),
        "{text}"
    );
}

#[test]
fn verify_checks_the_index_total_and_scans_for_nan() {
    let dir = tempfile::tempdir().unwrap();
    let out = merged(dir.path(), "out");
    let index = out.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let total = v["metadata"]["total_size"].as_u64().unwrap();
    v["metadata"]["total_size"] = (total + 2).into();
    std::fs::write(&index, serde_json::to_string(&v).unwrap()).unwrap();
    let (ok, text) = verify(&out, &[]);
    assert!(!ok);
    assert!(
        text.contains(&format!("total_size is {}", total + 2))
            && text.contains(&format!("hold {total} bytes")),
        "{text}"
    );

    // A fine-tune with NaNs in one tensor: the merge carries them, the journal
    // agrees with the shards, and only --scan finds them.
    let models = dir.path().join("models");
    for m in ["llama-base", "llama-ft-a", "llama-ft-b", "llama-ft-c"] {
        let from = examples().join("models").join(m);
        std::fs::create_dir_all(models.join(m)).unwrap();
        for f in std::fs::read_dir(&from).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), models.join(m).join(f.file_name())).unwrap();
        }
    }
    let file = models.join("llama-ft-a/model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize + 8 + header_len;
    assert_eq!(header[name]["dtype"], "BF16");
    for i in 0..5 {
        bytes[start + 2 * i..start + 2 * i + 2].copy_from_slice(&0x7fc0u16.to_le_bytes());
    }
    std::fs::write(&file, bytes).unwrap();
    let config = dir.path().join("linear.yaml");
    std::fs::write(
        &config,
        "models:\n  - model: models/llama-ft-a\n    parameters: {weight: 0.5}\n  - model: \
         models/llama-ft-b\n    parameters: {weight: 0.5}\nmerge_method: linear\ndtype: bfloat16\n",
    )
    .unwrap();
    let nan_out = dir.path().join("nan-out");
    let o = fleetmerge(
        dir.path(),
        &["run", "linear.yaml", nan_out.to_str().unwrap(), "--quiet"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (ok, text) = verify(&nan_out, &[]);
    assert!(ok, "{text}");
    let (ok, text) = verify(&nan_out, &["--scan"]);
    assert!(!ok);
    assert!(
        text.contains(&format!("{name} holds 5 NaN and 0 infinite values")),
        "{text}"
    );
}

#[test]
fn status_reads_finished_and_interrupted_merges_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let out = merged(dir.path(), "out");
    let (ok, text) = status(out.to_str().unwrap());
    assert!(ok, "{text}");
    assert!(text.contains(": finished"), "{text}");
    assert!(
        text.contains("units: 4 of 4 done (100 %), 0 pending"),
        "{text}"
    );

    // What an interrupted merge leaves: no final marker, no index, a unit
    // whose record was never written.
    std::fs::remove_file(out.join(".fleetmerge/done")).unwrap();
    std::fs::remove_file(out.join(".fleetmerge/units/unit-000002.json")).unwrap();
    std::fs::remove_file(out.join("model.safetensors.index.json")).unwrap();
    let (ok, text) = status(out.to_str().unwrap());
    assert!(ok, "{text}");
    assert!(text.contains("unfinished"), "{text}");
    assert!(
        text.contains("units: 3 of 4 done (75 %), 1 pending"),
        "{text}"
    );
    assert!(
        text.contains(&format!("pending units: 2 ({})", SHARDS[2])),
        "{text}"
    );
    // verify agrees that it is not a finished model.
    let (ok, text) = verify(&out, &[]);
    assert!(!ok);
    assert!(text.contains("not a finished model"), "{text}");

    let (ok, text) = status(dir.path().join("nothing").to_str().unwrap());
    assert!(!ok);
    assert!(text.contains("no merge journal"), "{text}");
}
