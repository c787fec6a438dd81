//! `fleetmerge worker`: the gRPC unit source ([`GrpcSource`]) that feeds the
//! worker loop ([`crate::work`]) from a coordinator, and [`run_remote`], which
//! connects, registers, drains on SIGTERM and runs the loop. Every call after
//! Register carries the session id the coordinator issued; when the
//! coordinator no longer knows it (it restarted), the source registers again.
//! A lost coordinator is retried with backoff up to `give_up_after`; the
//! coordinator's "done" ends the worker. A message over the size limits both
//! sides use ends the worker with an error saying so. Heartbeats, draining,
//! slots and their memory shares are the loop's.

use crate::paths::PathPolicy;
use crate::{Completed, Heartbeat, Lease, LoopOptions, Next, UnitFailure, UnitSource};
use fleetmerge_engine::exec::{self, NoProgress};
use fleetmerge_engine::unit::UnitOutput;
use fleetmerge_engine::unit::WorkUnit;
use fleetmerge_proto::coordinator_client::CoordinatorClient;
use fleetmerge_proto::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

pub use crate::WorkerError;

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
    /// Lease the next unit once the current one's inputs are read (see
    /// [`LoopOptions::read_ahead`]).
    pub read_ahead: bool,
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

/// A coordinator as the worker loop's unit source: each call blocks the
/// calling slot (a thread of the loop) on `rt`.
pub struct GrpcSource {
    rt: tokio::runtime::Handle,
    client: Client,
    opts: RemoteOptions,
    /// The session the coordinator issued at registration.
    session: Mutex<String>,
    /// How often the coordinator wants heartbeats.
    heartbeat: Duration,
}

impl GrpcSource {
    /// Connects to the coordinator of `opts` and registers.
    pub fn connect(opts: &RemoteOptions, rt: tokio::runtime::Handle) -> Result<Self, WorkerError> {
        let client = rt.block_on(async {
            // (The client needs the runtime to exist when it is made.)
            connect(
                &opts.coordinator,
                opts.token.as_deref(),
                opts.tls_ca.as_deref(),
                opts.insecure,
            )
        })?;
        let mut source = GrpcSource {
            rt,
            client,
            opts: opts.clone(),
            session: Mutex::new(String::new()),
            heartbeat: Duration::from_secs(1),
        };
        let reg = source.rt.clone().block_on(source.register())?;
        source.heartbeat = Duration::from_secs(reg.heartbeat_seconds.max(1) as u64);
        Ok(source)
    }

    fn session(&self) -> String {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Calls `f` (with the current session) until it succeeds, retrying
    /// unavailable-coordinator errors with exponential backoff up to
    /// `give_up_after`, and registering again when the coordinator has forgotten
    /// the session.
    async fn with_retry<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, WorkerError>
    where
        F: FnMut(Client, String) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut registrations = 0;
        loop {
            let session = self.session();
            match self.call(what, |c| f(c, session.clone())).await {
                Err(WorkerError::SessionUnknown { message, .. }) if registrations < 5 => {
                    registrations += 1;
                    // Another slot may have registered again meanwhile.
                    if self.session() == session {
                        tracing::warn!(what, %message, "registering again");
                        self.register().await?;
                    }
                }
                other => return other,
            }
        }
    }

