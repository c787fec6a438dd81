//! The HTTP side of the Hub: settings from the environment, the revision and
//! tree APIs, and file reads by range, on the reqwest already in the tree.
//!
//! How a file is read (hf-hub.md, "Resolve, redirects and headers"):
//!
//! - One `HEAD {endpoint}/{repo}/resolve/{commit}/{file}` per file, redirects
//!   not followed: a relative redirect (the Hub's `307 /api/resolve-cache/...`
//!   for small files) is followed on the Hub's origin; an absolute one to
//!   another origin (the `302` to a signed CDN URL for LFS/Xet files) is the
//!   file's data URL, with its size from `X-Linked-Size`.
//! - Every range is a GET on that data URL, never on `/resolve/`: the Hub's
//!   "resolvers" rate limit counts requests to `/resolve/`, so a merge costs
//!   one per file, not one per tensor. The data URL is kept per file and
//!   fetched again after [`URL_TTL`] or when the CDN answers 401/403/410 (a
//!   signed URL expired).
//! - The token (`HF_TOKEN`, the token file, or `hf_token`/`hf_token_file` in
//!   `--storage-config` for an `hf://ORG[/NAME]` prefix) goes only to the
//!   Hub's own origin, never to a CDN, and is never logged.
//! - `429` waits as `RateLimit` (`t` seconds, +1 when `r=0`) or `Retry-After`
//!   say; `408`, `5xx`, timeouts and dropped connections are retried with
//!   exponential backoff (`FLEETMERGE_IO_RETRIES`, default 10); a `206` with
//!   fewer bytes than asked or a `416` whose size is not the file's (a known
//!   CDN wart) is retried too. Gated (401/403 `GatedRepo`), missing repository,
//!   revision or file are errors that name the id and what to do.

use super::cache::{hf_home, hub_cache_dir, Cache};
use super::reference::HubPath;
use crate::storage::StorageError;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use reqwest::header::{HeaderMap, ACCEPT_ENCODING, CONTENT_RANGE, LOCATION, RANGE};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a file's signed data URL is used before it is fetched again
/// (the Hub signs them for an hour).
pub const URL_TTL: Duration = Duration::from_secs(55 * 60);

/// A token, never shown.
#[derive(Clone)]
pub(crate) struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<token>")
    }
}

/// Where the Hub is and how to reach it, from the environment (read once).
#[derive(Debug)]
pub struct Settings {
    /// `HF_ENDPOINT`, default `https://huggingface.co`, without a trailing `/`.
    pub endpoint: String,
    endpoint_url: url::Url,
    /// `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` (1/ON/YES/TRUE).
    pub offline: bool,
    /// The cache folder (`HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `$HF_HOME/hub`).
    pub cache: Cache,
    token: Option<Secret>,
    /// Where the token came from, for messages (never the token).
    pub token_source: Option<String>,
}

fn truthy(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_uppercase().as_str(),
            "1" | "ON" | "YES" | "TRUE"
        )
    })
}

fn read_token_file(path: &std::path::Path) -> Option<String> {
    let t = std::fs::read_to_string(path).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// The token as huggingface_hub finds it: `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`,
/// then the token file (`HF_TOKEN_PATH`, default `$HF_HOME/token`); none with
/// `HF_HUB_DISABLE_IMPLICIT_TOKEN`.
fn env_token() -> (Option<Secret>, Option<String>) {
    if truthy("HF_HUB_DISABLE_IMPLICIT_TOKEN") {
        return (None, None);
    }
    for var in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
        if let Ok(v) = std::env::var(var) {
            let v = v.trim();
            if !v.is_empty() {
                return (Some(Secret(v.to_string())), Some(var.to_string()));
            }
        }
    }
    let file = std::env::var("HF_TOKEN_PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .map(|p| super::cache::expand(&p))
        .unwrap_or_else(|| hf_home().join("token"));
    match read_token_file(&file) {
        Some(t) => (Some(Secret(t)), Some(file.display().to_string())),
        None => (None, None),
    }
}

/// The process's Hub settings.
pub fn settings() -> &'static Settings {
    static S: OnceLock<Settings> = OnceLock::new();
    S.get_or_init(|| {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim()
            .trim_end_matches('/')
            .to_string();
        let endpoint_url = url::Url::parse(&format!("{endpoint}/"))
            .unwrap_or_else(|_| url::Url::parse("https://huggingface.co/").expect("valid URL"));
        let (token, token_source) = env_token();
        Settings {
            endpoint,
            endpoint_url,
            offline: truthy("HF_HUB_OFFLINE") || truthy("TRANSFORMERS_OFFLINE"),
            cache: Cache::new(hub_cache_dir()),
            token,
            token_source,
        }
    })
}

