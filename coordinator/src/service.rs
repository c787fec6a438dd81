//! The coordinator's gRPC service (`fleetmerge coordinator`): the cluster
//! driver of a [`Merge`]. Workers register, lease units, heartbeat, and report
//! completions and failures, each call a short visit to the merge's lease
//! table (a completion's shard check and journal record run outside its lock,
//! see [`crate::merge`]); the standard gRPC health service answers probes.
//! When every unit is done the merge is finished (index, final marker), the
//! workers are told to exit, and the coordinator returns.

use crate::assemble::AssembleOptions;
use crate::lease_table::{FailReply, LeaseReply, LeaseTable, Outcome, Refusal};
use crate::merge::{CompleteError, Merge, MergeOptions, Opened, Report, RunError, RunSummary};
use crate::shardcheck::{truncated, Reported};
use fleetmerge_engine::plan::Plan;
use fleetmerge_proto::coordinator_server::{Coordinator, CoordinatorServer};
use fleetmerge_proto::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};

/// Options of `fleetmerge coordinator`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// Shared secret every call must carry (`authorization: Bearer <token>`).
    pub token: Option<String>,
    /// A unit whose lease is not renewed for this long goes to another worker.
    pub lease_timeout: Duration,
    /// Attempts per unit before the merge gives up.
    pub max_attempts: u32,
    pub assemble: AssembleOptions,
    pub restart: bool,
    /// PEM certificate chain and private key: serve gRPC over TLS.
    pub tls: Option<TlsIdentity>,
    /// Called about five times a second with the state of the merge.
    pub progress: Option<ProgressFn>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address.
    pub metrics: Option<SocketAddr>,
}

/// Why the coordinator could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("encoding work unit {unit}: {source}")]
    Encode {
        unit: usize,
        source: serde_json::Error,
    },
    #[error(
        "work unit {unit} ({file}, {tensors} tensors) is {len} bytes as JSON, more than the \
         {limit} a lease can carry to a worker: use a smaller --out-shard-size"
    )]
    UnitTooLarge {
        unit: usize,
        file: String,
        tensors: usize,
        len: usize,
        limit: usize,
    },
    #[error("metrics on {address}: {source}")]
    Metrics {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("listening on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS certificate or key: {0}")]
    Tls(tonic::transport::Error),
    #[error("serving on {address}: {source}")]
    Serve {
        address: SocketAddr,
        source: tonic::transport::Error,
    },
}

/// A progress callback (see [`ServeOptions::progress`]).
#[derive(Clone)]
pub struct ProgressFn(pub Arc<dyn Fn(&Snapshot) + Send + Sync>);

impl std::fmt::Debug for ProgressFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressFn")
    }
}

/// The state of a merge being served, for progress displays.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub counts: crate::lease_table::Counts,
    /// Input bytes of all units, and of those done.
    pub input_total: u64,
    pub input_done: u64,
    pub workers: Vec<WorkerSnapshot>,
}

#[derive(Debug, Clone)]
pub struct WorkerSnapshot {
    pub id: String,
    pub device: String,
    /// Units it holds leases on.
    pub units: Vec<usize>,
    pub bytes_read: u64,
    pub last_seen_ms_ago: u64,
}

/// The coordinator's TLS certificate chain and key, PEM-encoded.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity { .. }")
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Shared {
    merge: Merge,
    heartbeat_seconds: u32,
    started_ms: u64,
    /// Input bytes per unit id, and of the units resumed from the journal.
    input: std::collections::HashMap<usize, u64>,
    input_resumed: u64,
}

impl Shared {
    fn table(&self) -> std::sync::MutexGuard<'_, LeaseTable> {
        self.merge.table()
    }

    fn input_total(&self) -> u64 {
        self.input.values().sum()
    }

    /// Input bytes of the units `c` has done.
    fn input_done(&self, c: &LeaseTable) -> u64 {
        c.done_units()
            .iter()
            .filter_map(|u| self.input.get(u))
            .sum()
    }

    /// The state of the merge for progress displays.
    fn snapshot(&self) -> Snapshot {
        let c = self.table();
        let now = now_ms();
        Snapshot {
            counts: c.counts(),
            input_total: self.input_total(),
            input_done: self.input_done(&c),
            workers: c
                .workers
                .iter()
                .map(|(session, w)| WorkerSnapshot {
                    id: w.id.clone(),
                    device: w.device.clone(),
                    units: c.leases_of(session),
                    bytes_read: w.bytes_read,
                    last_seen_ms_ago: now.saturating_sub(w.last_seen_ms),
                })
                .collect(),
        }
    }
}

