//! `fleetmerge-bench coordinator-scale`: the coordinator at DeepSeek-V3 scale.
//! Two sparse DeepSeek-V3 checkpoints ([`fleetmerge_bench::deepseek`]: 92k
//! tensors, 163 shards each, header-only files) are merged by the real
//! `fleetmerge coordinator` process, served to simulated workers in this
//! process that speak the real gRPC protocol (the worker crate's client):
//! each registers, leases a unit, heartbeats on the coordinator's schedule
//! while it holds it, writes the unit's shard and completes it, without
//! computing.
//!
//! The shard is honest for these inputs: every input byte is zero (the files
//! are holes), so a linear merge of them is zero, and the shard is the
//! plan's header followed by zeros, written as a sparse file of the plan's
//! size. The coordinator checks it as any worker's (size, header, and one
//! tensor recomputed from the inputs); shards of at most 16 MiB, which it
//! hashes whole, are reported with their sha256, larger ones (which it does
//! not hash; `fleetmerge verify` would) with the sha256 of their header, so
//! the workers need not hash terabytes of zeros.
//!
//! Printed: planning time, lease round-trip latency percentiles (and those of
//! heartbeats and completions), RPCs per second, the coordinator's CPU seconds
//! and peak RSS (its rusage), the journal's size on disk, and the total time.

use anyhow::{bail, Context, Result};
use fleetmerge_engine::unit::WorkUnit;
use fleetmerge_proto::*;
use sha2::{Digest, Sha256};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct ScaleArgs {
    /// Where the sparse checkpoints and the output go.
    #[arg(long, default_value = "/tmp/fleetmerge-bench")]
    pub dir: std::path::PathBuf,
    /// The fleetmerge binary.
    #[arg(long, default_value = "target/release/fleetmerge")]
    pub bin: std::path::PathBuf,
    /// Simulated workers.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// The merge's --out-shard-size (the unit size: ~1.3 TB of bf16 output).
    #[arg(long, default_value = "2G")]
    out_shard_size: String,
    /// Milliseconds a worker holds a unit before completing it (simulated
    /// compute; heartbeats go on meanwhile).
    #[arg(long, default_value_t = 0)]
    work_ms: u64,
}

/// Latencies of one kind of call, in microseconds.
#[derive(Default)]
struct Latencies(Mutex<Vec<u64>>);

impl Latencies {
    fn add(&self, t: Instant) {
        let us = t.elapsed().as_micros() as u64;
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(us);
    }

    /// "p50 ... max" in milliseconds, and the count.
    fn summary(&self) -> (usize, String) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if v.is_empty() {
            return (0, "none".into());
        }
        v.sort_unstable();
        let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        (
            v.len(),
            format!(
                "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                p(0.5),
                p(0.9),
                p(0.99),
                p(1.0)
            ),
        )
    }
}

#[derive(Default)]
struct Stats {
    lease: Latencies,
    heartbeat: Latencies,
    complete: Latencies,
    other_rpcs: AtomicU64,
    units: AtomicU64,
    waits: AtomicU64,
}

