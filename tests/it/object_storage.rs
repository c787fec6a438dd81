//! Merges reading from and writing to object stores, against real servers on
//! loopback (moto's S3 server; fake-gcs-server for GCS reads), compared byte
//! for byte with the same merges on local files.

use crate::common::grpc;
use crate::common::procs::*;
use crate::common::servers::*;
use crate::common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const MINUTE: Duration = Duration::from_secs(60);

/// One moto server per test binary, with the example models in `s3://models/models/`.
fn s3() -> &'static str {
    static S3: OnceLock<String> = OnceLock::new();
    S3.get_or_init(|| {
        let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let endpoint = moto(false, &scratch);
        create_bucket(&endpoint, "models");
        upload_dir(&endpoint, "models", "models", &examples().join("models"));
        endpoint
    })
}

fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("FLEETMERGE_IO_RETRIES", "10".into()),
    ]
}

/// `fleetmerge ARGS` in `cwd` with `env`.
pub(crate) fn fleetmerge_env(
    cwd: &Path,
    args: &[&str],
    env: &[(&str, String)],
) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fleetmerge"));
    c.current_dir(cwd).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("fleetmerge runs")
}

/// A kit case's config with `./models/` pointing at `prefix`.
pub(crate) fn config_at(case: &str, prefix: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(fixture(case).join("config.yaml")).unwrap();
    let path = dir.join(format!("{case}.yaml"));
    std::fs::write(&path, text.replace("./models/", prefix)).unwrap();
    path
}

