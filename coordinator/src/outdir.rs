//! Who may write an output folder, and what a new merge may remove from it.
//!
//! Before the first byte of a merge is written, [`claim`]:
//! 1. refuses an output that overlaps an input (the output is an input's
//!    folder, lies inside one, or holds one), symlinks resolved;
//! 2. locks the output for the whole merge: an advisory `flock` on
//!    `OUT/.fleetmerge/lock` for a local folder (released by the kernel when
//!    the process ends, however it ends), a lock object created with a
//!    conditional PUT on an object store, with an owner and an expiry that the
//!    holder renews, so that a crashed holder blocks others only until then
//!    (or not at all when it ran on this host and its process is gone);
//! 3. refuses a folder that holds files no fleetmerge merge wrote (a folder
//!    without a journal must be empty), and a file the new merge would write
//!    over that the earlier merge's journal does not name;
//! 4. opens the journal ([`Journal::open`]), which resumes the same merge or
//!    retires an earlier, different one: its finished markers (the journal's
//!    final marker, the index, the model card) go first, then the shards its
//!    plan names, and nothing else.

use crate::journal::{Journal, JournalError, Resume};
use fleetmerge_engine::output::INDEX_FILE;
use fleetmerge_engine::plan::Plan;
use fleetmerge_engine::storage::{self, Storage, StorageError};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The journal folder inside an output.
pub const JOURNAL_DIR: &str = ".fleetmerge";
const LOCK: &str = "lock";

/// Files that a merge writes besides its shards and the donor's tokenizer files.
const SIDE_FILES: &[&str] = &[
    INDEX_FILE,
    "config.json",
    "README.md",
    "mergekit_config.yml",
];

#[derive(Debug, thiserror::Error)]
pub enum OutDirError {
    #[error(
        "the output {out} {relation} the input {input}: a merge never writes where it reads; \
         choose an output folder outside every input model"
    )]
    Overlap {
        out: String,
        input: String,
        relation: &'static str,
    },
    #[error("{out} is being written by another merge ({owner}); wait for it, or choose another output folder")]
    Busy { out: String, owner: String },
    #[error(
        "{out} holds files that no fleetmerge merge wrote ({files}); fleetmerge writes only into \
         an empty folder or one an earlier fleetmerge merge wrote: choose another output folder, \
         or move those files away"
    )]
    NotOurs { out: String, files: String },
    #[error(
        "{out}: this merge would overwrite {file}, which the earlier merge in this folder did not \
         write; move it away or choose another output folder"
    )]
    WouldOverwrite { out: String, file: String },
    #[error("{location}: {message}")]
    Io { location: String, message: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

fn io(location: &Path, e: impl std::fmt::Display) -> OutDirError {
    OutDirError::Io {
        location: location.display().to_string(),
        message: e.to_string(),
    }
}

/// A claimed output folder: the lock is held until this is dropped.
pub struct Claimed {
    pub journal: Journal,
    pub resume: Resume,
    pub lock: OutputLock,
}

/// Claims `out_dir` for `plan` (see the module's comment). `out_dir` is an
/// absolute local path or an object-store URL.
pub fn claim(plan: &Plan, out_dir: &str, restart: bool) -> Result<Claimed, OutDirError> {
    check_disjoint(plan, out_dir)?;
    let store = storage::for_location(out_dir);
    let local = !storage::is_url(out_dir);
    if local {
        std::fs::create_dir_all(out_dir).map_err(|e| io(Path::new(out_dir), e))?;
    }
    let had_journal_dir = local && Path::new(out_dir).join(JOURNAL_DIR).is_dir();
    let lock = OutputLock::acquire(out_dir)?;
    let refused = |e: OutDirError| {
        // Leave a folder we refused as we found it.
        if local && !had_journal_dir {
            drop_lock_dir(out_dir);
        }
        e
    };
    // The earlier merge's plan, read once: what it wrote, and what a new merge
    // removes of it.
    let earlier = crate::journal::read_plan(store.as_ref(), out_dir)?;
    check_ownership(store.as_ref(), plan, earlier.as_ref(), out_dir).map_err(refused)?;
    let (journal, resume) = Journal::open(plan, earlier.as_ref(), out_dir, restart)?;
    Ok(Claimed {
        journal,
        resume,
        lock,
    })
}

fn drop_lock_dir(out_dir: &str) {
    let dir = Path::new(out_dir).join(JOURNAL_DIR);
    let _ = std::fs::remove_file(dir.join(LOCK));
    let _ = std::fs::remove_dir(&dir);
}

/// Every location a merge reads from: the models' folders and their adapters'
/// (and the files the units read, in case a reference points elsewhere), the
/// config donor and the tokenizer source.
fn input_locations(plan: &Plan) -> Vec<String> {
    let mut all: Vec<String> = plan
        .models
        .iter()
        .flat_map(|m| std::iter::once(m.location.clone()).chain(m.adapter.clone()))
        .collect();
    all.push(plan.output.config_dir.clone());
    all.push(plan.output.tokenizer_dir.clone());
    for u in &plan.units {
        for t in &u.tensors {
            for r in t.all_refs() {
                all.push(r.location.clone());
            }
        }
    }
    all.sort();
    all.dedup();
    all
}

/// A local path made absolute with symlinks resolved, also when its last
/// components do not exist yet (the nearest existing ancestor is resolved).
pub fn resolve_local(path: &Path) -> PathBuf {
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut rest = Vec::new();
    let mut cur = path.as_path();
    loop {
        if let Ok(real) = std::fs::canonicalize(cur) {
            let mut out = real;
            for c in rest.iter().rev() {
                out.push(c);
            }
            return normalize(&out);
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return normalize(&path),
        }
    }
}

/// Removes `.` and folds `..` lexically (for the parts that do not exist yet).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// An object-store URL as path segments (`s3://b/x//y/` is `[s3:, b, x, y]`).
fn url_segments(url: &str) -> Vec<String> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    std::iter::once(format!("{scheme}:"))
        .chain(
            rest.split('/')
                .filter(|s| !s.is_empty() && *s != ".")
                .map(str::to_string),
        )
        .collect()
}

