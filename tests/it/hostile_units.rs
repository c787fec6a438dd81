//! A hostile coordinator against the real `fleetmerge worker`: a gRPC server in
//! this process serves crafted work units (the fuzzer's reproducers in
//! `fixtures/hostile_units/`, and leases with bad output folders) and records
//! what the worker reports. Every unit must end in a prompt report: a
//! non-retryable failure that names the problem, with nothing written, or (the
//! legitimate unit) a completed shard; the worker must then exit by itself.

use crate::common::procs::Proc;
use fleetmerge_proto::coordinator_server::{Coordinator, CoordinatorServer};
use fleetmerge_proto::*;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::{Request, Response, Status};

/// How long a worker may take over the units it is given, at most.
const BOUND: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Complete { file_name: String, size: u64 },
    Fail { error: String, retryable: bool },
}

/// Serves `leases` (unit JSON, out_dir) one after the other, then "done".
struct Fake {
    leases: Mutex<Vec<(Vec<u8>, String)>>,
    next_id: Mutex<u64>,
    /// (lease id, what the worker reported for it).
    events: Arc<Mutex<Vec<(u64, Event)>>>,
}

fn deadline() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 600_000
}

#[tonic::async_trait]
impl Coordinator for Fake {
    async fn register(
        &self,
        _: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(RegisterResponse {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_seconds: 1,
            session: "0123456789abcdef0123456789abcdef".into(),
        }))
    }

    async fn lease(&self, _: Request<LeaseRequest>) -> Result<Response<LeaseResponse>, Status> {
        let mut leases = self.leases.lock().unwrap();
        let reply = if leases.is_empty() {
            lease_response::Reply::Done("done".into())
        } else {
            let (unit, out_dir) = leases.remove(0);
            let mut id = self.next_id.lock().unwrap();
            *id += 1;
            lease_response::Reply::Unit(UnitLease {
                lease_id: *id,
                unit,
                out_dir,
                deadline_unix_ms: deadline(),
            })
        };
        Ok(Response::new(LeaseResponse { reply: Some(reply) }))
    }

    async fn heartbeat(
        &self,
        _: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        // Keeps every lease alive forever, as a hostile coordinator would.
        Ok(Response::new(HeartbeatResponse {
            revoked: Vec::new(),
            deadline_unix_ms: deadline(),
            shutdown: false,
        }))
    }

    async fn complete(
        &self,
        req: Request<CompleteRequest>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let r = req.into_inner();
        self.events.lock().unwrap().push((
            r.lease_id,
            Event::Complete {
                file_name: r.file_name,
                size: r.size,
            },
        ));
        Ok(Response::new(CompleteResponse { accepted: true }))
    }

    async fn fail(&self, req: Request<FailRequest>) -> Result<Response<FailResponse>, Status> {
        let r = req.into_inner();
        self.events.lock().unwrap().push((
            r.lease_id,
            Event::Fail {
                error: r.error,
                retryable: r.retryable,
            },
        ));
        Ok(Response::new(FailResponse {}))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse::default()))
    }
}

/// Serves `leases` to one real worker (started in `cwd` with `args`), waits
/// (bounded) for it to exit, and returns what it reported and its log.
fn replay(leases: Vec<(Vec<u8>, String)>, cwd: &Path, args: &[&str]) -> (Vec<Event>, String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake {
        leases: Mutex::new(leases),
        next_id: Mutex::new(0),
        events: events.clone(),
    };
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(CoordinatorServer::new(fake))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let coordinator = format!("http://{addr}");
    let mut argv = vec![
        "worker",
        "--coordinator",
        &coordinator,
        "--worker-id",
        "hostile-test",
        "--give-up-after",
        "5",
    ];
    argv.extend_from_slice(args);
    let mut worker = Proc::start("worker", cwd, &argv, &[]);
    // Kills the worker and fails the test when it does not end in time.
    let status = worker.wait_exit(BOUND);
    let log = worker.log();
    assert!(status.success(), "the worker failed ({status}):\n{log}");
    drop(rt);
    // In lease order: a worker that reads ahead leases (and may refuse) the
    // next unit while it still computes the current one.
    let mut events = events.lock().unwrap().clone();
    events.sort_by_key(|e| e.0);
    (events.into_iter().map(|e| e.1).collect(), log)
}

