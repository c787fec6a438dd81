//! `fleetmerge-bench cluster`: the cluster benchmark on simulated nodes.
//!
//! On this host: an S3-compatible server (s3.rs) holding the TIES merge's
//! inputs, and `fleetmerge coordinator`, both listening on the bridge address;
//! each `fleetmerge worker` in a network namespace of its own whose link is
//! capped each way (netns.rs). Inputs are read from and shards written to the
//! bucket, so every byte a worker moves crosses its capped link.
//!
//! For each set, link rate and node count it first measures the ceiling: the
//! same input objects fetched as plain parallel ranged GETs from the same
//! namespaces (`fleetmerge-bench get`, all nodes at once, for a bounded
//! time); then it times the merge (`--runs` times, the median reported) and
//! prints wall time, efficiency `T1 / (N * TN)` (with `--slow-node`, one node
//! at a quarter of the rate: `T1 / ((N - 0.75) * TN)`, the ideal for the
//! capacity there is), bytes each node received and sent (its link's
//! counters), and the share of the wall time each node held no lease (from
//! the worker's `working` / `unit done` log lines, timestamped as they
//! arrive). Two columns say what else binds: *at most*, the efficiency the
//! plan's largest unit allows (its node must read it all, then write its
//! output: `total / (N · (read + write))`, from `fleetmerge plan --json`),
//! and *host CPU busy*, the share of all the host's cores busy during the
//! merge, whoever used them (near 100 % on a quiet host: the simulated nodes
//! were short of CPU, not of network; the line per run gives the CPU
//! seconds of the merge's own processes). Logs of every process go under
//! `WORK/logs/`.
//!
//! Needs root; without it, it says so and exits. Everything it creates
//! (namespaces, links, bridge, server folder, outputs) is removed at the end,
//! on an error and on Ctrl-C, and leftovers of a crashed run before it starts.

use crate::netns::{self, Counters, Net, Rate};
use crate::s3::{Server, ServerKind};
use crate::{median, models};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct ClusterArgs {
    /// Where the model sets are (generated there when missing, as by the
    /// local benchmark).
    #[arg(long, default_value = "/tmp/fleetmerge-bench")]
    dir: PathBuf,
    /// Where the S3 server keeps its objects (a copy of the inputs, removed
    /// at the end) and the logs go (default: DIR/cluster).
    #[arg(long)]
    work: Option<PathBuf>,
    /// The fleetmerge binary.
    #[arg(long, default_value = "target/release/fleetmerge")]
    bin: PathBuf,
    /// Node counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    nodes: Vec<usize>,
    /// Link rates each way (e.g. 100mbit,1gbit; `none`: uncapped).
    #[arg(long, value_delimiter = ',', default_value = "100mbit")]
    rate: Vec<String>,
    /// Also run each node count (2 and up) with node 0 at a quarter of the rate.
    #[arg(long)]
    slow_node: bool,
    /// Only the slow-node runs (with --t1 for the efficiency).
    #[arg(long)]
    slow_only: bool,
    /// The model sets whose TIES merge runs (dense, moe).
    #[arg(long, value_delimiter = ',', default_value = "dense")]
    set: Vec<String>,
    /// The coordinator's --out-shard-size (20M: 13 units on the dense set).
    #[arg(long, default_value = "20M")]
    out_shard_size: String,
    /// Runs per configuration (the median is reported).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// The S3 server.
    #[arg(long, value_enum, default_value = "s3s-fs")]
    server: ServerKind,
    /// Its program (default: `s3s-fs` on the PATH or in ~/.cargo/bin;
    /// moto_server in /tmp/fleetmerge-venv, the test servers' venv).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Each worker's --slots.
    #[arg(long, default_value_t = 1)]
    slots: usize,
    /// An extra argument of `fleetmerge worker` (e.g. --worker-arg=--no-read-ahead); repeatable.
    #[arg(long = "worker-arg", value_name = "ARG", allow_hyphen_values = true)]
    worker_arg: Vec<String>,
    /// Extra environment of the workers, KEY=VALUE (e.g.
    /// FLEETMERGE_IO_CONCURRENCY=16); repeatable.
    #[arg(long = "worker-env", value_name = "KEY=VALUE")]
    worker_env: Vec<String>,
    /// Seconds each ceiling measurement fetches for.
    #[arg(long, default_value_t = 15.0)]
    ceiling_seconds: f64,
    /// GETs in flight per node in the ceiling measurement.
    #[arg(long, default_value_t = 8)]
    ceiling_parallel: usize,
    /// Skip the ceiling measurement.
    #[arg(long, conflicts_with = "ceiling_only")]
    no_ceiling: bool,
    /// Only measure the ceiling.
    #[arg(long)]
    ceiling_only: bool,
    /// The 1-node time of each set from an earlier run at this rate, as
    /// SET=SECONDS (e.g. dense=332.4,moe=347.0): efficiency without running
    /// one node again (a 1-node run of this invocation takes precedence).
    #[arg(long, value_delimiter = ',', value_name = "SET=SECONDS")]
    t1: Vec<String>,
    /// Give up on a merge after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
}

