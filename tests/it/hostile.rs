//! The cluster protocol against peers that do not play by its rules: a tonic
//! client in this process talks gRPC to a real `fleetmerge coordinator`
//! process on loopback (and real workers finish the merge afterwards), or a
//! real `fleetmerge worker` meets a coordinator that sends too much.

use crate::common::grpc::{self, lease, register, runtime, Client};
use crate::common::procs::*;
use crate::common::*;
use fleetmerge_engine::unit::WorkUnit;
use fleetmerge_proto::*;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tonic::Code;

const MINUTE: Duration = Duration::from_secs(60);
const TOKEN: &str = "hostile-test-token";

fn start_coordinator(cwd: &Path, config: &Path, out: &Path, extra: &[&str]) -> (Proc, String) {
    let token = out.with_extension("token");
    std::fs::write(&token, TOKEN).unwrap();
    let mut args = vec![
        "coordinator",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        token.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::start("coordinator", cwd, &args, &[]);
    let line = p.wait_for("coordinator listening", MINUTE, |l| {
        l.contains("coordinator listening")
    });
    let addr = field(&line, "listen").unwrap().to_string();
    (p, addr)
}

fn start_worker(name: &str, addr: &str) -> Proc {
    local_worker(name, addr, &[("FLEETMERGE_TOKEN", TOKEN)])
}

fn client(rt: &tokio::runtime::Runtime, addr: &str) -> Client {
    grpc::client(rt, addr, Some(TOKEN))
}

fn status(rt: &tokio::runtime::Runtime, c: &Client) -> StatusResponse {
    let mut c = c.clone();
    rt.block_on(c.status(StatusRequest {
        protocol_version: PROTOCOL_VERSION,
    }))
    .unwrap()
    .into_inner()
}

/// A completion as a worker would send it, for `session`'s lease of `unit`.
fn completion(session: &str, lease: u64, unit: &WorkUnit, shard: &[u8]) -> CompleteRequest {
    CompleteRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: "whoever".into(),
        lease_id: lease,
        file_name: unit.file_name.clone(),
        size: shard.len() as u64,
        sha256: hex::encode(Sha256::digest(shard)),
        tensors: Vec::new(),
        unit: unit.id as u64,
        progress_bytes: 0,
        session: session.to_string(),
        chunks: Vec::new(),
    }
}

fn complete(rt: &tokio::runtime::Runtime, c: &Client, req: CompleteRequest) -> tonic::Status {
    let mut c = c.clone();
    match rt.block_on(c.complete(req)) {
        Ok(r) => panic!("completion accepted: {:?}", r.into_inner()),
        Err(e) => e,
    }
}

fn assert_refused(e: &tonic::Status, code: Code, words: &[&str]) {
    assert_eq!(e.code(), code, "{e:?}");
    for w in words {
        assert!(
            e.message().contains(w),
            "{w:?} missing from {:?}",
            e.message()
        );
    }
}