    /// Registers with the coordinator and keeps the session it issues.
    async fn register(&self) -> Result<RegisterResponse, WorkerError> {
        let opts = &self.opts;
        let reg = self
            .call("register", |mut c| {
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
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = reg.session.clone();
        Ok(reg)
    }

    /// Calls `f` until it succeeds, retrying unavailable-coordinator errors with
    /// exponential backoff up to `give_up_after`.
    async fn call<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, WorkerError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let address = || self.opts.coordinator.clone();
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            match f(self.client.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s)
                    if s.code() == tonic::Code::Unauthenticated
                        && s.message().starts_with(UNKNOWN_SESSION) =>
                {
                    return Err(WorkerError::SessionUnknown {
                        address: address(),
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
                        address: address(),
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
                        address: address(),
                        message: format!("{what}: {}", s.message()),
                    })
                }
                Err(s) => {
                    if started.elapsed() > self.opts.give_up_after {
                        return Err(WorkerError::Unreachable {
                            address: address(),
                            seconds: self.opts.give_up_after.as_secs(),
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
}

impl UnitSource for GrpcSource {
    fn lease(&self, _slot: usize) -> Result<Next, WorkerError> {
        let worker = &self.opts.worker_id;
        let reply = self
            .rt
            .block_on(self.with_retry("lease", |mut c, session| {
                let req = LeaseRequest {
                    protocol_version: PROTOCOL_VERSION,
                    worker_id: worker.clone(),
                    session,
                };
                async move { c.lease(req).await }
            }))?;
        Ok(match reply.reply {
            Some(lease_response::Reply::Unit(u)) => {
                match serde_json::from_slice::<WorkUnit>(&u.unit) {
                    Ok(unit) => Next::Unit(Lease {
                        id: u.lease_id,
                        unit,
                        out_dir: u.out_dir,
                    }),
                    Err(error) => Next::Unreadable {
                        lease: u.lease_id,
                        error,
                    },
                }
            }
            Some(lease_response::Reply::RetryAfterMs(ms)) => {
                Next::Wait(Duration::from_millis(ms.clamp(50, 5000) as u64))
            }
            Some(lease_response::Reply::Done(why)) => Next::Done(why),
            None => Next::Wait(Duration::ZERO),
        })
    }

    fn complete(
        &self,
        _slot: usize,
        lease: &Lease,
        output: UnitOutput,
        progress_bytes: u64,
    ) -> Result<Completed, WorkerError> {
        let req = CompleteRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: self.opts.worker_id.clone(),
            lease_id: lease.id,
            file_name: output.file_name,
            size: output.size,
            sha256: output.sha256,
            // The coordinator knows the unit's tensors (and a long list would
            // not fit in a request).
            tensors: Vec::new(),
            unit: lease.unit.id as u64,
            progress_bytes,
            session: String::new(),
            chunks: output.chunks,
        };
        let r = self
            .rt
            .block_on(self.with_retry("complete", |mut c, session| {
                let req = CompleteRequest {
                    session,
                    ..req.clone()
                };
                async move { c.complete(req).await }
            }));
        match r {
            Ok(r) if r.accepted => Ok(Completed::Accepted),
            Ok(_) => Ok(Completed::AlreadyDone),
            // The coordinator rejected the shard: it re-queues the unit itself.
            Err(WorkerError::Refused { message, .. }) => Ok(Completed::Refused(message)),
            Err(e) => Err(e),
        }
    }

    fn fail(&self, _slot: usize, lease: u64, failure: &UnitFailure) -> Result<(), WorkerError> {
        let error = failure.to_string();
        // Cut to what the coordinator accepts.
        let mut cut = error.len().min(MAX_ERROR_BYTES);
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        let req = FailRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: self.opts.worker_id.clone(),
            lease_id: lease,
            error: error[..cut].to_string(),
            retryable: failure.retryable(),
            session: String::new(),
        };
        self.rt
            .block_on(self.with_retry("fail", |mut c, session| {
                let req = FailRequest {
                    session,
                    ..req.clone()
                };
                async move { c.fail(req).await }
            }))
            .map(|_| ())
    }

    fn heartbeat_every(&self) -> Option<Duration> {
        Some(self.heartbeat)
    }

    fn heartbeat(&self, leases: &[u64], progress_bytes: u64) -> Result<Heartbeat, WorkerError> {
        let req = HeartbeatRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: self.opts.worker_id.clone(),
            lease_ids: leases.to_vec(),
            progress_bytes,
            session: self.session(),
        };
        // One try: the next heartbeat comes soon (and the lease loops retry).
        let mut client = self.client.clone();
        match self.rt.block_on(async move { client.heartbeat(req).await }) {
            Ok(r) => {
                let r = r.into_inner();
                Ok(Heartbeat {
                    shutdown: r.shutdown,
                    revoked: r.revoked,
                })
            }
            Err(e) => Err(WorkerError::Heartbeat {
                message: e.message().to_string(),
            }),
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

/// Runs a worker until the coordinator says the merge is over (or SIGTERM:
/// then the units running finish first), its gRPC calls on `rt`. Returns the
/// number of units this worker completed.
pub fn run_remote(opts: RemoteOptions, rt: &tokio::runtime::Handle) -> Result<usize, WorkerError> {
    let stop = Arc::new(AtomicBool::new(false));
    // Installed first, so a SIGTERM at any later point drains instead of killing.
    let term = rt.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok()
    });
    let paths = PathPolicy::new(&opts.allow_paths)?;
    let source = GrpcSource::connect(&opts, rt.clone())?;
    tracing::info!(coordinator = %opts.coordinator, worker = %opts.worker_id, "registered");
    if let Some(mut term) = term {
        let stop = stop.clone();
        rt.spawn(async move {
            term.recv().await;
            tracing::info!("SIGTERM: finishing the current units, then exiting");
            stop.store(true, Ordering::SeqCst);
        });
    }
    let loop_opts = LoopOptions {
        slots: opts.slots.max(1),
        max_memory: opts.max_memory,
        device: opts.device.clone(),
        paths: Some(paths),
        announce: true,
        read_ahead: opts.read_ahead,
    };
    crate::work(&source, &loop_opts, &stop, &NoProgress)
}
