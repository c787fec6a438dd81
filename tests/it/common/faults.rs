//! A seeded fault-injecting HTTP proxy for object-store traffic (the chaos
//! test, tests/it/chaos.rs), and the small seeded random number generator the
//! chaos driver draws from.
//!
//! Every request through [`fault_proxy`] draws its fate from the seed and its
//! sequence number: it passes, or gets a 5xx answer, or loses its connection
//! before it reaches the server, or after the server acted on it (the answer
//! is lost: a retried conditional write then finds its own earlier write), or
//! its answer is cut off mid-body, or its answer is slow. Every answer is also
//! trickled at a fixed rate when one is set. Requests from concurrent clients
//! arrive in an order the seed does not decide, so a replay sees the same mix
//! of faults, not the same faults on the same requests.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// SplitMix64: small, seeded, good enough to pick faults and moments.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

/// How often each fault happens, in requests per thousand (drawn once per
/// request, in this order, so they add up), and how slow is slow.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    pub seed: u64,
    /// A `503 Service Unavailable` answer, the server never asked.
    pub error_5xx: u64,
    /// The connection closes once the request is read; the server never sees it.
    pub drop_request: u64,
    /// The server acts on the request; the connection closes before its answer.
    pub drop_answer: u64,
    /// The answer's head and part of its body arrive, then the connection closes.
    pub cut_body: u64,
    /// The answer waits `slow_ms` (drawn in that range) before it is sent.
    pub slow: u64,
    pub slow_ms: (u64, u64),
    /// Every answer is sent at this many bytes per second (`None`: at once).
    pub bytes_per_s: Option<u64>,
}

/// What went through a [`fault_proxy`].
#[derive(Debug, Default)]
pub struct FaultStats {
    pub requests: AtomicUsize,
    pub errors: AtomicUsize,
    pub dropped_requests: AtomicUsize,
    pub dropped_answers: AtomicUsize,
    pub cut_bodies: AtomicUsize,
    pub slowed: AtomicUsize,
    /// Multipart uploads the server created whose answer was lost or cut:
    /// the client never learns their ids (they stay unfinished).
    pub lost_creates: AtomicUsize,
}

impl FaultStats {
    pub fn summary(&self) -> String {
        let g = |a: &AtomicUsize| a.load(Ordering::SeqCst);
        format!(
            "{} requests: {} 5xx, {} dropped before the server, {} answers lost, {} bodies cut, {} slowed",
            g(&self.requests),
            g(&self.errors),
            g(&self.dropped_requests),
            g(&self.dropped_answers),
            g(&self.cut_bodies),
            g(&self.slowed)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Pass,
    Error,
    DropRequest,
    DropAnswer,
    CutBody,
    Slow(u64),
}

impl FaultPlan {
    /// The fate of request number `i`.
    fn fate(&self, i: u64) -> Fate {
        let mut rng = Rng::new(self.seed ^ i.wrapping_mul(0xd6e8_feb8_6659_fd93));
        let r = rng.below(1000);
        let mut at = 0;
        for (per_mille, fate) in [
            (self.error_5xx, Fate::Error),
            (self.drop_request, Fate::DropRequest),
            (self.drop_answer, Fate::DropAnswer),
            (self.cut_body, Fate::CutBody),
            (self.slow, Fate::Slow(0)),
        ] {
            at += per_mille;
            if r < at {
                return match fate {
                    Fate::Slow(_) => Fate::Slow(rng.between(self.slow_ms.0, self.slow_ms.1)),
                    f => f,
                };
            }
        }
        Fate::Pass
    }
}

/// A proxy on loopback in front of `upstream` (`http://host:port`) that
/// injects the faults of `plan`. Returns its address and counters.
pub fn fault_proxy(upstream: &str, plan: FaultPlan) -> (String, Arc<FaultStats>) {
    let upstream = upstream.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let stats = Arc::new(FaultStats::default());
    let st = stats.clone();
    let plan = Arc::new(plan);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (upstream, st, plan) = (upstream.clone(), st.clone(), plan.clone());
            std::thread::spawn(move || {
                let _ = relay(conn, &upstream, &st, &plan);
            });
        }
    });
    (addr, stats)
}

/// Where the head of an HTTP message ends (after its blank line).
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn relay(
    mut client: TcpStream,
    upstream: &str,
    stats: &FaultStats,
    plan: &FaultPlan,
) -> std::io::Result<()> {
    // One request per connection: its head, then its body by Content-Length.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let end = loop {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = head_end(&buf) {
            break i;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < end + len {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let i = stats.requests.fetch_add(1, Ordering::SeqCst) as u64;
    let fate = plan.fate(i);
    match fate {
        Fate::Error => {
            stats.errors.fetch_add(1, Ordering::SeqCst);
            client.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            return Ok(());
        }
        Fate::DropRequest => {
            stats.dropped_requests.fetch_add(1, Ordering::SeqCst);
            return client.shutdown(Shutdown::Both);
        }
        _ => {}
    }
    // Forward with `Connection: close`, so that the answer ends at EOF.
    let mut lines: Vec<&str> = head[..end - 4]
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.push("Connection: close");
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(format!("{}\r\n\r\n", lines.join("\r\n")).as_bytes())?;
    up.write_all(&buf[end..])?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let body_at = head_end(&answer).unwrap_or(answer.len());
    let is_head = head.starts_with("HEAD ");
    let creates_upload =
        head.starts_with("POST ") && head.lines().next().is_some_and(|l| l.contains("?uploads"));
    if creates_upload && matches!(fate, Fate::DropAnswer | Fate::CutBody) {
        stats.lost_creates.fetch_add(1, Ordering::SeqCst);
    }
    match fate {
        // An answer without a body cannot be cut mid-body: it is lost instead.
        Fate::DropAnswer | Fate::CutBody if is_head || answer.len() < body_at + 2 => {
            stats.dropped_answers.fetch_add(1, Ordering::SeqCst);
            return client.shutdown(Shutdown::Both);
        }
        Fate::DropAnswer => {
            stats.dropped_answers.fetch_add(1, Ordering::SeqCst);
            return client.shutdown(Shutdown::Both);
        }
        Fate::CutBody => {
            stats.cut_bodies.fetch_add(1, Ordering::SeqCst);
            let body = answer.len() - body_at;
            let keep = body_at + 1 + (i as usize * 7919) % (body - 1);
            send(&mut client, &answer[..keep], plan.bytes_per_s)?;
            return client.shutdown(Shutdown::Both);
        }
        Fate::Slow(ms) => {
            stats.slowed.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(ms));
        }
        _ => {}
    }
    send(&mut client, &answer, plan.bytes_per_s)
}

/// Writes `bytes`, at `bytes_per_s` when given.
fn send(client: &mut TcpStream, bytes: &[u8], bytes_per_s: Option<u64>) -> std::io::Result<()> {
    let Some(rate) = bytes_per_s else {
        return client.write_all(bytes);
    };
    // Twenty slices a second.
    let slice = (rate / 20).max(1) as usize;
    for part in bytes.chunks(slice) {
        client.write_all(part)?;
        if part.len() == slice {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}
