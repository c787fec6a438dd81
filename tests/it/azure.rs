//! Merges reading from and writing to Azure Blob Storage (`az://`), against
//! Azurite (the Azure emulator object_store's own CI uses) on loopback,
//! configured the way a user points fleetmerge at it (object_store's emulator
//! settings: `AZURE_STORAGE_USE_EMULATOR`, `AZURITE_BLOB_STORAGE_URL`):
//! kit cases container to container with range reads, a multipart upload, a
//! killed merge resumed from its journal in the container, and the output lock
//! (conditional writes), each compared byte for byte with the same merge on
//! local files.

use crate::common::servers::*;
use crate::common::*;
use crate::object_storage::{assert_same_files, config_at, fleetmerge_env, local};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One Azurite per test binary, with the example models in `az://models/models/`.
fn az() -> &'static str {
    static AZ: OnceLock<String> = OnceLock::new();
    AZ.get_or_init(|| {
        let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let endpoint = azurite(&scratch);
        az_create_container(&endpoint, "models");
        az_upload_dir(&endpoint, "models", "models", &examples().join("models"));
        endpoint
    })
}

/// Runs `fleetmerge run CONFIG az://CONTAINER/NAME ARGS` with `env`, asserts
/// success, and downloads the output into `dir/got-NAME`.
fn run_into_container(
    dir: &Path,
    config: &str,
    (container, name): (&str, &str),
    args: &[&str],
    env: &[(&str, String)],
) -> PathBuf {
    let out = format!("az://{container}/{name}");
    let mut all = vec!["run", config, &out, "--quiet"];
    all.extend(args);
    let o = fleetmerge_env(dir, &all, env);
    assert!(o.status.success(), "{name}: {}", stderr(&o));
    let got = dir.join(format!("got-{name}"));
    let _ = std::fs::remove_dir_all(&got);
    az_download_dir(az(), container, name, &got);
    got
}

#[test]
fn kit_cases_from_container_to_container_match_local_runs() {
    let endpoint = az();
    let dir = tempfile::tempdir().unwrap();
    az_create_container(endpoint, "out-kit");
    let env = azurite_env(endpoint);
    for case in [
        "linear",
        "ties",
        "slerp_gradient",
        "passthrough_slices",
        "della",
        "lora_ties",
    ] {
        let want = local(case, dir.path(), "100K");
        let cfg = config_at(case, "az://models/models/", dir.path());
        let got = run_into_container(
            dir.path(),
            cfg.to_str().unwrap(),
            ("out-kit", case),
            &["--out-shard-size", "100K"],
            &env,
        );
        assert_same_files(&got, &want);
        assert!(
            got.join(".fleetmerge/done").exists(),
            "{case}: journal marker"
        );
    }
    // A MoE merge through a counting proxy: its 123 tensor reads are a few
    // range requests, as on S3.
    let (proxy, stats) = flaky_proxy(endpoint, usize::MAX, usize::MAX);
    let want = local("mixtral_ties", dir.path(), "5B");
    let cfg = config_at("mixtral_ties", "az://models/models/", dir.path());
    let got = run_into_container(
        dir.path(),
        cfg.to_str().unwrap(),
        ("out-kit", "mixtral_ties"),
        &[],
        &azurite_env(&proxy),
    );
    assert_same_files(&got, &want);
    let gets = stats.range_gets.load(Ordering::SeqCst);
    assert!(
        (1..=6 * 2 + 6 * 2).contains(&gets),
        "{gets} range requests for 123 tensor reads"
    );
}

const LAYERS: u64 = 6;

/// Journal records of `az://container/name` (committed units).
fn journal_units(container: &str, name: &str) -> usize {
    az_list(az(), container, &format!("{name}/.fleetmerge/units"))
        .iter()
        .filter(|b| {
            let file = b.rsplit('/').next().unwrap_or("");
            file.starts_with("unit-") && file.ends_with(".json")
        })
        .count()
}