/// The options `--storage-config` accepts under an `hf://` prefix.
pub const OPTIONS: &[&str] = &["hf_token", "hf_token_file"];

/// The token for `repo`: a `--storage-config` entry for `hf://ORG/NAME` or
/// `hf://ORG` (longest wins), else the environment's.
pub(crate) fn token_for(repo: &str) -> Result<Option<Secret>, StorageError> {
    let Some(o) = crate::storage::overrides::for_location(&format!("{}{repo}", super::SCHEME))
    else {
        return Ok(settings().token.clone());
    };
    for (k, v) in &o.options {
        match k.as_str() {
            "hf_token" if !v.trim().is_empty() => return Ok(Some(Secret(v.trim().to_string()))),
            "hf_token_file" => {
                return read_token_file(&super::cache::expand(v))
                    .map(|t| Some(Secret(t)))
                    .ok_or_else(|| StorageError::Denied {
                        location: format!("{}{repo}", super::SCHEME),
                        message: format!(
                            "the token file {v} (hf_token_file of {} in the storage config) is \
                             missing or empty",
                            o.prefix
                        ),
                    })
            }
            _ => {}
        }
    }
    Ok(settings().token.clone())
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fleetmerge-hub")
            .enable_all()
            .build()
            .expect("starting the Hub I/O runtime")
    })
}

/// Runs `fut` on the Hub's I/O runtime and waits for it from any thread.
pub(crate) fn block<T: Send + 'static>(
    fut: impl Future<Output = Result<T, StorageError>> + Send + 'static,
) -> Result<T, StorageError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .map_err(|_| StorageError::io("hf://", "the Hub I/O task stopped"))?
}

fn http() -> &'static reqwest::Client {
    static C: OnceLock<reqwest::Client> = OnceLock::new();
    C.get_or_init(|| {
        crate::storage::install_crypto_provider();
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("fleetmerge/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(120))
            .build()
            .expect("building the Hub HTTP client")
    })
}

fn retries() -> u32 {
    std::env::var("FLEETMERGE_IO_RETRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5_000);
    // Jitter from the clock: no RNG needed for spreading retries.
    let jitter = Instant::now().elapsed().subsec_nanos() as u64 % (base / 4 + 1);
    Duration::from_millis(base + jitter)
}

/// How long a 429 asks to wait: `RateLimit: "...";r=R;t=T` (T seconds, one
/// more when R is 0, as huggingface_hub), else `Retry-After` seconds.
pub(crate) fn rate_limit_wait(headers: &HeaderMap) -> Option<Duration> {
    let field = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    if let Some(rl) = field("ratelimit") {
        let mut r = None;
        let mut t = None;
        for part in rl.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("r=") {
                r = v.trim().parse::<u64>().ok();
            } else if let Some(v) = part.strip_prefix("t=") {
                t = v.trim().parse::<u64>().ok();
            }
        }
        if let Some(t) = t {
            return Some(Duration::from_secs(t + u64::from(r == Some(0))));
        }
    }
    field("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// A URL without its query (signed URLs carry credentials there) for messages.
pub(crate) fn shown(url: &url::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

fn same_origin(a: &url::Url, b: &url::Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// An answer the Hub gave that is not what was asked.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    pub status: u16,
    /// `X-Error-Code` (GatedRepo, RepoNotFound, RevisionNotFound, EntryNotFound).
    pub code: Option<String>,
    /// `X-Error-Message`, cut to 300 characters.
    pub message: Option<String>,
}

impl Refusal {
    fn of(resp: &reqwest::Response) -> Refusal {
        let h = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.chars().take(300).collect::<String>())
        };
        Refusal {
            status: resp.status().as_u16(),
            code: h("x-error-code"),
            message: h("x-error-message"),
        }
    }
}

/// Why a request failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// An HTTP answer.
    Refused(Refusal),
    /// No answer (connection refused, DNS, timeout) after the retries.
    Unreachable(String),
}

