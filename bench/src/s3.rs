//! The cluster benchmark's S3-compatible server and a plain HTTP/1.1 client
//! of it.
//!
//! The server is `s3s-fs` (a Rust S3 server over a folder, `cargo install
//! s3s-fs --features binary`) or moto's `moto_server` (Python, in memory),
//! started on the bridge address without authentication: fleetmerge's
//! requests go unsigned (`AWS_SKIP_SIGNATURE=true`), the bench's too.
//!
//! The client ([`Http`]) is deliberately plain: one keep-alive connection per
//! thread, a request at a time, bodies with a Content-Length. It uploads the
//! inputs, lists and deletes a run's outputs, and, in `fleetmerge-bench get`
//! (run inside a node's namespace), makes the ceiling's parallel ranged GETs
//! of the same objects the merge reads, discarding the bytes.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where a response body goes as it arrives.
type Sink<'a> = &'a mut dyn FnMut(&[u8]);

/// One connection to `host:port`, reopened when the server closes it.
pub struct Http {
    addr: String,
    conn: Option<BufReader<TcpStream>>,
    /// An `Authorization` header sent with every request.
    auth: Option<String>,
}

/// What a request gets back: the status and, unless it went to a sink, the body.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// Its Content-Length header.
    pub length: Option<u64>,
}

impl Http {
    pub fn new(addr: &str, auth: Option<&str>) -> Http {
        Http {
            addr: addr.to_string(),
            conn: None,
            auth: auth.map(str::to_string),
        }
    }

    /// Sends `method path` with `headers` and a body of `body_len` bytes read
    /// from `body`; the response body goes to `sink` when given (else it is
    /// returned). A bodiless request on a kept-alive connection that the
    /// server had closed is sent once more on a new one.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        mut body: Option<(&mut dyn Read, u64)>,
        sink: Option<Sink<'_>>,
    ) -> Result<Response> {
        let mut collected = Vec::new();
        let mut collect = |b: &[u8]| collected.extend_from_slice(b);
        let sink: &mut dyn FnMut(&[u8]) = match sink {
            Some(s) => s,
            None => &mut collect,
        };
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        for (k, v) in headers {
            head += &format!("{k}: {v}\r\n");
        }
        if let Some(a) = &self.auth {
            head += &format!("Authorization: {a}\r\n");
        }
        head += &format!(
            "Content-Length: {}\r\n\r\n",
            body.as_ref().map(|b| b.1).unwrap_or(0)
        );
        let mut attempt = 0;
        let (status, length) = loop {
            attempt += 1;
            let fresh = self.conn.is_none();
            if fresh {
                let s = TcpStream::connect(&self.addr)
                    .with_context(|| format!("connecting to the S3 server at {}", self.addr))?;
                s.set_nodelay(true)?;
                self.conn = Some(BufReader::with_capacity(1 << 20, s));
            }
            let conn = self.conn.as_mut().expect("connected above");
            let sent = (|| -> std::io::Result<()> {
                let s = conn.get_mut();
                s.write_all(head.as_bytes())?;
                if let Some((r, len)) = body.as_mut() {
                    let copied = std::io::copy(&mut r.take(*len), s)?;
                    if copied != *len {
                        return Err(std::io::Error::other("the body ended early"));
                    }
                }
                s.flush()
            })();
            let response = sent
                .map_err(anyhow::Error::from)
                .and_then(|()| read_response(conn, method == "HEAD", &mut *sink));
            match response {
                Ok((status, length, keep)) => {
                    if !keep {
                        self.conn = None;
                    }
                    break (status, length);
                }
                Err(_) if !fresh && body.is_none() && attempt == 1 => self.conn = None,
                Err(e) => {
                    self.conn = None;
                    return Err(e.context(format!("{method} http://{}{path}", self.addr)));
                }
            }
        };
        Ok(Response {
            status,
            body: collected,
            length,
        })
    }
}