fn segments(location: &str) -> Vec<String> {
    if storage::is_url(location) {
        return url_segments(location);
    }
    let local = location.strip_prefix("file://").unwrap_or(location);
    resolve_local(Path::new(local))
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect()
}

/// Refuses an output that is, lies inside, or holds an input.
pub fn check_disjoint(plan: &Plan, out_dir: &str) -> Result<(), OutDirError> {
    let out = segments(out_dir);
    for input in input_locations(plan) {
        let mut inp = segments(&input);
        // A file's folder is what the merge must not write into.
        let is_file = !storage::is_url(&input) && Path::new(&input).is_file();
        if is_file || input.ends_with(".safetensors") || input.ends_with(".bin") {
            inp.pop();
        }
        let relation = if inp == out {
            "is the folder of"
        } else if out.starts_with(&inp) {
            "lies inside the folder of"
        } else if inp.starts_with(&out) {
            "holds"
        } else {
            continue;
        };
        return Err(OutDirError::Overlap {
            out: out_dir.to_string(),
            input,
            relation,
        });
    }
    Ok(())
}

/// What the earlier merge (`earlier`, its journal's plan) wrote that a new
/// merge may write again: its shards and side files.
fn earlier_files(earlier: &Plan) -> Vec<&str> {
    earlier
        .units
        .iter()
        .map(|u| u.file_name.as_str())
        .chain(SIDE_FILES.iter().copied())
        .collect()
}

