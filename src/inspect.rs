//! The commands that look at a merge rather than run it: `verify`, `status`.

use anyhow::Result;
use clap::Args;
use fleetmerge_coordinator::verify;
use std::path::PathBuf;

#[derive(Args)]
pub struct VerifyArgs {
    /// The merged model's folder (or object-store URL).
    out: PathBuf,
    /// Also read every float tensor and report NaN and infinite values.
    #[arg(long)]
    scan: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn verify(args: VerifyArgs) -> Result<()> {
    crate::init_logging(true);
    let out = args.out.to_string_lossy();
    let out = out.trim_end_matches('/');
    let report = verify::verify(out, args.scan);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.ok() {
        let mut line = format!(
            "ok: {out}: {} shard{}, {} tensors, {}",
            report.shards,
            if report.shards == 1 { "" } else { "s" },
            report.tensors,
            crate::bytes(report.bytes as f64)
        );
        if report.journal {
            line.push_str(&format!(
                "; sizes and sha256 of {} shard{} match the journal",
                report.hashed,
                if report.hashed == 1 { "" } else { "s" }
            ));
        } else {
            line.push_str("; no journal (.fleetmerge/) to compare hashes with");
        }
        if args.scan {
            line.push_str(&format!(
                "; {} float tensors scanned, no NaN or Inf",
                report.scanned
            ));
        }
        println!("{line}");
    } else {
        println!(
            "{out}: {} problem{}",
            report.problems.len(),
            if report.problems.len() == 1 { "" } else { "s" }
        );
        for p in &report.problems {
            println!("  {p}");
        }
    }
    if report.ok() {
        Ok(())
    } else {
        anyhow::bail!(
            "{out} did not verify ({} problem{})",
            report.problems.len(),
            if report.problems.len() == 1 { "" } else { "s" }
        )
    }
}

#[derive(Args)]
pub struct StatusArgs {
    /// The merge's output folder (or object-store URL), or a running
    /// coordinator's address (http://HOST:PORT or https://...).
    target: String,
    /// File holding the coordinator's token (else FLEETMERGE_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// PEM certificate to trust for an https:// coordinator.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Send the token over plain http:// to a coordinator on another machine.
    #[arg(long)]
    insecure: bool,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub fn status(args: StatusArgs) -> Result<()> {
    crate::init_logging(true);
    if args.target.starts_with("http://") || args.target.starts_with("https://") {
        return live_status(&args);
    }
    let out = args.target.trim_end_matches('/');
    let store = fleetmerge_engine::storage::for_location(out);
    let Some(r) = fleetmerge_coordinator::journal::read_records(store.as_ref(), out)? else {
        anyhow::bail!(
            "{out} has no merge journal (.fleetmerge/): not a fleetmerge output, or its \
             merge has not started"
        );
    };
    let total = r.plan.units.len();
    let total_bytes: u64 = r.plan.units.iter().map(|u| u.data_bytes()).sum();
    // Tensor bytes (shard headers left out), so done and total compare.
    let unit_bytes = |id: usize| {
        r.plan
            .units
            .iter()
            .find(|u| u.id == id)
            .map_or(0, |u| u.data_bytes())
    };
    let done_bytes: u64 = r.units.iter().map(|u| unit_bytes(u.unit)).sum();
    let times: Vec<u64> = r.recorded_ms.iter().flatten().copied().collect();
    // Throughput between the first and the last record (the first unit's own
    // time is unknown, so its bytes are left out).
    let rate = match (times.iter().min(), times.iter().max()) {
        (Some(&a), Some(&b)) if b > a && r.units.len() > 1 => {
            let first = r
                .units
                .iter()
                .zip(&r.recorded_ms)
                .filter(|(_, t)| **t == Some(a))
                .map(|(u, _)| unit_bytes(u.unit))
                .next()
                .unwrap_or(0);
            Some((done_bytes - first) as f64 / ((b - a) as f64 / 1e3))
        }
        _ => None,
    };
    let remaining = total_bytes.saturating_sub(done_bytes);
    let state = if r.finished {
        "finished"
    } else if r.units.is_empty() {
        "started, no unit finished yet (running, or interrupted)"
    } else {
        "unfinished (running, or interrupted: run the same command again to resume)"
    };
    let pending: Vec<(usize, &str)> = r
        .missing
        .iter()
        .filter_map(|id| r.plan.units.iter().find(|u| u.id == *id))
        .map(|u| (u.id, u.file_name.as_str()))
        .collect();
    if args.json {
        let v = serde_json::json!({
            "output": out,
            "state": if r.finished { "finished" } else { "unfinished" },
            "units": {"total": total, "done": r.units.len(), "pending": pending.len()},
            "bytes": {"total": total_bytes, "written": done_bytes},
            "bytes_per_second": rate,
            "eta_seconds": rate.filter(|_| !r.finished).map(|b| remaining as f64 / b),
            "pending": pending.iter().map(|(id, f)| serde_json::json!({"unit": id, "file": f})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{out}: {state}");
    println!(
        "units: {} of {total} done ({:.0} %), {} pending",
        r.units.len(),
        100.0 * r.units.len() as f64 / total.max(1) as f64,
        pending.len()
    );
    println!(
        "written: {} of {}",
        crate::bytes(done_bytes as f64),
        crate::bytes(total_bytes as f64)
    );
    if let Some(b) = rate {
        println!(
            "throughput: {}/s (between the first and the last finished unit)",
            crate::bytes(b)
        );
        if !r.finished && remaining > 0 {
            println!(
                "eta: {:.0} s at that rate, if it is running",
                remaining as f64 / b
            );
        }
    }
    if !pending.is_empty() {
        let list: Vec<String> = pending
            .iter()
            .take(8)
            .map(|(id, f)| format!("{id} ({f})"))
            .collect();
        let more = pending.len().saturating_sub(8);
        println!(
            "pending units: {}{}",
            list.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn live_status(args: &StatusArgs) -> Result<()> {
    use fleetmerge_proto::{StatusRequest, PROTOCOL_VERSION};
    let token = crate::read_token(&args.token_file)?;
    let ca = args.tls_ca.as_deref().map(crate::read_file).transpose()?;
    let s = crate::runtime()?.block_on(async {
        // (The client needs the runtime to exist when it is made.)
        let mut client = fleetmerge_worker::remote::connect(
            &args.target,
            token.as_deref(),
            ca.as_deref(),
            args.insecure,
        )?;
        let reply = client
            .status(StatusRequest {
                protocol_version: PROTOCOL_VERSION,
            })
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", args.target, e.message()))?;
        anyhow::Ok(reply.into_inner())
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    // Input bytes of finished units since this coordinator started.
    let secs = now.saturating_sub(s.started_unix_ms) as f64 / 1e3;
    let fresh = s.input_bytes_done.saturating_sub(s.input_bytes_resumed);
    let rate = (secs > 0.0 && fresh > 0).then(|| fresh as f64 / secs);
    let left = s.input_bytes_total.saturating_sub(s.input_bytes_done);
    let eta = rate.map(|r| left as f64 / r);
    if args.json {
        let v = serde_json::json!({
            "coordinator": args.target,
            "state": s.state,
            "units": {"total": s.total_units, "done": s.done, "running": s.running,
                      "pending": s.pending, "failed": s.failed},
            "bytes_written": s.bytes_written,
            "input_bytes": {"done": s.input_bytes_done, "total": s.input_bytes_total},
            "bytes_per_second": rate,
            "eta_seconds": eta,
            "retries": s.retries,
            "lease_expiries": s.lease_expiries,
            "failures": s.failures,
            "workers": s.workers.iter().map(|w| serde_json::json!({
                "worker": w.worker_id, "device": w.device, "units": w.units,
                "last_heartbeat_ms_ago": now.saturating_sub(w.last_heartbeat_unix_ms),
                "bytes_read": w.bytes_read,
            })).collect::<Vec<_>>(),
            "workers_left_out": s.workers_left_out,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{}: {}", args.target, s.state);
    println!(
        "units: {} done, {} running, {} pending, {} failed, of {}",
        s.done, s.running, s.pending, s.failed, s.total_units
    );
    println!(
        "input: {} of {} in finished units; written: {}",
        crate::bytes(s.input_bytes_done as f64),
        crate::bytes(s.input_bytes_total as f64),
        crate::bytes(s.bytes_written as f64)
    );
    if let (Some(r), Some(e)) = (rate, eta) {
        println!(
            "throughput: {}/s since the coordinator started; eta: {:.0} s",
            crate::bytes(r),
            e
        );
    }
    println!(
        "attempts: {} retries, {} lease expiries, {} failures reported",
        s.retries, s.lease_expiries, s.failures
    );
    if s.workers.is_empty() {
        println!("workers: none connected");
    }
    for w in &s.workers {
        println!(
            "worker {} ({}): units {:?}, last heartbeat {:.1} s ago, read {}",
            w.worker_id,
            w.device,
            w.units,
            now.saturating_sub(w.last_heartbeat_unix_ms) as f64 / 1e3,
            crate::bytes(w.bytes_read as f64)
        );
    }
    if s.workers_left_out > 0 {
        println!("... and {} more workers", s.workers_left_out);
    }
    Ok(())
}

#[derive(Args)]
pub struct PlanCmdArgs {
    /// The mergekit YAML config.
    config: PathBuf,
    /// Where the output would go (changes only the writer's buffers in the
    /// memory estimate: object stores buffer upload parts).
    /// Also checks that it is no input's folder, as `run` does.
    #[arg(long)]
    out: Option<String>,
    #[command(flatten)]
    plan: crate::PlanArgs,
    /// Compute threads the memory estimate assumes (default: every core here).
    #[arg(long)]
    threads: Option<usize>,
    /// Memory per worker slot, as `run --max-memory` / `worker --max-memory`.
    #[arg(long, value_parser = fleetmerge_engine::exec::memory::parse_memory)]
    max_memory: Option<u64>,
    /// Print the plan as JSON (see the README for its fields).
    #[arg(long)]
    json: bool,
}

pub fn plan(args: PlanCmdArgs) -> Result<()> {
    use fleetmerge_engine::config::MergeConfig;
    use fleetmerge_engine::plan::{self, summary, PlanOptions};
    crate::init_logging(true);
    let config = MergeConfig::load(&args.config)?;
    let opts = PlanOptions {
        out_shard_size: args.plan.out_shard_size,
        seed: args.plan.random_seed,
        allow_crimes: args.plan.allow_crimes,
        keep_fp8: args.plan.keep_fp8,
        base_dir: std::env::current_dir()?,
    };
    let models = plan::inspect_models(&config, &opts)?;
    let mismatches = summary::compare(&models);
    let planned = plan::plan(&config, &opts);
    let threads = args
        .threads
        .unwrap_or_else(rayon::current_num_threads)
        .max(1);
    let peak = planned.as_ref().ok().map(|p| {
        let out = args.out.as_deref().unwrap_or(".");
        fleetmerge_engine::exec::memory::peak(&p.units, out, args.max_memory, threads)
    });
    let overlap = match (&planned, &args.out) {
        (Ok(p), Some(out)) => {
            let out = if fleetmerge_engine::storage::is_url(out) {
                out.trim_end_matches('/').to_string()
            } else {
                fleetmerge_coordinator::outdir::resolve_local(std::path::Path::new(out))
                    .to_string_lossy()
                    .into_owned()
            };
            fleetmerge_coordinator::outdir::check_disjoint(p, &out).err()
        }
        _ => None,
    };
    let summary = planned
        .as_ref()
        .ok()
        .zip(peak.as_ref())
        .map(|(p, peak)| summary::summarize(p, &models, peak, threads));
    let error = match (&planned, peak.as_ref().and_then(|p| p.over_budget.as_ref())) {
        (Err(e), _) => Some(e.to_string()),
        (_, Some(e)) => Some(e.to_string()),
        _ => overlap.map(|e| e.to_string()),
    };
    if args.json {
        let v = serde_json::json!({
            "format": 1,
            "config": args.config,
            "models": models,
            "mismatches": mismatches,
            "plan": summary,
            "hub": crate::hub::inputs_json(planned.as_ref().ok()),
            "error": error,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_plan(&models, &mismatches, summary.as_ref(), args.max_memory);
        crate::hub::print_inputs(planned.as_ref().ok());
    }
    match error {
        Some(e) => anyhow::bail!(e),
        None => Ok(()),
    }
}

fn print_plan(
    models: &[fleetmerge_engine::plan::ModelFacts],
    mismatches: &[fleetmerge_engine::plan::summary::Mismatch],
    summary: Option<&fleetmerge_engine::plan::summary::Summary>,
    budget: Option<u64>,
) {
    use crate::bytes;
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    println!("inputs ({} models):", models.len());
    let width = models
        .iter()
        .map(|m| m.reference.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "  {:width$}  {:24}  {:>6}  {:>7}  {:>6}  {:>7}  {:>9}  {:>10}",
        "model", "architecture", "layers", "vocab", "hidden", "tensors", "params", "bytes"
    );
    for m in models {
        println!(
            "  {:width$}  {:24}  {:>6}  {:>7}  {:>6}  {:>7}  {:>9}  {:>10}",
            m.reference,
            m.architectures.join(","),
            m.layers,
            opt(m.vocab_size),
            opt(m.hidden_size),
            m.tensors,
            count(m.parameters),
            bytes(m.bytes as f64)
        );
    }
    if mismatches.is_empty() {
        println!("compatibility: same architecture, layers, vocabulary and tensor shapes");
    } else {
        println!("compatibility: {} mismatch(es)", mismatches.len());
        for m in mismatches {
            println!("  - {}\n    fix: {}", m.what, m.fix);
        }
    }
    let Some(s) = summary else { return };
    println!(
        "plan: {}, {} output tensors ({} parameters) in {} work unit{}",
        s.merge_method,
        s.output_tensors,
        count(s.parameters),
        s.work_units,
        if s.work_units == 1 { "" } else { "s" }
    );
    let reads: Vec<String> = s
        .read_per_model
        .iter()
        .map(|(m, b)| format!("{m} {}", bytes(*b as f64)))
        .collect();
    println!(
        "read: {} (total {})",
        reads.join(", "),
        bytes(s.read_total as f64)
    );
    println!("write: {}", bytes(s.write_total as f64));
    if let Some(u) = &s.largest_unit {
        println!(
            "largest unit: {} ({} tensors, reads {}, writes {})",
            u.file,
            u.tensors,
            bytes(u.read as f64),
            bytes(u.write as f64)
        );
    }
    println!(
        "peak memory per worker slot: about {} ({} threads{}; an upper bound)",
        bytes(s.peak_memory_per_slot as f64),
        s.threads,
        budget.map_or(String::new(), |b| {
            let fits = if s.peak_memory_per_slot <= b {
                "within"
            } else {
                "MORE than"
            };
            format!(", {fits} --max-memory {}", bytes(b as f64))
        })
    );
    if s.streamed_tensors > 0 {
        println!(
            "streamed: {} tensors larger than the budget allows whole are read a segment at a \
             time (methods with whole-tensor statistics read them once per pass)",
            s.streamed_tensors
        );
    }
    if s.warnings.is_empty() {
        println!("warnings: none");
    } else {
        println!("warnings:");
        for w in &s.warnings {
            println!("  - {w}");
        }
    }
}

/// `1.23 B`, `456.7 M`, `12.3 K` parameters.
fn count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} K", n / 1e3)
    } else {
        format!("{n}")
    }
}