/// Reads a response, its body into `take`; returns its status, its
/// Content-Length and whether the connection may be reused.
fn read_response(
    conn: &mut BufReader<TcpStream>,
    head_only: bool,
    take: &mut dyn FnMut(&[u8]),
) -> Result<(u16, Option<u64>, bool)> {
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        bail!("the server closed the connection");
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP status line: {line:?}"))?;
    let (mut length, mut chunked, mut keep) = (None, false, true);
    loop {
        line.clear();
        conn.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            match k.as_str() {
                "content-length" => length = v.parse::<u64>().ok(),
                "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
                "connection" => keep = !v.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    if head_only || status == 204 || status == 304 {
    } else if chunked {
        loop {
            line.clear();
            conn.read_line(&mut line)?;
            let n = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            if n == 0 {
                line.clear();
                conn.read_line(&mut line)?;
                break;
            }
            copy_n(conn, n, &mut buf, take)?;
            line.clear();
            conn.read_line(&mut line)?;
        }
    } else if let Some(n) = length {
        copy_n(conn, n, &mut buf, take)?;
    } else {
        // Until the server closes the connection.
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            take(&buf[..n]);
        }
        keep = false;
    }
    Ok((status, length, keep))
}

fn copy_n(
    r: &mut impl Read,
    mut n: u64,
    buf: &mut [u8],
    take: &mut dyn FnMut(&[u8]),
) -> Result<()> {
    while n > 0 {
        let want = buf.len().min(n as usize);
        let got = r.read(&mut buf[..want])?;
        if got == 0 {
            bail!("the body ended {n} bytes early");
        }
        take(&buf[..got]);
        n -= got as u64;
    }
    Ok(())
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum ServerKind {
    /// s3s-fs: Rust, objects as files under the benchmark's folder.
    S3sFs,
    /// moto_server: Python, objects in memory.
    Moto,
}

/// A running server and the bucket the benchmark uses; stopped (and its
/// folder removed) on drop.
pub struct Server {
    kind: ServerKind,
    child: Child,
    /// `host:port`.
    pub addr: String,
    pub bucket: String,
    root: Option<PathBuf>,
}

impl Server {
    /// Starts `kind` (program `program`) on `host`, keeping its data under
    /// `work` (s3s-fs), with its log in `log`; creates the bucket.
    pub fn start(
        kind: ServerKind,
        program: &Path,
        host: &str,
        work: &Path,
        log: &Path,
    ) -> Result<Server> {
        let port = free_port(host)?;
        let log_file = std::fs::File::create(log)?;
        let mut cmd = Command::new(program);
        let root = match kind {
            ServerKind::S3sFs => {
                let root = work.join("s3s-root");
                let _ = std::fs::remove_dir_all(&root);
                std::fs::create_dir_all(&root)?;
                cmd.args(["--host", host, "--port", &port.to_string()])
                    .arg(&root);
                Some(root)
            }
            ServerKind::Moto => {
                cmd.args(["-H", host, "-p", &port.to_string()]);
                None
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| {
                format!(
                    "starting the S3 server {} (s3s-fs: `cargo install s3s-fs --features binary`; \
                     moto: `pip install 'moto[server]'`; or name it with --server-bin)",
                    program.display()
                )
            })?;
        let mut server = Server {
            kind,
            child,
            addr: format!("{host}:{port}"),
            bucket: "fleetmerge-bench".into(),
            root,
        };
        let t = Instant::now();
        while TcpStream::connect(&server.addr).is_err() {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "the S3 server {} exited ({status}); see {}",
                    program.display(),
                    log.display()
                );
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!(
                    "the S3 server did not listen on {} within 30 s",
                    server.addr
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut http = server.http();
        let r = http.request("PUT", &format!("/{}", server.bucket), &[], None, None)?;
        if r.status / 100 != 2 {
            bail!(
                "creating bucket {}: HTTP {}: {}",
                server.bucket,
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        Ok(server)
    }

    /// A client of the server.
    pub fn http(&self) -> Http {
        Http::new(&self.addr, self.auth())
    }

    /// What the bench's client sends as `Authorization`: moto refuses
    /// anonymous reads of private objects but does not check signatures, so
    /// a well-formed SigV4 header with any signature makes a request its
    /// owner's; s3s-fs runs without authentication and takes plain requests.
    pub fn auth(&self) -> Option<&'static str> {
        (self.kind == ServerKind::Moto).then_some(
            "AWS4-HMAC-SHA256 Credential=bench/20260101/us-east-1/s3/aws4_request, \
             SignedHeaders=host, Signature=0000000000000000000000000000000000000000000000000000000000000000",
        )
    }

    /// CPU seconds the server has used so far (user + system).
    pub fn cpu(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // The fields after the command name, which ends with the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // utime and stime are fields 14 and 15 of the whole line.
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
            .sum();
        // SAFETY: sysconf has no preconditions.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    /// `s3://bucket/key`.
    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// The environment fleetmerge needs to use this server: unsigned
    /// requests to s3s-fs, signed ones (any key: moto does not check) to moto.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("AWS_ENDPOINT_URL", format!("http://{}", self.addr)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
        ];
        match self.kind {
            ServerKind::S3sFs => env.push(("AWS_SKIP_SIGNATURE", "true".into())),
            ServerKind::Moto => {
                env.push(("AWS_ACCESS_KEY_ID", "bench".into()));
                env.push(("AWS_SECRET_ACCESS_KEY", "bench".into()));
            }
        }
        env.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// Uploads `file` as `key` in one PUT.
    pub fn upload(&self, file: &Path, key: &str) -> Result<()> {
        let mut f =
            std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let len = f.metadata()?.len();
        let mut http = self.http();
        let r = http.request(
            "PUT",
            &format!("/{}/{key}", self.bucket),
            &[],
            Some((&mut f, len)),
            None,
        )?;
        if r.status / 100 != 2 {
            bail!(
                "uploading {} to {}: HTTP {}: {}",
                file.display(),
                self.url(key),
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        Ok(())
    }

    /// The keys under `prefix`.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let mut http = self.http();
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!("/{}?list-type=2&prefix={}", self.bucket, encode(prefix));
            if let Some(t) = &token {
                path += &format!("&continuation-token={}", encode(t));
            }
            let r = http.request("GET", &path, &[], None, None)?;
            let xml = String::from_utf8_lossy(&r.body).into_owned();
            if r.status != 200 {
                bail!("listing {}: HTTP {}: {xml}", self.url(prefix), r.status);
            }
            keys.extend(elements(&xml, "Key").into_iter().map(unescape));
            token = elements(&xml, "NextContinuationToken")
                .first()
                .map(|t| unescape(t));
            if token.is_none() || !xml.contains("<IsTruncated>true</IsTruncated>") {
                return Ok(keys);
            }
        }
    }

    /// Deletes every object under `prefix`.
    pub fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let mut http = self.http();
        for key in self.list(prefix)? {
            let r = http.request(
                "DELETE",
                &format!("/{}/{key}", self.bucket),
                &[],
                None,
                None,
            )?;
            if r.status / 100 != 2 {
                bail!("deleting {}: HTTP {}", self.url(&key), r.status);
            }
        }
        Ok(())
    }

    /// Whether `key` is there with `len` bytes (HEAD).
    pub fn has(&self, key: &str, len: u64) -> Result<bool> {
        let mut http = self.http();
        let r = http.request("HEAD", &format!("/{}/{key}", self.bucket), &[], None, None)?;
        Ok(r.status == 200 && r.length == Some(len))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(root) = &self.root {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

/// The text of every `<tag>...</tag>` in `xml`.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(open.as_str())
        .skip(1)
        .filter_map(|s| s.split(close.as_str()).next())
        .collect()
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// A port free on `host` now.
pub fn free_port(host: &str) -> Result<u16> {
    let l = std::net::TcpListener::bind((host, 0))
        .with_context(|| format!("finding a free port on {host}"))?;
    Ok(l.local_addr()?.port())
}

/// `fleetmerge-bench get`: the ceiling's client on one node.
#[derive(clap::Args)]
pub struct GetArgs {
    /// The server, HOST:PORT.
    #[arg(long)]
    server: String,
    /// Ranges to fetch, `/bucket/key:START-END` (END exclusive), in order.
    #[arg(long = "range", required = true)]
    ranges: Vec<String>,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// The `Authorization` header to send.
    #[arg(long)]
    authorization: Option<String>,
    /// Stop taking new ranges after this many seconds.
    #[arg(long)]
    seconds: Option<f64>,
}

/// Fetches the ranges, `parallel` at a time; prints `BYTES SECONDS`.
pub fn get_main(args: GetArgs) -> Result<()> {
    let ranges: Vec<(String, u64, u64)> = args
        .ranges
        .iter()
        .map(|r| {
            let (path, span) = r.rsplit_once(':').context("expected PATH:START-END")?;
            let (a, b) = span.split_once('-').context("expected PATH:START-END")?;
            Ok((path.to_string(), a.parse()?, b.parse()?))
        })
        .collect::<Result<_>>()?;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t = Instant::now();
    let limit = args.seconds.map(Duration::from_secs_f64);
    let totals: Vec<Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.parallel.max(1))
            .map(|_| {
                s.spawn(|| -> Result<u64> {
                    let mut http = Http::new(&args.server, args.authorization.as_deref());
                    let mut total = 0u64;
                    loop {
                        if limit.is_some_and(|l| t.elapsed() >= l) {
                            return Ok(total);
                        }
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((path, a, b)) = ranges.get(i) else {
                            return Ok(total);
                        };
                        let mut got = 0u64;
                        let r = http.request(
                            "GET",
                            path,
                            &[("Range", format!("bytes={a}-{}", b - 1))],
                            None,
                            Some(&mut |bytes: &[u8]| got += bytes.len() as u64),
                        )?;
                        if r.status != 206 || got != b - a {
                            bail!("GET {path} bytes {a}-{b}: HTTP {}, {got} bytes", r.status);
                        }
                        total += got;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a GET thread panicked")))
            .collect()
    });
    let mut bytes = 0;
    for t in totals {
        bytes += t?;
    }
    println!("{bytes} {:.6}", t.elapsed().as_secs_f64());
    Ok(())
}