fn check_version(v: u32) -> Result<(), Status> {
    if v == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "this worker speaks protocol version {v}, the coordinator speaks {PROTOCOL_VERSION}: \
             run the same fleetmerge version on both"
        )))
    }
}

struct Service(Arc<Shared>);

/// Most workers listed in a status answer (the rest are counted).
pub const MAX_STATUS_WORKERS: usize = 100;
/// Most sessions a coordinator keeps at once.
pub const MAX_SESSIONS: usize = 1024;
/// Longest session id accepted in a request (ours are 32 hex digits).
const MAX_SESSION_BYTES: usize = 64;

/// A fresh session id: 128 bits from the operating system's RNG, in hex.
fn new_session() -> Result<String, Status> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| Status::internal(format!("the OS random generator failed: {e}")))?;
    Ok(hex::encode(bytes))
}

/// Refuses a string a peer sent that is longer than `max` bytes or holds
/// control characters (it ends up in logs and status).
fn bounded(what: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{what} is {} bytes long; at most {max} are accepted",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{what} contains control characters"
        )));
    }
    Ok(())
}

/// The worker of `session`, marked as heard from; refused when unknown.
fn session<'a>(
    c: &'a mut LeaseTable,
    session: &str,
    now: u64,
) -> Result<&'a mut crate::lease_table::WorkerInfo, Status> {
    if session.is_empty() || session.len() > MAX_SESSION_BYTES {
        return Err(Status::unauthenticated(format!(
            "{UNKNOWN_SESSION}: the call carries no valid session id (register first; \
             a worker of protocol version {PROTOCOL_VERSION} does)"
        )));
    }
    c.session(session, now).ok_or_else(|| {
        Status::unauthenticated(format!(
            "{UNKNOWN_SESSION}: register again (the coordinator restarted, or forgot this \
             worker after a silence)"
        ))
    })
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let r = req.into_inner();
        check_version(r.protocol_version)?;
        bounded("worker_id", &r.worker_id, MAX_WORKER_ID_BYTES)?;
        bounded("device", &r.device, MAX_DEVICE_BYTES)?;
        if r.worker_id.is_empty() {
            return Err(Status::invalid_argument("worker_id is empty"));
        }
        if r.slots > MAX_SLOTS {
            return Err(Status::invalid_argument(format!(
                "{} slots; at most {MAX_SLOTS} are accepted",
                r.slots
            )));
        }
        let id = new_session()?;
        let now = now_ms();
        let info = crate::lease_table::WorkerInfo {
            id: r.worker_id.clone(),
            device: r.device.clone(),
            slots: r.slots,
            last_seen_ms: now,
            ..Default::default()
        };
        if let Err(e) = self.0.table().register(&id, info) {
            tracing::warn!(worker = %r.worker_id, error = %e, "registration refused");
            return Err(Status::resource_exhausted(e.to_string()));
        }
        tracing::info!(worker = %r.worker_id, device = %r.device, slots = r.slots, "worker registered");
        Ok(Response::new(RegisterResponse {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_seconds: self.0.heartbeat_seconds,
            session: id,
        }))
    }

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<LeaseResponse>, Status> {
        let r = req.into_inner();
        check_version(r.protocol_version)?;
        let now = now_ms();
        let mut c = self.0.table();
        let name = session(&mut c, &r.session, now)?.id.clone();
        let reply = match c.lease(&r.session, now) {
            LeaseReply::Unit {
                lease,
                unit,
                deadline_ms,
            } => {
                tracing::info!(worker = %name, unit = unit.id, lease, "unit leased");
                let json =
                    serde_json::to_vec(&*unit).map_err(|e| Status::internal(e.to_string()))?;
                lease_response::Reply::Unit(UnitLease {
                    lease_id: lease,
                    unit: json,
                    out_dir: self.0.merge.out_dir().to_string(),
                    deadline_unix_ms: deadline_ms,
                })
            }
            LeaseReply::Wait => lease_response::Reply::RetryAfterMs(500),
            LeaseReply::Done(why) => {
                if let Some(w) = c.session(&r.session, now) {
                    w.dismissed = true;
                }
                lease_response::Reply::Done(why)
            }
        };
        Ok(Response::new(LeaseResponse { reply: Some(reply) }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let r = req.into_inner();
        check_version(r.protocol_version)?;
        if r.lease_ids.len() > MAX_LEASES_PER_HEARTBEAT {
            return Err(Status::invalid_argument(format!(
                "{} lease ids; at most {MAX_LEASES_PER_HEARTBEAT} are accepted",
                r.lease_ids.len()
            )));
        }
        let now = now_ms();
        let mut c = self.0.table();
        let info = session(&mut c, &r.session, now)?;
        info.bytes_read = info.bytes_read.saturating_add(r.progress_bytes);
        let revoked = c.heartbeat(&r.session, &r.lease_ids, now);
        let shutdown = c.outcome().is_some();
        if shutdown {
            if let Some(w) = c.session(&r.session, now) {
                w.dismissed = true;
            }
        }
        Ok(Response::new(HeartbeatResponse {
            revoked,
            deadline_unix_ms: now + self.0.heartbeat_seconds as u64 * 1000,
            shutdown,
        }))
    }

    /// A completion is checked in three steps, so that no storage I/O happens
    /// under the lease table's lock, which every call needs (see
    /// [`Merge::complete`]): the whole of it runs on the blocking pool.
    async fn complete(
        &self,
        req: Request<CompleteRequest>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let r = req.into_inner();
        check_version(r.protocol_version)?;
        let name = {
            let mut c = self.0.table();
            let info = session(&mut c, &r.session, now_ms())?;
            info.bytes_read = info.bytes_read.saturating_add(r.progress_bytes);
            info.id.clone()
        };
        let shared = self.0.clone();
        let (session, lease, unit) = (r.session.clone(), r.lease_id, r.unit);
        let report = Report::Remote(Reported {
            file_name: r.file_name,
            size: r.size,
            sha256: r.sha256,
            tensors: r.tensors,
            chunks: r.chunks,
        });
        let result = tokio::task::spawn_blocking(move || {
            shared.merge.complete(&session, lease, unit, report)
        })
        .await
        .map_err(|e| Status::internal(format!("the completion's check stopped: {e}")))?;
        match result {
            Ok(output) => {
                tracing::info!(worker = %name, unit, sha256 = %output.sha256, accepted = true, "unit completed");
                Ok(Response::new(CompleteResponse { accepted: true }))
            }
            Err(CompleteError::Refused(Refusal::AlreadyDone { .. })) => {
                tracing::info!(worker = %name, unit, "unit completed again (already done)");
                Ok(Response::new(CompleteResponse { accepted: false }))
            }
            Err(CompleteError::Refused(why)) => {
                tracing::warn!(worker = %name, unit, lease, error = %why, "completion refused");
                Err(Status::failed_precondition(format!(
                    "completion refused: {why}"
                )))
            }
            Err(rejected) => {
                if let CompleteError::Rejected { reason, .. } = &rejected {
                    tracing::warn!(worker = %name, unit, error = %reason, "completion rejected; the unit goes back to the queue");
                }
                Err(Status::failed_precondition(rejected.to_string()))
            }
        }
    }

    async fn fail(&self, req: Request<FailRequest>) -> Result<Response<FailResponse>, Status> {
        let r = req.into_inner();
        check_version(r.protocol_version)?;
        let error = truncated(&r.error, MAX_ERROR_BYTES);
        let mut c = self.0.table();
        let name = session(&mut c, &r.session, now_ms())?.id.clone();
        match c.fail(r.lease_id, &r.session, &error, r.retryable) {
            FailReply::Recorded => {
                tracing::warn!(worker = %name, lease = r.lease_id, retryable = r.retryable, error = %error, "unit failed");
                Ok(Response::new(FailResponse {}))
            }
            FailReply::Stale => {
                tracing::info!(worker = %name, lease = r.lease_id, error = %error, "a failure under a lease that is no longer current (ignored)");
                Ok(Response::new(FailResponse {}))
            }
            FailReply::NotYours => {
                tracing::warn!(worker = %name, lease = r.lease_id, "refused a failure report for a lease this worker does not hold");
                Err(Status::permission_denied(format!(
                    "lease {} is not held by this worker's session",
                    r.lease_id
                )))
            }
        }
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        check_version(req.into_inner().protocol_version)?;
        let c = self.0.table();
        let counts = c.counts();
        // Workers holding units first, then the most recently heard from.
        let mut all: Vec<(&String, &crate::lease_table::WorkerInfo, Vec<usize>)> = c
            .workers
            .iter()
            .map(|(s, w)| (s, w, c.leases_of(s)))
            .collect();
        all.sort_by_key(|(_, w, units)| (units.is_empty(), std::cmp::Reverse(w.last_seen_ms)));
        let left_out = all.len().saturating_sub(MAX_STATUS_WORKERS);
        let workers = all
            .into_iter()
            .take(MAX_STATUS_WORKERS)
            .map(|(_, w, units)| WorkerStatus {
                worker_id: w.id.clone(),
                device: w.device.clone(),
                units: units.into_iter().map(|u| u as u64).collect(),
                last_heartbeat_unix_ms: w.last_seen_ms,
                bytes_read: w.bytes_read,
            })
            .collect();
        Ok(Response::new(StatusResponse {
            total_units: counts.total as u32,
            done: counts.done as u32,
            running: counts.running as u32,
            pending: counts.pending as u32,
            failed: counts.failed as u32,
            bytes_written: counts.bytes_written,
            workers,
            workers_left_out: left_out as u32,
            state: match c.outcome() {
                None => "running".into(),
                Some(Outcome::AllDone) => "complete".into(),
                Some(Outcome::Failed(e)) => format!("failed: {e}"),
            },
            retries: c.retries,
            lease_expiries: c.lease_expiries,
            failures: c.failures,
            started_unix_ms: self.0.started_ms,
            input_bytes_done: self.0.input_done(&c),
            input_bytes_total: self.0.input_total(),
            input_bytes_resumed: self.0.input_resumed,
        }))
    }
}

/// Checks the shared token in constant time; the token itself is never logged.
fn authorize(token: &Option<Arc<str>>, req: &Request<()>) -> Result<(), Status> {
    let Some(token) = token else { return Ok(()) };
    let given = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        tracing::warn!(peer = ?req.remote_addr(), "rejected a call with a missing or wrong token");
        Err(Status::unauthenticated(
            "missing or wrong token (see --token-file / FLEETMERGE_TOKEN)",
        ))
    }
}