/// Writes the shard of `unit` (header, then zeros as a hole) into `out`;
/// returns (size, sha256 as reported).
fn write_shard(out: &Path, unit: &WorkUnit) -> Result<(u64, String)> {
    if let Some(p) = &unit.part {
        // A part: the coordinator made the shard's parts file, sparse (all
        // zeros: the merge of zeros); the first part writes the header.
        let layout = unit.written_layout();
        let path = out.join(format!(".{}.fleetmerge-parts", unit.file_name));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("{}", path.display()))?;
        use std::os::unix::fs::FileExt;
        f.write_all_at(&layout.header, p.offset)?;
        let mut h = Sha256::new();
        h.update(&layout.header);
        if p.len <= 16 << 20 {
            h.update(vec![0u8; (p.len - layout.header.len() as u64) as usize]);
        }
        return Ok((p.len, hex(&h.finalize())));
    }
    let layout = unit.layout();
    let path = out.join(&unit.file_name);
    let mut f = std::fs::File::create(&path).with_context(|| format!("{}", path.display()))?;
    f.write_all(&layout.header)?;
    f.set_len(layout.file_size)?;
    let mut h = Sha256::new();
    h.update(&layout.header);
    if layout.file_size <= 16 << 20 {
        let zeros = vec![0u8; (layout.file_size - layout.header.len() as u64) as usize];
        h.update(&zeros);
    }
    Ok((layout.file_size, hex(&h.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One simulated worker: register, then lease / heartbeat / complete until
/// the coordinator says the merge is done.
async fn worker(
    addr: String,
    n: usize,
    out: PathBuf,
    work_ms: u64,
    stats: Arc<Stats>,
) -> Result<()> {
    let mut client = fleetmerge_worker::remote::connect(&addr, None, None, false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let reg = client
        .register(RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: format!("sim-{n}"),
            device: "none".into(),
            memory_bytes: 1 << 30,
            slots: 1,
        })
        .await?
        .into_inner();
    stats.other_rpcs.fetch_add(1, Ordering::Relaxed);
    let session = reg.session;
    let every = Duration::from_secs(reg.heartbeat_seconds.max(1) as u64);
    // Heartbeats on the coordinator's schedule, for the lease held (if any).
    let held: Arc<Mutex<Vec<u64>>> = Arc::default();
    let beat = {
        let (mut client, held, stats, session) =
            (client.clone(), held.clone(), stats.clone(), session.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let lease_ids = held.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let t = Instant::now();
                let r = client
                    .heartbeat(HeartbeatRequest {
                        protocol_version: PROTOCOL_VERSION,
                        worker_id: format!("sim-{n}"),
                        lease_ids,
                        progress_bytes: 0,
                        session: session.clone(),
                    })
                    .await;
                stats.heartbeat.add(t);
                match r {
                    Ok(r) if r.get_ref().shutdown => break,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        })
    };
    loop {
        let t = Instant::now();
        let reply = client
            .lease(LeaseRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id: format!("sim-{n}"),
                session: session.clone(),
            })
            .await?
            .into_inner();
        stats.lease.add(t);
        match reply.reply {
            Some(lease_response::Reply::Unit(l)) => {
                *held.lock().unwrap_or_else(|p| p.into_inner()) = vec![l.lease_id];
                let unit: WorkUnit = serde_json::from_slice(&l.unit)?;
                let (out, unit2) = (out.clone(), unit.clone());
                let (size, sha256) =
                    tokio::task::spawn_blocking(move || write_shard(&out, &unit2)).await??;
                if work_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(work_ms)).await;
                }
                let t = Instant::now();
                let r = client
                    .complete(CompleteRequest {
                        protocol_version: PROTOCOL_VERSION,
                        worker_id: format!("sim-{n}"),
                        lease_id: l.lease_id,
                        file_name: unit.file_name.clone(),
                        size,
                        sha256,
                        tensors: unit.tensors.iter().map(|t| t.name.clone()).collect(),
                        unit: unit.id as u64,
                        progress_bytes: unit.input_bytes(),
                        session: session.clone(),
                        chunks: Vec::new(),
                    })
                    .await
                    .with_context(|| format!("completing unit {}", unit.id))?;
                stats.complete.add(t);
                held.lock().unwrap_or_else(|p| p.into_inner()).clear();
                if r.into_inner().accepted {
                    stats.units.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some(lease_response::Reply::RetryAfterMs(ms)) => {
                stats.waits.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(ms as u64)).await;
            }
            Some(lease_response::Reply::Done(_)) | None => break,
        }
    }
    beat.abort();
    Ok(())
}

/// Apparent bytes and files under `dir`.
fn tree_size(dir: &Path) -> (u64, usize) {
    let mut total = (0, 0);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                let (b, n) = tree_size(&p);
                total = (total.0 + b, total.1 + n);
            } else if let Ok(m) = e.metadata() {
                total = (total.0 + m.len(), total.1 + 1);
            }
        }
    }
    total
}

