//! The local Hugging Face cache, in huggingface_hub's layout (hub-docs
//! `local-cache.md`, a spec meant for reimplementation):
//!
//! ```text
//! <HF_HUB_CACHE>/models--{org}--{name}/
//!     refs/{revision}                 commit hash, no trailing newline
//!     blobs/{etag}                    file contents (sha256 for LFS files, git sha1 otherwise)
//!     snapshots/{commit}/{path}       relative symlink to ../../blobs/{etag}
//!     .no_exist/{commit}/{path}       empty marker: the file does not exist at that commit
//!     trees/{commit}.json             (huggingface_hub >= 1.22) the commit's file list
//! ```
//!
//! Reading never writes anything. [`Cache::store`] (for `fleetmerge download`)
//! writes as huggingface_hub does: the blob under `{etag}.incomplete`, renamed
//! when whole, then the relative symlink, then `refs/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Expands a leading `~` and `$VAR` / `${VAR}` (Python's `expanduser` and
/// `expandvars`; unknown variables are left as written).
pub fn expand(s: &str) -> PathBuf {
    let mut out = String::new();
    let mut rest = s;
    if let Some(r) = s.strip_prefix('~') {
        if r.is_empty() || r.starts_with('/') {
            if let Ok(home) = std::env::var("HOME") {
                out.push_str(&home);
                rest = r;
            }
        }
    }
    let mut i = 0;
    while let Some(c) = rest[i..].chars().next() {
        if c == '$' {
            let tail = &rest[i + 1..];
            let (name, used) = match tail.strip_prefix('{') {
                Some(t) => t.find('}').map_or(("", 0), |end| (&t[..end], end + 2)),
                None => {
                    let end = tail
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(tail.len());
                    (&tail[..end], end)
                }
            };
            if let Some(v) = std::env::var(name).ok().filter(|_| !name.is_empty()) {
                out.push_str(&v);
                i += 1 + used;
                continue;
            }
        }
        out.push(c);
        i += c.len_utf8();
    }
    PathBuf::from(out)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `HF_HOME`: default `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(h) = env("HF_HOME") {
        return expand(&h);
    }
    match env("XDG_CACHE_HOME") {
        Some(x) => expand(&x).join("huggingface"),
        None => expand("~/.cache/huggingface"),
    }
}

/// The hub cache: `HF_HUB_CACHE`, else the legacy `HUGGINGFACE_HUB_CACHE`,
/// else `$HF_HOME/hub`.
pub fn hub_cache_dir() -> PathBuf {
    env("HF_HUB_CACHE")
        .or_else(|| env("HUGGINGFACE_HUB_CACHE"))
        .map(|p| expand(&p))
        .unwrap_or_else(|| hf_home().join("hub"))
}

/// `models--{org}--{name}`.
pub fn repo_folder_name(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// What the cache knows about one file at one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The file, a regular file once symlinks are followed.
    Found(PathBuf),
    /// A `.no_exist` marker: the file is known not to exist at that commit.
    Missing,
    /// Not cached.
    Unknown,
}

/// One cache folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    pub root: PathBuf,
}

impl Cache {
    pub fn new(root: PathBuf) -> Cache {
        Cache { root }
    }

    /// `<root>/models--org--name`.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root.join(repo_folder_name(repo))
    }

    /// `snapshots/{commit}` of a repository.
    pub fn snapshot_dir(&self, repo: &str, commit: &str) -> PathBuf {
        self.repo_dir(repo).join("snapshots").join(commit)
    }

    /// The commit a revision names: a commit hash is itself; a branch or tag is
    /// read from `refs/` (trailing whitespace ignored).
    pub fn commit_of(&self, repo: &str, revision: &str) -> Option<String> {
        if super::reference::is_commit(revision) {
            return Some(revision.to_string());
        }
        // `refs/pr/1` is a nested file; `..` would leave the folder.
        if revision
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return None;
        }
        let text = std::fs::read_to_string(self.repo_dir(repo).join("refs").join(revision)).ok()?;
        let commit = text.trim();
        super::reference::is_commit(commit).then(|| commit.to_string())
    }

    /// Looks a file up at a commit.
    pub fn lookup(&self, repo: &str, commit: &str, path: &str) -> Lookup {
        let file = self.snapshot_dir(repo, commit).join(path);
        if std::fs::metadata(&file).is_ok_and(|m| m.is_file()) {
            return Lookup::Found(file);
        }
        let marker = self
            .repo_dir(repo)
            .join(".no_exist")
            .join(commit)
            .join(path);
        if marker.exists() {
            return Lookup::Missing;
        }
        Lookup::Unknown
    }

    /// The commit's file list and sizes from `trees/{commit}.json`, when
    /// huggingface_hub wrote one.
    pub fn tree(&self, repo: &str, commit: &str) -> Option<BTreeMap<String, u64>> {
        let path = self
            .repo_dir(repo)
            .join("trees")
            .join(format!("{commit}.json"));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        let files = v.get("files")?.as_object()?;
        Some(
            files
                .iter()
                .filter_map(|(p, e)| {
                    let size = e
                        .get("lfs_size")
                        .and_then(|s| s.as_u64())
                        .or_else(|| e.get("size").and_then(|s| s.as_u64()))?;
                    Some((p.clone(), size))
                })
                .collect(),
        )
    }

    /// The files under a snapshot folder (recursive), with their sizes.
    pub fn snapshot_files(&self, repo: &str, commit: &str) -> BTreeMap<String, u64> {
        fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, u64>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let rel = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                match std::fs::metadata(e.path()) {
                    Ok(m) if m.is_dir() => walk(&e.path(), &rel, out),
                    Ok(m) if m.is_file() => {
                        out.insert(rel, m.len());
                    }
                    _ => {}
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.snapshot_dir(repo, commit), "", &mut out);
        out
    }

    /// Stores a downloaded file: `blobs/{etag}` (written by `fill` under
    /// `{etag}.incomplete`, renamed when it returns), the relative symlink
    /// `snapshots/{commit}/{path}`. A blob already present is kept.
    pub fn store(
        &self,
        repo: &str,
        commit: &str,
        path: &str,
        etag: &str,
        fill: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<PathBuf, String> {
        if etag.is_empty()
            || !etag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{repo}/{path}: the Hub gave an unusable ETag {etag:?}"
            ));
        }
        let dir = self.repo_dir(repo);
        let blobs = dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(|e| format!("{}: {e}", blobs.display()))?;
        let blob = blobs.join(etag);
        if !blob.is_file() {
            let partial = blobs.join(format!("{etag}.incomplete"));
            fill(&partial).inspect_err(|_| {
                let _ = std::fs::remove_file(&partial);
            })?;
            std::fs::rename(&partial, &blob).map_err(|e| format!("{}: {e}", blob.display()))?;
        }
        let link = self.snapshot_dir(repo, commit).join(path);
        let parent = link.parent().expect("a snapshot file has a folder");
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        // ../../blobs/{etag} from snapshots/{commit}/, one more ../ per subfolder.
        let depth = path.matches('/').count() + 2;
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
        match std::fs::symlink_metadata(&link) {
            Ok(_) => std::fs::remove_file(&link).map_err(|e| format!("{}: {e}", link.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", link.display())),
        }
        std::os::unix::fs::symlink(&target, &link)
            .map_err(|e| format!("{}: {e}", link.display()))?;
        Ok(link)
    }

    /// Writes `refs/{revision}` (no trailing newline, as huggingface_hub reads
    /// it with a bare `read()`), unless the revision is a commit.
    pub fn write_ref(&self, repo: &str, revision: &str, commit: &str) -> Result<(), String> {
        if super::reference::is_commit(revision) {
            return Ok(());
        }
        let path = self.repo_dir(repo).join("refs").join(revision);
        let parent = path.parent().expect("refs/ has a folder");
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        let tmp = path.with_extension("fleetmerge-tmp");
        std::fs::write(&tmp, commit).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn reads_refs_snapshots_and_no_exist() {
        let t = tempfile::tempdir().unwrap();
        let cache = Cache::new(t.path().to_path_buf());
        let repo = cache.repo_dir("org/m");
        assert!(repo.ends_with("models--org--m"));
        std::fs::create_dir_all(repo.join("refs/refs/pr")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{C}\n")).unwrap();
        std::fs::write(repo.join("refs/refs/pr/1"), C).unwrap();
        std::fs::write(repo.join("refs/bad"), "not a commit").unwrap();
        assert_eq!(cache.commit_of("org/m", "main").as_deref(), Some(C));
        assert_eq!(cache.commit_of("org/m", "refs/pr/1").as_deref(), Some(C));
        assert_eq!(cache.commit_of("org/m", "bad"), None);
        assert_eq!(cache.commit_of("org/m", "../refs/main"), None);
        assert_eq!(cache.commit_of("org/m", "v2"), None);
        assert_eq!(cache.commit_of("org/m", C).as_deref(), Some(C));

        let written = cache
            .store("org/m", C, "sub/x.bin", "abc123", |p| {
                std::fs::write(p, b"hello").map_err(|e| e.to_string())
            })
            .unwrap();
        assert_eq!(
            std::fs::read_link(&written).unwrap(),
            PathBuf::from("../../../blobs/abc123")
        );
        assert_eq!(
            cache.lookup("org/m", C, "sub/x.bin"),
            Lookup::Found(written.clone())
        );
        assert_eq!(std::fs::read(&written).unwrap(), b"hello");
        assert_eq!(cache.lookup("org/m", C, "nope"), Lookup::Unknown);
        std::fs::create_dir_all(repo.join(".no_exist").join(C)).unwrap();
        std::fs::write(repo.join(".no_exist").join(C).join("nope"), b"").unwrap();
        assert_eq!(cache.lookup("org/m", C, "nope"), Lookup::Missing);
        assert_eq!(
            cache.snapshot_files("org/m", C),
            BTreeMap::from([("sub/x.bin".to_string(), 5)])
        );
        // A failed fill leaves neither a blob nor its partial file.
        let e = cache.store("org/m", C, "y", "def", |p| {
            std::fs::write(p, b"part").unwrap();
            Err("connection lost".into())
        });
        assert!(e.is_err());
        assert!(!repo.join("blobs/def").exists() && !repo.join("blobs/def.incomplete").exists());
        cache.write_ref("org/m", "dev", C).unwrap();
        assert_eq!(std::fs::read_to_string(repo.join("refs/dev")).unwrap(), C);
    }

    #[test]
    fn expands_home_and_variables() {
        let home = std::env::var("HOME").unwrap_or_default();
        assert_eq!(expand("~/x"), PathBuf::from(format!("{home}/x")));
        assert_eq!(expand("$HOME/y"), PathBuf::from(format!("{home}/y")));
        assert_eq!(expand("${HOME}/z"), PathBuf::from(format!("{home}/z")));
        assert_eq!(
            expand("/a/$FLEETMERGE_SURELY_UNSET_VAR/b"),
            PathBuf::from("/a/$FLEETMERGE_SURELY_UNSET_VAR/b")
        );
    }
}