/// TIES models of 3 MiB tensors (36 MiB each) in `az://big/models/`: a
/// shard of 40M is a multipart upload (16 MiB blocks), reads of a unit are
/// split into concurrent parts; a merge killed midway resumes from its
/// journal in the container; the output lock is a conditional write.
#[test]
fn a_large_merge_uploads_in_parts_resumes_and_is_locked() {
    let endpoint = az();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::create_dir_all(dir.join("models")).unwrap();
    make_ties_models(&dir.join("models"), LAYERS);
    az_create_container(endpoint, "big");
    az_upload_dir(endpoint, "big", "models", &dir.join("models"));
    let ties = ties_config(0.5);
    std::fs::write(
        dir.join("local.yaml"),
        ties.replace("model: ", "model: models/"),
    )
    .unwrap();
    std::fs::write(
        dir.join("az.yaml"),
        ties.replace("model: ", "model: az://big/models/"),
    )
    .unwrap();
    let reference = |shard: &str| {
        let out = dir.join(format!("reference-{shard}"));
        let o = fleetmerge(
            dir,
            &[
                "run",
                "local.yaml",
                out.to_str().unwrap(),
                "--quiet",
                "--out-shard-size",
                shard,
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        out
    };
    let env = azurite_env(endpoint);
    az_create_container(endpoint, "out-big");

    // One 36 MiB shard: a multipart upload of three blocks.
    let want = reference("40M");
    let got = run_into_container(
        dir,
        "az.yaml",
        ("out-big", "one"),
        &["--out-shard-size", "40M"],
        &env,
    );
    assert!(same_output_files(&got, &want) >= 1);
    let shards: Vec<_> = std::fs::read_dir(&got)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.ends_with(".safetensors").then_some(n)
        })
        .collect();
    assert_eq!(shards.len(), 1, "{shards:?}");
    let size = std::fs::metadata(got.join(&shards[0])).unwrap().len();
    assert!(
        size > 2 * (16 << 20),
        "{size} bytes: not a multipart upload"
    );

    // Killed once two units are journaled in the container, then resumed.
    let want = reference("4M");
    let units = 2 * LAYERS as usize;
    let args = [
        "run",
        "az.yaml",
        "az://out-big/resumed",
        "--quiet",
        "--threads",
        "1",
        "--out-shard-size",
        "4M",
    ];
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fleetmerge"))
        .current_dir(dir)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal_units("out-big", "resumed") < 2 {
        assert!(Instant::now() < deadline, "no progress within 60 s");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the merge finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done_before = journal_units("out-big", "resumed");
    assert!(
        done_before < units,
        "killed too late ({done_before}/{units})"
    );
    let o = fleetmerge_env(dir, &args, &env);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("resumed: {done_before} of {units} units")),
        "{err}"
    );
    let got = dir.join("got-resumed");
    az_download_dir(endpoint, "out-big", "resumed", &got);
    assert_same_files(&got, &want);

    // The output lock: a live holder refuses a second merge, naming it, and
    // nothing is written; an expired one is taken over, and a finished merge
    // releases it.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let lock = |expires_ms: u64| {
        format!(
            r#"{{"host":"elsewhere","pid":4242,"since_unix_ms":1,"expires_unix_ms":{expires_ms},"id":"x"}}"#
        )
    };
    let run = || {
        fleetmerge_env(
            dir,
            &["run", "az.yaml", "az://out-big/locked", "--quiet"],
            &env,
        )
    };
    az_put(
        endpoint,
        "out-big",
        "locked/.fleetmerge/lock",
        lock(now_ms + 600_000).as_bytes(),
        dir,
    );
    let o = run();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is being written by another merge (pid 4242 on elsewhere"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        az_list(endpoint, "out-big", "locked"),
        ["locked/.fleetmerge/lock"]
    );
    az_put(
        endpoint,
        "out-big",
        "locked/.fleetmerge/lock",
        lock(now_ms - 1).as_bytes(),
        dir,
    );
    let o = run();
    assert!(o.status.success(), "{}", stderr(&o));
    let got = dir.join("got-locked");
    az_download_dir(endpoint, "out-big", "locked", &got);
    let held: serde_json::Value =
        serde_json::from_slice(&std::fs::read(got.join(".fleetmerge/lock")).unwrap()).unwrap();
    assert_eq!(held["expires_unix_ms"], 0, "released: {held}");
    assert_ne!(held["host"], "elsewhere");
}
