//! Hugging Face Hub model references (`model: org/name@rev`): resolved to a
//! commit once at planning (`hf://org/name@COMMIT`, the location plans and
//! work units carry), then read file by file from the local HF cache when it
//! holds them, else by byte range from the Hub, with no download.
//!
//! - `reference`: the repo-id rule and `hf://` locations.
//! - `cache`: the HF cache folder in huggingface_hub's layout (read-only,
//!   except for `fleetmerge download`).
//! - `client`: the Hub's HTTP API (revision, tree, resolve), signed-URL range
//!   reads, retries, rate limits, token handling.
//! - `backend`: [`HubStorage`], the read-only [`crate::storage::Storage`] for
//!   `hf://` locations.
//!
//! With `HF_HUB_OFFLINE=1` (or `TRANSFORMERS_OFFLINE=1`) nothing goes to the
//! network: a revision is read from `refs/`, files from `snapshots/`, and a
//! model that is not cached is an error naming the id, the revision and the
//! cache folder.

mod backend;
pub mod cache;
pub mod client;
pub mod reference;

pub use backend::HubStorage;
pub use client::{settings, Settings, TreeEntry, OPTIONS};
pub use reference::{
    is_commit, is_hub_location, is_repo_id, model_location, parse_location, HubPath, SCHEME,
};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// A Hub reference resolved to a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// `hf://repo@commit`.
    pub location: String,
    pub commit: String,
}

type PinKey = (String, String);

fn pins() -> &'static Mutex<HashMap<PinKey, String>> {
    static P: OnceLock<Mutex<HashMap<PinKey, String>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

/// Pins `repo@revision` to `commit` for this process: planning uses that
/// commit instead of asking the Hub (a resumed merge reads the commit its
/// journal recorded, even if the branch moved since).
pub fn pin(repo: &str, revision: &str, commit: &str) {
    pins()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert((repo.to_string(), revision.to_string()), commit.to_string());
}

/// The revision a reference means when it names none.
pub const DEFAULT_REVISION: &str = "main";

fn not_cached(repo: &str, revision: &str, what: &str) -> String {
    let s = settings();
    format!(
        "{repo}@{revision} is not in the Hugging Face cache ({what} in {}) and HF_HUB_OFFLINE \
         is set: run without HF_HUB_OFFLINE to read it from the Hub, or fill the cache first \
         (`fleetmerge download CONFIG`, or huggingface_hub's snapshot_download)",
        s.cache.repo_dir(repo).display()
    )
}

/// Resolves `repo@revision` (default `main`) to a commit: a commit hash is
/// itself; a pinned revision its pin; offline, `refs/{revision}` in the cache;
/// otherwise the Hub's revision API (falling back to the cache, with a
/// warning, when the Hub cannot be reached). Errors name the id, the revision
/// and what to do.
pub fn resolve(repo: &str, revision: Option<&str>) -> Result<Resolved, String> {
    if !is_repo_id(repo) {
        return Err(format!("'{repo}' is not a valid Hugging Face Hub repo id"));
    }
    let rev = revision
        .filter(|r| !r.is_empty())
        .unwrap_or(DEFAULT_REVISION);
    let s = settings();
    let pinned = pins()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(repo.to_string(), rev.to_string()))
        .cloned();
    let commit = if is_commit(rev) {
        rev.to_string()
    } else if let Some(pinned) = pinned {
        if !s.offline {
            // Best effort: say so when the branch moved since the pin.
            if let Ok(now) = client::revision_commit(repo, rev) {
                if now != pinned {
                    tracing::warn!(
                        "{repo}@{rev} now points to commit {now}; this merge started from \
                         commit {pinned} and resumes with it (run with --restart to merge the \
                         new commit)"
                    );
                }
            }
        }
        pinned
    } else if s.offline {
        s.cache
            .commit_of(repo, rev)
            .ok_or_else(|| not_cached(repo, rev, &format!("no refs/{rev}")))?
    } else {
        match client::revision_commit(repo, rev) {
            Ok(c) => c,
            Err(client::Failure::Refused(r)) => {
                let has_token = client::token_for(repo).ok().flatten().is_some();
                return Err(client::explain(&r, repo, Some(rev), None, has_token));
            }
            Err(client::Failure::Unreachable(m)) => match s.cache.commit_of(repo, rev) {
                Some(c) => {
                    tracing::warn!(
                        "cannot reach the Hugging Face Hub ({m}); using {repo}@{rev} from the \
                         cache (commit {c})"
                    );
                    c
                }
                None => {
                    return Err(format!(
                        "cannot resolve {repo}@{rev}: the Hugging Face Hub at {} cannot be \
                         reached ({m}) and the cache ({}) has no refs/{rev} for it",
                        s.endpoint,
                        s.cache.repo_dir(repo).display()
                    ))
                }
            },
        }
    };
    if s.offline && !s.cache.snapshot_dir(repo, &commit).is_dir() {
        return Err(not_cached(repo, rev, &format!("no snapshots/{commit}")));
    }
    Ok(Resolved {
        location: model_location(repo, &commit),
        commit,
    })
}

/// The local file behind a location, for memory-mapping: the location itself
/// when it is a local path, the cached file of an `hf://` location when the
/// cache holds it, `None` for anything remote.
pub fn local_file(location: &str) -> Option<String> {
    if !is_hub_location(location) {
        return None;
    }
    let hp = parse_location(location).ok()?;
    match settings().cache.lookup(&hp.repo, &hp.commit, &hp.path) {
        cache::Lookup::Found(p) => Some(p.to_string_lossy().into_owned()),
        _ => None,
    }
}

/// Where an `hf://` location's bytes come from, for `plan`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InputSource {
    pub repo: String,
    pub commit: String,
    /// Bytes of the files read.
    pub bytes: u64,
    pub files: usize,
    /// Files found in the local cache; the others are read from the Hub.
    pub cached_files: usize,
    /// The cache folder of the repository.
    pub cache_dir: PathBuf,
    pub endpoint: String,
}

/// Describes the files `files` (locations under the model `location`).
pub fn describe(location: &str, files: &[String]) -> Option<InputSource> {
    let hp = parse_location(location).ok()?;
    let s = settings();
    let st = HubStorage;
    let mut bytes = 0;
    let mut cached = 0;
    for f in files {
        if let Ok(fp) = parse_location(f) {
            if matches!(
                s.cache.lookup(&fp.repo, &fp.commit, &fp.path),
                cache::Lookup::Found(_)
            ) {
                cached += 1;
            }
        }
        bytes += crate::storage::Storage::size(&st, f).unwrap_or(0);
    }
    Some(InputSource {
        cache_dir: s.cache.repo_dir(&hp.repo),
        repo: hp.repo,
        commit: hp.commit,
        bytes,
        files: files.len(),
        cached_files: cached,
        endpoint: s.endpoint.clone(),
    })
}

/// The page of a repository at a commit (`{endpoint}/{repo}/tree/{commit}`).
pub fn commit_url(repo: &str, commit: &str) -> String {
    format!("{}/{repo}/tree/{commit}", settings().endpoint)
}

/// Checks an option of an `hf://` prefix in `--storage-config`.
pub fn check_option(key: &str) -> Result<(), String> {
    if OPTIONS.contains(&key) {
        Ok(())
    } else {
        Err(format!(
            "unknown option '{key}' for hf:// locations (known: {})",
            OPTIONS.join(", ")
        ))
    }
}