/// Set by SIGINT/SIGTERM: the waits below end with an error, and the guards
/// remove what the benchmark made.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Child processes killed on drop (those still running).
#[derive(Default)]
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// One link configuration of a run.
#[derive(Clone, Copy)]
struct Link {
    rate: Option<Rate>,
    /// Node 0 at a quarter of `rate`.
    slow: bool,
}

impl Link {
    fn rates(self, n: usize) -> Vec<Option<Rate>> {
        (0..n)
            .map(|i| match self.rate {
                Some(r) if self.slow && i == 0 => Some(Rate(r.0 / 4)),
                r => r,
            })
            .collect()
    }

    fn label(self) -> String {
        match (self.rate, self.slow) {
            (None, _) => "uncapped".into(),
            (Some(r), false) => r.to_string(),
            (Some(r), true) => format!("{r}, node 0 at {}", Rate(r.0 / 4)),
        }
    }

    /// Node-equivalents of capacity `n` nodes have.
    fn capacity(self, n: usize) -> f64 {
        if self.slow && n > 1 {
            n as f64 - 0.75
        } else {
            n as f64
        }
    }
}

/// What one merge run measured.
struct RunResult {
    wall: f64,
    /// CPU seconds (user, system) of the coordinator and the workers.
    cpu: (f64, f64),
    /// CPU seconds of the S3 server.
    server_cpu: f64,
    per_node: Vec<Counters>,
    idle: Vec<f64>,
    units: Vec<usize>,
    /// Share of the host's CPU time (all cores, kernel work included: the
    /// links' shaping and the server) that was busy during the merge: near 1,
    /// the simulated nodes were short of CPU, not of network.
    host_busy: f64,
}