/// Refuses a folder with files no fleetmerge merge wrote, and files this merge
/// would write over that the earlier merge did not write.
fn check_ownership(
    store: &dyn Storage,
    plan: &Plan,
    earlier: Option<&Plan>,
    out_dir: &str,
) -> Result<(), OutDirError> {
    let present: Vec<String> = store
        .list(out_dir)?
        .into_iter()
        .filter(|n| !n.starts_with(JOURNAL_DIR))
        .collect();
    let local = !storage::is_url(out_dir);
    let has_subdirs = local
        && std::fs::read_dir(out_dir)
            .map_err(|e| io(Path::new(out_dir), e))?
            .filter_map(Result::ok)
            .any(|e| e.file_name() != JOURNAL_DIR && e.path().is_dir());
    match earlier.map(earlier_files) {
        None if present.is_empty() && !has_subdirs => Ok(()),
        None => {
            let mut shown: Vec<String> = present.iter().take(5).cloned().collect();
            if has_subdirs {
                shown.push("folders".into());
            }
            if present.len() > 5 {
                shown.push(format!("and {} more", present.len() - 5));
            }
            Err(OutDirError::NotOurs {
                out: out_dir.to_string(),
                files: shown.join(", "),
            })
        }
        Some(ours) => {
            let writes = plan
                .units
                .iter()
                .map(|u| u.file_name.as_str())
                .chain(SIDE_FILES.iter().copied());
            for file in writes {
                if present.iter().any(|p| p == file) && !ours.contains(&file) {
                    return Err(OutDirError::WouldOverwrite {
                        out: out_dir.to_string(),
                        file: file.to_string(),
                    });
                }
            }
            Ok(())
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown host".into())
}

/// Who holds a lock, as written into it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Owner {
    host: String,
    pid: u32,
    since_unix_ms: u64,
    /// Object stores: the lock is stale after this (renewed by the holder).
    #[serde(default)]
    expires_unix_ms: u64,
    /// A random id of this holder (a lock object is only renewed or removed
    /// by the holder that wrote it).
    #[serde(default)]
    id: String,
}

impl Owner {
    fn new(expires_unix_ms: u64) -> Owner {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).unwrap_or_default();
        Owner {
            host: host_name(),
            pid: std::process::id(),
            since_unix_ms: now_ms(),
            expires_unix_ms,
            id: hex::encode(id),
        }
    }

    /// A holder on this very host whose process is gone (or whose pid is
    /// ours: an earlier incarnation of this process, as after a container
    /// restart). A holder elsewhere is trusted until its lock expires.
    fn is_gone(&self) -> bool {
        if self.host != host_name() {
            return false;
        }
        if self.pid == std::process::id() {
            return true;
        }
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists.
        let r = unsafe { libc::kill(pid, 0) };
        r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    }

    fn describe(&self) -> String {
        format!(
            "pid {} on {}, since {} s ago",
            self.pid,
            self.host,
            now_ms().saturating_sub(self.since_unix_ms) / 1000
        )
    }
}

/// How long an object-store lock lasts without renewal, and how often it is
/// renewed.
pub const OBJECT_LOCK_TTL: Duration = Duration::from_secs(120);
const OBJECT_LOCK_RENEW: Duration = Duration::from_secs(30);

/// The lock on an output folder, held until dropped.
pub struct OutputLock {
    inner: LockKind,
}

enum LockKind {
    Local(#[allow(dead_code)] std::fs::File),
    Object {
        stop: Arc<AtomicBool>,
        renewer: Option<std::thread::JoinHandle<()>>,
        store: Arc<dyn Storage>,
        location: String,
        version: Arc<std::sync::Mutex<String>>,
    },
}

impl OutputLock {
    /// Takes the lock of `out_dir`, or says who holds it.
    pub fn acquire(out_dir: &str) -> Result<OutputLock, OutDirError> {
        if storage::is_url(out_dir) {
            return Self::acquire_object(out_dir, OBJECT_LOCK_TTL);
        }
        use std::io::{Read, Seek, Write};
        use std::os::unix::io::AsRawFd;
        let dir = Path::new(out_dir).join(JOURNAL_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let path = dir.join(LOCK);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        // SAFETY: flock on a descriptor this function owns.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let owner = serde_json::from_str::<Owner>(&text)
                .map(|o| o.describe())
                .unwrap_or_else(|_| "a process that is starting".into());
            return Err(OutDirError::Busy {
                out: out_dir.to_string(),
                owner,
            });
        }
        let owner = serde_json::to_vec(&Owner::new(0)).unwrap_or_default();
        let _ = file.set_len(0);
        let _ = file.seek(std::io::SeekFrom::Start(0));
        let _ = file.write_all(&owner);
        Ok(OutputLock {
            inner: LockKind::Local(file),
        })
    }

