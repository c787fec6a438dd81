//! `fleetmerge status TARGET`: how far a merge is, from its output folder's
//! journal (finished, running or interrupted), or live from a coordinator.

use super::options::{self, ClientArgs};
use anyhow::Result;
use clap::Args;
use fleetmerge_engine::exec::human_bytes as bytes;

#[derive(Args)]
pub struct StatusArgs {
    /// The merge's output folder (or object-store URL), or a running
    /// coordinator's address (http://HOST:PORT or https://...).
    target: String,
    #[command(flatten)]
    client: ClientArgs,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub fn status(args: StatusArgs) -> Result<()> {
    options::init_logging(true);
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
        bytes(done_bytes as f64),
        bytes(total_bytes as f64)
    );
    if let Some(b) = rate {
        println!(
            "throughput: {}/s (between the first and the last finished unit)",
            bytes(b)
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
    let token = args.client.token()?;
    let ca = args.client.tls_ca()?;
    let s = options::runtime()?.block_on(async {
        // (The client needs the runtime to exist when it is made.)
        let mut client = fleetmerge_worker::remote::connect(
            &args.target,
            token.as_deref(),
            ca.as_deref(),
            args.client.insecure,
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
        bytes(s.input_bytes_done as f64),
        bytes(s.input_bytes_total as f64),
        bytes(s.bytes_written as f64)
    );
    if let (Some(r), Some(e)) = (rate, eta) {
        println!(
            "throughput: {}/s since the coordinator started; eta: {:.0} s",
            bytes(r),
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
            bytes(w.bytes_read as f64)
        );
    }
    if s.workers_left_out > 0 {
        println!("... and {} more workers", s.workers_left_out);
    }
    Ok(())
}