/// Items 9 and 10 of issue 16: a completion must name a lease of the caller's
/// session and a shard that matches the plan; another session can neither
/// extend, fail nor complete a lease; unknown sessions and old protocol
/// versions are refused. Real workers then finish the merge as `run` does.
#[test]
fn completions_and_leases_are_checked_against_sessions_and_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let (config, cwd) = (fixture("ties").join("config.yaml"), examples());
    let reference = dir.path().join("reference");
    run_case("ties", &reference, "100K");
    let out = dir.path().join("out");
    // Long leases: none expires while the test holds it, however slow.
    let (mut coordinator, addr) = start_coordinator(
        &cwd,
        &config,
        &out,
        &["--out-shard-size", "100K", "--lease-timeout", "600"],
    );
    let rt = runtime();
    let c = client(&rt, &addr);

    // An old worker is refused, saying why.
    let mut old = c.clone();
    let e = rt
        .block_on(old.register(RegisterRequest {
            protocol_version: 1,
            worker_id: "old".into(),
            device: "cpu".into(),
            memory_bytes: 0,
            slots: 1,
        }))
        .unwrap_err();
    assert_refused(&e, Code::FailedPrecondition, &["protocol version 1"]);

    // No session, or a made-up one: refused.
    for s in ["", "00000000000000000000000000000000"] {
        let mut x = c.clone();
        let e = rt
            .block_on(x.lease(LeaseRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id: "w-a".into(),
                session: s.into(),
            }))
            .unwrap_err();
        assert_refused(&e, Code::Unauthenticated, &[UNKNOWN_SESSION]);
    }

    // Two sessions under the same name: a name is not an identity.
    let a = register(&rt, &c, "w-a").unwrap();
    let b = register(&rt, &c, "w-a").unwrap();
    assert!(a.len() == 32 && b.len() == 32 && a != b, "{a} {b}");
    let (lease_a, unit_a, _) = lease(&rt, &c, &a);

    // B cannot keep A's lease alive, fail it, or complete it.
    let mut x = c.clone();
    let hb = rt
        .block_on(x.heartbeat(HeartbeatRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: "w-a".into(),
            lease_ids: vec![lease_a],
            progress_bytes: 0,
            session: b.clone(),
        }))
        .unwrap()
        .into_inner();
    assert_eq!(hb.revoked, vec![lease_a]);
    let e = rt
        .block_on(x.fail(FailRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: "w-a".into(),
            lease_id: lease_a,
            error: "it is broken, give up".into(),
            retryable: false,
            session: b.clone(),
        }))
        .unwrap_err();
    assert_refused(&e, Code::PermissionDenied, &["not held by this worker"]);
    let e = complete(&rt, &c, completion(&b, lease_a, &unit_a, b"x"));
    assert_refused(&e, Code::FailedPrecondition, &["belongs to another worker"]);
    // A lease nobody was given.
    let e = complete(&rt, &c, completion(&a, 0, &unit_a, b"x"));
    assert_refused(&e, Code::FailedPrecondition, &["never given"]);
    let s = status(&rt, &c);
    assert_eq!(
        (s.state.as_str(), s.running, s.failures),
        ("running", 1, 0),
        "{s:?}"
    );

    // A's own completions that do not hold up: each is rejected, and its unit
    // goes back to the queue as a failed attempt.
    // 1. not a sha256
    let mut req = completion(&a, lease_a, &unit_a, b"x");
    req.sha256 = "not-a-hash".into();
    let e = complete(&rt, &c, req);
    assert_refused(
        &e,
        Code::FailedPrecondition,
        &["not 64 lowercase hex digits"],
    );
    // 2. a random file of the right size
    let (lease2, unit2, _) = lease(&rt, &c, &a);
    let l2 = unit2.layout();
    let noise: Vec<u8> = (0..l2.file_size).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(out.join(&unit2.file_name), &noise).unwrap();
    let e = complete(&rt, &c, completion(&a, lease2, &unit2, &noise));
    assert_refused(&e, Code::FailedPrecondition, &["rejected", "header"]);
    // 3. the plan's header over garbage data
    let (lease3, unit3, _) = lease(&rt, &c, &a);
    let l3 = unit3.layout();
    let mut garbage = l3.header.clone();
    garbage.resize(l3.file_size as usize, 0x7b);
    std::fs::write(out.join(&unit3.file_name), &garbage).unwrap();
    let e = complete(&rt, &c, completion(&a, lease3, &unit3, &garbage));
    assert_refused(
        &e,
        Code::FailedPrecondition,
        &["differs from the coordinator's own computation"],
    );
    // 4. a size that is not the plan's
    let (lease4, unit4, _) = lease(&rt, &c, &a);
    let mut short = unit4.layout().header;
    short.extend_from_slice(&[0; 16]);
    std::fs::write(out.join(&unit4.file_name), &short).unwrap();
    let e = complete(&rt, &c, completion(&a, lease4, &unit4, &short));
    assert_refused(&e, Code::FailedPrecondition, &["bytes"]);

    let s = status(&rt, &c);
    assert_eq!(
        (s.state.as_str(), s.done, s.running, s.failures),
        ("running", 0, 0, 4),
        "{s:?}"
    );
    // Logged with the worker's id (stderr is read by another thread: wait
    // for it, up to a minute).
    let rejected = || {
        coordinator
            .lines()
            .iter()
            .filter(|l| l.contains("completion rejected") && field(l, "worker") == Some("w-a"))
            .count()
    };
    let deadline = std::time::Instant::now() + MINUTE;
    while rejected() < 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(rejected(), 4, "{}", coordinator.log());

    // Honest workers finish the merge; the rejected files were replaced.
    let mut workers: Vec<Proc> = ["w1", "w2"]
        .iter()
        .map(|n| start_worker(n, &addr))
        .collect();
    coordinator.succeeds(MINUTE * 2);
    for w in &mut workers {
        w.succeeds(MINUTE);
    }
    let (got, want) = (read_model(&out), read_model(&reference));
    assert_eq!(got.len(), want.len());
    for (name, t) in &want {
        assert!(got.get(name) == Some(t), "{name} differs from run's");
    }
    let o = fleetmerge(Path::new("."), &["verify", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn vm_rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Item 11 of issue 16: huge worker ids, more registrations than the
/// coordinator keeps, oversized lists and texts are refused; its memory stays
/// bounded and `status` keeps working.
#[test]
fn huge_and_many_registrations_are_refused_and_status_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let (config, cwd) = (fixture("ties").join("config.yaml"), examples());
    let out = dir.path().join("out");
    // Long leases: no session is forgotten while the test registers.
    let (coordinator, addr) = start_coordinator(
        &cwd,
        &config,
        &out,
        &["--out-shard-size", "100K", "--lease-timeout", "600"],
    );
    let rt = runtime();
    let c = client(&rt, &addr);
    // A client that sends what it is given (ours refuses over 64 KiB).
    let raw = c.clone().max_encoding_message_size(usize::MAX);
    let before = vm_rss_kb(coordinator.pid());

    // 30 registrations with 3.5 MB ids: refused by the transport, unread.
    let huge = "x".repeat(3_500_000);
    for _ in 0..30 {
        let e = register(&rt, &raw, &huge).unwrap_err();
        assert!(
            e.message().contains("too large") || e.code() == Code::OutOfRange,
            "{e:?}"
        );
    }
    // Ids that fit in a request but are longer than an id may be.
    let e = register(&rt, &raw, &"y".repeat(4000)).unwrap_err();
    assert_refused(&e, Code::InvalidArgument, &["worker_id", "at most 256"]);
    let e = register(&rt, &c, "two\nlines").unwrap_err();
    assert_refused(&e, Code::InvalidArgument, &["control characters"]);

    // Registrations up to the bound, then refusals.
    let mut ok = 0;
    let mut refused = None;
    for i in 0..1100 {
        match register(&rt, &c, &format!("{i:0>200}")) {
            Ok(_) => ok += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert_eq!(ok, 1024);
    assert_refused(
        &refused.expect("a refusal"),
        Code::ResourceExhausted,
        &["too many workers"],
    );

    // Lists and texts beyond their bounds.
    let s = status(&rt, &c);
    assert_eq!(s.workers.len(), 100, "status lists at most 100 workers");
    assert_eq!(s.workers_left_out, 924);
    let mut x = raw.clone();
    let e = rt
        .block_on(x.heartbeat(HeartbeatRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: String::new(),
            lease_ids: (0..2000).collect(),
            progress_bytes: 0,
            session: "0".repeat(32),
        }))
        .unwrap_err();
    assert_refused(&e, Code::InvalidArgument, &["lease ids"]);

    // `fleetmerge status` works, ten times over, and says what it left out.
    let token = out.with_extension("token");
    for _ in 0..10 {
        let o = fleetmerge(
            Path::new("."),
            &[
                "status",
                &format!("http://{addr}"),
                "--token-file",
                token.to_str().unwrap(),
            ],
        );
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "{text}{}", stderr(&o));
        assert!(text.contains("... and 924 more workers"), "{text}");
    }
    let after = vm_rss_kb(coordinator.pid());
    println!("coordinator VmRSS: {before} kB before, {after} kB after the attack");
    assert!(
        after < before + 100 * 1024,
        "the coordinator grew from {before} kB to {after} kB"
    );
}

/// Writes a safetensors file of 12,000 two-element BF16 tensors, each `value`.
fn write_many_tensors(dir: &Path, value: [u8; 2]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for i in 0..12_000 {
        header.insert(
            format!("model.layers.0.experts.{i}.w.weight"),
            serde_json::json!({"dtype": "BF16", "shape": [2],
                               "data_offsets": [data.len(), data.len() + 4]}),
        );
        data.extend_from_slice(&value);
        data.extend_from_slice(&value);
    }
    let mut file = safetensors_prefix(&header);
    file.extend_from_slice(&data);
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}"#,
    )
    .unwrap();
}

