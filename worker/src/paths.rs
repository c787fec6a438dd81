//! Where a cluster worker may read and write (`fleetmerge worker --allow-path`).
//!
//! The coordinator names every input location and the output folder of a unit;
//! a worker does not take them on trust:
//!
//! - `out_dir` must be an absolute local path or an object-store URL (an empty
//!   or relative one would write at the filesystem root or in the worker's
//!   working directory).
//! - Local paths are resolved (symlinks followed, `.` and `..` removed) before
//!   any check, and the unit is run on the resolved paths; object-store URLs
//!   with `.` or `..` segments are refused.
//! - With `--allow-path PREFIX` (repeatable; local path prefixes or URL
//!   prefixes, matched a path segment at a time; a Hugging Face Hub repository
//!   `hf://ORG/NAME` holds its files at every commit), every input must lie
//!   under one of the prefixes, and so must the output folder.
//! - Without it, the worker writes only into the first output folder the
//!   coordinator gave it (a lease for another folder is refused) and reads any
//!   input that passes the executor's header check (a tensor of a safetensors
//!   file's own header, or of a torch `.bin` checkpoint's pickle).

use fleetmerge_engine::storage;
use fleetmerge_engine::unit::WorkUnit;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

/// Why a location cannot be resolved.
#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    #[error("empty location")]
    Empty,
    #[error("{location:?}: an object-store location with . or .. segments")]
    DotSegments { location: String },
    #[error(
        "{location:?} is not an absolute path (a relative one would be resolved against \
         the worker's working directory)"
    )]
    Relative { location: String },
    #[error("{location:?}: cannot resolve a path that does not exist and ends in . or ..")]
    DotsAtEnd { location: String },
    #[error("{location:?}: cannot be resolved")]
    NoParent { location: String },
    #[error("{location:?}: cannot be resolved: {source}")]
    Io {
        location: String,
        source: std::io::Error,
    },
}

/// Why a prefix, a unit's output folder or one of its inputs is refused.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("--allow-path {0}")]
    AllowPath(LocationError),
    #[error("refusing output folder: {0}")]
    Output(LocationError),
    #[error("refusing output folder {out_dir:?}: not under an --allow-path ({allowed})")]
    OutputNotAllowed { out_dir: String, allowed: String },
    #[error(
        "refusing output folder {out_dir:?}: this worker writes only into {first:?}, the first \
         output folder of this session (start the worker with --allow-path to allow others)"
    )]
    OutputPinned { out_dir: String, first: String },
    #[error("refusing input {input} of {tensor}: {source}")]
    Input {
        input: String,
        tensor: String,
        source: LocationError,
    },
    #[error(
        "refusing input {input} of {tensor}: {location:?} is not under an --allow-path ({allowed})"
    )]
    InputNotAllowed {
        input: String,
        tensor: String,
        location: String,
        allowed: String,
    },
}

/// A location after resolution: a local path or an object-store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    Local(PathBuf),
    Url(String),
}

impl Place {
    fn to_location(&self) -> String {
        match self {
            Place::Local(p) => p.to_string_lossy().into_owned(),
            Place::Url(u) => u.clone(),
        }
    }

    fn is_under(&self, prefix: &Place) -> bool {
        match (self, prefix) {
            (Place::Local(p), Place::Local(q)) => p.starts_with(q),
            (Place::Url(u), Place::Url(q)) => {
                let q = q.trim_end_matches('/');
                u == q
                    || u.strip_prefix(q).is_some_and(|rest| {
                        rest.starts_with('/')
                            // A Hub repository, `hf://ORG/NAME`, holds its files
                            // at every commit (`hf://ORG/NAME@COMMIT/FILE`).
                            || (rest.starts_with('@')
                                && fleetmerge_engine::storage::hub::is_hub_location(q)
                                && !q.contains('@'))
                    })
            }
            _ => false,
        }
    }
}

