//! `fleetmerge verify` and `fleetmerge status` on real outputs: a whole model
//! verifies; a corrupted, a truncated and a missing shard, a wrong total_size
//! and NaN values (with --scan) are each found and named; status reads a
//! finished and an interrupted merge from the journal.

use crate::common::*;
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

/// Runs `fleetmerge ARGS`: (success, stdout then stderr).
fn run_text(args: &[&str]) -> (bool, String) {
    let o = fleetmerge(Path::new("."), args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

fn verify(out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["verify", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_text(&args)
}

fn status(target: &str) -> (bool, String) {
    run_text(&["status", target])
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
        text.contains("sha256 of 4 shards (or parts of shards) match the journal"),
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

#[test]
fn plan_numbers_match_a_hand_count_of_the_example_models() {
    let config = fixture("ties").join("config.yaml");
    let o = fleetmerge(
        &examples(),
        &[
            "plan",
            config.to_str().unwrap(),
            "--out-shard-size",
            "100K",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // By hand from config.json (vocab 512, hidden 64, 4 heads / 2 KV heads of 16,
    // intermediate 176, 6 layers): embeddings 2 x 512·64 = 65,536; per layer
    // q, o 64·64 + k, v 32·64 = 12,288, MLP 3 x 176·64 = 33,792, 2 norms 128:
    // 46,208 x 6 = 277,248; final norm 64. Total 342,848 parameters = 685,696 bf16 bytes.
    let params = 342_848u64;
    let bytes = 2 * params;
    assert_eq!(v["models"].as_array().unwrap().len(), 4);
    for m in v["models"].as_array().unwrap() {
        assert_eq!(m["parameters"], params);
        assert_eq!(m["bytes"], bytes);
        assert_eq!(m["tensors"], 57);
        assert_eq!(m["layers"], 6);
        assert_eq!(m["vocab_size"], 512);
    }
    assert_eq!(v["mismatches"].as_array().unwrap().len(), 0);
    let p = &v["plan"];
    assert_eq!(p["merge_method"], "ties");
    assert_eq!(p["output_tensors"], 57);
    assert_eq!(p["parameters"], params);
    // TIES reads every tensor of the three fine-tunes and of the base.
    for (_, b) in p["read_per_model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x[0].clone(), x[1].clone()))
    {
        assert_eq!(b, bytes);
    }
    assert_eq!(p["read_total"], 4 * bytes);
    assert_eq!(p["write_total"], bytes);
    // 100 KB shards of 685,696 bytes of tensors: the same 8 units `run` writes.
    assert_eq!(p["work_units"], 8);
    assert!(p["peak_memory_per_slot"].as_u64().unwrap() > 0);
    assert_eq!(v["error"], serde_json::Value::Null);
}

#[test]
fn plan_lists_mismatches_with_their_fix_and_fails_like_run() {
    let dir = tempfile::tempdir().unwrap();
    // ft-b with a different architecture, two layers fewer and a wider MLP tensor.
    let models = dir.path().join("models");
    for m in ["llama-base", "llama-ft-a", "llama-ft-b"] {
        std::fs::create_dir_all(models.join(m)).unwrap();
        for f in std::fs::read_dir(examples().join("models").join(m)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), models.join(m).join(f.file_name())).unwrap();
        }
    }
    let cfg_path = models.join("llama-ft-b/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    cfg["num_hidden_layers"] = 4.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    // ... and its tensors really hold 4 layers (a config that says fewer
    // layers than the weights hold is refused outright).
    drop_layers_from(&models.join("llama-ft-b"), 4);
    std::fs::write(
        dir.path().join("m.yaml"),
        "models:\n  - model: models/llama-ft-a\n    parameters: {weight: 0.5}\n  - model: \
         models/llama-ft-b\n    parameters: {weight: 0.5}\nmerge_method: linear\n",
    )
    .unwrap();
    let run = fleetmerge(dir.path(), &["run", "m.yaml", "out"]);
    assert!(!run.status.success());
    let o = fleetmerge(dir.path(), &["plan", "m.yaml"]);
    assert!(!o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("compatibility: 3 mismatch(es)"), "{text}");
    assert!(
        text.contains("architectures differ") && text.contains("--allow-crimes"),
        "{text}"
    );
    assert!(
        text.contains("layer counts differ: models/llama-ft-a 6, models/llama-ft-b 4")
            && text.contains("layer_range"),
        "{text}"
    );
    // The same error as `run`, word for word.
    let run_err = stderr(&run);
    assert!(
        stderr(&o).trim() == run_err.trim(),
        "plan: {}\nrun: {run_err}",
        stderr(&o)
    );
    assert!(!dir.path().join("out").join("model.safetensors").exists());
}

#[test]
fn progress_is_logged_without_a_terminal_and_silent_when_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture("ties").join("config.yaml");
    let out = dir.path().join("out");
    let o = fleetmerge(
        &examples(),
        &["run", config.to_str().unwrap(), out.to_str().unwrap()],
    );
    assert!(o.status.success());
    let err = stderr(&o);
    // The first line at the start, the last at the end.
    assert!(err.contains("progress: 0/1 units"), "{err}");
    assert!(
        err.contains("progress: 1/1 units · read 2.74 MB of 2.74 MB") && err.contains("done"),
        "{err}"
    );
    let o = fleetmerge(
        &examples(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    assert!(o.status.success());
    assert!(!stderr(&o).contains("progress"), "{}", stderr(&o));
}

#[test]
fn progress_bars_render_on_a_terminal() {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let dir = tempfile::tempdir().unwrap();
    let config = fixture("ties").join("config.yaml");
    let out = dir.path().join("out");
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 160,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty fills two fresh descriptors that we then own.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(r, 0, "openpty");
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fleetmerge"))
        .current_dir(examples())
        .args([
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--out-shard-size",
            "100K",
        ])
        .stderr(std::process::Stdio::from(slave))
        .spawn()
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        // Reading the master ends with EIO once the child's side is closed.
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&bytes).to_string()
    });
    assert!(child.wait().unwrap().success());
    let screen = reader.join().unwrap();
    assert!(
        !screen.contains("progress:"),
        "no log lines on a terminal: {screen}"
    );
    // The bar drawn full at the end, with its counters.
    assert!(screen.contains("[00:00:0"), "{screen}");
    assert!(
        screen.contains(&"=".repeat(30)) && screen.contains("8/8 units · read 2.74 MB of 2.74 MB"),
        "{screen}"
    );
    assert!(
        screen.contains("\x1b["),
        "terminal control sequences: {screen}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture("ties").join("config.yaml");
    let out = dir.path().join("out");
    let o = fleetmerge(
        &examples(),
        &[
            "--log-format",
            "json",
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let mut progress = 0;
    for line in err.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
        if v["message"].as_str().unwrap().starts_with("progress:") {
            progress += 1;
            assert_eq!(v["units_total"], 1, "{line}");
            assert_eq!(v["bytes_to_read"], 4 * 685_696, "{line}");
        }
    }
    assert!(progress >= 2, "{err}");
}

#[test]
fn the_model_card_records_version_inputs_and_every_checksum() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let out = merged(dir.path(), "out");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    // mergekit's card first, unchanged in form.
    assert!(card.starts_with("---\nbase_model:"), "{card}");
    assert!(
        card.contains("This model was merged using the [TIES]"),
        "{card}"
    );
    assert!(card.contains("### Configuration"), "{card}");
    // Then what a user of a big merge wants on record.
    assert!(
        card.contains(&format!(
            "Merged with fleetmerge {} using `ties`, output dtype bfloat16: 342848 parameters, \
             685696 bytes of tensors in 4 files.",
            env!("CARGO_PKG_VERSION")
        )),
        "{card}"
    );
    for m in ["llama-ft-a", "llama-ft-b", "llama-ft-c", "llama-base"] {
        let location = examples().join("models").join(m);
        assert!(
            card.contains(&format!("* `./models/{m}`: `{}`", location.display())),
            "{card}"
        );
    }
    assert!(card.contains("Input fingerprint"), "{card}");
    for shard in SHARDS {
        let bytes = std::fs::read(out.join(shard)).unwrap();
        let sha = hex::encode(Sha256::digest(&bytes));
        assert!(
            card.contains(&format!("| {shard} | {} | `{sha}` |", bytes.len())),
            "{shard} {sha} not in\n{card}"
        );
    }
}

/// Rewrites the safetensors files of `dir` (and its index) without the
/// tensors of layers `from` and above.
fn drop_layers_from(dir: &Path, from: u64) {
    let keep = |name: &str| {
        name.strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<u64>().ok())
            .is_none_or(|l| l < from)
    };
    for f in std::fs::read_dir(dir).unwrap() {
        let p = f.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            let b = std::fs::read(&p).unwrap();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let h: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&b[8..8 + n]).unwrap();
            let data = &b[8 + n..];
            let (mut header, mut out) = (serde_json::Map::new(), Vec::new());
            for (k, v) in h {
                if k == "__metadata__" || !keep(&k) {
                    continue;
                }
                let off = &v["data_offsets"];
                let (s, e) = (
                    off[0].as_u64().unwrap() as usize,
                    off[1].as_u64().unwrap() as usize,
                );
                let mut v = v.clone();
                v["data_offsets"] = serde_json::json!([out.len(), out.len() + e - s]);
                out.extend_from_slice(&data[s..e]);
                header.insert(k, v);
            }
            let mut file = safetensors_prefix(&header);
            file.extend_from_slice(&out);
            std::fs::write(&p, file).unwrap();
        } else if name.ends_with(".index.json") {
            let mut idx: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            let map = idx["weight_map"].as_object_mut().unwrap();
            map.retain(|k, _| keep(k));
            std::fs::write(&p, idx.to_string()).unwrap();
        }
    }
}

/// `plan` on a tokenizer merge shows the output vocabulary (size, padding,
/// tokens added and from where, rows that fall back to a default), no longer
/// calls the different vocabularies a mismatch, and `--json` carries it all.
#[test]
fn plan_shows_the_output_vocabulary_of_a_tokenizer_merge() {
    let config = fixture("tok_force_tokens").join("config.yaml");
    let o = fleetmerge(&examples(), &["plan", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}{}", stderr(&o));
    assert!(
        text.contains("vocabularies aligned to the output's") && !text.contains("mismatch"),
        "{text}"
    );
    assert!(text.contains("vocabulary: 67 tokens from union"), "{text}");
    assert!(
        text.contains("\"<|im_start|>\" id 64, special: from ./models/tok-chatml")
            && text.contains("\"<|new|>\" id 66: from tokenizer.tokens"),
        "{text}"
    );
    assert!(
        text.contains(
            "\"<|im_end|>\" id 65 (for ./models/tok-base): the row of ./models/tok-chatml, \
             the only model with it"
        ) && text.contains(
            "\"<|new|>\" id 66 (for ./models/tok-base, ./models/tok-chatml): row 65 of \
             ./models/tok-chatml (tokenizer.tokens)"
        ),
        "{text}"
    );

    let config = fixture("tok_slerp_union_pad").join("config.yaml");
    let o = fleetmerge(&examples(), &["plan", "--json", config.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let vocab = &v["plan"]["vocabulary"];
    assert_eq!(vocab["tokens"], 66, "{v}");
    assert_eq!(vocab["rows"], 80, "{v}");
    assert_eq!(vocab["added"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(vocab["fallbacks"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["mismatches"], serde_json::json!([]), "{v}");

    // Without a tokenizer setting the same models are a mismatch whose fix
    // names the setting, and the error says how to align them.
    let config = fixture("err_vocab_mismatch").join("config.yaml");
    let o = fleetmerge(&examples(), &["plan", config.to_str().unwrap()]);
    assert!(!o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("vocabulary sizes differ") && text.contains("set `tokenizer_source`"),
        "{text}"
    );
    assert!(
        stderr(&o).contains("tokenizer_source: union"),
        "{}",
        stderr(&o)
    );
}