/// The local merge of a kit case.
pub(crate) fn local(case: &str, dir: &Path, shard: &str) -> PathBuf {
    let out = dir.join(format!("local-{case}"));
    let cfg = fixture(case).join("config.yaml");
    let o = fleetmerge(
        &examples(),
        &[
            "run",
            cfg.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
            "--out-shard-size",
            shard,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

/// Same shards, index, config and tokenizer, byte for byte.
/// Runs `fleetmerge run CONFIG s3://BUCKET/NAME` (shards of `shard`) with
/// `env`, and downloads the output into `dir/got-NAME`.
fn run_into_bucket(
    endpoint: &str,
    dir: &Path,
    config: &str,
    (bucket, name): (&str, &str),
    shard: &str,
    env: &[(&str, String)],
) -> PathBuf {
    let out = format!("s3://{bucket}/{name}");
    let o = fleetmerge_env(
        dir,
        &["run", config, &out, "--quiet", "--out-shard-size", shard],
        env,
    );
    assert!(o.status.success(), "{name}: {}", stderr(&o));
    let got = dir.join(format!("got-{name}"));
    download_dir(endpoint, bucket, name, &got);
    got
}

pub(crate) fn assert_same_files(got: &Path, want: &Path) {
    let mut compared = 0;
    for e in std::fs::read_dir(want).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") || name.ends_with(".json") {
            let (a, b) = (
                std::fs::read(got.join(&name)),
                std::fs::read(want.join(&name)),
            );
            assert!(a.is_ok(), "{name} missing from {}", got.display());
            assert!(a.unwrap() == b.unwrap(), "{name} differs");
            compared += 1;
        }
    }
    assert!(compared >= 3, "nothing to compare in {}", want.display());
    assert!(got.join("README.md").exists());
}

#[test]
fn kit_cases_from_bucket_to_bucket_match_local_runs() {
    let endpoint = s3();
    let dir = tempfile::tempdir().unwrap();
    create_bucket(endpoint, "out-kit");
    for case in [
        "linear",
        "ties",
        "slerp_gradient",
        "passthrough_slices",
        "mixtral_ties",
        "della",
        "gptoss_ties",
    ] {
        let want = local(case, dir.path(), "100K");
        let cfg = config_at(case, "s3://models/models/", dir.path());
        let got = run_into_bucket(
            endpoint,
            dir.path(),
            cfg.to_str().unwrap(),
            ("out-kit", case),
            "100K",
            &s3_env(endpoint),
        );
        assert_same_files(&got, &want);
        assert!(
            got.join(".fleetmerge/done").exists(),
            "{case}: journal marker"
        );
    }
}

/// LoRA references with either side in S3: base and adapter in the bucket
/// (merged into the bucket), and a local base with its adapter in the bucket
/// (merged locally): the bytes of the local merges.
#[test]
fn adapters_in_s3_match_local_runs() {
    let endpoint = s3();
    let dir = tempfile::tempdir().unwrap();
    create_bucket(endpoint, "out-lora");
    for case in ["lora_ties", "lora_linear"] {
        let want = local(case, dir.path(), "100K");
        let cfg = config_at(case, "s3://models/models/", dir.path());
        assert!(std::fs::read_to_string(&cfg)
            .unwrap()
            .contains("s3://models/models/llama-base+s3://models/models/lora-"));
        let got = run_into_bucket(
            endpoint,
            dir.path(),
            cfg.to_str().unwrap(),
            ("out-lora", case),
            "100K",
            &s3_env(endpoint),
        );
        assert_same_files(&got, &want);
        let card = std::fs::read_to_string(got.join("README.md")).unwrap();
        assert!(card.contains("s3://models/models/lora-"), "{card}");
    }
    // The base local, the adapter in the bucket.
    let case = "lora_base_model";
    let want = local(case, dir.path(), "5B");
    let text = std::fs::read_to_string(fixture(case).join("config.yaml")).unwrap();
    let cfg = dir.path().join("mixed.yaml");
    std::fs::write(
        &cfg,
        text.replace("+./models/lora-", "+s3://models/models/lora-"),
    )
    .unwrap();
    let out = dir.path().join("mixed-out");
    let o = fleetmerge_env(
        &examples(),
        &[
            "run",
            cfg.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ],
        &s3_env(endpoint),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_files(&out, &want);
}

#[test]
fn transient_failures_are_retried_and_change_nothing() {
    let endpoint = s3();
    let dir = tempfile::tempdir().unwrap();
    create_bucket(endpoint, "out-flaky");
    let (proxy, stats) = flaky_proxy(endpoint, 5, 7);
    let want = local("ties", dir.path(), "100K");
    let cfg = config_at("ties", "s3://models/models/", dir.path());
    let mut env = s3_env(&proxy);
    env.push(("FLEETMERGE_IO_RETRIES", "20".into()));
    let o = fleetmerge_env(
        dir.path(),
        &[
            "run",
            cfg.to_str().unwrap(),
            "s3://out-flaky/ties",
            "--quiet",
            "--out-shard-size",
            "100K",
        ],
        &env,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stats.faults.load(Ordering::SeqCst) >= 5,
        "too few faults injected"
    );
    let got = dir.path().join("got");
    download_dir(endpoint, "out-flaky", "ties", &got);
    assert_same_files(&got, &want);
}

#[test]
fn moe_expert_tensors_are_fetched_in_few_range_requests() {
    let endpoint = s3();
    let dir = tempfile::tempdir().unwrap();
    create_bucket(endpoint, "out-moe");
    let (proxy, stats) = flaky_proxy(endpoint, usize::MAX, usize::MAX);
    let want = local("mixtral_ties", dir.path(), "5B");
    let cfg = config_at("mixtral_ties", "s3://models/models/", dir.path());
    let o = fleetmerge_env(
        dir.path(),
        &["run", cfg.to_str().unwrap(), "s3://out-moe/m", "--quiet"],
        &s3_env(&proxy),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // 41 tensors read from 3 models (123 tensor reads) in 6 files: at most 2
    // requests per header and a few spans per file.
    let gets = stats.range_gets.load(Ordering::SeqCst);
    eprintln!("range requests: {gets}");
    assert!(
        gets <= 6 * 2 + 6 * 2,
        "{gets} range requests for 123 tensor reads"
    );
    let got = dir.path().join("got");
    download_dir(endpoint, "out-moe", "m", &got);
    assert_same_files(&got, &want);
}

/// `.bin` models in `s3://bins/models/{base,a,b}` (a: one `pytorch_model.bin`,
/// b: two shards and an index), `BIN_LAYERS` layers of two 256 KiB tensors,
/// and their local copies under `dir/models`.
const BIN_LAYERS: u64 = 4;
const BIN_TENSOR: u64 = 256 * 512 * 2;

fn bin_models(endpoint: &str, dir: &Path) {
    for (m, seed, shards) in [("base", 1u64, 1), ("a", 2, 1), ("b", 3, 2)] {
        let tensors: Vec<(String, Vec<u64>, Vec<f32>)> = (0..BIN_LAYERS)
            .flat_map(|l| {
                ["mlp.up_proj.weight", "mlp.down_proj.weight"]
                    .into_iter()
                    .enumerate()
                    .map(move |(j, s)| {
                        let values = noise(seed * 100 + l * 2 + j as u64, 256 * 512, 0.02);
                        (format!("model.layers.{l}.{s}"), vec![256, 512], values)
                    })
            })
            .collect();
        torch::write_bin_model(&dir.join("models").join(m), BIN_LAYERS, &tensors, shards);
    }
    create_bucket(endpoint, "bins");
    upload_dir(endpoint, "bins", "models", &dir.join("models"));
}

#[test]
fn bin_inputs_in_s3_are_read_by_range_and_only_where_the_merge_needs() {
    let endpoint = s3();
    let dir = tempfile::tempdir().unwrap();
    bin_models(endpoint, dir.path());
    create_bucket(endpoint, "out-bins");

    // A TIES merge of the three from S3 writes what the local merge writes.
    let ties = ties_config(0.5);
    std::fs::write(
        dir.path().join("local.yaml"),
        ties.replace("model: ", "model: models/"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("s3.yaml"),
        ties.replace("model: ", "model: s3://bins/models/"),
    )
    .unwrap();
    let want = dir.path().join("want");
    let o = fleetmerge(
        dir.path(),
        &[
            "run",
            "local.yaml",
            want.to_str().unwrap(),
            "--quiet",
            "--out-shard-size",
            "1M",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = run_into_bucket(
        endpoint,
        dir.path(),
        "s3.yaml",
        ("out-bins", "ties"),
        "1M",
        &s3_env(endpoint),
    );
    assert_same_files(&got, &want);

    // One layer of `a`: its two tensors are read, and of the rest of the file
    // only what locates them.
    let (proxy, stats) = flaky_proxy(endpoint, usize::MAX, usize::MAX);
    std::fs::write(
        dir.path().join("slice.yaml"),
        "slices:\n  - sources:\n      - model: s3://bins/models/a\n        layer_range: [0, 1]\n\
         merge_method: passthrough\n",
    )
    .unwrap();
    let o = fleetmerge_env(
        dir.path(),
        &["run", "slice.yaml", "s3://out-bins/slice", "--quiet"],
        &s3_env(&proxy),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let file = "/bins/models/a/pytorch_model.bin";
    let size = std::fs::metadata(dir.path().join("models/a/pytorch_model.bin"))
        .unwrap()
        .len();
    let (gets, bytes) = stats.ranges_of(file);
    eprintln!("{gets} range requests, {bytes} of {size} bytes");
    let needed = 2 * BIN_TENSOR;
    // Beyond the two tensors, planning and the unit's check each read the
    // file's last 64 KiB (its end record and central directory) and its
    // pickle with the local headers near it: well under one more tensor.
    assert!(
        bytes >= needed && bytes < needed + BIN_TENSOR,
        "{bytes} bytes read of {size} for {needed} bytes of tensors"
    );
    // Requests: planning reads the end, the pickle with the first storage's
    // local header, and each other storage's local header (8 tensors); the
    // unit's check the end, the pickle and the two storages' headers; the
    // two adjacent tensors come in one request.
    let tensors = 2 * BIN_LAYERS as usize;
    assert!(
        gets <= (1 + tensors) + 3 + 1,
        "{gets} range requests for a file of {tensors} tensors"
    );
    let got = dir.path().join("got-slice");
    download_dir(endpoint, "out-bins", "slice", &got);
    let model = read_model(&got);
    assert_eq!(
        model.keys().collect::<Vec<_>>(),
        [
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.mlp.up_proj.weight"
        ]
    );
}

#[test]
fn a_missing_model_or_wrong_credentials_fail_fast_and_clearly() {
    let endpoint = s3();
    let dir = tempfile::tempdir().unwrap();
    // A model that is not in the bucket.
    let cfg = config_at("ties", "s3://models/models/", dir.path());
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("llama-ft-b", "llama-ft-zzz")).unwrap();
    let o = fleetmerge_env(
        dir.path(),
        &[
            "run",
            cfg.to_str().unwrap(),
            dir.path().join("o1").to_str().unwrap(),
        ],
        &s3_env(endpoint),
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("s3://models/models/llama-ft-zzz"), "{err}");
    assert!(err.contains("not found"), "{err}");

    // A server that checks credentials: ours are not valid there.
    let strict = moto(true, dir.path());
    let cfg = config_at("ties", "s3://models/models/", dir.path());
    let started = Instant::now();
    let o = fleetmerge_env(
        dir.path(),
        &[
            "run",
            cfg.to_str().unwrap(),
            dir.path().join("o2").to_str().unwrap(),
        ],
        &s3_env(&strict),
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("s3://models/models/"), "{err}");
    assert!(err.contains("access denied"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not fast: {:?}",
        started.elapsed()
    );
}

#[test]
fn gcs_inputs_are_read_by_range() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gcs");
    let models = data.join("models/models");
    std::fs::create_dir_all(&models).unwrap();
    for e in std::fs::read_dir(examples().join("models")).unwrap() {
        let from = e.unwrap().path();
        let to = models.join(from.file_name().unwrap());
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(&from).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    }
    let endpoint = fake_gcs(&data, dir.path());
    let sa = dir.path().join("sa.json");
    std::fs::write(
        &sa,
        format!(
            r#"{{"gcs_base_url": "{endpoint}", "disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}}"#
        ),
    )
    .unwrap();
    let env = [("GOOGLE_SERVICE_ACCOUNT", sa.to_string_lossy().into_owned())];
    for case in ["ties", "mixtral_ties"] {
        let want = local(case, dir.path(), "100K");
        let cfg = config_at(case, "gs://models/models/", dir.path());
        let got = dir.path().join(format!("got-{case}"));
        let o = fleetmerge_env(
            dir.path(),
            &[
                "run",
                cfg.to_str().unwrap(),
                got.to_str().unwrap(),
                "--quiet",
                "--out-shard-size",
                "100K",
            ],
            &env,
        );
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        assert_same_files(&got, &want);
    }
    // The same objects as plain http:// model references (range GETs, no API).
    let want = local("ties", dir.path(), "100K");
    let cfg = config_at("ties", &format!("{endpoint}/models/models/"), dir.path());
    let got = dir.path().join("got-http");
    let o = fleetmerge(
        dir.path(),
        &[
            "run",
            cfg.to_str().unwrap(),
            got.to_str().unwrap(),
            "--quiet",
            "--out-shard-size",
            "100K",
        ],
    );
    assert!(o.status.success(), "http: {}", stderr(&o));
    assert_same_files(&got, &want);
}

#[test]
fn a_storage_config_sends_one_bucket_to_another_server() {
    let endpoint = s3();
    let dir = tempfile::tempdir().unwrap();
    let other = moto(false, dir.path());
    create_bucket(&other, "elsewhere");
    let storage = dir.path().join("storage.yaml");
    std::fs::write(
        &storage,
        format!(
            "s3://elsewhere:\n  aws_endpoint: {other}\n  aws_access_key_id: test\n  \
             aws_secret_access_key: test\n  allow_http: true\n"
        ),
    )
    .unwrap();
    let want = local("linear", dir.path(), "100K");
    let cfg = config_at("linear", "s3://models/models/", dir.path());
    let o = fleetmerge_env(
        dir.path(),
        &[
            "run",
            cfg.to_str().unwrap(),
            "s3://elsewhere/linear",
            "--quiet",
            "--out-shard-size",
            "100K",
            "--storage-config",
            storage.to_str().unwrap(),
        ],
        &s3_env(endpoint),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = dir.path().join("got");
    download_dir(&other, "elsewhere", "linear", &got);
    assert_same_files(&got, &want);
    assert!(list_keys(endpoint, "models", "linear").is_empty());

    // A misspelt option is an error naming it and its line.
    std::fs::write(&storage, "s3://elsewhere:\n  aws_endpoitn: http://x\n").unwrap();
    let o = fleetmerge_env(
        dir.path(),
        &[
            "run",
            cfg.to_str().unwrap(),
            "s3://elsewhere/x",
            "--storage-config",
            storage.to_str().unwrap(),
        ],
        &s3_env(endpoint),
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("aws_endpoitn") && err.contains("line 2"),
        "{err}"
    );
}

// ---- cluster mode with inputs and output in S3 ----

const LAYERS: u64 = 6;

/// Big models in `s3://big/models/{base,a,b}` and a local reference merge.
fn big(endpoint: &str) -> &'static (PathBuf, PathBuf) {
    static BIG: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BIG.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("s3-big");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("models")).unwrap();
        make_ties_models(&dir.join("models"), LAYERS);
        create_bucket(endpoint, "big");
        upload_dir(endpoint, "big", "models", &dir.join("models"));
        std::fs::write(
            dir.join("local.yaml"),
            ties_config(0.5).replace("model: ", "model: models/"),
        )
        .unwrap();
        std::fs::write(
            dir.join("s3.yaml"),
            ties_config(0.5).replace("model: ", "model: s3://big/models/"),
        )
        .unwrap();
        let reference = dir.join("reference");
        let o = fleetmerge(
            &dir,
            &[
                "run",
                "local.yaml",
                reference.to_str().unwrap(),
                "--quiet",
                "--out-shard-size",
                "4M",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        (dir, reference)
    })
}

pub(crate) fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn journal_units(endpoint: &str, bucket: &str, prefix: &str) -> BTreeSet<usize> {
    list_keys(endpoint, bucket, &format!("{prefix}/.fleetmerge/units"))
        .iter()
        .filter_map(|k| {
            k.rsplit('/')
                .next()?
                .strip_prefix("unit-")?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .collect()
}

fn coordinator(
    name: &str,
    cwd: &Path,
    out: &str,
    listen: &str,
    env: &[(&str, &str)],
) -> (Proc, String) {
    coordinator_with(name, cwd, out, listen, env, &["--out-shard-size", "4M"])
}

/// `fleetmerge coordinator` on `s3.yaml` into `out`, listening on `listen`
/// with `args` besides; its process and the address it listens on.
fn coordinator_with(
    name: &str,
    cwd: &Path,
    out: &str,
    listen: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> (Proc, String) {
    let mut all = vec![
        "coordinator",
        "--config",
        "s3.yaml",
        "--out",
        out,
        "--listen",
        listen,
    ];
    all.extend_from_slice(args);
    let mut p = Proc::start(name, cwd, &all, env);
    let line = p.wait_for("listening", MINUTE, |l| l.contains("coordinator listening"));
    (p, field(&line, "listen").unwrap().to_string())
}

fn worker(name: &str, addr: &str, env: &[(&str, &str)]) -> Proc {
    local_worker(name, addr, env)
}

#[test]
fn a_cluster_merges_from_s3_into_s3_and_resumes_after_the_coordinator_dies() {
    let endpoint = s3();
    let (dir, reference) = big(endpoint);
    let env = s3_env(endpoint);
    let env = env_refs(&env);
    create_bucket(endpoint, "out-cluster");

    // Coordinator + 2 workers, inputs and output in S3.
    let (mut c, addr) = coordinator(
        "coordinator",
        dir,
        "s3://out-cluster/full",
        "127.0.0.1:0",
        &env,
    );
    let mut ws: Vec<Proc> = ["w1", "w2"]
        .iter()
        .map(|n| worker(n, &addr, &env))
        .collect();
    c.succeeds(MINUTE * 2);
    for w in &mut ws {
        w.succeeds(MINUTE);
    }
    let got = dir.join("got-full");
    let _ = std::fs::remove_dir_all(&got);
    download_dir(endpoint, "out-cluster", "full", &got);
    assert_same_files(&got, reference);

    // Killed coordinator, OUT in S3: the restarted one keeps what is journaled.
    let listen = format!("127.0.0.1:{}", free_port());
    let (mut first, addr) = coordinator(
        "coordinator-1",
        dir,
        "s3://out-cluster/resumed",
        &listen,
        &env,
    );
    let mut w = worker("w1", &addr, &env);
    let deadline = Instant::now() + MINUTE;
    while journal_units(endpoint, "out-cluster", "resumed").len() < 2 {
        assert!(Instant::now() < deadline, "no progress:\n{}", first.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    first.kill();
    let finished = journal_units(endpoint, "out-cluster", "resumed");
    assert!(finished.len() < 2 * LAYERS as usize, "killed too late");
    let (mut second, _) = coordinator(
        "coordinator-2",
        dir,
        "s3://out-cluster/resumed",
        &listen,
        &env,
    );
    second.succeeds(MINUTE * 2);
    w.succeeds(MINUTE);
    let again: Vec<usize> = second
        .lines()
        .iter()
        .filter(|l| l.contains("unit leased"))
        .filter_map(|l| field(l, "unit")?.parse().ok())
        .filter(|u| finished.contains(u))
        .collect();
    assert!(again.is_empty(), "journaled units {again:?} computed again");
    let got = dir.join("got-resumed");
    let _ = std::fs::remove_dir_all(&got);
    download_dir(endpoint, "out-cluster", "resumed", &got);
    assert_same_files(&got, reference);
}

#[test]
fn tensors_larger_than_the_budget_stream_from_s3_with_the_same_bytes() {
    let endpoint = s3();
    let (dir, reference) = big(endpoint);
    let env = s3_env(endpoint);
    // Each tensor's inputs are 9 MiB; this budget leaves windows of a few MiB,
    // so every tensor is fetched and merged a segment at a time (TIES: one
    // pass per statistic, each fetching the segments again).
    let budget = "80MiB";
    let out = dir.join("streamed");
    let _ = std::fs::remove_dir_all(&out);
    let o = fleetmerge_env(
        dir,
        &[
            "plan",
            "s3.yaml",
            "--json",
            "--max-memory",
            budget,
            "--out",
            out.to_str().unwrap(),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let streamed = plan["plan"]["streamed_tensors"].as_u64().unwrap();
    assert!(
        streamed >= 2 * LAYERS,
        "{streamed} tensors streamed:\n{plan}"
    );
    let o = fleetmerge_env(
        dir,
        &[
            "run",
            "s3.yaml",
            out.to_str().unwrap(),
            "--quiet",
            "--out-shard-size",
            "4M",
            "--max-memory",
            budget,
        ],
        &env,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_files(&out, reference);
}

/// The output lock on an object store (a conditional PUT of
/// `OUT/.fleetmerge/lock`): a live holder refuses a second merge, naming it;
/// an expired one (a crashed coordinator) is taken over; a finished merge
/// releases it. An output prefix that holds an input is refused too.
#[test]
fn object_store_outputs_are_locked_and_never_overlap_inputs() {
    let endpoint = s3();
    let dir = tempfile::tempdir().unwrap();
    create_bucket(endpoint, "out-lock");
    let cfg = config_at("linear", "s3://models/models/", dir.path());
    let run = |out: &str| {
        fleetmerge_env(
            dir.path(),
            &["run", cfg.to_str().unwrap(), out, "--quiet"],
            &s3_env(endpoint),
        )
    };
    let put_lock = |expires_ms: u64| {
        let body = dir.path().join("lock.json");
        std::fs::write(
            &body,
            format!(
                r#"{{"host":"elsewhere","pid":4242,"since_unix_ms":1,"expires_unix_ms":{expires_ms},"id":"x"}}"#
            ),
        )
        .unwrap();
        curl(&[
            "-T",
            body.to_str().unwrap(),
            &format!("{endpoint}/out-lock/m/.fleetmerge/lock"),
        ]);
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;

    // A live holder: refused at once, nothing written.
    put_lock(now_ms + 600_000);
    let o = run("s3://out-lock/m");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is being written by another merge (pid 4242 on elsewhere"),
        "{}",
        stderr(&o)
    );
    assert_eq!(list_keys(endpoint, "out-lock", "m"), ["m/.fleetmerge/lock"]);

    // An expired holder: taken over, the merge completes and releases the lock.
    put_lock(now_ms - 1);
    let o = run("s3://out-lock/m");
    assert!(o.status.success(), "{}", stderr(&o));
    let lock: serde_json::Value =
        serde_json::from_slice(&curl(&[&format!("{endpoint}/out-lock/m/.fleetmerge/lock")]))
            .unwrap();
    assert_eq!(lock["expires_unix_ms"], 0, "released: {lock}");
    assert_ne!(lock["host"], "elsewhere");
    // and the next merge into it goes through
    let o = run("s3://out-lock/m");
    assert!(o.status.success(), "{}", stderr(&o));

    // An output that is an input's prefix, or holds one.
    for out in [
        "s3://models/models/llama-ft-a",
        "s3://models/models",
        "s3://models/models/llama-ft-a/x/",
    ] {
        let o = run(out);
        assert_eq!(o.status.code(), Some(1), "{out}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("never writes where it reads"),
            "{out}: {}",
            stderr(&o)
        );
    }
    assert!(!list_keys(endpoint, "models", "models/llama-ft-a")
        .iter()
        .any(|k| k.contains(".fleetmerge")));
}

// ---- no storage I/O under the lease table's lock ----

/// `run --workers 2` into S3 with the first unit's journal record held on its
/// way to storage: the other slot still leases, computes and records the next
/// unit meanwhile (the record is written outside the lease table's lock, which
/// every slot needs), and the model is the reference's.
#[test]
fn a_slow_journal_write_does_not_hold_up_the_other_slots() {
    let endpoint = s3();
    let (dir, reference) = big(endpoint);
    create_bucket(endpoint, "out-gated-run");
    let gate = Gate::new("/.fleetmerge/units/");
    let env = s3_env(&gated_proxy(endpoint, gate.clone()));
    let mut run = Proc::start(
        "run",
        dir,
        &[
            "run",
            "s3.yaml",
            "s3://out-gated-run/m",
            "--out-shard-size",
            "4M",
            "--workers",
            "2",
        ],
        &env_refs(&env),
    );
    // Well within the S3 client's own timeout (30 s), after which it would
    // send the held record again.
    let recorded_meanwhile = gate.wait_until(Duration::from_secs(20), |seen| {
        seen.len() >= 2 && seen[1] != seen[0]
    });
    let seen = gate.seen();
    gate.open();
    run.succeeds(MINUTE * 2);
    assert!(
        recorded_meanwhile,
        "no other unit was recorded while {:?} was held: {seen:?}\n{}",
        seen.first(),
        run.log()
    );
    let got = dir.join("got-gated-run");
    let _ = std::fs::remove_dir_all(&got);
    download_dir(endpoint, "out-gated-run", "m", &got);
    assert_same_files(&got, reference);
}

/// A coordinator whose first completion is being recorded (its journal PUT
/// held on its way to S3) answers a status call at once, and counts the unit
/// being checked as running; the merge then finishes as the reference.
#[test]
fn the_coordinator_answers_while_a_completion_is_recorded() {
    use fleetmerge_proto::{StatusRequest, PROTOCOL_VERSION};
    let endpoint = s3();
    let (dir, reference) = big(endpoint);
    create_bucket(endpoint, "out-gated-cluster");
    let gate = Gate::new("/.fleetmerge/units/");
    let env = s3_env(&gated_proxy(endpoint, gate.clone()));
    let env = env_refs(&env);
    let (mut c, addr) = coordinator(
        "coordinator",
        dir,
        "s3://out-gated-cluster/m",
        "127.0.0.1:0",
        &env,
    );
    let mut w = worker("w1", &addr, &env);
    let held = gate.wait_until(MINUTE, |seen| !seen.is_empty());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = held.then(|| {
        rt.block_on(async {
            let mut client =
                fleetmerge_worker::remote::connect(&format!("http://{addr}"), None, None, false)
                    .unwrap();
            let request = StatusRequest {
                protocol_version: PROTOCOL_VERSION,
            };
            tokio::time::timeout(Duration::from_secs(10), client.status(request)).await
        })
    });
    // Still the one held: the completion had not finished when status answered.
    let seen = gate.seen();
    gate.open();
    assert!(held, "no unit was recorded:\n{}", c.log());
    let status = match answer {
        Some(Ok(Ok(reply))) => reply.into_inner(),
        Some(Ok(Err(e))) => panic!("status failed: {e}"),
        _ => panic!("status did not answer within 10 s while a completion was recorded"),
    };
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        status.running >= 1 && status.done == 0,
        "the unit being checked is running: {status:?}"
    );
    c.succeeds(MINUTE * 2);
    w.succeeds(MINUTE);
    let got = dir.join("got-gated-cluster");
    let _ = std::fs::remove_dir_all(&got);
    download_dir(endpoint, "out-gated-cluster", "m", &got);
    assert_same_files(&got, reference);
}

/// A vocabulary tensor reads only the input rows its alignment uses: with
/// `tokenizer_source: base`, a model with 300 tokens more than the base
/// (39 MB of embedding and output-head rows the output drops) is fetched for
/// its base rows only, read with its window or streamed under
/// `--max-memory`; both merges have the bytes of the same merge from local
/// files.
#[test]
fn vocabulary_rows_the_output_drops_are_not_fetched() {
    let endpoint = s3();
    let dir = tempfile::tempdir().unwrap();
    let (width, extra) = (32768u64, 300u64);
    write_wide_tok_models(dir.path(), width, extra);
    for m in ["tok-base", "tok-wide"] {
        upload_dir(
            endpoint,
            "models",
            &format!("wide-tok/{m}"),
            &dir.path().join("models").join(m),
        );
    }
    let config = |prefix: &str| {
        format!(
            "models:\n  - model: {prefix}tok-base\n    parameters: {{weight: 0.5}}\n  \
             - model: {prefix}tok-wide\n    parameters: {{weight: 0.5}}\n\
             merge_method: linear\nbase_model: {prefix}tok-base\ntokenizer_source: base\n\
             dtype: bfloat16\n"
        )
    };
    std::fs::write(dir.path().join("local.yaml"), config("./models/")).unwrap();
    std::fs::write(dir.path().join("s3.yaml"), config("s3://models/wide-tok/")).unwrap();
    let want = dir.path().join("local");
    let o = fleetmerge(
        dir.path(),
        &["run", "local.yaml", want.to_str().unwrap(), "--quiet"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // 64 rows of 64 KiB of each vocabulary tensor of each model, two norms
    // each; the headers besides.
    let row = width * 2;
    let needed = 2 * 2 * 64 * row + 2 * 2 * row;
    let dropped = 2 * extra * row;
    let budget = "100MiB";
    for (name, extra_args) in [
        ("window", vec![]),
        ("streamed", vec!["--max-memory", budget]),
    ] {
        let (proxy, stats) = flaky_proxy(endpoint, usize::MAX, usize::MAX);
        let env = s3_env(&proxy);
        if name == "streamed" {
            let o = fleetmerge_env(
                dir.path(),
                &[
                    "plan",
                    "s3.yaml",
                    "--json",
                    "--threads",
                    "2",
                    "--max-memory",
                    budget,
                ],
                &env,
            );
            assert!(o.status.success(), "{}", stderr(&o));
            let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(plan["plan"]["streamed_tensors"], 2, "{plan}");
            // The plan counts only the rows read.
            let read = plan["plan"]["read_total"].as_u64().unwrap();
            assert_eq!(read, needed, "{plan}");
        }
        let out = dir.path().join(name);
        let mut args = vec![
            "run",
            "s3.yaml",
            out.to_str().unwrap(),
            "--quiet",
            "--threads",
            "2",
        ];
        args.extend(extra_args);
        let before = stats.range_bytes.load(Ordering::SeqCst);
        let o = fleetmerge_env(dir.path(), &args, &env);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let fetched = (stats.range_bytes.load(Ordering::SeqCst) - before) as u64;
        eprintln!(
            "{name}: {fetched} bytes fetched in {} range requests; {needed} needed, {dropped} \
             dropped",
            stats.range_gets.load(Ordering::SeqCst)
        );
        assert!(
            fetched >= needed && fetched < needed + (512 << 10),
            "{name}: {fetched} bytes fetched for {needed} needed"
        );
        assert!(same_output_files(&out, &want) >= 4, "{name}");
    }
}

/// Multipart uploads the bucket still holds unfinished (moto's `?uploads`).
fn open_uploads(endpoint: &str, bucket: &str) -> usize {
    let xml = String::from_utf8(curl(&[&format!("{endpoint}/{bucket}?uploads")])).unwrap();
    xml.matches("<Upload>").count()
}

/// The local merge of `big`'s models with 20M shards written as whole
/// units (`--unit-size 100G`), into `dir/name`: what a merge in parts must
/// equal byte for byte.
fn whole_shards_reference(dir: &Path, name: &str) -> PathBuf {
    let whole = dir.join(name);
    let _ = std::fs::remove_dir_all(&whole);
    let o = fleetmerge(
        dir,
        &[
            "run",
            "local.yaml",
            whole.to_str().unwrap(),
            "--quiet",
            "--out-shard-size",
            "20M",
            "--unit-size",
            "100G",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    whole
}

/// Two shards written by three units each (`--unit-size`): by two remote
/// workers whose parts go into one multipart upload per shard, with the coordinator killed
/// once parts are journaled, and by `run`'s in-process workers. Both are
/// byte for byte the merge with whole-shard units; nothing is left in the
/// bucket but the model and its journal.
#[test]
fn a_shard_written_in_parts_by_a_cluster_into_s3_survives_a_coordinator_kill() {
    let endpoint = s3();
    let (dir, _) = big(endpoint);
    let env = s3_env(endpoint);
    let env = env_refs(&env);
    create_bucket(endpoint, "out-parts");
    let whole = whole_shards_reference(dir, "parts-reference");

    let listen = format!("127.0.0.1:{}", free_port());
    let start = |name: &str| {
        coordinator_with(
            name,
            dir,
            "s3://out-parts/m",
            &listen,
            &env,
            &["--out-shard-size", "20M", "--unit-size", "18M"],
        )
    };
    let (mut first, addr) = start("coordinator-1");
    let mut ws: Vec<Proc> = ["w1", "w2"]
        .iter()
        .map(|n| worker(n, &addr, &env))
        .collect();
    let deadline = Instant::now() + MINUTE * 2;
    while journal_units(endpoint, "out-parts", "m").is_empty() {
        assert!(Instant::now() < deadline, "no progress:\n{}", first.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    first.kill();
    let kept = journal_units(endpoint, "out-parts", "m");
    assert!(kept.len() < 6, "killed too late: {kept:?}");
    let (mut second, _) = start("coordinator-2");
    second.succeeds(MINUTE * 3);
    for w in &mut ws {
        w.succeeds(MINUTE);
    }
    let log = second.log();
    assert!(log.contains("shard finished from its parts"), "{log}");
    let got = dir.join("got-parts");
    let _ = std::fs::remove_dir_all(&got);
    download_dir(endpoint, "out-parts", "m", &got);
    assert_same_files(&got, &whole);
    assert_eq!(
        open_uploads(endpoint, "out-parts"),
        0,
        "an upload was left open"
    );
    let o = fleetmerge_env(dir, &["verify", "s3://out-parts/m"], &s3_env(endpoint));
    assert!(o.status.success(), "{}", stderr(&o));

    // `run` writes the same parts in process.
    let o = fleetmerge_env(
        dir,
        &[
            "run",
            "s3.yaml",
            "s3://out-parts/run",
            "--quiet",
            "--out-shard-size",
            "20M",
            "--unit-size",
            "18M",
        ],
        &s3_env(endpoint),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = dir.join("got-parts-run");
    let _ = std::fs::remove_dir_all(&got);
    download_dir(endpoint, "out-parts", "run", &got);
    assert_same_files(&got, &whole);
    for key in list_keys(endpoint, "out-parts", "run")
        .into_iter()
        .chain(list_keys(endpoint, "out-parts", "m"))
    {
        let name = key.split_once('/').map_or(key.as_str(), |(_, n)| n);
        assert!(
            name.starts_with(".fleetmerge/")
                || [
                    "model-00001-of-00002.safetensors",
                    "model-00002-of-00002.safetensors",
                    "model.safetensors.index.json",
                    "config.json",
                    "README.md",
                    "mergekit_config.yml",
                ]
                .contains(&name),
            "a stray object in the bucket: {key}"
        );
    }
    assert_eq!(
        open_uploads(endpoint, "out-parts"),
        0,
        "an upload was left open"
    );
}

/// `s` with every byte but `A-Za-z0-9-_.~` percent-encoded (a query value).
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A worker that lies about a part of a shard going to S3: it leases the
/// part, uploads chunks of garbage into the shard's multipart upload and
/// reports their hash, which the coordinator cannot check before the upload
/// is complete. Once the other parts are in, the finished shard fails its
/// check: the coordinator deletes it, starts a new upload and has every part
/// written again by the honest workers. The merge ends byte for byte as a
/// local one, with no upload left open and `verify` clean.
#[test]
fn a_lying_worker_s_part_makes_the_coordinator_write_the_shard_again() {
    use fleetmerge_proto::*;
    let endpoint = s3();
    let (dir, _) = big(endpoint);
    let env = s3_env(endpoint);
    let env = env_refs(&env);
    create_bucket(endpoint, "out-lie");
    let whole = whole_shards_reference(dir, "lie-reference");
    let (mut coordinator, addr) = coordinator_with(
        "coordinator-lie",
        dir,
        "s3://out-lie/m",
        "127.0.0.1:0",
        &env,
        &["--out-shard-size", "20M", "--unit-size", "18M"],
    );

    // The liar: a real gRPC client in this process.
    let rt = grpc::runtime();
    let mut c = grpc::client(&rt, &addr, None);
    let session = grpc::register(&rt, &c, "liar").unwrap();
    let (lease_id, unit, _) = grpc::lease(&rt, &c, &session);
    let part = unit.part.clone().expect("a part of a shard");
    let upload = part.upload.clone().expect("the shard's upload");
    let scratch = tempfile::tempdir().unwrap();
    let mut etags = Vec::new();
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    for (k, range) in fleetmerge_engine::unit::upload_chunks(part.len, part.chunk)
        .into_iter()
        .enumerate()
    {
        let garbage = vec![0x5a_u8; (range.end - range.start) as usize];
        sha2::Digest::update(&mut hasher, &garbage);
        let file = scratch.path().join(format!("chunk-{k}"));
        std::fs::write(&file, &garbage).unwrap();
        let headers = curl(&[
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!(
                "{endpoint}/out-lie/m/{}?partNumber={}&uploadId={}",
                unit.file_name,
                part.first_chunk as usize + k + 1,
                query_escape(&upload)
            ),
        ]);
        let headers = String::from_utf8(headers).unwrap();
        let etag = headers
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("etag").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no ETag in {headers}"));
        etags.push(etag);
    }
    let accepted = rt.block_on(c.complete(CompleteRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: "liar".into(),
        lease_id,
        file_name: unit.file_name.clone(),
        size: part.len,
        sha256: hex::encode(sha2::Digest::finalize(hasher)),
        tensors: Vec::new(),
        unit: unit.id as u64,
        progress_bytes: 0,
        session,
        chunks: etags,
    }));
    // Nothing can be checked before the upload is complete: taken for now.
    assert!(accepted.is_ok(), "{accepted:?}");

    let mut ws: Vec<Proc> = ["honest-1", "honest-2"]
        .iter()
        .map(|n| worker(n, &addr, &env))
        .collect();
    coordinator.succeeds(MINUTE * 3);
    for w in &mut ws {
        w.succeeds(MINUTE);
    }
    let log = coordinator.log();
    assert!(
        log.contains("every part is written again into a new upload"),
        "{log}"
    );
    let got = dir.join("got-lie");
    let _ = std::fs::remove_dir_all(&got);
    download_dir(endpoint, "out-lie", "m", &got);
    assert_same_files(&got, &whole);
    assert_eq!(
        open_uploads(endpoint, "out-lie"),
        0,
        "an upload was left open"
    );
    let o = fleetmerge_env(dir, &["verify", "s3://out-lie/m"], &s3_env(endpoint));
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A worker whose lease is revoked (another worker's copy of its unit
/// finished first) stops reading that unit at once and gives its link back,
/// instead of fetching the rest of a result that will not count. The slow
/// worker reads through a proxy trickling 40 kB/s: its 9 MB unit would take
/// minutes; the fast worker does every other unit, then a copy of the slow
/// one, and the slow worker must be gone soon after the coordinator.
#[test]
fn a_revoked_lease_stops_its_reads_and_the_worker_moves_on() {
    use crate::common::faults::{fault_proxy, FaultPlan};
    let endpoint = s3();
    let (dir, reference) = big(endpoint);
    create_bucket(endpoint, "out-revoked");
    let (slow_endpoint, stats) = fault_proxy(
        endpoint,
        FaultPlan {
            seed: 0,
            error_5xx: 0,
            drop_request: 0,
            drop_answer: 0,
            cut_body: 0,
            slow: 0,
            slow_ms: (0, 0),
            bytes_per_s: Some(40_000),
        },
    );
    let (fast_env, slow_env) = (s3_env(endpoint), s3_env(&slow_endpoint));
    let (fast_env, slow_env) = (env_refs(&fast_env), env_refs(&slow_env));
    let (mut c, addr) = coordinator_with(
        "coordinator",
        dir,
        "s3://out-revoked/x",
        "127.0.0.1:0",
        &fast_env,
        &["--out-shard-size", "4M", "--lease-timeout", "3"],
    );
    // The slow worker takes its unit first, then the fast one joins.
    let mut slow = worker("slow", &addr, &slow_env);
    let working = slow.wait_for("a unit", MINUTE, |l| l.contains("working"));
    let unit = field(&working, "unit").unwrap().to_string();
    let mut fast = worker("fast", &addr, &fast_env);
    c.succeeds(MINUTE * 2);
    let merged = Instant::now();
    fast.succeeds(MINUTE);
    // Without stopping, the slow worker would read on for minutes.
    slow.succeeds(Duration::from_secs(30));
    let after = merged.elapsed();
    let log = slow.log();
    assert!(
        log.contains("stopped: lease revoked"),
        "the slow worker did not stop its unit {unit} ({after:?} after the merge; proxy: {}):\n{log}",
        stats.summary()
    );
    assert!(
        !log.contains("unit failed"),
        "a cancelled unit is not a failure:\n{log}"
    );
    let got = dir.join("got-revoked");
    let _ = std::fs::remove_dir_all(&got);
    download_dir(endpoint, "out-revoked", "x", &got);
    assert_same_files(&got, reference);
    assert_eq!(open_uploads(endpoint, "out-revoked"), 0);
}
