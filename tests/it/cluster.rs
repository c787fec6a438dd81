//! Cluster mode with real processes on loopback: one `fleetmerge coordinator`
//! and `fleetmerge worker`s talking gRPC. Every output is compared bit for bit
//! with what `fleetmerge run` writes for the same config.

use crate::common::procs::*;
use crate::common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);
const LAYERS: u64 = 8;
const SHARD: &str = "4M"; // one 1.5M-element tensor per unit: 16 units

/// The big models (built once per test run), their TIES config, and the
/// output of `fleetmerge run` on them.
struct Big {
    dir: PathBuf,
    config: PathBuf,
    reference: PathBuf,
}

fn big() -> &'static Big {
    static BIG: OnceLock<Big> = OnceLock::new();
    BIG.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cluster-models");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        make_ties_models(&dir, LAYERS);
        let config = dir.join("ties.yaml");
        std::fs::write(&config, ties_config(0.5)).unwrap();
        let reference = dir.join("reference");
        let o = fleetmerge(
            &dir,
            &[
                "run",
                config.to_str().unwrap(),
                reference.to_str().unwrap(),
                "--quiet",
                "--out-shard-size",
                SHARD,
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        Big {
            dir,
            config,
            reference,
        }
    })
}

/// The same model, tensor for tensor, and the same index file.
fn assert_same_model(out: &Path, reference: &Path) {
    assert!(
        out.join("model.safetensors.index.json").exists(),
        "no index in {}",
        out.display()
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors.index.json")).unwrap(),
        std::fs::read(reference.join("model.safetensors.index.json")).unwrap(),
        "index files differ"
    );
    let (a, b) = (read_model(out), read_model(reference));
    assert_eq!(a.len(), b.len());
    for (name, t) in &b {
        assert!(
            a.get(name) == Some(t),
            "{name} differs from fleetmerge run's"
        );
    }
    for f in ["config.json", "README.md"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
}

fn journal_units(out: &Path) -> BTreeSet<usize> {
    std::fs::read_dir(out.join(".fleetmerge/units"))
        .map(|d| {
            d.filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_prefix("unit-")?
                    .strip_suffix(".json")?
                    .parse()
                    .ok()
            })
            .collect()
        })
        .unwrap_or_default()
}