    /// The lock object `OUT/.fleetmerge/lock`: created if absent; taken over
    /// (with a conditional write on its version) when its holder let it expire.
    pub fn acquire_object(out_dir: &str, ttl: Duration) -> Result<OutputLock, OutDirError> {
        let store = storage::for_location(out_dir);
        let location = store.join(&store.join(out_dir, JOURNAL_DIR), LOCK);
        let ttl_ms = ttl.as_millis() as u64;
        let me = Owner::new(now_ms() + ttl_ms);
        let body = serde_json::to_vec(&me).unwrap_or_default();
        // A conflict may be our own write, landed with its answer lost (the
        // retry then found the object): then the lock is ours.
        let first = store
            .put_conditional(&location, &body, None)
            .or_else(|e| mine(store.as_ref(), &location, &body, e));
        let version = match first {
            Ok(v) => v,
            Err(StorageError::Conflict { .. }) => {
                let held = store.read_versioned(&location)?;
                let owner: Option<Owner> = serde_json::from_slice(&held.bytes).ok();
                match owner {
                    Some(o) if o.expires_unix_ms > now_ms() && !o.is_gone() => {
                        return Err(OutDirError::Busy {
                            out: out_dir.to_string(),
                            owner: o.describe(),
                        })
                    }
                    _ => {
                        tracing::warn!(lock = %location, "taking over the lock of a merge that stopped (expired, or its process on this host is gone)");
                        match store
                            .put_conditional(&location, &body, Some(&held.version))
                            .or_else(|e| mine(store.as_ref(), &location, &body, e))
                        {
                            Ok(v) => v,
                            Err(StorageError::Conflict { .. }) => {
                                return Err(OutDirError::Busy {
                                    out: out_dir.to_string(),
                                    owner: "another merge that took the lock just now".into(),
                                })
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
            }
            Err(e) => return Err(e.into()),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let version = Arc::new(std::sync::Mutex::new(version));
        let renewer = {
            let (stop, store, location, version) = (
                stop.clone(),
                store.clone(),
                location.clone(),
                version.clone(),
            );
            let renew_every = (ttl / 4).min(OBJECT_LOCK_RENEW);
            std::thread::Builder::new()
                .name("output-lock".into())
                .spawn(move || {
                    let mut last = std::time::Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(200));
                        if last.elapsed() < renew_every {
                            continue;
                        }
                        last = std::time::Instant::now();
                        let mut owner = me.clone();
                        owner.expires_unix_ms = now_ms() + ttl_ms;
                        let body = serde_json::to_vec(&owner).unwrap_or_default();
                        let mut v = version.lock().unwrap_or_else(|e| e.into_inner());
                        match store
                            .put_conditional(&location, &body, Some(&v))
                            .or_else(|e| mine(store.as_ref(), &location, &body, e))
                        {
                            Ok(new) => *v = new,
                            Err(e) => {
                                tracing::error!(lock = %location, error = %e, "could not renew the output lock");
                            }
                        }
                    }
                })
                .ok()
        };
        Ok(OutputLock {
            inner: LockKind::Object {
                stop,
                renewer,
                store,
                location,
                version,
            },
        })
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        if let LockKind::Object {
            stop,
            renewer,
            store,
            location,
            version,
        } = &mut self.inner
        {
            stop.store(true, Ordering::Relaxed);
            if let Some(h) = renewer.take() {
                let _ = h.join();
            }
            // Released by expiring it at once, with a write conditional on our
            // version: a lock someone else took over is left alone.
            let v = version.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let released = serde_json::to_vec(&Owner::new(0)).unwrap_or_default();
            let _ = store.put_conditional(location, &released, Some(&v));
        }
    }
}

/// A failed conditional write of `body` to the lock object at `location`:
/// when it failed on a conflict and the object holds exactly `body` (our own
/// write, whose answer was lost, so that the retried write found it), its
/// version; otherwise the error.
fn mine(
    store: &dyn storage::Storage,
    location: &str,
    body: &[u8],
    e: StorageError,
) -> Result<String, StorageError> {
    if !matches!(e, StorageError::Conflict { .. }) {
        return Err(e);
    }
    match store.read_versioned(location) {
        Ok(held) if held.bytes == body => Ok(held.version),
        _ => Err(e),
    }
}