/// Sends the request `build` makes, retrying 408, 429 (as long as the Hub
/// asks), 5xx and transport errors.
async fn send(
    build: impl Fn() -> reqwest::RequestBuilder,
    url: &url::Url,
    max_retries: u32,
) -> Result<reqwest::Response, Failure> {
    let mut attempt = 0;
    loop {
        match build().send().await {
            Ok(r) => {
                let s = r.status().as_u16();
                if matches!(s, 408 | 429 | 500 | 502 | 503 | 504) && attempt < max_retries {
                    let wait = match (s, rate_limit_wait(r.headers())) {
                        (429, Some(w)) => w,
                        _ => backoff(attempt),
                    };
                    if s == 429 {
                        tracing::warn!(
                            url = %shown(url),
                            "rate limited by the Hugging Face Hub: waiting {:.1} s as it asks \
                             (set HF_TOKEN for a higher limit)",
                            wait.as_secs_f64()
                        );
                    } else {
                        tracing::debug!(url = %shown(url), status = s, "retrying");
                    }
                    attempt += 1;
                    tokio::time::sleep(wait).await;
                    continue;
                }
                return Ok(r);
            }
            Err(e) if attempt < max_retries => {
                tracing::debug!(url = %shown(url), error = %e.without_url(), "retrying");
                attempt += 1;
                tokio::time::sleep(backoff(attempt)).await;
            }
            Err(e) => {
                return Err(Failure::Unreachable(format!(
                    "{}: {}",
                    shown(url),
                    e.without_url()
                )))
            }
        }
    }
}

/// `{endpoint}/{segments...}` with each segment percent-encoded.
fn endpoint_url<'a>(segments: impl IntoIterator<Item = &'a str>) -> url::Url {
    let mut u = settings().endpoint_url.clone();
    {
        let mut p = u.path_segments_mut().expect("an http(s) endpoint");
        p.pop_if_empty();
        p.extend(segments);
    }
    u
}

/// `{endpoint}/{repo}/resolve/{commit}/{path}`: the repo id's `/` and the
/// path's `/` kept, everything else quoted.
fn resolve_url(hp: &HubPath) -> url::Url {
    endpoint_url(
        hp.repo
            .split('/')
            .chain(["resolve", hp.commit.as_str()])
            .chain(hp.path.split('/')),
    )
}

fn request(
    method: reqwest::Method,
    url: &url::Url,
    token: Option<&Secret>,
) -> reqwest::RequestBuilder {
    let mut r = http()
        .request(method, url.clone())
        .header(ACCEPT_ENCODING, "identity");
    // The token goes to the Hub's own origin only.
    if let Some(t) = token.filter(|_| same_origin(url, &settings().endpoint_url)) {
        r = r.bearer_auth(&t.0);
    }
    r
}

/// Says what a refusal means for `repo` (and `revision`, `file`), and what to do.
pub(crate) fn explain(
    r: &Refusal,
    repo: &str,
    revision: Option<&str>,
    file: Option<&str>,
    has_token: bool,
) -> String {
    let s = settings();
    let hub_says = r
        .message
        .as_deref()
        .map(|m| format!(" (the Hub says: {m})"))
        .unwrap_or_default();
    let page = format!("{}/{repo}", s.endpoint);
    let code = r.code.as_deref().unwrap_or("");
    match (r.status, code) {
        (401 | 403, "GatedRepo") if has_token => format!(
            "{repo} is a gated model and the token in use has no access to it{hub_says}: open \
             {page}, accept its licence (or request access) with the account of that token, \
             then run again"
        ),
        (401 | 403, "GatedRepo") => format!(
            "{repo} is a gated model{hub_says}: open {page}, accept its licence (or request \
             access), then set HF_TOKEN to a token of that account (or log in with `hf auth \
             login`)"
        ),
        (401, _)
            if r.message
                .as_deref()
                .is_some_and(|m| m.contains("Invalid credentials")) =>
        {
            format!(
                "the Hub refused the token{hub_says}: check HF_TOKEN (or the token file) for {repo}"
            )
        }
        (401, _) if has_token => format!(
            "{repo}: repository not found on {}, or the token in use cannot read it{hub_says}",
            s.endpoint
        ),
        (401, _) => format!(
            "{repo}: repository not found on {}, or it is private or gated{hub_says}: check the \
             id, or set HF_TOKEN to a token that can read it",
            s.endpoint
        ),
        (404, "RepoNotFound") => format!(
            "{repo}: repository not found on {}{hub_says}: check the id (a private repository \
             also needs HF_TOKEN)",
            s.endpoint
        ),
        (404, "RevisionNotFound") => format!(
            "{repo} has no revision '{}'{hub_says}: name a branch, tag or commit of the repository",
            revision.unwrap_or("main")
        ),
        (404, _) if file.is_some() => format!(
            "{repo}: no file {} at this commit{hub_says}",
            file.unwrap_or_default()
        ),
        (403, _) => format!("{repo}: access denied by the Hub{hub_says}"),
        (status, _) => format!(
            "{repo}: the Hub answered HTTP {status}{}{hub_says}",
            if code.is_empty() {
                String::new()
            } else {
                format!(" ({code})")
            }
        ),
    }
}