/// Item 12 of issue 16 (was /work/shared/reliability/repro_unit_json_over_4MiB.sh):
/// one unit of 12,000 tensors is 6.3 MB of JSON, over gRPC's default 4 MiB;
/// the worker used to retry it forever as "coordinator unavailable".
#[test]
fn a_unit_of_12000_tensors_reaches_a_worker() {
    let dir = tempfile::tempdir().unwrap();
    write_many_tensors(&dir.path().join("a"), [0x80, 0x3f]);
    write_many_tensors(&dir.path().join("b"), [0x00, 0x40]);
    let config = dir.path().join("big.yaml");
    std::fs::write(
        &config,
        "models:\n  - model: a\n    parameters: {weight: 0.5}\n  - model: b\n    \
         parameters: {weight: 0.5}\nmerge_method: linear\n",
    )
    .unwrap();
    let reference = dir.path().join("ref");
    let o = fleetmerge(
        dir.path(),
        &["run", "big.yaml", reference.to_str().unwrap(), "--quiet"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let (mut coordinator, addr) = start_coordinator(dir.path(), &config, &out, &[]);
    let mut w = start_worker("w1", &addr);
    coordinator.succeeds(MINUTE * 2);
    w.succeeds(MINUTE);
    assert!(!w.log().contains("unavailable"), "{}", w.log());
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(reference.join("model.safetensors")).unwrap()
    );
}

/// Item 14 of issue 16: the token does not go over plain http:// to another
/// machine unless the operator says --insecure.
#[test]
fn the_token_does_not_travel_over_plain_http_to_another_machine() {
    // 192.0.2.1 is TEST-NET-1: nobody answers there.
    let url = "http://192.0.2.1:7070";
    let mut w = Proc::start(
        "worker",
        Path::new("."),
        &["worker", "--coordinator", url, "--give-up-after", "1"],
        &[("FLEETMERGE_TOKEN", TOKEN)],
    );
    assert!(!w.wait_exit(MINUTE).success());
    let log = w.log();
    for part in [
        "refusing to send the token",
        "https://",
        "--tls-ca",
        "--insecure",
    ] {
        assert!(log.contains(part), "{part:?} missing from:\n{log}");
    }
    // The same for `status`.
    let o = Command::new(env!("CARGO_BIN_EXE_fleetmerge"))
        .args(["status", url])
        .env("FLEETMERGE_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--insecure"), "{}", stderr(&o));

    // With --insecure the worker tries (and, here, finds nobody).
    let mut w = Proc::start(
        "worker",
        Path::new("."),
        &[
            "worker",
            "--coordinator",
            url,
            "--give-up-after",
            "1",
            "--insecure",
        ],
        &[("FLEETMERGE_TOKEN", TOKEN)],
    );
    assert!(!w.wait_exit(MINUTE).success());
    let log = w.log();
    assert!(
        log.contains("lost the coordinator") && !log.contains("refusing to send"),
        "{log}"
    );
}