/// A fixture unit with its input paths pointed at `examples/models` and the
/// fuzzer's scratch folder (`/tmp/fuzz/work/c5b/`) at `scratch`.
fn unit(name: &str, scratch: &Path) -> Vec<u8> {
    let path = crate::common::root()
        .join("tests/fixtures/hostile_units")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap();
    let models = crate::common::examples().join("models");
    text.replace("/tmp/fuzz/work/c5/models", models.to_str().unwrap())
        .replace(
            "/tmp/fuzz/work/c5b/",
            &format!("{}/", scratch.to_str().unwrap()),
        )
        .into_bytes()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(d) => d
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

struct Scene {
    _dir: tempfile::TempDir,
    /// The fuzzer's scratch folder: a FIFO and a secret file.
    scratch: PathBuf,
    out: PathBuf,
    cwd: PathBuf,
}

fn scene() -> Scene {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let scratch = root.join("c5b");
    let out = root.join("out");
    let cwd = root.join("cwd");
    for d in [&scratch, &out, &cwd] {
        std::fs::create_dir_all(d).unwrap();
    }
    let fifo = std::ffi::CString::new(scratch.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::fs::write(
        scratch.join("secret.txt"),
        "SECRET-0123456789-abcdefghijklmnopqrstuvwxyz\n",
    )
    .unwrap();
    Scene {
        _dir: dir,
        scratch,
        out,
        cwd,
    }
}

/// Expects exactly one non-retryable failure containing every one of `words`.
fn refused(events: &[Event], log: &str, words: &[&str]) -> String {
    match events {
        [Event::Fail { error, retryable }] => {
            assert!(!retryable, "refusals are final: {error}");
            for w in words {
                assert!(error.contains(w), "{w:?} missing from: {error}\n{log}");
            }
            error.clone()
        }
        other => panic!("expected one failure, got {other:?}\n{log}"),
    }
}

#[test]
fn the_legitimate_unit_completes() {
    let s = scene();
    let out = s.out.to_str().unwrap().to_string();
    let (events, log) = replay(vec![(unit("baseline_ok", &s.scratch), out)], &s.cwd, &[]);
    match &events[..] {
        [Event::Complete { file_name, size }] => {
            assert_eq!(file_name, "model-00001-of-00004.safetensors");
            let written = std::fs::metadata(s.out.join(file_name)).unwrap().len();
            assert_eq!(written, *size, "{log}");
        }
        other => panic!("expected a completion, got {other:?}\n{log}"),
    }
}

/// Every reproducer that used to panic, hang, abort or write an invalid shard:
/// refused by validation (naming the unit, tensor and field), nothing written.
#[test]
fn malformed_units_are_refused_before_anything_is_written() {
    let s = scene();
    let out = s.out.to_str().unwrap().to_string();
    let cases: &[(&str, &[&str])] = &[
        (
            "abort_output_shape_2TiB",
            &["model.embed_tokens.weight", "inputs[0].shape"],
        ),
        (
            "invalid_shard_duplicate_names",
            &["model.embed_tokens.weight", "name", "two output tensors"],
        ),
        ("invalid_shard_metadata_name", &["__metadata__", "name"]),
        (
            "invalid_shard_shape_overflow",
            &["model.embed_tokens.weight", "shape", "overflow"],
        ),
        (
            "panic_base_index_99",
            &["model.embed_tokens.weight", "base", "index 99"],
        ),
        (
            "panic_hang_requant_weight_shape",
            &["model.embed_tokens.weight", "requant"],
        ),
        (
            "panic_input_dtype_f32",
            &["model.embed_tokens.weight", "inputs[0].len"],
        ),
        (
            "panic_input_len_2",
            &["model.embed_tokens.weight", "inputs[0].len"],
        ),
        (
            "panic_inputs_empty",
            &["model.embed_tokens.weight", "inputs", "no inputs"],
        ),
        (
            "panic_output_dtype_i64",
            &["model.embed_tokens.weight", "dtype", "I64"],
        ),
    ];
    let leases = cases
        .iter()
        .map(|(name, _)| (unit(name, &s.scratch), out.clone()))
        .collect();
    let (events, log) = replay(leases, &s.cwd, &[]);
    assert_eq!(events.len(), cases.len(), "{events:?}\n{log}");
    for ((name, words), event) in cases.iter().zip(&events) {
        let error = refused(std::slice::from_ref(event), &log, words);
        assert!(
            error.contains("invalid work unit 0"),
            "{name}: the unit is named: {error}"
        );
    }
    assert_eq!(files_in(&s.out), Vec::<String>::new(), "nothing written");
}

/// An input that is a FIFO (whose heartbeats would keep the lease alive for
/// ever) is refused at once.
#[test]
fn a_fifo_input_is_refused_not_waited_on() {
    let s = scene();
    let out = s.out.to_str().unwrap().to_string();
    let (events, log) = replay(
        vec![(unit("hang_input_fifo", &s.scratch), out)],
        &s.cwd,
        &[],
    );
    refused(&events, &log, &["fifo", "not a regular file"]);
    assert_eq!(files_in(&s.out), Vec::<String>::new());
}

/// A unit that copies an arbitrary local file into its shard is refused: the
/// file is not a safetensors file whose header lists that tensor.
#[test]
fn a_unit_cannot_read_a_file_that_is_not_its_checkpoint() {
    let s = scene();
    let out = s.out.to_str().unwrap().to_string();
    let (events, log) = replay(
        vec![(unit("reads_any_local_file", &s.scratch), out.clone())],
        &s.cwd,
        &[],
    );
    refused(
        &events,
        &log,
        &["secret.txt", "exfil", "not a usable safetensors file"],
    );
    assert_eq!(files_in(&s.out), Vec::<String>::new());

    // A real checkpoint, but bytes its header does not declare as that tensor
    // (here: the header itself).
    let model = crate::common::examples().join("models/llama-ft-a/model.safetensors");
    let text = String::from_utf8(unit("reads_any_local_file", &s.scratch))
        .unwrap()
        .replace(
            &s.scratch.join("secret.txt").to_string_lossy().into_owned(),
            model.to_str().unwrap(),
        );
    let (events, log) = replay(vec![(text.into_bytes(), out)], &s.cwd, &[]);
    refused(
        &events,
        &log,
        &["llama-ft-a/model.safetensors", "exfil", "no such tensor"],
    );
    assert_eq!(files_in(&s.out), Vec::<String>::new());
}

/// An empty or relative output folder is refused (it wrote at the filesystem
/// root, or in the worker's working directory); so is a second output folder.
#[test]
fn output_folders_must_be_absolute_and_stay_the_same() {
    let s = scene();
    let ok = unit("baseline_ok", &s.scratch);
    let out = s.out.to_str().unwrap().to_string();
    let other = s.cwd.parent().unwrap().join("elsewhere");
    let leases = vec![
        (ok.clone(), String::new()),
        (ok.clone(), "relative-out".to_string()),
        (ok.clone(), out.clone()),
        (ok.clone(), other.to_str().unwrap().to_string()),
        // The same folder by another path: still the first one.
        (ok, format!("{out}/../out/")),
    ];
    // An earlier run of the fuzzer may have left one there: it must not change.
    let at_root = Path::new("/model-00001-of-00004.safetensors");
    let modified = || std::fs::metadata(at_root).and_then(|m| m.modified()).ok();
    let before = modified();
    let (events, log) = replay(leases, &s.cwd, &[]);
    assert_eq!(events.len(), 5, "{events:?}\n{log}");
    refused(&events[0..1], &log, &["output folder", "empty"]);
    refused(
        &events[1..2],
        &log,
        &["relative-out", "not an absolute path"],
    );
    assert!(matches!(events[2], Event::Complete { .. }), "{events:?}");
    refused(&events[3..4], &log, &["elsewhere", "first output folder"]);
    assert!(matches!(events[4], Event::Complete { .. }), "{events:?}");
    assert_eq!(files_in(&s.cwd), Vec::<String>::new(), "nothing in the cwd");
    assert!(!other.exists(), "nothing elsewhere");
    assert_eq!(modified(), before, "nothing written at the filesystem root");
}

/// `--allow-path`: inputs and outputs only under the prefixes, symlinks
/// resolved first.
#[test]
fn allow_path_limits_reads_and_writes() {
    let s = scene();
    let ok = unit("baseline_ok", &s.scratch);
    let models = crate::common::examples()
        .join("models")
        .canonicalize()
        .unwrap();
    let root = s.out.parent().unwrap().to_path_buf();
    let allowed = root.join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    // A symlink inside the allowed folder that leads out of it.
    std::os::unix::fs::symlink(&s.out, allowed.join("link")).unwrap();
    let allow = |p: &Path| p.to_str().unwrap().to_string();
    let (allowed_s, models_s) = (allow(&allowed), allow(&models));

    // Output outside the prefixes, through a symlink, then inside.
    let leases = vec![
        (ok.clone(), allow(&s.out)),
        (ok.clone(), allow(&allowed.join("link"))),
        (ok.clone(), allow(&allowed.join("shards"))),
    ];
    let args = ["--allow-path", &allowed_s, "--allow-path", &models_s];
    let (events, log) = replay(leases, &s.cwd, &args);
    assert_eq!(events.len(), 3, "{events:?}\n{log}");
    refused(&events[0..1], &log, &["output folder", "--allow-path"]);
    refused(&events[1..2], &log, &["link", "--allow-path"]);
    assert!(
        matches!(events[2], Event::Complete { .. }),
        "{events:?}\n{log}"
    );
    assert_eq!(files_in(&s.out), Vec::<String>::new());
    assert_eq!(
        files_in(&allowed.join("shards")),
        vec!["model-00001-of-00004.safetensors"]
    );

    // Inputs outside the prefixes (the models are not allowed here).
    let (events, log) = replay(
        vec![(ok, allow(&allowed.join("shards2")))],
        &s.cwd,
        &["--allow-path", &allowed_s],
    );
    refused(&events, &log, &["refusing input", "--allow-path"]);
    assert!(!allowed.join("shards2").exists());
}
