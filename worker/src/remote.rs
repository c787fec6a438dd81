//! A worker of a cluster merge (`fleetmerge worker`): connects to the
//! coordinator, registers, and runs `slots` lease loops. Each leased unit is
//! executed on the blocking thread pool while a heartbeat keeps its lease alive;
//! the result is reported with the shard's size and sha256. A lost coordinator
//! is retried with backoff; SIGTERM stops new leases and lets running units
//! finish; the coordinator's "done" ends the worker. Every call after Register
//! carries the session id the coordinator issued; when the coordinator no
//! longer knows it (it restarted), the worker registers again. A message over
//! the size limits both sides use ends the worker with an error saying so.

use crate::retryable;
use fleetmerge_engine::exec::{self, Progress};
use fleetmerge_engine::unit::WorkUnit;
use fleetmerge_proto::coordinator_client::CoordinatorClient;
use fleetmerge_proto::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// Options of `fleetmerge worker`.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// `http://HOST:PORT` of the coordinator.
    pub coordinator: String,
    pub token: Option<String>,
    pub worker_id: String,
    /// Where units are computed (its name is reported to the coordinator).
    pub device: exec::Device,
    pub slots: usize,
    /// Memory all slots together may use (each slot gets its share).
    pub max_memory: Option<u64>,
    /// Give up when the coordinator cannot be reached for this long.
    pub give_up_after: Duration,
    /// PEM certificate(s) to trust for an `https://` coordinator, besides the
    /// public web PKI roots (a private CA or a self-signed certificate).
    pub tls_ca: Option<Vec<u8>>,
    /// `--allow-path` prefixes: where units may read inputs and write shards
    /// (none: see [`crate::paths`]).
    pub allow_paths: Vec<String>,
    /// Send the token over plain `http://` to a coordinator that is not on
    /// this machine (see [`connect`]).
    pub insecure: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("coordinator address {address}: {message}")]
    Address { address: String, message: String },
    #[error("the coordinator at {address} refused this worker: {message}")]
    Refused { address: String, message: String },
    #[error("lost the coordinator at {address} for more than {seconds} s: {message}")]
    Unreachable {
        address: String,
        seconds: u64,
        message: String,
    },
    #[error("{0}")]
    Options(String),
    /// A panic in a lease loop: a bug.
    #[error("internal error (a bug): {0}")]
    Internal(String),
    #[error(
        "{what}: a message between this worker and the coordinator at {address} is larger \
         than the protocol allows ({message}); run the same fleetmerge version on both"
    )]
    TooLarge {
        address: String,
        what: String,
        message: String,
    },
    /// The coordinator does not know this worker's session (handled by
    /// registering again).
    #[error("the coordinator at {address} no longer knows this worker: {message}")]
    SessionUnknown { address: String, message: String },
}

pub type Client = CoordinatorClient<InterceptedService<Channel, Auth>>;