/// Resolves `location` (what a unit or the command line names): a URL is kept
/// (without a trailing `/`) unless it has `.` or `..` segments; a local path
/// must be absolute and is resolved through its existing part (symlinks
/// followed); the part that does not exist yet must be plain names.
fn resolve(location: &str) -> Result<Place, LocationError> {
    let owned = || location.to_string();
    if location.is_empty() {
        return Err(LocationError::Empty);
    }
    if storage::is_url(location) {
        let path = location.split_once("://").map_or("", |(_, p)| p);
        if path.split('/').any(|s| s == "." || s == "..") {
            return Err(LocationError::DotSegments { location: owned() });
        }
        return Ok(Place::Url(location.trim_end_matches('/').to_string()));
    }
    let path = Path::new(location.strip_prefix("file://").unwrap_or(location));
    if !path.is_absolute() {
        return Err(LocationError::Relative { location: owned() });
    }
    // The longest existing ancestor, resolved; then the rest, which must be names.
    let mut existing = path.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(real) => {
                let mut out = real;
                for name in rest.iter().rev() {
                    out.push(name);
                }
                return Ok(Place::Local(out));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(Component::Normal(name)) = existing.components().next_back() else {
                    return Err(LocationError::DotsAtEnd { location: owned() });
                };
                rest.push(name.to_os_string());
                if !existing.pop() {
                    return Err(LocationError::NoParent { location: owned() });
                }
            }
            Err(source) => {
                return Err(LocationError::Io {
                    location: owned(),
                    source,
                })
            }
        }
    }
}

/// The read/write policy of one worker process.
#[derive(Debug, Default)]
pub struct PathPolicy {
    allow: Vec<Place>,
    /// Without `--allow-path`: the output folder of the first lease.
    pinned: Mutex<Option<Place>>,
}

impl PathPolicy {
    /// The policy for `--allow-path` values `allow` (none: see the module docs).
    pub fn new(allow: &[String]) -> Result<Self, PathError> {
        let allow = allow
            .iter()
            .map(|p| resolve(p).map_err(PathError::AllowPath))
            .collect::<Result<_, _>>()?;
        Ok(PathPolicy {
            allow,
            pinned: Mutex::new(None),
        })
    }

    fn allowed(&self, place: &Place) -> bool {
        self.allow.iter().any(|p| place.is_under(p))
    }