/// Refuses a plan with a unit too large for a LeaseResponse (before anything
/// is written or served), naming the unit.
fn check_unit_sizes(plan: &Plan) -> Result<(), ServeError> {
    // Room for the lease's other fields and the protobuf framing.
    let limit = MAX_UNIT_MESSAGE_BYTES - 64 * 1024;
    for u in &plan.units {
        let len = serde_json::to_vec(u)
            .map_err(|source| ServeError::Encode { unit: u.id, source })?
            .len();
        if len > limit {
            return Err(ServeError::UnitTooLarge {
                unit: u.id,
                file: u.file_name.clone(),
                tensors: u.tensors.len(),
                len,
                limit,
            });
        }
    }
    Ok(())
}

/// Runs the merge as a gRPC coordinator until every unit is done (or one failed).
pub async fn serve(
    plan: Plan,
    out_dir: String,
    opts: ServeOptions,
) -> Result<RunSummary, RunError> {
    check_unit_sizes(&plan)?;
    let lease_ms = opts.lease_timeout.as_millis().max(1) as u64;
    let merge_opts = MergeOptions {
        assemble: opts.assemble.clone(),
        restart: opts.restart,
        max_attempts: opts.max_attempts,
        lease_ms,
        // Lease ids of a restarted coordinator never collide with those that
        // workers of the previous one still hold.
        first_lease: now_ms().saturating_mul(1000),
    };
    // The output's lock is held until the merge returns.
    let (merge, _lock) = match Merge::open(&plan, &out_dir, &merge_opts)? {
        Opened::Complete(summary) => return Ok(summary),
        Opened::Started { merge, lock } => (*merge, lock),
    };
    let resumed = merge.resumed().len();
    // A third of the lease, at most 2 s (progress displays want fresh numbers).
    let heartbeat_seconds = (lease_ms / 3000).clamp(1, 2) as u32;
    let input_resumed: u64 = plan
        .units
        .iter()
        .filter(|u| merge.resumed().contains(&u.id))
        .map(|u| u.input_bytes())
        .sum();
    // A live worker calls at least every few seconds (heartbeats, or asking
    // for work); one silent for longer than a lease, and at least 10 s, that
    // holds no lease is forgotten (it registers again if it comes back).
    merge
        .table()
        .limit_sessions(MAX_SESSIONS, lease_ms.max(10_000));
    let shared = Arc::new(Shared {
        merge,
        heartbeat_seconds,
        started_ms: now_ms(),
        input: plan.units.iter().map(|u| (u.id, u.input_bytes())).collect(),
        input_resumed,
    });
    let token: Option<Arc<str>> = opts.token.map(Arc::from);
    let open_to_anyone = token.is_none();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<Service>>().await;
    // Requests are small (see fleetmerge_proto::MAX_REQUEST_BYTES); answers
    // carry whole units.
    let svc = tonic::service::interceptor::InterceptedService::new(
        CoordinatorServer::new(Service(shared.clone()))
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_UNIT_MESSAGE_BYTES),
        move |req: Request<()>| authorize(&token, &req).map(|()| req),
    );
    let metrics = match opts.metrics {
        None => None,
        Some(addr) => {
            let shared = shared.clone();
            let (bound, task) = crate::metrics::serve(addr, move || {
                let c = shared.table();
                crate::metrics::render(&c, shared.input_done(&c), shared.input_total(), now_ms())
            })
            .await
            .map_err(|source| ServeError::Metrics {
                address: addr,
                source,
            })?;
            tracing::info!(metrics = %bound, "metrics listening (GET /metrics)");
            Some(task)
        }
    };
    let reporting = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reporter = opts.progress.clone().map(|report| {
        let shared = shared.clone();
        let reporting = reporting.clone();
        tokio::spawn(async move {
            loop {
                (report.0)(&shared.snapshot());
                if !reporting.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    // Stop once the merge is over and every worker heard so (or after a grace period).
    let watcher = shared.clone();
    let shutdown = async move {
        let mut over_since: Option<std::time::Instant> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut c = watcher.table();
            c.expire(now_ms());
            if c.outcome().is_none() {
                continue;
            }
            let since = *over_since.get_or_insert_with(std::time::Instant::now);
            let all_told = c.workers.values().all(|w| w.dismissed);
            if all_told
                || since.elapsed() > Duration::from_secs(watcher.heartbeat_seconds as u64 * 2 + 1)
            {
                break;
            }
        }
    };
    let incoming = tonic::transport::server::TcpIncoming::bind(opts.listen)
        .map_err(|source| ServeError::Listen {
            address: opts.listen,
            source,
        })?
        .with_nodelay(Some(true));
    let bound = incoming.local_addr().unwrap_or(opts.listen);
    if open_to_anyone {
        tracing::warn!(
            "no token configured: anyone who can reach {} can take part in this merge",
            bound
        );
    }
    tracing::info!(
        listen = %bound,
        tls = opts.tls.is_some(),
        units = plan.units.len(),
        pending = plan.units.len() - resumed,
        "coordinator listening"
    );
    // Metadata (the token) is small; bound what a peer can make us hold.
    let mut server = tonic::transport::Server::builder()
        .http2_max_header_list_size(64 * 1024)
        .max_concurrent_streams(256);
    if let Some(tls) = &opts.tls {
        let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        server = server
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(ServeError::Tls)?;
    }
    server
        .add_service(health_service)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|source| ServeError::Serve {
            address: opts.listen,
            source,
        })?;
    if let Some(m) = metrics {
        m.abort();
    }
    // One last report, of the final state.
    reporting.store(false, std::sync::atomic::Ordering::Relaxed);
    if let Some(r) = reporter {
        let _ = r.await;
    }
    shared
        .merge
        .finish(&plan, "the coordinator stopped before the merge ended")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[test]
    fn only_the_right_token_passes() {
        let token: Option<Arc<str>> = Some(Arc::from("s3cret"));
        assert!(authorize(&token, &request(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("s3cret"),
        ] {
            let e = authorize(&token, &request(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            assert!(!e.message().contains("s3cret"), "{}", e.message());
        }
        // Without a configured token every call passes.
        assert!(authorize(&None, &request(None)).is_ok());
    }

    #[test]
    fn another_protocol_version_is_refused_clearly() {
        assert!(check_version(PROTOCOL_VERSION).is_ok());
        let e = check_version(PROTOCOL_VERSION + 1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("protocol version"), "{}", e.message());
    }
}