pub fn main(args: ClusterArgs) -> Result<()> {
    if let Err(why) = netns::check_privileges() {
        eprintln!("fleetmerge-bench cluster: skipped: {why}");
        return Ok(());
    }
    if args.nodes.is_empty() || args.nodes.contains(&0) {
        bail!("--nodes: give node counts of 1 or more, e.g. 1,2,4,8");
    }
    let rates: Vec<Option<Rate>> = args
        .rate
        .iter()
        .map(|r| match r.as_str() {
            "none" | "uncapped" => Ok(None),
            r => Rate::parse(r).map(Some),
        })
        .collect::<Result<_>>()?;
    for s in &args.set {
        if s != "dense" && s != "moe" {
            bail!("--set {s}: the sets are dense and moe");
        }
    }
    let bin = std::fs::canonicalize(&args.bin)
        .with_context(|| format!("{} (run `cargo build --release` first)", args.bin.display()))?;
    let me = std::env::current_exe()?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::fs::canonicalize(&args.dir)?;
    for set in &args.set {
        models::generate(&dir, set)?;
    }
    let work = args.work.clone().unwrap_or_else(|| dir.join("cluster"));
    std::fs::create_dir_all(&work)?;
    let logs = work.join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;

    let most = *args.nodes.iter().max().expect("not empty");
    let net = Net::setup(&vec![None; most])?;
    let server_bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => default_server_bin(args.server)?,
    };
    let server = Server::start(
        args.server,
        &server_bin,
        netns::HOST,
        &work,
        &logs.join("server.log"),
    )?;
    eprintln!(
        "S3 server: {:?} ({}) at {}",
        args.server,
        server_bin.display(),
        server.addr
    );

    let mut rows: Vec<Row> = Vec::new();
    print_header();
    for set in &args.set {
        let inputs = upload_set(&server, &dir, set)?;
        let cfg = work.join(format!("{set}-ties.yaml"));
        std::fs::write(
            &cfg,
            models::merge_yaml("ties", true, |m| server.url(&format!("{set}/{m}"))),
        )?;
        let largest = largest_unit(&bin, &server, &cfg, &args)?;
        eprintln!(
            "{set}: the largest work unit reads and writes {:.0} MB; the merge reads {:.0} MB",
            largest.0 as f64 / 1e6,
            largest.1 as f64 / 1e6
        );
        for &rate in &rates {
            let mut links = vec![Link { rate, slow: false }];
            if (args.slow_node || args.slow_only) && rate.is_some() {
                links.push(Link { rate, slow: true });
            }
            if args.slow_only {
                links.retain(|l| l.slow);
            }
            for link in links {
                let mut t1 = None;
                for &n in &args.nodes {
                    if link.slow && n == 1 {
                        continue;
                    }
                    check_interrupted()?;
                    net.set_rates(&link.rates(n))?;
                    let ceiling = if args.no_ceiling {
                        None
                    } else {
                        Some(measure_ceiling(&args, &me, &net, &server, &inputs, n)?)
                    };
                    if let Some((total, per)) = &ceiling {
                        eprintln!(
                            "{set} {}: {n} nodes: ceiling {:.1} MB/s ({})",
                            link.label(),
                            total / 1e6,
                            per.iter()
                                .map(|b| format!("{:.1}", b / 1e6))
                                .collect::<Vec<_>>()
                                .join(" / ")
                        );
                    }
                    if args.ceiling_only {
                        rows.push(Row {
                            set: set.clone(),
                            link,
                            nodes: n,
                            ceiling: ceiling.map(|c| c.0),
                            runs: Vec::new(),
                            t1: None,
                            largest: Some(largest),
                        });
                        if let Some(r) = rows.last() {
                            print_row(r);
                        }
                        continue;
                    }
                    let mut runs = Vec::new();
                    for k in 0..args.runs {
                        let r =
                            merge_run(&args, &bin, &net, &server, &cfg, &logs, set, link, n, k)?;
                        eprintln!(
                            "{set} {}: {n} nodes, run {}: {:.1} s, {} units, received {} GB, \
                             sent {} GB, idle {}, CPU of coordinator and workers {:.1} s user + {:.1} s system, \
                             of the server {:.1} s",
                            link.label(),
                            k + 1,
                            r.wall,
                            r.units.iter().sum::<usize>(),
                            per_node(&r.per_node, |c| c.received as f64 / 1e9, 2),
                            per_node(&r.per_node, |c| c.sent as f64 / 1e9, 2),
                            r.idle
                                .iter()
                                .map(|i| format!("{:.0}%", i * 100.0))
                                .collect::<Vec<_>>()
                                .join(" / "),
                            r.cpu.0,
                            r.cpu.1,
                            r.server_cpu
                        );
                        runs.push(r);
                    }
                    let wall = median(runs.iter().map(|r| r.wall).collect());
                    if n == 1 && !link.slow {
                        t1 = Some(wall);
                    }
                    rows.push(Row {
                        set: set.clone(),
                        link,
                        nodes: n,
                        ceiling: ceiling.map(|c| c.0),
                        runs,
                        t1: if link.slow {
                            rows.iter()
                                .find(|r: &&Row| {
                                    r.set == *set && r.nodes == 1 && r.link.rate == rate
                                })
                                .and_then(|r| r.wall())
                        } else {
                            t1
                        }
                        .or_else(|| given_t1(&args.t1, set)),
                        largest: Some(largest),
                    });
                    if let Some(r) = rows.last() {
                        print_row(r);
                    }
                }
            }
        }
    }
    println!();
    print_header();
    for r in &rows {
        print_row(r);
    }
    drop(server);
    drop(net);
    Ok(())
}

fn default_server_bin(kind: ServerKind) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match kind {
        ServerKind::S3sFs => {
            let mut v: Vec<PathBuf> = std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join("s3s-fs"))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(home) = std::env::var_os("HOME") {
                v.push(Path::new(&home).join(".cargo/bin/s3s-fs"));
            }
            v
        }
        ServerKind::Moto => vec![PathBuf::from("/tmp/fleetmerge-venv/bin/moto_server")],
    };
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| match kind {
            ServerKind::S3sFs => {
                "s3s-fs not found: `cargo install s3s-fs@0.14.1 --features binary --locked` \
                              (or name it with --server-bin, or use --server moto)"
                    .to_string()
            }
            ServerKind::Moto => {
                "moto_server not found in /tmp/fleetmerge-venv: `bash scripts/test.sh` \
                             makes that venv (or name it with --server-bin)"
                    .to_string()
            }
        })
}