    fn allowed_list(&self) -> String {
        self.allow
            .iter()
            .map(Place::to_location)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks where `unit` reads and where it writes (`out_dir`), rewriting its
    /// local input locations to their resolved paths. Returns the resolved
    /// output folder to write into.
    pub fn admit(&self, unit: &mut WorkUnit, out_dir: &str) -> Result<String, PathError> {
        let out = resolve(out_dir).map_err(PathError::Output)?;
        if !self.allow.is_empty() {
            if !self.allowed(&out) {
                return Err(PathError::OutputNotAllowed {
                    out_dir: out_dir.to_string(),
                    allowed: self.allowed_list(),
                });
            }
        } else {
            let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
            match &*pinned {
                None => *pinned = Some(out.clone()),
                Some(first) if *first == out => {}
                Some(first) => {
                    return Err(PathError::OutputPinned {
                        out_dir: out_dir.to_string(),
                        first: first.to_location(),
                    })
                }
            }
        }
        let mut resolved: HashMap<String, String> = HashMap::new();
        for t in &mut unit.tensors {
            let tensor = t.name.clone();
            // Inputs, block scales and LoRA factors alike.
            t.try_for_each_ref_mut(|r| {
                if let Some(real) = resolved.get(&r.location) {
                    r.location = real.clone();
                    return Ok(());
                }
                let place = resolve(&r.location).map_err(|source| PathError::Input {
                    input: r.name.clone(),
                    tensor: tensor.clone(),
                    source,
                })?;
                if !self.allow.is_empty() && !self.allowed(&place) {
                    return Err(PathError::InputNotAllowed {
                        input: r.name.clone(),
                        tensor: tensor.clone(),
                        location: place.to_location(),
                        allowed: self.allowed_list(),
                    });
                }
                let real = place.to_location();
                resolved.insert(r.location.clone(), real.clone());
                r.location = real;
                Ok(())
            })?;
        }
        Ok(out.to_location())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_through_symlinks_and_prefixes_match_whole_segments() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(real.join("allowed/sub")).unwrap();
        std::fs::create_dir_all(real.join("other")).unwrap();
        std::os::unix::fs::symlink(real.join("other"), real.join("allowed/link")).unwrap();
        let s = |p: PathBuf| p.to_string_lossy().into_owned();
        let allowed = resolve(&s(real.join("allowed"))).unwrap();
        let under = |p: PathBuf| resolve(&s(p)).unwrap().is_under(&allowed);
        assert!(under(real.join("allowed/sub/x.safetensors")));
        assert!(under(real.join("allowed/new/dir")), "not yet existing");
        assert!(!under(real.join("allowed/link/x")), "a symlink out");
        assert!(!under(real.join("allowed/../other/x")));
        assert!(!under(real.join("allowedX/x")), "a whole segment");
        assert!(resolve("relative/out").is_err());
        assert!(resolve("").is_err());
        let url = resolve("s3://bucket/models/").unwrap();
        assert!(resolve("s3://bucket/models/a/b").unwrap().is_under(&url));
        assert!(!resolve("s3://bucket/modelsX/a").unwrap().is_under(&url));
        assert!(resolve("s3://bucket/models/../secret").is_err());
        // Hub locations: an org or a repository holds the repository's files
        // at any commit; a commit pins it.
        let c = "0123456789abcdef0123456789abcdef01234567";
        let file = resolve(&format!("hf://org/name@{c}/model.safetensors")).unwrap();
        for p in [
            "hf://org".to_string(),
            "hf://org/name".into(),
            format!("hf://org/name@{c}"),
        ] {
            assert!(file.is_under(&resolve(&p).unwrap()), "{p}");
        }
        for p in [
            "hf://org/nam".to_string(),
            "hf://org/name@0".into(),
            "hf://or".into(),
            format!("hf://org/name@{c}/model"),
        ] {
            assert!(!file.is_under(&resolve(&p).unwrap()), "{p}");
        }
    }

    /// A LoRA factor is an input like any other: resolved, and refused
    /// outside `--allow-path` (it would otherwise read any file's bytes).
    #[test]
    fn lora_factors_are_admitted_like_inputs() {
        use fleetmerge_engine::dtype::DType;
        use fleetmerge_engine::unit::{LoraRef, OutputTensor, TensorOp, TensorRef, PLAN_FORMAT};
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        for d in ["models", "adapters", "elsewhere", "out"] {
            std::fs::create_dir_all(real.join(d)).unwrap();
        }
        std::os::unix::fs::symlink(real.join("adapters"), real.join("models/link")).unwrap();
        let at = |p: &str| TensorRef {
            model: 0,
            name: "w".into(),
            location: real.join(p).to_string_lossy().into_owned(),
            offset: 0,
            len: 4,
            dtype: DType::F32,
            shape: vec![1, 1],
            lora: None,
        };
        let unit = |factor: &str| WorkUnit {
            part: None,
            format: PLAN_FORMAT,
            id: 0,
            file_name: "model.safetensors".into(),
            merge_method: "linear".into(),
            seed: 0,
            tensors: vec![OutputTensor {
                name: "w".into(),
                dtype: DType::F32,
                shape: vec![1, 1],
                op: TensorOp::Merge,
                inputs: vec![TensorRef {
                    lora: Some(Box::new(LoraRef {
                        a: at(factor),
                        b: at(factor),
                        scale: 1.0,
                        transposed: false,
                    })),
                    ..at("models/m.safetensors")
                }],
                base: None,
                params: Default::default(),
                scales: Vec::new(),
                block: None,
                requant: None,
                packed: None,
                vocab: None,
            }],
        };
        let s = |p: &str| real.join(p).to_string_lossy().into_owned();
        let policy = PathPolicy::new(&[s("models"), s("out")]).unwrap();
        let mut ok = unit("models/link/adapter_model.safetensors");
        policy.admit(&mut ok, &s("out")).unwrap_err();
        let policy = PathPolicy::new(&[s("models"), s("adapters"), s("out")]).unwrap();
        policy.admit(&mut ok, &s("out")).unwrap();
        let l = ok.tensors[0].inputs[0].lora.as_ref().unwrap();
        assert_eq!(
            l.a.location,
            s("adapters/adapter_model.safetensors"),
            "resolved"
        );
        let mut bad = unit("elsewhere/secret");
        let e = policy.admit(&mut bad, &s("out")).unwrap_err().to_string();
        assert!(
            e.contains("elsewhere/secret") && e.contains("--allow-path"),
            "{e}"
        );
    }
}
