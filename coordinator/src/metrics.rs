//! Prometheus metrics of a running coordinator (`--metrics-listen ADDR`):
//! `GET /metrics` answers in the text exposition format. A minimal HTTP/1.1
//! responder on the coordinator's runtime, since scrapes are small and rare.

use crate::lease_table::LeaseTable;
use std::fmt::Write;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The metrics text for the lease table's current state.
/// `input_done` and `input_total` are the input bytes of the units done and
/// of all units.
pub fn render(c: &LeaseTable, input_done: u64, input_total: u64, now_ms: u64) -> String {
    let counts = c.counts();
    let mut s = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(s, "# HELP {name} {help}");
        let _ = writeln!(s, "# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(s, "{name}{labels} {v}");
        }
    };
    metric(
        "fleetmerge_units",
        "gauge",
        "Work units by state.",
        [
            ("pending", counts.pending),
            ("running", counts.running),
            ("done", counts.done),
            ("failed", counts.failed),
        ]
        .iter()
        .map(|(st, n)| (format!("{{state=\"{st}\"}}"), *n as f64))
        .collect(),
    );
    metric(
        "fleetmerge_units_total",
        "gauge",
        "Work units of the merge.",
        vec![(String::new(), counts.total as f64)],
    );
    metric(
        "fleetmerge_output_bytes_written_total",
        "counter",
        "Bytes of finished output shards.",
        vec![(String::new(), counts.bytes_written as f64)],
    );
    metric(
        "fleetmerge_input_bytes_done",
        "gauge",
        "Input bytes of the units that are done.",
        vec![(String::new(), input_done as f64)],
    );
    metric(
        "fleetmerge_input_bytes",
        "gauge",
        "Input bytes of all units.",
        vec![(String::new(), input_total as f64)],
    );
    metric(
        "fleetmerge_lease_expiries_total",
        "counter",
        "Leases that ran out without a heartbeat.",
        vec![(String::new(), c.lease_expiries as f64)],
    );
    metric(
        "fleetmerge_unit_retries_total",
        "counter",
        "Leases of a unit beyond its first.",
        vec![(String::new(), c.retries as f64)],
    );
    metric(
        "fleetmerge_unit_failures_total",
        "counter",
        "Unit attempts that workers reported as failed.",
        vec![(String::new(), c.failures as f64)],
    );
    metric(
        "fleetmerge_workers",
        "gauge",
        "Workers that have registered.",
        vec![(String::new(), c.workers.len() as f64)],
    );
    let label = |id: &str| {
        format!(
            "{{worker=\"{}\"}}",
            id.replace('\\', "\\\\").replace('"', "\\\"")
        )
    };
    // One series per worker name (several sessions may share one: a worker
    // that registered again).
    let mut by_name: std::collections::BTreeMap<&str, (u64, usize, u64)> =
        std::collections::BTreeMap::new();
    for (session, w) in &c.workers {
        let e = by_name.entry(w.id.as_str()).or_insert((0, 0, 0));
        e.0 += w.bytes_read;
        e.1 += c.leases_of(session).len();
        e.2 = e.2.max(w.last_seen_ms);
    }
    metric(
        "fleetmerge_worker_bytes_read_total",
        "counter",
        "Input bytes a worker has read.",
        by_name
            .iter()
            .map(|(id, (read, _, _))| (label(id), *read as f64))
            .collect(),
    );
    metric(
        "fleetmerge_worker_units_leased",
        "gauge",
        "Units a worker holds leases on.",
        by_name
            .iter()
            .map(|(id, (_, units, _))| (label(id), *units as f64))
            .collect(),
    );
    metric(
        "fleetmerge_worker_heartbeat_age_seconds",
        "gauge",
        "Seconds since a worker was last heard from.",
        by_name
            .iter()
            .map(|(id, (_, _, seen))| (label(id), now_ms.saturating_sub(*seen) as f64 / 1e3))
            .collect(),
    );
    s
}

/// Serves `GET /metrics` on `listen` with what `body` returns, until the task
/// is dropped. Returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    body: impl Fn() -> String + Send + Sync + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    let body = std::sync::Arc::new(body);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                // The request line and headers; bodies are not expected.
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        conn.read(&mut buf),
                    )
                    .await
                    {
                        Ok(Ok(n)) if n > 0 => req.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let line = String::from_utf8_lossy(&req);
                let first = line.lines().next().unwrap_or_default();
                let (status, ctype, text) = if first.starts_with("GET /metrics ") {
                    ("200 OK", "text/plain; version=0.0.4", body())
                } else {
                    (
                        "404 Not Found",
                        "text/plain",
                        "try GET /metrics\n".to_string(),
                    )
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok((bound, task))
}