/// The commit a revision points to now (`GET /api/models/{repo}/revision/{rev}`).
pub(crate) fn revision_commit(repo: &str, revision: &str) -> Result<String, Failure> {
    let token = token_for(repo).map_err(|e| Failure::Unreachable(e.to_string()))?;
    let url = endpoint_url(
        ["api", "models"]
            .into_iter()
            .chain(repo.split('/'))
            .chain(["revision", revision]),
    );
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let r = async {
            // Few retries of an unreachable Hub: the caller may fall back to the cache.
            let resp = send(
                || request(reqwest::Method::GET, &url, token.as_ref()),
                &url,
                retries().min(3),
            )
            .await?;
            if !resp.status().is_success() {
                return Err(Failure::Refused(Refusal::of(&resp)));
            }
            let v: serde_json::Value = resp.json().await.map_err(|e| {
                Failure::Unreachable(format!("{}: {}", shown(&url), e.without_url()))
            })?;
            v.get("sha")
                .and_then(|s| s.as_str())
                .filter(|s| super::reference::is_commit(s))
                .map(str::to_string)
                .ok_or_else(|| {
                    Failure::Unreachable(format!("{}: the answer has no commit sha", shown(&url)))
                })
        }
        .await;
        let _ = tx.send(r);
    });
    rx.recv()
        .unwrap_or_else(|_| Err(Failure::Unreachable("the Hub I/O task stopped".into())))
}

/// One file of a commit's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    pub size: u64,
    /// The blob id the cache names it by: the LFS sha256, else the git sha1.
    pub etag: String,
}

/// Every file of `repo` at `commit` (`GET /api/models/{repo}/tree/{commit}
/// ?recursive=true&expand=false`, following `Link: rel="next"` pages), once
/// per process.
pub(crate) fn tree(
    repo: &str,
    commit: &str,
) -> Result<Arc<BTreeMap<String, TreeEntry>>, StorageError> {
    type Slot = Arc<tokio::sync::Mutex<Option<Arc<BTreeMap<String, TreeEntry>>>>>;
    static TREES: OnceLock<Mutex<HashMap<String, Slot>>> = OnceLock::new();
    let key = format!("{repo}@{commit}");
    let slot = TREES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_default()
        .clone();
    let (repo, commit) = (repo.to_string(), commit.to_string());
    block(async move {
        let mut g = slot.lock().await;
        if let Some(t) = g.as_ref() {
            return Ok(t.clone());
        }
        let t = Arc::new(fetch_tree(&repo, &commit).await?);
        *g = Some(t.clone());
        Ok(t)
    })
}

/// The tree entry of one file (its size and blob id).
pub fn tree_entry(repo: &str, commit: &str, path: &str) -> Result<TreeEntry, StorageError> {
    tree(repo, commit)?
        .get(path)
        .cloned()
        .ok_or_else(|| StorageError::NotFound {
            location: HubPath {
                repo: repo.to_string(),
                commit: commit.to_string(),
                path: path.to_string(),
            }
            .location(),
        })
}