/// Adds the shared token to every call.
#[derive(Clone)]
pub struct Auth(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A unit must be one a planner would write (names, dtypes, shapes, byte
/// ranges, indexes, parameters; a plain shard file name): see
/// [`WorkUnit::validate`].
fn check_unit(unit: &WorkUnit) -> Result<(), String> {
    unit.validate().map_err(|e| e.to_string())
}

struct Shared {
    client: Client,
    opts: RemoteOptions,
    /// Where units may read and write.
    paths: crate::paths::PathPolicy,
    /// The session the coordinator issued at registration.
    session: Mutex<String>,
    active: Mutex<BTreeSet<u64>>,
    read: AtomicU64,
    /// Stop asking for work (SIGTERM or the coordinator said so).
    draining: AtomicBool,
    done: AtomicBool,
}

struct ReadCounter<'a>(&'a AtomicU64);
impl Progress for ReadCounter<'_> {
    fn read(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Shared {
    fn session(&self) -> String {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Calls `f` (with the current session) until it succeeds, retrying
/// unavailable-coordinator errors with exponential backoff up to
/// `give_up_after`, and registering again when the coordinator has forgotten
/// the session.
async fn with_retry<T, F, Fut>(shared: &Shared, what: &str, mut f: F) -> Result<T, WorkerError>
where
    F: FnMut(Client, String) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    let mut registrations = 0;
    loop {
        let session = shared.session();
        match call(shared, what, |c| f(c, session.clone())).await {
            Err(WorkerError::SessionUnknown { message, .. }) if registrations < 5 => {
                registrations += 1;
                // Another slot may have registered again meanwhile.
                if shared.session() == session {
                    tracing::warn!(what, %message, "registering again");
                    register(shared).await?;
                }
            }
            other => return other,
        }
    }
}

/// Registers with the coordinator and keeps the session it issues.
async fn register(shared: &Shared) -> Result<RegisterResponse, WorkerError> {
    let opts = &shared.opts;
    let reg = call(shared, "register", |mut c| {
        let req = RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: opts.worker_id.clone(),
            device: opts.device.name(),
            memory_bytes: opts.max_memory.unwrap_or(0),
            slots: opts.slots as u32,
        };
        async move { c.register(req).await }
    })
    .await?;
    if reg.protocol_version != PROTOCOL_VERSION || reg.session.is_empty() {
        return Err(WorkerError::Refused {
            address: opts.coordinator.clone(),
            message: format!(
                "the coordinator speaks protocol version {}, this worker {PROTOCOL_VERSION}: \
                 run the same fleetmerge version on both",
                reg.protocol_version
            ),
        });
    }
    *shared.session.lock().unwrap_or_else(|p| p.into_inner()) = reg.session.clone();
    Ok(reg)
}

/// Calls `f` until it succeeds, retrying unavailable-coordinator errors with
/// exponential backoff up to `give_up_after`.
async fn call<T, F, Fut>(shared: &Shared, what: &str, mut f: F) -> Result<T, WorkerError>
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        match f(shared.client.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s)
                if s.code() == tonic::Code::Unauthenticated
                    && s.message().starts_with(UNKNOWN_SESSION) =>
            {
                return Err(WorkerError::SessionUnknown {
                    address: shared.opts.coordinator.clone(),
                    message: s.message().to_string(),
                })
            }
            // A message over the size limit (decoding here, or encoding on
            // either side): no retry can fix that.
            Err(s)
                if s.code() == tonic::Code::OutOfRange
                    || (s.code() == tonic::Code::ResourceExhausted
                        && s.message().contains("message length too large")) =>
            {
                return Err(WorkerError::TooLarge {
                    address: shared.opts.coordinator.clone(),
                    what: what.to_string(),
                    message: s.message().to_string(),
                })
            }
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unauthenticated
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
                        | tonic::Code::ResourceExhausted
                ) =>
            {
                return Err(WorkerError::Refused {
                    address: shared.opts.coordinator.clone(),
                    message: format!("{what}: {}", s.message()),
                })
            }
            Err(s) => {
                if started.elapsed() > shared.opts.give_up_after {
                    return Err(WorkerError::Unreachable {
                        address: shared.opts.coordinator.clone(),
                        seconds: shared.opts.give_up_after.as_secs(),
                        message: s.message().to_string(),
                    });
                }
                tracing::warn!(what, error = %s.message(), retry_in_ms = backoff.as_millis() as u64, "coordinator unavailable");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Whether `host` (of a URI) names this machine.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A client of the coordinator at `coordinator` (`http://` or `https://`),
/// sending `token` with every call and trusting `tls_ca` besides public CAs.
/// The token goes over plain `http://` only to this machine, unless
/// `insecure`: over the network, whoever answers at that address would get
/// it. Connects lazily: the first call reports an unreachable coordinator.
pub fn connect(
    coordinator: &str,
    token: Option<&str>,
    tls_ca: Option<&[u8]>,
    insecure: bool,
) -> Result<Client, WorkerError> {
    let address = coordinator.to_string();
    let endpoint = Endpoint::from_shared(address.clone())
        .map_err(|e| WorkerError::Address {
            address: address.clone(),
            message: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120));
    let host = endpoint.uri().host().unwrap_or("").to_string();
    if token.is_some() && !address.starts_with("https://") && !insecure && !is_loopback(&host) {
        return Err(WorkerError::Address {
            address,
            message: "refusing to send the token over plain http:// to another machine \
                      (whoever answers at that address would get it): use \
                      https://HOST:PORT (the coordinator's --tls-cert/--tls-key) with \
                      --tls-ca CA.pem for a private CA, or pass --insecure to send it \
                      unencrypted anyway (a network you trust)"
                .into(),
        });
    }
    let endpoint = if address.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_webpki_roots();
        if let Some(ca) = &tls_ca {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        endpoint.tls_config(tls).map_err(|e| WorkerError::Address {
            address: address.clone(),
            message: format!("TLS: {e}"),
        })?
    } else {
        if tls_ca.is_some() {
            return Err(WorkerError::Address {
                address,
                message: "--tls-ca is given but the address is not https://".into(),
            });
        }
        endpoint
    };
    let channel = endpoint.connect_lazy();
    let token = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| WorkerError::Address {
                    address: address.clone(),
                    message: "the token contains characters that cannot travel in a header".into(),
                })?,
        ),
        None => None,
    };
    Ok(CoordinatorClient::with_interceptor(channel, Auth(token))
        .max_decoding_message_size(MAX_UNIT_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES))
}