fn start_coordinator(
    name: &str,
    cwd: &Path,
    config: &Path,
    out: &Path,
    listen: &str,
    extra: &[&str],
) -> (Proc, String) {
    let mut args = vec![
        "coordinator",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--listen",
        listen,
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::start(name, cwd, &args, &[]);
    let line = p.wait_for("coordinator listening", MINUTE, |l| {
        l.contains("coordinator listening")
    });
    let addr = field(&line, "listen")
        .expect("address in the log")
        .to_string();
    (p, addr)
}

fn start_worker(name: &str, addr: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let url = format!("http://{addr}");
    let mut args = vec![
        "worker",
        "--coordinator",
        url.as_str(),
        "--worker-id",
        name,
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    Proc::start(name, Path::new("."), &args, env)
}

/// Units the coordinator handed out, as (worker, unit) in log order.
fn leases(coordinator: &Proc) -> Vec<(String, usize)> {
    coordinator
        .lines()
        .iter()
        .filter(|l| l.contains("unit leased"))
        .map(|l| {
            (
                field(l, "worker").unwrap().to_string(),
                field(l, "unit").unwrap().parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn three_workers_write_what_run_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (config, cwd) = (fixture("ties").join("config.yaml"), examples());
    let reference = dir.path().join("reference");
    run_case("ties", &reference, "100K");
    let token = dir.path().join("token");
    std::fs::write(&token, "a-shared-secret\n").unwrap();

    let out = dir.path().join("out");
    let (mut coordinator, addr) = start_coordinator(
        "coordinator",
        &cwd,
        &config,
        &out,
        "127.0.0.1:0",
        &[
            "--out-shard-size",
            "100K",
            "--token-file",
            token.to_str().unwrap(),
        ],
    );
    let mut workers: Vec<Proc> = (1..=3)
        .map(|i| {
            start_worker(
                &format!("w{i}"),
                &addr,
                &["--token-file", token.to_str().unwrap()],
                &[],
            )
        })
        .collect();
    coordinator.succeeds(MINUTE);
    let mut computed = 0;
    for w in &mut workers {
        w.succeeds(MINUTE);
        let line = w.wait_for("summary", MINUTE, |l| l.contains("worker finished"));
        computed += line
            .split_whitespace()
            .find_map(|t| t.parse::<usize>().ok())
            .unwrap();
    }
    let units = journal_units(&out).len();
    assert_eq!(units, 8, "several units: {}", coordinator.log());
    assert_eq!(computed, units, "each unit computed once");
    assert!(out.join(".fleetmerge/done").exists());
    assert_same_model(&out, &reference);
}

#[test]
fn a_tokenizer_merge_in_the_cluster_writes_what_run_writes() {
    // Union vocabulary padded to 32 rows: workers re-index the embedding rows.
    let dir = tempfile::tempdir().unwrap();
    let case = "tok_slerp_union_pad";
    let (config, cwd) = (fixture(case).join("config.yaml"), examples());
    let reference = dir.path().join("reference");
    run_case(case, &reference, "100K");
    let out = dir.path().join("out");
    let (mut coordinator, addr) = start_coordinator(
        "coordinator",
        &cwd,
        &config,
        &out,
        "127.0.0.1:0",
        &["--out-shard-size", "100K"],
    );
    let mut workers: Vec<Proc> = (1..=2)
        .map(|i| start_worker(&format!("w{i}"), &addr, &[], &[]))
        .collect();
    coordinator.succeeds(MINUTE);
    for w in &mut workers {
        w.succeeds(MINUTE);
    }
    assert_same_model(&out, &reference);
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(reference.join(f)).unwrap(),
            "{f} differs from fleetmerge run's"
        );
    }
}

/// The same tokenizer merge with vocabulary tensors too large for the
/// worker's `--max-memory` whole (the kit's models widened, see
/// `write_wide_tok_models`): the worker streams them, rows read and aligned
/// a segment at a time, and writes what `fleetmerge run` writes without a
/// budget.
#[test]
fn a_worker_within_max_memory_streams_the_vocabulary_tensors() {
    let dir = tempfile::tempdir().unwrap();
    write_wide_tok_models(dir.path(), 16 << 10, 0);
    let case = "tok_slerp_union_pad";
    let config = fixture(case).join("config.yaml");
    let budget = "95MiB";
    let o = fleetmerge(
        dir.path(),
        &[
            "plan",
            config.to_str().unwrap(),
            "--json",
            "--threads",
            "1",
            "--max-memory",
            budget,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        plan["plan"]["streamed_tensors"], 2,
        "embed_tokens and lm_head"
    );
    let reference = dir.path().join("reference");
    let o = fleetmerge(
        dir.path(),
        &[
            "run",
            config.to_str().unwrap(),
            reference.to_str().unwrap(),
            "--quiet",
            "--out-shard-size",
            "100K",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let (mut coordinator, addr) = start_coordinator(
        "coordinator",
        dir.path(),
        &config,
        &out,
        "127.0.0.1:0",
        &["--out-shard-size", "100K"],
    );
    let mut worker = start_worker("w1", &addr, &["--max-memory", budget], &[]);
    coordinator.succeeds(MINUTE);
    worker.succeeds(MINUTE);
    assert_same_model(&out, &reference);
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(reference.join("tokenizer.json")).unwrap()
    );
}

#[test]
fn bin_inputs_in_the_cluster_write_what_run_writes() {
    // Two torch .bin models (one file; two shards with an index) and two
    // safetensors ones: workers read the .bin tensors by the byte ranges the
    // coordinator's plan found in their pickles, and check them against it.
    let dir = tempfile::tempdir().unwrap();
    let case = "bin_mixed_ties";
    let (config, cwd) = (fixture(case).join("config.yaml"), examples());
    let reference = dir.path().join("reference");
    run_case(case, &reference, "100K");
    let out = dir.path().join("out");
    let (mut coordinator, addr) = start_coordinator(
        "coordinator",
        &cwd,
        &config,
        &out,
        "127.0.0.1:0",
        &["--out-shard-size", "100K"],
    );
    let mut workers: Vec<Proc> = (1..=2)
        .map(|i| start_worker(&format!("w{i}"), &addr, &[], &[]))
        .collect();
    coordinator.succeeds(MINUTE);
    for w in &mut workers {
        w.succeeds(MINUTE);
    }
    assert!(journal_units(&out).len() > 1, "{}", coordinator.log());
    assert_same_model(&out, &reference);
    // And that is mergekit's output.
    let problems = compare(
        &read_model(&out),
        &read_model(&fixture(case).join("expected")),
        Mode::Close,
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn a_worker_killed_mid_unit_loses_only_its_unit() {
    let big = big();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (mut coordinator, addr) = start_coordinator(
        "coordinator",
        &big.dir,
        &big.config,
        &out,
        "127.0.0.1:0",
        &["--out-shard-size", SHARD, "--lease-timeout", "2"],
    );
    let mut a = start_worker("victim", &addr, &[], &[]);
    let line = coordinator.wait_for("a lease to the victim", MINUTE, |l| {
        l.contains("unit leased") && field(l, "worker") == Some("victim")
    });
    a.kill();
    let unit: usize = field(&line, "unit").unwrap().parse().unwrap();
    assert!(
        !journal_units(&out).contains(&unit),
        "the victim finished unit {unit} before it was killed"
    );

    let mut others: Vec<Proc> = ["w2", "w3"]
        .iter()
        .map(|n| start_worker(n, &addr, &[], &[]))
        .collect();
    coordinator.succeeds(MINUTE * 2);
    for w in &mut others {
        w.succeeds(MINUTE);
    }
    let log = coordinator.log();
    assert!(
        coordinator
            .lines()
            .iter()
            .any(|l| l.contains("lease expired")
                && field(l, "worker") == Some("victim")
                && field(l, "unit") == Some(&unit.to_string())),
        "no expiry of the victim's lease:\n{log}"
    );
    assert!(
        leases(&coordinator)
            .iter()
            .any(|(w, u)| *u == unit && w != "victim"),
        "unit {unit} was not handed to another worker:\n{log}"
    );
    assert_same_model(&out, &big.reference);
}

#[test]
fn a_killed_coordinator_resumes_without_recomputing() {
    let big = big();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let listen = format!("127.0.0.1:{}", free_port());
    let args = ["--out-shard-size", SHARD];
    let (mut first, addr) =
        start_coordinator("coordinator-1", &big.dir, &big.config, &out, &listen, &args);
    // One worker, kept running across the coordinator's death: it reconnects.
    let mut worker = start_worker("w1", &addr, &[], &[]);
    let deadline = std::time::Instant::now() + MINUTE;
    while journal_units(&out).len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no progress:\n{}",
            first.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    first.kill();
    let finished = journal_units(&out);
    let total = 2 * LAYERS as usize;
    assert!(finished.len() < total, "killed too late to test resuming");
    assert!(!out.join("model.safetensors.index.json").exists());

    let (mut second, _) =
        start_coordinator("coordinator-2", &big.dir, &big.config, &out, &listen, &args);
    second.succeeds(MINUTE * 2);
    worker.succeeds(MINUTE);
    // The new coordinator does not know the worker's session: it registered again.
    assert!(
        worker.log().contains("registering again"),
        "{}",
        worker.log()
    );
    let resumed = second.wait_for("the resume line", MINUTE, |l| l.contains("resuming"));
    assert_eq!(
        field(&resumed, "done"),
        Some(finished.len().to_string().as_str()),
        "{resumed}"
    );
    let recomputed: Vec<usize> = leases(&second)
        .into_iter()
        .map(|(_, u)| u)
        .filter(|u| finished.contains(u))
        .collect();
    assert!(
        recomputed.is_empty(),
        "units {recomputed:?} were journaled before the kill and computed again"
    );
    assert_eq!(journal_units(&out).len(), total);
    assert_same_model(&out, &big.reference);
}

#[test]
fn a_worker_told_to_stop_finishes_its_unit_first() {
    let big = big();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (mut coordinator, addr) = start_coordinator(
        "coordinator",
        &big.dir,
        &big.config,
        &out,
        "127.0.0.1:0",
        &["--out-shard-size", SHARD],
    );
    // One unit at a time: a worker that reads ahead holds two.
    let mut a = start_worker("stopping", &addr, &["--no-read-ahead"], &[]);
    let line = coordinator.wait_for("a lease", MINUTE, |l| {
        l.contains("unit leased") && field(l, "worker") == Some("stopping")
    });
    a.signal("TERM");
    a.succeeds(MINUTE);
    let unit: usize = field(&line, "unit").unwrap().parse().unwrap();
    assert!(
        journal_units(&out).contains(&unit),
        "SIGTERM dropped unit {unit}:\n{}",
        a.log()
    );
    let taken: Vec<usize> = leases(&coordinator)
        .into_iter()
        .filter(|(w, _)| w == "stopping")
        .map(|(_, u)| u)
        .collect();
    assert_eq!(taken.len(), 1, "took new work after SIGTERM: {taken:?}");

    let mut b = start_worker("w2", &addr, &[], &[]);
    coordinator.succeeds(MINUTE * 2);
    b.succeeds(MINUTE);
    assert_same_model(&out, &big.reference);
}

#[test]
fn a_changed_config_or_a_wrong_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = examples();
    let config = dir.path().join("ties.yaml");
    let original = std::fs::read_to_string(fixture("ties").join("config.yaml")).unwrap();
    std::fs::write(&config, &original).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "the-right-token").unwrap();
    let out = dir.path().join("out");
    let args = ["--token-file", token.to_str().unwrap()];
    let (mut coordinator, addr) =
        start_coordinator("coordinator", &cwd, &config, &out, "127.0.0.1:0", &args);

    // Wrong and missing tokens: the worker is refused and says so; the
    // coordinator logs the attempt without the token.
    for (name, env) in [
        ("wrong", vec![("FLEETMERGE_TOKEN", "not-the-token-42")]),
        ("missing", vec![]),
    ] {
        let mut w = start_worker(name, &addr, &["--give-up-after", "20"], &env);
        let status = w.wait_exit(MINUTE);
        assert!(!status.success(), "{name}: {}", w.log());
        let log = w.log();
        assert!(
            log.contains("refused") && log.contains("token"),
            "{name}: {log}"
        );
    }
    coordinator.wait_for("the rejection", MINUTE, |l| l.contains("wrong token"));
    assert!(!coordinator.log().contains("not-the-token-42"));
    assert!(!coordinator.log().contains("the-right-token"));
    assert!(journal_units(&out).is_empty());

    // Killed, then restarted with another config on the same OUT: refused.
    coordinator.kill();
    std::fs::write(&config, original.replace("density: 0.5", "density: 0.6")).unwrap();
    let mut changed = Proc::start(
        "coordinator-2",
        &cwd,
        &[
            "coordinator",
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            token.to_str().unwrap(),
        ],
        &[],
    );
    let status = changed.wait_exit(MINUTE);
    assert!(!status.success());
    assert!(changed.log().contains("--restart"), "{}", changed.log());
    assert!(!changed.log().contains("coordinator listening"));
}

#[test]
fn a_permanent_unit_failure_ends_the_merge_without_an_index() {
    let dir = tempfile::tempdir().unwrap();
    // Our own copy of the models, so one can be damaged after planning.
    for m in ["llama-base", "llama-ft-a", "llama-ft-b", "llama-ft-c"] {
        let (from, to) = (
            examples().join("models").join(m),
            dir.path().join("models").join(m),
        );
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(&from).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    }
    let config = fixture("ties").join("config.yaml");
    let out = dir.path().join("out");
    let (mut coordinator, addr) =
        start_coordinator("coordinator", dir.path(), &config, &out, "127.0.0.1:0", &[]);
    // Truncate ft-a's data after the coordinator read its header.
    let shard = dir.path().join("models/llama-ft-a/model.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);

    let mut w = start_worker("w1", &addr, &[], &[]);
    let status = coordinator.wait_exit(MINUTE);
    let _ = w.wait_exit(MINUTE);
    assert!(!status.success(), "{}", coordinator.log());
    let log = coordinator.log();
    for part in [
        "work unit 0",
        "model.safetensors, tensors model.embed_tokens.weight",
        "cannot fix",
        // Found by the worker's check of the input against its header.
        "truncated",
        "w1",
        "llama-ft-a",
    ] {
        assert!(
            log.contains(part),
            "{part:?} missing from the error:\n{log}"
        );
    }
    assert!(!out.join("model.safetensors.index.json").exists());
    assert!(!out.join(".fleetmerge/done").exists());
}

/// A certificate authority and a certificate for `localhost` signed by it.
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[test]
fn workers_reach_a_tls_coordinator_that_they_trust() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(dir.path());
    let (config, cwd) = (fixture("linear").join("config.yaml"), examples());
    let reference = dir.path().join("reference");
    let o = fleetmerge(
        &cwd,
        &[
            "run",
            config.to_str().unwrap(),
            reference.to_str().unwrap(),
            "--quiet",
            "--out-shard-size",
            "200K",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let (mut coordinator, addr) = start_coordinator(
        "coordinator",
        &cwd,
        &config,
        &out,
        "127.0.0.1:0",
        &[
            "--out-shard-size",
            "200K",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let port = addr.rsplit(':').next().unwrap();
    let url = format!("https://localhost:{port}");

    // Without the CA the worker does not trust the coordinator.
    let mut untrusting = Proc::start(
        "untrusting",
        Path::new("."),
        &["worker", "--coordinator", &url, "--give-up-after", "2"],
        &[],
    );
    assert!(!untrusting.wait_exit(MINUTE).success());
    assert!(journal_units(&out).is_empty());

    let mut w = Proc::start(
        "w1",
        Path::new("."),
        &[
            "worker",
            "--coordinator",
            &url,
            "--tls-ca",
            ca.to_str().unwrap(),
        ],
        &[],
    );
    coordinator.succeeds(MINUTE);
    w.succeeds(MINUTE);
    assert_same_model(&out, &reference);
}

#[test]
fn status_asks_a_running_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let (config, cwd) = (fixture("ties").join("config.yaml"), examples());
    let token = dir.path().join("token");
    std::fs::write(&token, "status-secret\n").unwrap();
    let out = dir.path().join("out");
    let (mut coordinator, addr) = start_coordinator(
        "coordinator",
        &cwd,
        &config,
        &out,
        "127.0.0.1:0",
        &[
            "--out-shard-size",
            "100K",
            "--token-file",
            token.to_str().unwrap(),
        ],
    );
    let url = format!("http://{addr}");
    let o = fleetmerge(
        Path::new("."),
        &["status", &url, "--token-file", token.to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{text}{}", stderr(&o));
    assert!(text.contains(": running"), "{text}");
    assert!(
        text.contains("units: 0 done, 0 running, 8 pending, 0 failed, of 8"),
        "{text}"
    );
    assert!(text.contains("workers: none connected"), "{text}");
    assert!(
        text.contains("input: 0 B of 2.74 MB in finished units")
            && text.contains("attempts: 0 retries, 0 lease expiries, 0 failures reported"),
        "{text}"
    );
    // Without the token the coordinator refuses.
    let o = fleetmerge(Path::new("."), &["status", &url]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("token"), "{}", stderr(&o));

    let mut worker = start_worker("w1", &addr, &["--token-file", token.to_str().unwrap()], &[]);
    coordinator.succeeds(MINUTE);
    worker.succeeds(MINUTE);
    let o = fleetmerge(Path::new("."), &["status", out.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        text.contains(": finished") && text.contains("8 of 8 done"),
        "{text}"
    );
}

/// `GET path` over plain HTTP/1.1; returns the whole response.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn the_coordinator_serves_prometheus_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (config, cwd) = (fixture("ties").join("config.yaml"), examples());
    let out = dir.path().join("out");
    let (mut coordinator, addr) = start_coordinator(
        "coordinator",
        &cwd,
        &config,
        &out,
        "127.0.0.1:0",
        &[
            "--out-shard-size",
            "100K",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let line = coordinator.wait_for("metrics address", MINUTE, |l| {
        l.contains("metrics listening")
    });
    let metrics = field(&line, "metrics").expect("address").to_string();
    let text = http_get(&metrics, "/metrics");
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    for want in [
        "# TYPE fleetmerge_units gauge",
        "fleetmerge_units{state=\"pending\"} 8",
        "fleetmerge_units{state=\"done\"} 0",
        "fleetmerge_units_total 8",
        "fleetmerge_input_bytes 2742784",
        "fleetmerge_lease_expiries_total 0",
        "fleetmerge_workers 0",
    ] {
        assert!(text.contains(want), "{want} missing in:\n{text}");
    }
    assert!(http_get(&metrics, "/other").starts_with("HTTP/1.1 404"));

    let mut worker = start_worker("w1", &addr, &[], &[]);
    coordinator.succeeds(MINUTE);
    worker.succeeds(MINUTE);

    // Per-worker series while a worker computes (the big models take seconds).
    let big = big();
    let out = dir.path().join("big-out");
    let (mut coordinator, addr) = start_coordinator(
        "coordinator",
        &big.dir,
        &big.config,
        &out,
        "127.0.0.1:0",
        &["--out-shard-size", SHARD, "--metrics-listen", "127.0.0.1:0"],
    );
    let line = coordinator.wait_for("metrics address", MINUTE, |l| {
        l.contains("metrics listening")
    });
    let metrics = field(&line, "metrics").expect("address").to_string();
    let mut worker = start_worker("w1", &addr, &[], &[]);
    coordinator.wait_for("a lease to w1", MINUTE, |l| {
        l.contains("unit leased") && field(l, "worker") == Some("w1")
    });
    let text = http_get(&metrics, "/metrics");
    for want in [
        "fleetmerge_units_total 16",
        "fleetmerge_workers 1",
        "fleetmerge_worker_bytes_read_total{worker=\"w1\"}",
        "fleetmerge_worker_heartbeat_age_seconds{worker=\"w1\"}",
        "fleetmerge_worker_units_leased{worker=\"w1\"}",
    ] {
        assert!(text.contains(want), "{want} missing in:\n{text}");
    }
    coordinator.succeeds(MINUTE * 2);
    worker.succeeds(MINUTE);
}

/// A merge with LoRA-adapted inputs (lora_ties: an adapted model beside a
/// fine-tune and the base; lora_base_model: an adapted base): the units carry
/// the adapters' factors, the workers fold them on read, and the output is
/// what `fleetmerge run` writes, bit for bit (the coordinator spot-checks the
/// workers' shards by recomputing a tensor, adapted ones included).
#[test]
fn adapted_inputs_in_the_cluster_write_what_run_writes() {
    for case in ["lora_ties", "lora_base_model"] {
        let dir = tempfile::tempdir().unwrap();
        let (config, cwd) = (fixture(case).join("config.yaml"), examples());
        let reference = dir.path().join("reference");
        run_case(case, &reference, "100K");
        let out = dir.path().join("out");
        let (mut coordinator, addr) = start_coordinator(
            "coordinator",
            &cwd,
            &config,
            &out,
            "127.0.0.1:0",
            &["--out-shard-size", "100K"],
        );
        let mut workers: Vec<Proc> = (1..=2)
            .map(|i| start_worker(&format!("w{i}"), &addr, &[], &[]))
            .collect();
        coordinator.succeeds(MINUTE);
        for w in &mut workers {
            w.succeeds(MINUTE);
        }
        assert!(journal_units(&out).len() > 3, "{case}: several units");
        assert_same_model(&out, &reference);
        let card = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(
            card.contains("./models/llama-base + ./models/lora-")
                && card.contains("examples/models/lora-"),
            "{case}: the card names the adapter and where it was read: {card}"
        );
    }
}