pub fn run(bin: &Path, dir: &Path, args: &ScaleArgs) -> Result<()> {
    let root = dir.join("deepseek-v3");
    for m in ["ds-a", "ds-b"] {
        if !root.join(m).join("model.safetensors.index.json").exists() {
            let _ = std::fs::remove_dir_all(root.join(m));
            let (n, bytes) = fleetmerge_bench::deepseek::write_model(&root.join(m))?;
            eprintln!(
                "generated {m}: {n} tensors, {:.0} GB (sparse)",
                bytes as f64 / 1e9
            );
        }
    }
    std::fs::write(
        root.join("m.yaml"),
        "models:\n  - model: ds-a\n    parameters: {weight: 0.5}\n  - model: ds-b\n    \
         parameters: {weight: 0.5}\nmerge_method: linear\ndtype: bfloat16\n",
    )?;
    let out = root.join("out");
    let _ = std::fs::remove_dir_all(&out);

    let started = Instant::now();
    let mut child = std::process::Command::new(bin)
        .current_dir(&root)
        .args([
            "coordinator",
            "--config",
            "m.yaml",
            "--out",
            "out",
            "--listen",
            "127.0.0.1:0",
            "--out-shard-size",
            &args.out_shard_size,
        ])
        .env("RUST_LOG", "warn,fleetmerge_coordinator::service=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    // The coordinator's log: its address, then drained (and kept) so it never blocks.
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("piped"));
    let addr = loop {
        let mut line = String::new();
        if lines.read_line(&mut line)? == 0 {
            bail!("the coordinator exited before listening");
        }
        if line.contains("coordinator listening") {
            let addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("listen="))
                .context("no listen= in the coordinator's log")?;
            let units: String = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("units="))
                .unwrap_or("?")
                .to_string();
            eprintln!(
                "planned {units} units in {:.2} s; serving {} simulated workers",
                started.elapsed().as_secs_f64(),
                args.workers
            );
            break format!("http://{addr}");
        }
    };
    let planned = started.elapsed();
    let log_tail = Arc::new(Mutex::new(std::collections::VecDeque::<String>::new()));
    let drain = {
        let tail = log_tail.clone();
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                t.push_back(line);
                if t.len() > 20 {
                    t.pop_front();
                }
            }
        })
    };

    let stats = Arc::new(Stats::default());
    let served = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let results: Vec<Result<()>> = rt.block_on(async {
        let tasks: Vec<_> = (0..args.workers)
            .map(|n| {
                tokio::spawn(worker(
                    addr.clone(),
                    n,
                    out.clone(),
                    args.work_ms,
                    stats.clone(),
                ))
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.map_err(anyhow::Error::from).and_then(|r| r));
        }
        results
    });
    let serving = served.elapsed();

    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; pointers are to live locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let total = started.elapsed();
    let _ = drain.join();
    let tail: Vec<String> = log_tail
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect();
    for r in &results {
        if let Err(e) = r {
            bail!(
                "a simulated worker failed: {e:#}\ncoordinator log:\n{}",
                tail.join("\n")
            );
        }
    }
    if pid < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!(
            "the coordinator failed (status {status}):\n{}",
            tail.join("\n")
        );
    }
    let cpu = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let (journal_bytes, journal_files) = tree_size(&out.join(".fleetmerge"));
    let (leases, lease) = stats.lease.summary();
    let (beats, beat) = stats.heartbeat.summary();
    let (completes, complete) = stats.complete.summary();
    let rpcs = leases + beats + completes + stats.other_rpcs.load(Ordering::Relaxed) as usize;
    println!(
        "coordinator at DeepSeek-V3 scale ({} simulated workers, units of --out-shard-size {})",
        args.workers, args.out_shard_size
    );
    println!(
        "  units completed     {}",
        stats.units.load(Ordering::Relaxed)
    );
    println!(
        "  planning            {:.2} s (start to listening)",
        planned.as_secs_f64()
    );
    println!("  serving             {:.2} s", serving.as_secs_f64());
    println!("  total               {:.2} s", total.as_secs_f64());
    println!(
        "  lease RTT           {lease} ({leases} calls, {} answered wait)",
        stats.waits.load(Ordering::Relaxed)
    );
    println!("  complete RTT        {complete} ({completes} calls)");
    println!("  heartbeat RTT       {beat} ({beats} calls)");
    println!(
        "  RPCs                {rpcs} ({:.0}/s while serving)",
        rpcs as f64 / serving.as_secs_f64()
    );
    println!(
        "  coordinator CPU     {:.2} s user + {:.2} s system",
        cpu(usage.ru_utime),
        cpu(usage.ru_stime)
    );
    println!(
        "  coordinator RSS     {:.0} MiB peak",
        usage.ru_maxrss as f64 / 1024.0
    );
    println!(
        "  journal             {journal_bytes} bytes in {journal_files} files (out/.fleetmerge)"
    );
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}
