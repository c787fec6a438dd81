//! Chaos: a cluster merge (a coordinator and four workers, real processes)
//! with inputs and output in S3 (moto) reached through a proxy that injects
//! faults (5xx answers, connections dropped before the server or after it
//! acted, answers cut mid-body, slow answers: [`crate::common::faults`]),
//! while a driver thread kills random workers (SIGKILL or SIGTERM) and the
//! coordinator (SIGKILL and SIGTERM, at least 3 times) at random moments, at
//! least 20 times in all, and starts each again. At the end:
//!
//! - the output in the bucket is byte for byte what `fleetmerge run` writes
//!   from local copies (shards, index, config.json);
//! - `fleetmerge verify` on the bucket is clean;
//! - the bucket holds exactly the files a finished merge leaves (those of the
//!   local run: shards, side files, the journal), no other object, and no
//!   incomplete multipart upload;
//! - no unit was ever recorded with two different sha256 values: the journal's
//!   unit records watched in the bucket while the merge ran, every
//!   coordinator's "unit completed" lines and every worker's "unit done" lines
//!   across all restarts name one hash per unit, the shard's own.
//!
//! Seeded: `FLEETMERGE_CHAOS_SEED=N` replays a run's schedule of kills and its
//! mix of faults (the seed is printed at the start and in every failure).
//! One run: `cargo test --release --test it chaos::`.

use crate::common::faults::*;
use crate::common::procs::*;
use crate::common::servers::*;
use crate::common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WORKERS: usize = 4;
/// Four 1 MiB tensors a layer: 120 tensors.
const LAYERS: u64 = 30;
const ROWS: u64 = 512;
const COLS: u64 = 1024;
/// 11 tensors a shard (the last has 10): each written by units of 5, 5 and
/// 1 tensors (parts of one multipart upload per shard); 32 units.
const SHARD: &str = "12M";
const UNIT: &str = "15M";
const BUCKET: &str = "chaos";
const OUT: &str = "out";
const MIN_KILLS: usize = 20;
const MIN_COORDINATOR_KILLS: usize = 3;
/// The whole merge, chaos included, must end within this.
const MERGE_DEADLINE: Duration = Duration::from_secs(200);

/// The seed: `FLEETMERGE_CHAOS_SEED`, or a fresh one.
fn seed() -> u64 {
    if let Ok(s) = std::env::var("FLEETMERGE_CHAOS_SEED") {
        return s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("FLEETMERGE_CHAOS_SEED={s:?} is not a number"));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    Rng::new(nanos ^ (std::process::id() as u64) << 32).next_u64() % 1_000_000_000
}

fn replay(seed: u64) -> String {
    format!("chaos seed {seed} (replay: FLEETMERGE_CHAOS_SEED={seed} cargo test --release --test it chaos::)")
}

#[test]
fn a_merge_under_chaos_ends_as_run_writes_it() {
    let seed = seed();
    eprintln!("{}", replay(seed));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| chaos(seed)));
    if let Err(p) = result {
        let message = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        panic!("{}: {message}", replay(seed));
    }
}

/// Base and two fine-tunes of `LAYERS` layers of four tensors (bf16).
fn make_models(dir: &Path) {
    let kinds = [
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ];
    for (m, seed) in [("base", 1u64), ("a", 2), ("b", 3)] {
        let mut tensors = Vec::new();
        for l in 0..LAYERS {
            for (j, kind) in kinds.iter().enumerate() {
                let k = l * kinds.len() as u64 + j as u64;
                let n = (ROWS * COLS) as usize;
                let mut values = noise(100 + k, n, 0.02);
                if seed != 1 {
                    for (v, d) in values.iter_mut().zip(noise(seed * 1000 + k, n, 0.004)) {
                        *v += d;
                    }
                }
                tensors.push((format!("model.layers.{l}.{kind}"), vec![ROWS, COLS], values));
            }
        }
        write_bf16_model(&dir.join(m), LAYERS, &tensors);
    }
}

/// Everything under `dir`, as relative paths.
fn files_under(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel);
            }
        }
    }
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The unit records seen in the bucket while the merge ran: every sha256 each
/// unit was ever recorded with.
#[derive(Default)]
struct Watched {
    hashes: BTreeMap<u64, BTreeSet<String>>,
    /// Records read (a record read again after it changed counts again).
    reads: usize,
}