async fn fetch_tree(repo: &str, commit: &str) -> Result<BTreeMap<String, TreeEntry>, StorageError> {
    let location = super::reference::model_location(repo, commit);
    let token = token_for(repo)?;
    let mut url = endpoint_url(
        ["api", "models"]
            .into_iter()
            .chain(repo.split('/'))
            .chain(["tree", commit]),
    );
    url.set_query(Some("recursive=true&expand=false"));
    let mut out = BTreeMap::new();
    for _page in 0..10_000 {
        let resp = send(
            || request(reqwest::Method::GET, &url, token.as_ref()),
            &url,
            retries(),
        )
        .await
        .map_err(|f| failure_error(&location, f, repo, None, None, token.is_some()))?;
        if !resp.status().is_success() {
            let r = Refusal::of(&resp);
            return Err(refusal_error(
                &location,
                &r,
                repo,
                None,
                None,
                token.is_some(),
            ));
        }
        let next = next_link(resp.headers()).and_then(|n| url.join(&n).ok());
        let entries: Vec<serde_json::Value> = resp.json().await.map_err(|e| {
            StorageError::io(
                &location,
                format!("the tree listing is not a JSON list: {}", e.without_url()),
            )
        })?;
        for e in entries {
            if e.get("type").and_then(|t| t.as_str()) != Some("file") {
                continue;
            }
            let Some(path) = e.get("path").and_then(|p| p.as_str()) else {
                continue;
            };
            let lfs = e.get("lfs");
            let size = lfs
                .and_then(|l| l.get("size"))
                .and_then(|s| s.as_u64())
                .or_else(|| e.get("size").and_then(|s| s.as_u64()))
                .unwrap_or(0);
            let etag = lfs
                .and_then(|l| l.get("oid").or_else(|| l.get("sha256")))
                .or_else(|| e.get("oid"))
                .and_then(|o| o.as_str())
                .unwrap_or_default()
                .to_string();
            out.insert(path.to_string(), TreeEntry { size, etag });
        }
        match next {
            Some(n) if same_origin(&n, &settings().endpoint_url) => url = n,
            _ => return Ok(out),
        }
    }
    Err(StorageError::io(&location, "the tree listing never ends"))
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(headers: &HeaderMap) -> Option<String> {
    let link = headers.get("link")?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"" || p.trim() == "rel=next")
            .then(|| {
                target
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

fn refusal_error(
    location: &str,
    r: &Refusal,
    repo: &str,
    revision: Option<&str>,
    file: Option<&str>,
    has_token: bool,
) -> StorageError {
    let message = explain(r, repo, revision, file, has_token);
    match r.status {
        404 if file.is_some() => StorageError::NotFound {
            location: location.to_string(),
        },
        401 | 403 | 404 => StorageError::Denied {
            location: location.to_string(),
            message,
        },
        _ => StorageError::Io {
            location: location.to_string(),
            message,
        },
    }
}

fn failure_error(
    location: &str,
    f: Failure,
    repo: &str,
    revision: Option<&str>,
    file: Option<&str>,
    has_token: bool,
) -> StorageError {
    match f {
        Failure::Refused(r) => refusal_error(location, &r, repo, revision, file, has_token),
        Failure::Unreachable(m) => StorageError::io(
            location,
            format!(
                "cannot reach the Hugging Face Hub ({m}); set HF_HUB_OFFLINE=1 to use the local \
                 cache only"
            ),
        ),
    }
}

/// Where a file's bytes are served.
#[derive(Debug)]
pub(crate) struct FileMeta {
    /// The data URL: the signed CDN URL, or a URL on the Hub's origin.
    pub url: url::Url,
    pub size: u64,
    /// The blob id (`X-Linked-Etag` or `ETag`, quotes and `W/` removed).
    pub etag: Option<String>,
    fetched: Instant,
}

fn etag_of(headers: &HeaderMap, linked: bool) -> Option<String> {
    let name = if linked { "x-linked-etag" } else { "etag" };
    let v = headers.get(name)?.to_str().ok()?;
    Some(
        v.trim()
            .trim_start_matches("W/")
            .trim_matches('"')
            .to_string(),
    )
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// The one `HEAD` on `/resolve/` for a file (see the module docs).
async fn head(hp: &HubPath) -> Result<FileMeta, StorageError> {
    let location = hp.location();
    let token = token_for(&hp.repo)?;
    let fail = |f: Failure| {
        failure_error(
            &location,
            f,
            &hp.repo,
            None,
            Some(&hp.path),
            token.is_some(),
        )
    };
    let mut url = resolve_url(hp);
    for _hop in 0..5 {
        let resp = send(
            || request(reqwest::Method::HEAD, &url, token.as_ref()),
            &url,
            retries(),
        )
        .await
        .map_err(fail)?;
        let status = resp.status();
        let headers = resp.headers();
        if status.is_success() {
            let size = header_u64(headers, "x-linked-size")
                .or_else(|| header_u64(headers, "content-length"))
                .ok_or_else(|| StorageError::io(&location, "the Hub gave no file size"))?;
            return Ok(FileMeta {
                url,
                size,
                etag: etag_of(headers, true).or_else(|| etag_of(headers, false)),
                fetched: Instant::now(),
            });
        }
        if status.is_redirection() {
            let target = headers
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
                .ok_or_else(|| {
                    StorageError::io(&location, "the Hub redirected without a usable Location")
                })?;
            if same_origin(&target, &settings().endpoint_url) {
                // The Hub's own relative redirects (resolve-cache, renames).
                url = target;
                continue;
            }
            let size = header_u64(headers, "x-linked-size").ok_or_else(|| {
                StorageError::io(
                    &location,
                    "the Hub's redirect to the file's storage has no X-Linked-Size",
                )
            })?;
            return Ok(FileMeta {
                url: target,
                size,
                etag: etag_of(headers, true).or_else(|| etag_of(headers, false)),
                fetched: Instant::now(),
            });
        }
        return Err(fail(Failure::Refused(Refusal::of(&resp))));
    }
    Err(StorageError::io(&location, "too many redirects"))
}

type MetaSlot = Arc<tokio::sync::Mutex<Option<Arc<FileMeta>>>>;

fn meta_slot(location: &str) -> MetaSlot {
    static METAS: OnceLock<Mutex<HashMap<String, MetaSlot>>> = OnceLock::new();
    METAS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(location.to_string())
        .or_default()
        .clone()
}

/// The file's data URL and size: fetched once (one HEAD), again after
/// [`URL_TTL`], or when `stale` (a meta whose URL was refused) is current.
pub(crate) async fn file_meta(
    hp: &HubPath,
    stale: Option<Instant>,
) -> Result<Arc<FileMeta>, StorageError> {
    let slot = meta_slot(&hp.location());
    let mut g = slot.lock().await;
    if let Some(m) = g.as_ref() {
        if Some(m.fetched) != stale && m.fetched.elapsed() < URL_TTL {
            return Ok(m.clone());
        }
    }
    let m = Arc::new(head(hp).await?);
    *g = Some(m.clone());
    Ok(m)
}

/// The cached meta of a file, if it was fetched.
pub(crate) fn known_meta(location: &str) -> Option<Arc<FileMeta>> {
    meta_slot(location).try_lock().ok().and_then(|g| g.clone())
}

/// Total size from `Content-Range: bytes */N` (or `bytes a-b/N`).
fn content_range_total(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_RANGE)?
        .to_str()
        .ok()?
        .rsplit('/')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Bytes `range` of the file, from its data URL (see the module docs for what
/// is retried).
async fn get_range(hp: &HubPath, range: Range<u64>) -> Result<Bytes, StorageError> {
    let location = hp.location();
    let want = range.end - range.start;
    let token = token_for(&hp.repo)?;
    let mut stale = None;
    let mut refreshed = false;
    let mut warts = 0;
    loop {
        let meta = file_meta(hp, stale).await?;
        if range.end > meta.size {
            return Err(StorageError::OutOfRange {
                location,
                start: range.start,
                end: range.end,
                size: meta.size,
            });
        }
        if want == 0 {
            return Ok(Bytes::new());
        }
        let spec = format!("bytes={}-{}", range.start, range.end - 1);
        let resp = send(
            || request(reqwest::Method::GET, &meta.url, token.as_ref()).header(RANGE, &spec),
            &meta.url,
            retries(),
        )
        .await
        .map_err(|f| failure_error(&location, f, &hp.repo, None, Some(&hp.path), false))?;
        let status = resp.status().as_u16();
        let total = content_range_total(resp.headers());
        match status {
            206 | 200 => {
                let body = resp.bytes().await;
                match body {
                    Ok(b) if b.len() as u64 == want && (status == 206 || range.start == 0) => {
                        return Ok(b)
                    }
                    Ok(b) if status == 200 && b.len() as u64 != want => {
                        return Err(StorageError::io(
                            &location,
                            format!(
                                "{} ignored the Range header (HTTP 200 with {} bytes)",
                                shown(&meta.url),
                                b.len()
                            ),
                        ))
                    }
                    // A 206 with fewer bytes (an empty one is a known CDN wart),
                    // or a connection lost mid-body: try again.
                    Ok(b) => tracing::debug!(
                        location = %location,
                        "short range answer ({} of {want} bytes), retrying",
                        b.len()
                    ),
                    Err(e) => {
                        tracing::debug!(location = %location, error = %e.without_url(), "range body lost, retrying")
                    }
                }
            }
            416 if total == Some(meta.size) => {
                return Err(StorageError::OutOfRange {
                    location,
                    start: range.start,
                    end: range.end,
                    size: meta.size,
                })
            }
            // A 416 about another size: the CDN applied the range to something
            // else (a cached redirect): try again.
            416 => tracing::debug!(location = %location, "spurious 416, retrying"),
            // The signed URL expired (or was revoked): ask the Hub for a new one.
            401 | 403 | 410 if !refreshed => {
                tracing::info!(location = %location, status, "the file's signed URL was refused; resolving it again");
                stale = Some(meta.fetched);
                refreshed = true;
                continue;
            }
            404 => return Err(StorageError::NotFound { location }),
            _ => {
                let r = Refusal::of(&resp);
                return Err(StorageError::Denied {
                    message: format!(
                        "{} answered HTTP {status} for bytes {}..{}{}",
                        shown(&meta.url),
                        range.start,
                        range.end,
                        r.message.map(|m| format!(": {m}")).unwrap_or_default()
                    ),
                    location,
                });
            }
        }
        warts += 1;
        if warts > retries() {
            return Err(StorageError::io(
                &location,
                format!(
                    "{} kept answering bytes {}..{} incompletely",
                    shown(&meta.url),
                    range.start,
                    range.end
                ),
            ));
        }
        tokio::time::sleep(backoff(warts)).await;
    }
}

/// Bytes `range` of a file, large ranges in parts fetched concurrently (as
/// the object-store reader does).
pub(crate) fn read_range(hp: &HubPath, range: Range<u64>) -> Result<Vec<Bytes>, StorageError> {
    let hp = hp.clone();
    let part = crate::storage::PART as u64;
    block(async move {
        let parts: Vec<Range<u64>> = if range.start == range.end {
            vec![range.clone()]
        } else {
            (range.start..range.end)
                .step_by(part as usize)
                .map(|s| s..(s + part).min(range.end))
                .collect()
        };
        futures::stream::iter(parts)
            .map(|r| {
                let hp = hp.clone();
                async move { get_range(&hp, r).await }
            })
            .buffered(crate::storage::concurrency())
            .try_collect()
            .await
    })
}

/// A whole (small) file. Its data URL when known; else one GET on
/// `/resolve/`, redirects followed by hand (the token kept only on the
/// Hub's origin).
pub(crate) fn read_all(hp: &HubPath) -> Result<Vec<u8>, StorageError> {
    let known = known_meta(&hp.location()).filter(|m| m.fetched.elapsed() < URL_TTL);
    if let Some(m) = known {
        return Ok(read_range(hp, 0..m.size)?.concat());
    }
    let hp = hp.clone();
    block(async move {
        let location = hp.location();
        let token = token_for(&hp.repo)?;
        let mut url = resolve_url(&hp);
        let mut attempts = 0;
        for _hop in 0..6 {
            let resp = send(
                || request(reqwest::Method::GET, &url, token.as_ref()),
                &url,
                retries(),
            )
            .await
            .map_err(|f| {
                failure_error(
                    &location,
                    f,
                    &hp.repo,
                    None,
                    Some(&hp.path),
                    token.is_some(),
                )
            })?;
            let status = resp.status();
            if status.is_redirection() {
                url = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| url.join(l).ok())
                    .ok_or_else(|| {
                        StorageError::io(&location, "the Hub redirected without a usable Location")
                    })?;
                continue;
            }
            if !status.is_success() {
                return Err(refusal_error(
                    &location,
                    &Refusal::of(&resp),
                    &hp.repo,
                    None,
                    Some(&hp.path),
                    token.is_some(),
                ));
            }
            match resp.bytes().await {
                Ok(b) => {
                    // Where the file was served: a second read needs no /resolve/.
                    let slot = meta_slot(&location);
                    let mut g = slot.lock().await;
                    if g.is_none() {
                        *g = Some(Arc::new(FileMeta {
                            url: url.clone(),
                            size: b.len() as u64,
                            etag: None,
                            fetched: Instant::now(),
                        }));
                    }
                    return Ok(b.to_vec());
                }
                Err(e) if attempts < retries() => {
                    tracing::debug!(location = %location, error = %e.without_url(), "body lost, retrying");
                    attempts += 1;
                    url = resolve_url(&hp);
                    tokio::time::sleep(backoff(attempts)).await;
                }
                Err(e) => return Err(StorageError::io(&location, e.without_url())),
            }
        }
        Err(StorageError::io(&location, "too many redirects"))
    })
}

/// Streams a whole file into `out` (for `fleetmerge download`): its data URL
/// by ranges of [`crate::storage::PART`], and returns its blob id.
pub fn download(
    hp: &HubPath,
    out: &mut dyn std::io::Write,
) -> Result<(u64, Option<String>), StorageError> {
    let h = hp.clone();
    let meta = block(async move { file_meta(&h, None).await })?;
    let part = crate::storage::PART as u64;
    let mut at = 0;
    while at < meta.size {
        let end = (at + part * crate::storage::concurrency() as u64).min(meta.size);
        for b in read_range(hp, at..end)? {
            out.write_all(&b)
                .map_err(|e| StorageError::io(&hp.location(), e))?;
        }
        at = end;
    }
    Ok((meta.size, meta.etag.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn rate_limit_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "ratelimit",
            HeaderValue::from_static("\"resolvers\";r=0;t=2"),
        );
        assert_eq!(rate_limit_wait(&h), Some(Duration::from_secs(3)));
        h.insert("ratelimit", HeaderValue::from_static("\"api\";r=5;t=7"));
        assert_eq!(rate_limit_wait(&h), Some(Duration::from_secs(7)));
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("4"));
        assert_eq!(rate_limit_wait(&h), Some(Duration::from_secs(4)));
        assert_eq!(rate_limit_wait(&HeaderMap::new()), None);
    }

    #[test]
    fn link_next_and_content_range() {
        let mut h = HeaderMap::new();
        h.insert(
            "link",
            HeaderValue::from_static(
                "<https://hub/api/models/a/b/tree/c?cursor=x>; rel=\"next\", <https://hub/p>; rel=\"prev\"",
            ),
        );
        assert_eq!(
            next_link(&h).as_deref(),
            Some("https://hub/api/models/a/b/tree/c?cursor=x")
        );
        h.insert(CONTENT_RANGE, HeaderValue::from_static("bytes */177"));
        assert_eq!(content_range_total(&h), Some(177));
        h.insert(CONTENT_RANGE, HeaderValue::from_static("bytes 0-9/1000"));
        assert_eq!(content_range_total(&h), Some(1000));
    }

    #[test]
    fn urls_quote_the_revision_and_path_but_not_the_repo_slash() {
        let hp = HubPath {
            repo: "org/name".into(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            path: "sub dir/x.safetensors".into(),
        };
        let u = resolve_url(&hp).to_string();
        assert!(
            u.ends_with(
                "/org/name/resolve/0123456789abcdef0123456789abcdef01234567/sub%20dir/x.safetensors"
            ),
            "{u}"
        );
        let r = endpoint_url(["api", "models", "org", "name", "revision", "refs/pr/1"]).to_string();
        assert!(
            r.ends_with("/api/models/org/name/revision/refs%2Fpr%2F1"),
            "{r}"
        );
        let signed = url::Url::parse("https://cdn.example/x?X-Amz-Signature=secret").unwrap();
        assert_eq!(shown(&signed), "https://cdn.example/x");
    }

    #[test]
    fn explanations_name_the_id_and_the_fix() {
        let r = |status, code: Option<&str>| Refusal {
            status,
            code: code.map(str::to_string),
            message: None,
        };
        let m = explain(&r(401, Some("GatedRepo")), "org/gated", None, None, false);
        assert!(
            m.contains("org/gated") && m.contains("licence") && m.contains("HF_TOKEN"),
            "{m}"
        );
        let m = explain(
            &r(404, Some("RevisionNotFound")),
            "org/m",
            Some("v9"),
            None,
            true,
        );
        assert!(m.contains("org/m") && m.contains("'v9'"), "{m}");
        let m = explain(&r(404, Some("RepoNotFound")), "org/none", None, None, false);
        assert!(m.contains("org/none") && m.contains("not found"), "{m}");
        let m = explain(&r(401, None), "org/private", None, None, false);
        assert!(m.contains("private") && m.contains("HF_TOKEN"), "{m}");
    }
}