/// A coordinator that registers anyone and answers every lease with a unit
/// of `unit_bytes` bytes.
struct Oversized {
    unit_bytes: usize,
}

#[tonic::async_trait]
impl coordinator_server::Coordinator for Oversized {
    async fn register(
        &self,
        _: tonic::Request<RegisterRequest>,
    ) -> Result<tonic::Response<RegisterResponse>, tonic::Status> {
        Ok(tonic::Response::new(RegisterResponse {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_seconds: 1,
            session: "0123456789abcdef0123456789abcdef".into(),
        }))
    }
    async fn lease(
        &self,
        _: tonic::Request<LeaseRequest>,
    ) -> Result<tonic::Response<LeaseResponse>, tonic::Status> {
        Ok(tonic::Response::new(LeaseResponse {
            reply: Some(lease_response::Reply::Unit(UnitLease {
                lease_id: 1,
                unit: vec![b' '; self.unit_bytes],
                out_dir: "/nonexistent".into(),
                deadline_unix_ms: u64::MAX,
            })),
        }))
    }
    async fn heartbeat(
        &self,
        _: tonic::Request<HeartbeatRequest>,
    ) -> Result<tonic::Response<HeartbeatResponse>, tonic::Status> {
        Ok(tonic::Response::new(HeartbeatResponse::default()))
    }
    async fn complete(
        &self,
        _: tonic::Request<CompleteRequest>,
    ) -> Result<tonic::Response<CompleteResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("no"))
    }
    async fn fail(
        &self,
        _: tonic::Request<FailRequest>,
    ) -> Result<tonic::Response<FailResponse>, tonic::Status> {
        Ok(tonic::Response::new(FailResponse {}))
    }
    async fn status(
        &self,
        _: tonic::Request<StatusRequest>,
    ) -> Result<tonic::Response<StatusResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("no"))
    }
}

/// Item 12 of issue 16, the other half: a message over the limit ends the
/// worker with an error that says so (it used to retry forever as
/// "coordinator unavailable").
#[test]
fn a_worker_sent_a_message_over_the_limit_fails_saying_so() {
    let rt = runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream_of(listener);
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(coordinator_server::CoordinatorServer::new(Oversized {
                unit_bytes: MAX_UNIT_MESSAGE_BYTES + 1,
            }))
            .serve_with_incoming(incoming),
    );
    let mut w = Proc::start(
        "worker",
        Path::new("."),
        &[
            "worker",
            "--coordinator",
            &format!("http://{addr}"),
            "--give-up-after",
            "600",
        ],
        &[],
    );
    let status = w.wait_exit(MINUTE);
    let log = w.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("larger than the protocol allows") && log.contains("too large"),
        "{log}"
    );
    assert!(!log.contains("coordinator unavailable"), "{log}");
}

/// The accepted connections of `listener`, as tonic's server takes them.
fn tokio_stream_of(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
}