/// Runs a worker until the coordinator says the merge is over (or SIGTERM).
/// Returns the number of units this worker completed.
pub async fn run_remote(opts: RemoteOptions) -> Result<usize, WorkerError> {
    // Installed first, so a SIGTERM at any later point drains instead of killing.
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let address = opts.coordinator.clone();
    let client = connect(
        &address,
        opts.token.as_deref(),
        opts.tls_ca.as_deref(),
        opts.insecure,
    )?;
    let paths = crate::paths::PathPolicy::new(&opts.allow_paths).map_err(WorkerError::Options)?;
    let shared = Arc::new(Shared {
        client,
        opts: opts.clone(),
        paths,
        session: Mutex::new(String::new()),
        active: Mutex::new(BTreeSet::new()),
        read: AtomicU64::new(0),
        draining: AtomicBool::new(false),
        done: AtomicBool::new(false),
    });
    let reg = register(&shared).await?;
    tracing::info!(coordinator = %address, worker = %opts.worker_id, "registered");

    // SIGTERM: finish what is running, take nothing new.
    let sig = shared.clone();
    tokio::spawn(async move {
        if let Some(mut term) = term {
            term.recv().await;
            tracing::info!("SIGTERM: finishing the current units, then exiting");
            sig.draining.store(true, Ordering::SeqCst);
        }
    });
    let hb = shared.clone();
    let period = Duration::from_secs(reg.heartbeat_seconds.max(1) as u64);
    let heartbeat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            if hb.done.load(Ordering::SeqCst) {
                break;
            }
            let leases: Vec<u64> = hb
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .copied()
                .collect();
            let req = HeartbeatRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id: hb.opts.worker_id.clone(),
                lease_ids: leases,
                progress_bytes: hb.read.swap(0, Ordering::Relaxed),
                session: hb.session(),
            };
            match hb.client.clone().heartbeat(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.shutdown {
                        hb.draining.store(true, Ordering::SeqCst);
                    }
                    for l in r.revoked {
                        tracing::warn!(
                            lease = l,
                            "lease revoked by the coordinator; its result will not count"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e.message(), "heartbeat failed"),
            }
        }
    });
    let mut slots = Vec::new();
    for slot in 0..opts.slots.max(1) {
        slots.push(tokio::spawn(lease_loop(shared.clone(), slot)));
    }
    let mut completed = 0;
    let mut first_error = None;
    for s in slots {
        match s.await {
            Ok(Ok(n)) => completed += n,
            Ok(Err(e)) => {
                shared.draining.store(true, Ordering::SeqCst);
                first_error.get_or_insert(e);
            }
            Err(e) => {
                shared.draining.store(true, Ordering::SeqCst);
                first_error.get_or_insert(slot_died(e));
            }
        }
    }
    shared.done.store(true, Ordering::SeqCst);
    heartbeat.abort();
    match first_error {
        Some(e) => Err(e),
        None => Ok(completed),
    }
}