/// Lists `OUT/.fleetmerge/units/` (straight from moto, no faults) every
/// 300 ms until `stop`, reading each record whose ETag is new.
fn watch_journal(endpoint: String, stop: Arc<AtomicBool>, seen: Arc<Mutex<Watched>>) {
    let mut etags: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let last = stop.load(Ordering::SeqCst);
        let xml = String::from_utf8(curl(&[&format!(
            "{endpoint}/{BUCKET}?list-type=2&max-keys=10000&prefix={OUT}/.fleetmerge/units/"
        )]))
        .unwrap();
        for entry in xml.split("<Contents>").skip(1) {
            let tag = |t: &str| {
                entry
                    .split(&format!("<{t}>"))
                    .nth(1)
                    .and_then(|s| s.split(&format!("</{t}>")).next())
                    .unwrap_or("")
                    .to_string()
            };
            let (key, etag) = (tag("Key"), tag("ETag"));
            if etags.get(&key) == Some(&etag) {
                continue;
            }
            let out = Command::new("curl")
                .args(["-sS", "--fail-with-body"])
                .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "test:test"])
                .arg(format!("{endpoint}/{BUCKET}/{key}"))
                .output()
                .unwrap();
            if !out.status.success() {
                continue; // replaced or removed meanwhile: the next listing tells
            }
            let record: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                    panic!(
                        "{key}: a journal record that is not JSON ({e}): {}",
                        String::from_utf8_lossy(&out.stdout)
                    )
                });
            let unit = record["unit"]
                .as_u64()
                .unwrap_or_else(|| panic!("{key}: no unit in {record}"));
            let sha = record["sha256"]
                .as_str()
                .unwrap_or_else(|| panic!("{key}: no sha256 in {record}"))
                .to_string();
            let mut w = seen.lock().unwrap();
            w.hashes.entry(unit).or_default().insert(sha);
            w.reads += 1;
            etags.insert(key, etag);
        }
        if last {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The processes of the cluster, live and ended, and what the driver did.
struct Cluster {
    dir: PathBuf,
    env: Vec<(&'static str, String)>,
    listen: String,
    coordinator: Option<Proc>,
    coordinators_started: usize,
    workers: Vec<Option<Proc>>,
    workers_started: usize,
    /// Workers told to stop (SIGTERM), finishing their unit, by slot.
    draining: Vec<(usize, Proc)>,
    /// Processes that ended (their logs are read at the end).
    ended: Vec<Proc>,
    /// Starts due: (when, slot; `None` for the coordinator).
    due: Vec<(Instant, Option<usize>)>,
    kills: usize,
    /// Coordinators killed before they listened (see `kill_coordinator`).
    killed_starting: usize,
    coordinator_kills: Vec<&'static str>,
    worker_kills: Vec<&'static str>,
    /// Exits nobody asked for that were not clean.
    unexpected: Vec<String>,
}

impl Cluster {
    fn env(&self) -> Vec<(&'static str, &str)> {
        self.env.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    fn start_coordinator(&mut self) {
        self.coordinators_started += 1;
        let name = format!("coordinator-{}", self.coordinators_started);
        let p = Proc::start(
            &name,
            &self.dir,
            &[
                "coordinator",
                "--config",
                "s3.yaml",
                "--out",
                &format!("s3://{BUCKET}/{OUT}"),
                "--listen",
                &self.listen,
                "--out-shard-size",
                SHARD,
                "--unit-size",
                UNIT,
                // A killed worker's unit goes to another one soon.
                "--lease-timeout",
                "3",
                // Every kill of a worker mid-unit costs that unit an attempt.
                "--max-attempts",
                "20",
            ],
            &self.env(),
        );
        self.coordinator = Some(p);
    }

    fn start_worker(&mut self, slot: usize) {
        self.workers_started += 1;
        let name = format!("w{slot}-{}", self.workers_started);
        let url = format!("http://{}", self.listen);
        let p = Proc::start(
            &name,
            &self.dir,
            &[
                "worker",
                "--coordinator",
                &url,
                "--worker-id",
                &name,
                "--threads",
                "1",
                "--give-up-after",
                "120",
            ],
            &self.env(),
        );
        self.workers[slot] = Some(p);
    }

    /// Reaps what ended. Returns the coordinator's exit status if it ended.
    fn reap(&mut self) -> Option<ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        for slot in 0..WORKERS {
            let ended = match self.workers[slot].as_mut() {
                Some(w) => w.try_exit(),
                None => None,
            };
            if let Some(status) = ended {
                let w = self.workers[slot].take().unwrap();
                if !status.success() {
                    self.unexpected
                        .push(format!("{} exited ({status}) on its own", w.name));
                }
                // A clean exit: the coordinator said the merge is over.
                self.ended.push(w);
            }
        }
        let mut i = 0;
        while i < self.draining.len() {
            let Some(status) = self.draining[i].1.try_exit() else {
                i += 1;
                continue;
            };
            let (slot, w) = self.draining.remove(i);
            // SIGTERM drains: it exits 0 once its unit is reported (or dies
            // of the signal if it came before the handler was installed).
            if !status.success() && status.signal() != Some(libc::SIGTERM) {
                self.unexpected
                    .push(format!("{} exited ({status}) after SIGTERM", w.name));
            }
            self.ended.push(w);
            self.due.push((Instant::now(), Some(slot)));
        }
        let status = self.coordinator.as_mut()?.try_exit()?;
        let c = self.coordinator.take().unwrap();
        if !status.success() {
            self.unexpected
                .push(format!("{} exited ({status}) on its own", c.name));
        }
        self.ended.push(c);
        Some(status)
    }

    /// Starts what is due.
    fn start_due(&mut self) {
        let now = Instant::now();
        let (ready, later): (Vec<_>, Vec<_>) = self.due.drain(..).partition(|(at, _)| *at <= now);
        self.due = later;
        for (_, what) in ready {
            match what {
                None => self.start_coordinator(),
                Some(slot) => self.start_worker(slot),
            }
        }
    }

    fn kill_coordinator(&mut self, sig: &'static str, restart_in: Duration) {
        let Some(mut c) = self.coordinator.take() else {
            return;
        };
        // Killed before it listened: it may have been preparing the shards'
        // uploads, and one it created may not be journaled yet.
        let starting = !c
            .lines()
            .iter()
            .any(|l| l.contains("coordinator listening"));
        if sig == "KILL" {
            c.kill();
        } else {
            c.signal(sig);
            c.wait_exit(Duration::from_secs(20));
        }
        self.ended.push(c);
        self.kills += 1;
        self.coordinator_kills.push(sig);
        self.killed_starting += usize::from(starting);
        self.due.push((Instant::now() + restart_in, None));
    }

    fn kill_worker(&mut self, slot: usize, sig: &'static str, restart_in: Duration) {
        let Some(mut w) = self.workers[slot].take() else {
            return;
        };
        self.kills += 1;
        self.worker_kills.push(sig);
        if sig == "KILL" {
            w.kill();
            self.ended.push(w);
            self.due.push((Instant::now() + restart_in, Some(slot)));
        } else {
            w.signal(sig);
            self.draining.push((slot, w));
        }
    }

    /// Every process's log, each under its name.
    fn logs(&self) -> String {
        let live = self.coordinator.iter().chain(self.workers.iter().flatten());
        let draining = self.draining.iter().map(|(_, p)| p);
        let mut text = String::new();
        for p in self.ended.iter().chain(live).chain(draining) {
            text.push_str(&format!("==== {}\n{}\n", p.name, p.log()));
        }
        text
    }

    /// Every line of the coordinators' and workers' logs.
    fn all_lines(&self) -> Vec<(String, String)> {
        let live = self.coordinator.iter().chain(self.workers.iter().flatten());
        let draining = self.draining.iter().map(|(_, p)| p);
        self.ended
            .iter()
            .chain(live)
            .chain(draining)
            .flat_map(|p| p.lines().into_iter().map(|l| (p.name.clone(), l)))
            .collect()
    }
}

/// What the driver did, and how the merge ended.
struct Driven {
    cluster: Cluster,
    /// The merge ended (the coordinator exited 0) after this long.
    took: Duration,
    /// When the last kill came, after the start.
    last_kill: Duration,
}

/// The driver: starts the cluster, kills and restarts its processes at
/// random moments until the planned kills are done, then lets the merge
/// finish. Returns once the coordinator has exited 0.
fn drive(seed: u64, mut cluster: Cluster) -> Driven {
    let mut rng = Rng::new(seed);
    let total_kills = rng.between(MIN_KILLS as u64 + 2, MIN_KILLS as u64 + 6) as usize;
    // The coordinator's kills among the first MIN_KILLS - 1 (not the very
    // first), so that they happen even if the merge ends soon after.
    let coordinator_kills = rng.between(MIN_COORDINATOR_KILLS as u64 + 1, 5) as usize;
    let mut at_kill: BTreeSet<usize> = BTreeSet::new();
    while at_kill.len() < coordinator_kills {
        at_kill.insert(rng.between(1, MIN_KILLS as u64 - 2) as usize);
    }
    // Both signals for both kinds: the first of each kind picks one, the
    // second the other, later ones are drawn.
    let signal = |rng: &mut Rng, done: &[&'static str]| -> &'static str {
        let pick = match done {
            [] => rng.below(2) == 0,
            [first] => *first != "KILL",
            _ => rng.below(2) == 0,
        };
        if pick {
            "KILL"
        } else {
            "TERM"
        }
    };
    let started = Instant::now();
    cluster.start_coordinator();
    for slot in 0..WORKERS {
        cluster.start_worker(slot);
    }
    let interval = |rng: &mut Rng| Duration::from_millis(rng.between(900, 2600));
    let mut next_kill = Instant::now() + interval(&mut rng);
    let mut last_kill = Duration::ZERO;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        if let Some(status) = cluster.reap() {
            if status.success() {
                break;
            }
            // An exit nobody asked for: the merge failed.
            let logs = cluster.logs();
            panic!(
                "the coordinator failed on its own: {:?}\n{logs}",
                cluster.unexpected
            );
        }
        cluster.start_due();
        assert!(
            started.elapsed() < MERGE_DEADLINE,
            "the merge did not finish within {MERGE_DEADLINE:?} ({} kills)\n{}",
            cluster.kills,
            cluster.logs()
        );
        if cluster.kills >= total_kills || Instant::now() < next_kill {
            continue;
        }
        next_kill = Instant::now() + interval(&mut rng);
        let restart_in = Duration::from_millis(rng.between(0, 1000));
        if at_kill.contains(&cluster.kills) {
            if cluster.coordinator.is_none() {
                continue; // not restarted yet: the next moment
            }
            let sig = signal(&mut rng, &cluster.coordinator_kills);
            eprintln!(
                "chaos: kill #{} at {:.1} s: coordinator (SIG{sig})",
                cluster.kills + 1,
                started.elapsed().as_secs_f64()
            );
            cluster.kill_coordinator(sig, restart_in);
        } else {
            let live: Vec<usize> = (0..WORKERS)
                .filter(|&s| cluster.workers[s].is_some())
                .collect();
            if live.is_empty() {
                continue;
            }
            let slot = live[rng.below(live.len() as u64) as usize];
            let sig = signal(&mut rng, &cluster.worker_kills);
            eprintln!(
                "chaos: kill #{} at {:.1} s: worker slot {slot} (SIG{sig})",
                cluster.kills + 1,
                started.elapsed().as_secs_f64()
            );
            cluster.kill_worker(slot, sig, restart_in);
        }
        last_kill = started.elapsed();
    }
    let took = started.elapsed();
    // The merge is over: workers told so exit; one started after the
    // coordinator ended has nobody to tell it, and is stopped here.
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline
        && (cluster.workers.iter().any(Option::is_some) || !cluster.draining.is_empty())
    {
        cluster.reap();
        std::thread::sleep(Duration::from_millis(50));
    }
    for slot in 0..WORKERS {
        if let Some(mut w) = cluster.workers[slot].take() {
            w.kill();
            cluster.ended.push(w);
        }
    }
    for (_, mut w) in cluster.draining.drain(..) {
        w.kill();
        cluster.ended.push(w);
    }
    Driven {
        cluster,
        took,
        last_kill,
    }
}

/// `fleetmerge ARGS` in `cwd` with `env` (and none of the Hub's variables).
fn fleetmerge_env(cwd: &Path, args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fleetmerge"));
    for k in HUB_ENV {
        c.env_remove(k);
    }
    c.current_dir(cwd).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("fleetmerge runs")
}

fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

fn chaos(seed: u64) {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    make_models(&dir.join("models"));
    std::fs::write(
        dir.join("local.yaml"),
        ties_config(0.5).replace("model: ", "model: models/"),
    )
    .unwrap();
    std::fs::write(
        dir.join("s3.yaml"),
        ties_config(0.5).replace("model: ", &format!("model: s3://{BUCKET}/models/")),
    )
    .unwrap();
    let reference = dir.join("reference");
    let o = fleetmerge(
        dir,
        &[
            "run",
            "local.yaml",
            reference.to_str().unwrap(),
            "--quiet",
            "--out-shard-size",
            SHARD,
            "--unit-size",
            UNIT,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let endpoint = moto(false, dir);
    create_bucket(&endpoint, BUCKET);
    upload_dir(&endpoint, BUCKET, "models", &dir.join("models"));
    let (proxy, faults) = fault_proxy(
        &endpoint,
        FaultPlan {
            seed,
            error_5xx: 15,
            drop_request: 8,
            drop_answer: 8,
            cut_body: 8,
            slow: 40,
            slow_ms: (200, 1500),
            bytes_per_s: None,
        },
    );
    eprintln!(
        "chaos: models, reference and bucket ready in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let watched = Arc::new(Mutex::new(Watched::default()));
    let watcher = {
        let (endpoint, stop, watched) = (endpoint.clone(), stop.clone(), watched.clone());
        std::thread::spawn(move || watch_journal(endpoint, stop, watched))
    };
    let cluster = Cluster {
        dir: dir.to_path_buf(),
        env: s3_env(&proxy),
        listen: format!("127.0.0.1:{}", free_port()),
        coordinator: None,
        coordinators_started: 0,
        workers: (0..WORKERS).map(|_| None).collect(),
        workers_started: 0,
        draining: Vec::new(),
        ended: Vec::new(),
        due: Vec::new(),
        kills: 0,
        killed_starting: 0,
        coordinator_kills: Vec::new(),
        worker_kills: Vec::new(),
        unexpected: Vec::new(),
    };
    let driver = std::thread::Builder::new()
        .name("chaos-driver".into())
        .spawn(move || drive(seed, cluster))
        .unwrap();
    let driven = driver.join();
    stop.store(true, Ordering::SeqCst);
    let watched_ok = watcher.join();
    let Driven {
        cluster,
        took,
        last_kill,
    } = match driven {
        Ok(d) => d,
        Err(p) => std::panic::resume_unwind(p),
    };
    if let Err(p) = watched_ok {
        std::panic::resume_unwind(p);
    }
    // Every process's log, kept when the test fails (removed when it passes).
    let log_file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{seed}.log"));
    std::fs::write(&log_file, cluster.logs()).unwrap();
    let logs = format!("(every process's log: {})", log_file.display());
    eprintln!(
        "chaos: merge done in {:.1} s, last kill at {:.1} s; {} kills (coordinator: {:?}, workers: {} SIGKILL, {} SIGTERM); {} coordinators and {} workers started; faults: {}",
        took.as_secs_f64(),
        last_kill.as_secs_f64(),
        cluster.kills,
        cluster.coordinator_kills,
        cluster.worker_kills.iter().filter(|s| **s == "KILL").count(),
        cluster.worker_kills.iter().filter(|s| **s == "TERM").count(),
        cluster.coordinators_started,
        cluster.workers_started,
        faults.summary()
    );

    // The chaos that was promised.
    assert!(
        cluster.unexpected.is_empty(),
        "processes failed on their own: {:?} {logs}",
        cluster.unexpected
    );
    assert!(
        cluster.kills >= MIN_KILLS && cluster.coordinator_kills.len() >= MIN_COORDINATOR_KILLS,
        "the merge ended after {} kills ({} of the coordinator): too soon for the chaos \
         planned; make the merge bigger or slower {logs}",
        cluster.kills,
        cluster.coordinator_kills.len()
    );
    for (who, kills) in [
        ("coordinator", &cluster.coordinator_kills),
        ("workers", &cluster.worker_kills),
    ] {
        assert!(
            kills.contains(&"KILL") && kills.contains(&"TERM"),
            "{who} got {kills:?}: not both signals {logs}"
        );
    }
    let g = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::SeqCst);
    for (what, n) in [
        ("5xx answers", g(&faults.errors)),
        ("requests dropped", g(&faults.dropped_requests)),
        ("answers lost", g(&faults.dropped_answers)),
        ("bodies cut", g(&faults.cut_bodies)),
        ("slow answers", g(&faults.slowed)),
    ] {
        assert!(n >= 1, "no {what} injected: {}", faults.summary());
    }

    // The output: what `fleetmerge run` wrote from local files.
    let got = dir.join("got");
    download_dir(&endpoint, BUCKET, OUT, &got);
    let compared = same_output_files(&got, &reference);
    assert!(compared >= 3, "only {compared} files compared {logs}");
    let verify = fleetmerge_env(
        dir,
        &["verify", &format!("s3://{BUCKET}/{OUT}")],
        &s3_env(&endpoint),
    );
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success()
            && report.starts_with("ok:")
            && report.contains("match the journal"),
        "verify: {report}{} {logs}",
        stderr(&verify)
    );

    // Nothing else in the bucket: the files of the local run, journal
    // included, and no upload left unfinished.
    let want = files_under(&reference);
    let have = files_under(&got);
    let orphans: Vec<&String> = have.difference(&want).collect();
    let missing: Vec<&String> = want.difference(&have).collect();
    assert!(
        orphans.is_empty() && missing.is_empty(),
        "objects no finished merge leaves: {orphans:?}; missing: {missing:?} {logs}"
    );
    // The only unfinished uploads: those whose creation the server did but
    // whose answer the proxy lost, and at most one per coordinator killed
    // while it prepared them (created, not yet journaled): nobody learnt
    // their ids (README: a bucket lifecycle rule removes them).
    let uploads = String::from_utf8(curl(&[&format!("{endpoint}/{BUCKET}?uploads")])).unwrap();
    let lost = faults
        .lost_creates
        .load(std::sync::atomic::Ordering::SeqCst);
    let allowed = lost + cluster.killed_starting;
    assert!(
        uploads.matches("<Upload>").count() <= allowed,
        "incomplete multipart uploads left in the bucket ({lost} creations lost their answer, \
         {} coordinators killed while starting): {uploads} {logs}",
        cluster.killed_starting
    );

    // One hash per unit, ever: the journal as watched, every coordinator's
    // completions and every worker's reports, and the shard itself.
    let plan: serde_json::Value =
        serde_json::from_slice(&std::fs::read(got.join(".fleetmerge/plan.json")).unwrap()).unwrap();
    let mut shard_of = BTreeMap::new();
    for unit in plan["units"].as_array().unwrap() {
        let id = unit["id"].as_u64().unwrap();
        let file = unit["file_name"].as_str().unwrap();
        let bytes = std::fs::read(got.join(file)).unwrap();
        // A unit that wrote a part of its shard: the part's bytes.
        let range = match unit.get("part") {
            Some(p) => {
                let (at, len) = (p["offset"].as_u64().unwrap(), p["len"].as_u64().unwrap());
                at as usize..(at + len) as usize
            }
            None => 0..bytes.len(),
        };
        shard_of.insert(id, sha256_hex(&bytes[range]));
    }
    let watched = watched.lock().unwrap();
    let mut seen: BTreeMap<u64, BTreeSet<(String, String)>> = BTreeMap::new();
    for (unit, hashes) in &watched.hashes {
        for h in hashes {
            seen.entry(*unit)
                .or_default()
                .insert((h.clone(), "the journal".into()));
        }
    }
    let mut completions = 0;
    for (who, line) in cluster.all_lines() {
        // A coordinator's accepted completion; a worker's completion, accepted
        // or found done already.
        let reported = (line.contains("unit completed") && line.contains("accepted=true"))
            || (line.contains("unit done") && who.starts_with('w'));
        let (Some(unit), Some(sha)) = (field(&line, "unit"), field(&line, "sha256")) else {
            assert!(
                !reported,
                "{who}: a completion without unit and sha256: {line}"
            );
            continue;
        };
        if reported {
            completions += 1;
            seen.entry(unit.parse().unwrap())
                .or_default()
                .insert((sha.to_string(), who));
        }
    }
    assert!(
        completions >= shard_of.len(),
        "{completions} completions logged for {} units {logs}",
        shard_of.len()
    );
    for (unit, shard) in &shard_of {
        let hashes = seen.get(unit).cloned().unwrap_or_default();
        let distinct: BTreeSet<&String> = hashes.iter().map(|(h, _)| h).collect();
        assert!(
            distinct.len() == 1 && distinct.contains(shard),
            "unit {unit} (shard sha256 {shard}) was recorded or reported as {hashes:?} {logs}"
        );
        assert!(
            hashes.iter().any(|(_, who)| who == "the journal"),
            "unit {unit}: no journal record was seen while the merge ran {logs}"
        );
    }
    assert_eq!(
        seen.len(),
        shard_of.len(),
        "units outside the plan: {seen:?}"
    );
    let _ = std::fs::remove_file(&log_file);
    eprintln!(
        "chaos: passed in {:.1} s ({} journal records read, {completions} completions logged)",
        t0.elapsed().as_secs_f64(),
        watched.reads
    );
}