/// Uploads a set's four models (shard, index, config) unless the server has
/// them; returns the keys and sizes of the shards (the merge's input objects).
fn upload_set(server: &Server, dir: &Path, set: &str) -> Result<Vec<(String, u64)>> {
    let t = Instant::now();
    let mut shards = Vec::new();
    let mut total = 0;
    for m in models::MODELS {
        for file in [models::SHARD, "model.safetensors.index.json", "config.json"] {
            check_interrupted()?;
            let path = dir.join(set).join(m).join(file);
            let key = format!("{set}/{m}/{file}");
            let len = path
                .metadata()
                .with_context(|| format!("{}", path.display()))?
                .len();
            if !server.has(&key, len)? {
                server.upload(&path, &key)?;
                total += len;
            }
            if file == models::SHARD {
                shards.push((key, len));
            }
        }
    }
    if total > 0 {
        eprintln!(
            "uploaded the {set} set ({:.2} GB) in {:.1} s",
            total as f64 / 1e9,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(shards)
}

/// Plain parallel ranged GETs of the input objects from `n` nodes at once:
/// 16 MiB ranges dealt out to the nodes in turn, `--ceiling-parallel` in
/// flight per node, for `--ceiling-seconds`. Returns (the sum of the nodes'
/// bytes/s, each node's bytes/s).
fn measure_ceiling(
    args: &ClusterArgs,
    me: &Path,
    net: &Net,
    server: &Server,
    inputs: &[(String, u64)],
    n: usize,
) -> Result<(f64, Vec<f64>)> {
    const PART: u64 = 16 << 20;
    let mut ranges = Vec::new();
    for (key, len) in inputs {
        let mut a = 0;
        while a < *len {
            let b = (a + PART).min(*len);
            ranges.push(format!("/{}/{key}:{a}-{b}", server.bucket));
            a = b;
        }
    }
    let server_before = server.cpu();
    let mut procs = Procs::default();
    for node in &net.nodes[..n] {
        let mine: Vec<&String> = ranges.iter().skip(node.index).step_by(n).collect();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.ns])
            .arg(me)
            .args(["get", "--server", &server.addr])
            .args(["--parallel", &args.ceiling_parallel.to_string()])
            .args(["--seconds", &args.ceiling_seconds.to_string()]);
        if let Some(a) = server.auth() {
            cmd.args(["--authorization", a]);
        }
        for r in mine {
            cmd.args(["--range", r]);
        }
        procs.0.push(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting the ceiling's GETs in a namespace")?,
        );
    }
    let mut per = Vec::new();
    let mut total = 0u64;
    for child in std::mem::take(&mut procs.0) {
        let out = child.wait_with_output()?;
        check_interrupted()?;
        if !out.status.success() {
            bail!(
                "the ceiling's GETs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace();
        let (Some(Ok(bytes)), Some(Ok(secs))) = (
            it.next().map(str::parse::<u64>),
            it.next().map(str::parse::<f64>),
        ) else {
            bail!("the ceiling's GETs printed {text:?}");
        };
        per.push(bytes as f64 / secs);
        total += bytes;
    }
    eprintln!(
        "  (the ceiling's {:.2} GB took the server {:.1} s of CPU)",
        total as f64 / 1e9,
        server.cpu() - server_before
    );
    // Each node's own rate, added up: a node's last GETs may end after the
    // others' (they were in flight at the time limit).
    Ok((per.iter().sum(), per))
}

/// A unit-lease event of a worker's log: (seconds since the run started, unit, taken).
type Event = (f64, usize, bool);

/// The unit a log line of the worker's loop takes (`working`) or ends
/// (`unit done`, `unit failed`, `completion refused`).
fn event(line: &str) -> Option<(usize, bool)> {
    let unit = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("unit="))
        .and_then(|u| u.parse().ok())?;
    if line.contains(" working ") {
        Some((unit, true))
    } else if line.contains(" unit done ")
        || line.contains(" unit failed ")
        || line.contains(" completion refused ")
    {
        Some((unit, false))
    } else {
        None
    }
}

/// Seconds of `0..end` in which at least one unit was held.
fn busy(events: &[Event], end: f64) -> f64 {
    let mut held = BTreeSet::new();
    let (mut busy, mut since) = (0.0, 0.0);
    for &(t, unit, taken) in events {
        // A worker may log its last line after the coordinator ended.
        let t = t.min(end);
        let was = !held.is_empty();
        if taken {
            held.insert(unit);
        } else {
            held.remove(&unit);
        }
        match (was, held.is_empty()) {
            (false, false) => since = t,
            (true, true) => busy += t - since,
            _ => {}
        }
    }
    if !held.is_empty() {
        busy += end - since;
    }
    busy
}

#[allow(clippy::too_many_arguments)]
fn merge_run(
    args: &ClusterArgs,
    bin: &Path,
    net: &Net,
    server: &Server,
    cfg: &Path,
    logs: &Path,
    set: &str,
    link: Link,
    n: usize,
    k: usize,
) -> Result<RunResult> {
    let rate = match link.rate {
        Some(r) => r.to_string(),
        None => "uncapped".into(),
    };
    let name = format!(
        "{set}-{rate}-{n}{}-run{}",
        if link.slow { "-slow" } else { "" },
        k + 1
    );
    let out_key = format!("out/{name}");
    server.delete_prefix(&format!("{out_key}/"))?;
    let port = crate::s3::free_port(netns::HOST)?;
    let env = server.env();
    let before = net.counters();
    let cpu_before = children_cpu();
    let host_before = host_cpu()?;
    let server_before = server.cpu();
    let mut procs = Procs::default();
    let t0 = Instant::now();
    let coordinator_log = std::fs::File::create(logs.join(format!("{name}-coordinator.log")))?;
    procs.0.push(
        Command::new(bin)
            .args(["coordinator", "--config"])
            .arg(cfg)
            .args(["--out", &server.url(&out_key)])
            .args(["--listen", &format!("{}:{port}", netns::HOST)])
            .args(["--out-shard-size", &args.out_shard_size])
            .args(["--no-copy-tokenizer", "--quiet"])
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(coordinator_log.try_clone()?)
            .stderr(coordinator_log)
            .spawn()
            .context("starting the coordinator")?,
    );
    let events: Vec<Arc<Mutex<Vec<Event>>>> = (0..n).map(|_| Default::default()).collect();
    let mut readers = Vec::new();
    for (node, events) in net.nodes[..n].iter().zip(&events) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.ns])
            .arg(bin)
            .args([
                "worker",
                "--coordinator",
                &format!("http://{}:{port}", netns::HOST),
            ])
            .args(["--worker-id", &format!("node-{}", node.index)])
            .args(["--slots", &args.slots.to_string()])
            .args(&args.worker_arg)
            .envs(env.iter().cloned());
        for kv in &args.worker_env {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--worker-env {kv}: expected KEY=VALUE"))?;
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting a worker in its namespace")?;
        let stderr = child.stderr.take().expect("piped");
        let mut log = std::fs::File::create(logs.join(format!("{name}-node{}.log", node.index)))?;
        let events = events.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let t = t0.elapsed().as_secs_f64();
                let _ = writeln!(log, "[{t:9.3}] {line}");
                if let Some((unit, taken)) = event(&line) {
                    events
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((t, unit, taken));
                }
            }
        }));
        procs.0.push(child);
    }
    // The coordinator ends when the merge is done.
    let deadline = Duration::from_secs(args.timeout);
    let status = loop {
        check_interrupted()?;
        if let Some(s) = procs.0[0].try_wait()? {
            break s;
        }
        for (i, w) in procs.0[1..].iter_mut().enumerate() {
            if let Some(s) = w.try_wait()? {
                if !s.success() {
                    bail!(
                        "worker node {i} failed ({s}); see {}",
                        logs.join(format!("{name}-node{i}.log")).display()
                    );
                }
            }
        }
        if t0.elapsed() > deadline {
            bail!(
                "the merge {name} took longer than --timeout {} s",
                args.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = t0.elapsed().as_secs_f64();
    let host_after = host_cpu()?;
    let host_busy =
        (host_after.0 - host_before.0) as f64 / ((host_after.1 - host_before.1) as f64).max(1.0);
    if !status.success() {
        bail!(
            "the coordinator failed ({status}); see {}",
            logs.join(format!("{name}-coordinator.log")).display()
        );
    }
    // The workers hear that the merge is over at their next lease.
    let t = Instant::now();
    for w in &mut procs.0[1..] {
        while w.try_wait()?.is_none() && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(procs);
    for r in readers {
        let _ = r.join();
    }
    let cpu_after = children_cpu();
    let server_cpu = server.cpu() - server_before;
    let after = net.counters();
    if !server
        .list(&format!("{out_key}/"))?
        .iter()
        .any(|k| k.ends_with("model.safetensors.index.json"))
    {
        bail!(
            "the merge {name} ended without its index in {}",
            server.url(&out_key)
        );
    }
    server.delete_prefix(&format!("{out_key}/"))?;
    let per_node = before
        .iter()
        .zip(&after)
        .take(n)
        .map(|(b, a)| Counters {
            received: a.received - b.received,
            sent: a.sent - b.sent,
        })
        .collect();
    let mut idle = Vec::new();
    let mut units = Vec::new();
    for e in &events {
        let mut e = e.lock().unwrap_or_else(|p| p.into_inner()).clone();
        e.sort_by(|a, b| a.0.total_cmp(&b.0));
        idle.push(1.0 - busy(&e, wall) / wall);
        units.push(e.iter().filter(|x| !x.2).count());
    }
    Ok(RunResult {
        wall,
        cpu: (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1),
        server_cpu,
        per_node,
        idle,
        units,
        host_busy,
    })
}

/// `--t1`'s time for `set`.
fn given_t1(given: &[String], set: &str) -> Option<f64> {
    given
        .iter()
        .filter_map(|g| g.split_once('='))
        .find(|(s, _)| *s == set)
        .and_then(|(_, t)| t.parse().ok())
}

/// The host's CPU time so far, in ticks of all cores: (busy, total), from the
/// first line of /proc/stat (busy: all but idle and iowait).
fn host_cpu() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| {
            t.parse()
                .context("/proc/stat: a CPU time that is no number")
        })
        .collect::<Result<_>>()?;
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// The plan's largest work unit's input plus output bytes, and all input
/// bytes (`fleetmerge plan --json`). A TIES unit's output goes up only once
/// its inputs are read (the top-k spans the tensor), so no merge of N nodes
/// ends before that unit's node has read it and written it through its link:
/// efficiency is at most `total / (N · (read + write))` (one node reads and
/// writes at once, in both directions of its link).
fn largest_unit(bin: &Path, server: &Server, cfg: &Path, args: &ClusterArgs) -> Result<(u64, u64)> {
    let o = Command::new(bin)
        .arg("plan")
        .arg(cfg)
        .args(["--out-shard-size", &args.out_shard_size, "--json"])
        .envs(server.env().iter().cloned())
        .stdin(Stdio::null())
        .output()
        .context("running fleetmerge plan")?;
    if !o.status.success() {
        bail!(
            "fleetmerge plan {}: {}",
            cfg.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).context("fleetmerge plan --json")?;
    let plan = &v["plan"];
    let read = plan["largest_unit"]["read"].as_u64();
    let write = plan["largest_unit"]["write"].as_u64();
    let total = plan["read_total"].as_u64();
    match (read, write, total) {
        (Some(r), Some(w), Some(t)) if r + w > 0 => Ok((r + w, t)),
        _ => bail!("fleetmerge plan --json has no largest_unit.read/write or read_total"),
    }
}

/// CPU seconds (user, system) of this process's waited-for children so far.
fn children_cpu() -> (f64, f64) {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: fills a live local.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(u.ru_utime), secs(u.ru_stime))
}

/// One line of the table.
struct Row {
    set: String,
    link: Link,
    nodes: usize,
    /// Bytes/s of the plain GETs, all nodes.
    ceiling: Option<f64>,
    runs: Vec<RunResult>,
    /// The 1-node time at this rate, uncapped node.
    t1: Option<f64>,
    /// Input plus output bytes of the plan's largest unit, and input bytes
    /// of all units.
    largest: Option<(u64, u64)>,
}

impl Row {
    fn wall(&self) -> Option<f64> {
        (!self.runs.is_empty()).then(|| median(self.runs.iter().map(|r| r.wall).collect()))
    }
}

/// `min-max` (or the one value) of a per-node figure.
fn per_node(c: &[Counters], f: impl Fn(&Counters) -> f64, digits: usize) -> String {
    let v: Vec<f64> = c.iter().map(f).collect();
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    if (hi - lo).abs() < 0.5 * 10f64.powi(-(digits as i32)) {
        format!("{lo:.digits$}")
    } else {
        format!("{lo:.digits$}-{hi:.digits$}")
    }
}

fn print_header() {
    println!(
        "| set | link each way | nodes | ceiling (plain GETs, all nodes) | wall (median) | \
         efficiency | at most (largest unit) | merge reads, all nodes | received per node | sent per node | \
         idle per node (mean, max) | host CPU busy |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
}

fn print_row(r: &Row) {
    let ceiling = r
        .ceiling
        .map(|c| format!("{:.1} MB/s", c / 1e6))
        .unwrap_or_else(|| "-".into());
    let Some(wall) = r.wall() else {
        println!(
            "| {} TIES | {} | {} | {ceiling} | - | - | - | - | - | - | - | - |",
            r.set,
            r.link.label(),
            r.nodes
        );
        return;
    };
    let eff =
        r.t1.map(|t1| format!("{:.2}", t1 / (r.link.capacity(r.nodes) * wall)))
            .unwrap_or_else(|| "-".into());
    // The largest unit's node reads it at a full link's rate at best.
    let at_most = r
        .largest
        .map(|(l, t)| format!("{:.2}", (t as f64 / (r.nodes as f64 * l as f64)).min(1.0)))
        .unwrap_or_else(|| "-".into());
    let mid = &r.runs[r.runs.len() / 2];
    let received: u64 = mid.per_node.iter().map(|c| c.received).sum();
    let idle_mean = mid.idle.iter().sum::<f64>() / mid.idle.len() as f64;
    let idle_max = mid.idle.iter().cloned().fold(0.0, f64::max);
    println!(
        "| {} TIES | {} | {} | {ceiling} | {wall:.1} s | {eff} | {at_most} | {:.1} MB/s | {} GB | {} GB | \
         {:.0} %, {:.0} % | {:.0} % |",
        r.set,
        r.link.label(),
        r.nodes,
        received as f64 / mid.wall / 1e6,
        per_node(&mid.per_node, |c| c.received as f64 / 1e9, 2),
        per_node(&mid.per_node, |c| c.sent as f64 / 1e9, 2),
        idle_mean * 100.0,
        idle_max * 100.0,
        mid.host_busy * 100.0,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_give_lease_events() {
        let l = "2026-11-30T21:00:00.1Z  INFO working slot=0 unit=12 lease=3 file=x";
        assert_eq!(event(l), Some((12, true)));
        let l = "2026-11-30T21:00:01.1Z  INFO unit done slot=0 unit=12 accepted=true";
        assert_eq!(event(l), Some((12, false)));
        assert_eq!(event("INFO the coordinator has no more work slot=0"), None);
    }

    #[test]
    fn busy_time_is_the_union_of_held_leases() {
        // Units 1 and 2 overlap (1..4 busy), a gap, unit 3 from 6 to the end.
        let e = [
            (1.0, 1, true),
            (2.0, 2, true),
            (3.0, 1, false),
            (4.0, 2, false),
            (6.0, 3, true),
        ];
        assert_eq!(busy(&e, 10.0), 3.0 + 4.0);
        // A unit done after the end (logged after the coordinator exited)
        // counts to the end only.
        let e = [(1.0, 1, true), (12.0, 1, false)];
        assert_eq!(busy(&e, 10.0), 9.0);
    }

    #[test]
    fn rates_parse_and_the_slow_node_gets_a_quarter() {
        let r = Rate::parse("100mbit").unwrap();
        assert_eq!(r.0, 100_000_000);
        assert_eq!(Rate::parse("1gbit").unwrap().0, 1_000_000_000);
        assert!(Rate::parse("fast").is_err());
        let l = Link {
            rate: Some(r),
            slow: true,
        };
        assert_eq!(l.rates(2), vec![Some(Rate(25_000_000)), Some(r)]);
        assert_eq!(l.capacity(4), 3.25);
    }
}