async fn lease_loop(shared: Arc<Shared>, slot: usize) -> Result<usize, WorkerError> {
    let mut completed = 0;
    let worker = shared.opts.worker_id.clone();
    while !shared.draining.load(Ordering::SeqCst) {
        let reply = with_retry(&shared, "lease", |mut c, session| {
            let req = LeaseRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id: worker.clone(),
                session,
            };
            async move { c.lease(req).await }
        })
        .await?;
        let lease = match reply.reply {
            Some(lease_response::Reply::Unit(u)) => u,
            Some(lease_response::Reply::RetryAfterMs(ms)) => {
                tokio::time::sleep(Duration::from_millis(ms.clamp(50, 5000) as u64)).await;
                continue;
            }
            Some(lease_response::Reply::Done(why)) => {
                tracing::info!(slot, reason = %why, "the coordinator has no more work");
                shared.draining.store(true, Ordering::SeqCst);
                break;
            }
            None => continue,
        };
        let lease_id = lease.lease_id;
        let unit: Result<WorkUnit, String> =
            serde_json::from_slice(&lease.unit).map_err(|e| format!("unreadable work unit: {e}"));
        let unit = unit.and_then(|u| check_unit(&u).map(|()| u));
        let admitted =
            unit.and_then(|mut u| shared.paths.admit(&mut u, &lease.out_dir).map(|d| (u, d)));
        let (unit, out_dir) = match admitted {
            Ok(u) => u,
            Err(e) => {
                report_failure(&shared, lease_id, &e, false).await?;
                continue;
            }
        };
        shared
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(lease_id);
        tracing::info!(slot, unit = unit.id, lease = lease_id, file = %unit.file_name, "working");
        let job = shared.clone();
        let id = unit.id;
        let budget = job
            .opts
            .max_memory
            .map(|m| m / job.opts.slots.max(1) as u64);
        let result = tokio::task::spawn_blocking(move || {
            exec::ExecLimits::for_unit(&unit, &out_dir, budget)
                .and_then(|l| {
                    let read = ReadCounter(&job.read);
                    exec::execute_unit_on(&unit, &out_dir, &read, &l, &job.opts.device)
                })
                .map_err(|e| (retryable(&e), e.to_string()))
        })
        .await
        .unwrap_or_else(|e| Err((false, slot_died(e).to_string())));
        shared
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&lease_id);
        match result {
            Ok(out) => {
                let req = CompleteRequest {
                    protocol_version: PROTOCOL_VERSION,
                    worker_id: worker.clone(),
                    lease_id,
                    file_name: out.file_name,
                    size: out.size,
                    sha256: out.sha256,
                    // The coordinator knows the unit's tensors (and a long
                    // list would not fit in a request).
                    tensors: Vec::new(),
                    unit: id as u64,
                    progress_bytes: shared.read.swap(0, Ordering::Relaxed),
                    session: String::new(),
                };
                let r = with_retry(&shared, "complete", |mut c, session| {
                    let req = CompleteRequest {
                        session,
                        ..req.clone()
                    };
                    async move { c.complete(req).await }
                })
                .await;
                match r {
                    Ok(r) => {
                        tracing::info!(slot, unit = id, accepted = r.accepted, "unit done");
                        completed += 1;
                    }
                    // The coordinator rejected the shard: it re-queues the unit itself.
                    Err(WorkerError::Refused { message, .. }) => {
                        tracing::warn!(unit = id, %message, "completion refused")
                    }
                    Err(e) => return Err(e),
                }
            }
            Err((retry, e)) => report_failure(&shared, lease_id, &e, retry).await?,
        }
    }
    Ok(completed)
}

/// The error for a task that died (a panic that escaped the executor's own
/// guards: a bug, never the coordinator's refusal).
fn slot_died(e: tokio::task::JoinError) -> WorkerError {
    if e.is_panic() {
        let payload = e.into_panic();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        WorkerError::Internal(format!("a worker task panicked: {message}"))
    } else {
        WorkerError::Internal(format!("a worker task stopped: {e}"))
    }
}

async fn report_failure(
    shared: &Shared,
    lease_id: u64,
    error: &str,
    retryable: bool,
) -> Result<(), WorkerError> {
    tracing::warn!(lease = lease_id, retryable, error, "unit failed");
    // Cut to what the coordinator accepts.
    let mut cut = error.len().min(MAX_ERROR_BYTES);
    while !error.is_char_boundary(cut) {
        cut -= 1;
    }
    let req = FailRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: shared.opts.worker_id.clone(),
        lease_id,
        error: error[..cut].to_string(),
        retryable,
        session: String::new(),
    };
    with_retry(shared, "fail", |mut c, session| {
        let req = FailRequest {
            session,
            ..req.clone()
        };
        async move { c.fail(req).await }
    })
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lease loop that panics is a bug of this worker, reported as such, not
    /// as the coordinator refusing it.
    #[test]
    fn a_panicking_slot_is_an_internal_error() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let joined = rt.block_on(async {
            tokio::spawn(async {
                panic!("slot exploded");
            })
            .await
        });
        let e = slot_died(joined.unwrap_err());
        assert!(matches!(e, WorkerError::Internal(_)), "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with("internal error (a bug)") && text.contains("slot exploded"),
            "{text}"
        );
        assert!(!text.contains("refused"), "{text}");
    }
}
