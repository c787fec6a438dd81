//! [`HubStorage`]: the read-only [`Storage`] for `hf://repo@commit/file`
//! locations. Each file comes from the local cache when `snapshots/` holds
//! it, else from the Hub by range; sizes and existence come from the cache or
//! the commit's tree listing (one API request per repository), so only reads
//! touch `/resolve/`, once per file. Reads that start at byte 0 and are at
//! most [`PREFIX_BYTES`] (safetensors headers) are kept, so the header checks
//! of later work units cost no request.

use super::cache::Lookup;
use super::reference::{parse_location, HubPath};
use super::{client, settings};
use crate::storage::{LocalStorage, ObjectWriter, Storage, StorageError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Largest read from byte 0 that is kept in memory.
pub const PREFIX_BYTES: usize = 256 << 10;

/// Reads `hf://` locations (cache first, then the Hub).
pub struct HubStorage;

fn prefixes() -> &'static Mutex<HashMap<String, Arc<Vec<u8>>>> {
    static P: OnceLock<Mutex<HashMap<String, Arc<Vec<u8>>>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

fn parse(location: &str) -> Result<HubPath, StorageError> {
    parse_location(location).map_err(|m| StorageError::io(location, m))
}

/// Where a file is: a cached file, known missing, or to be asked of the Hub.
enum Place {
    Cached(String),
    Missing,
    Remote,
}

fn place(hp: &HubPath, location: &str) -> Result<Place, StorageError> {
    let s = settings();
    match s.cache.lookup(&hp.repo, &hp.commit, &hp.path) {
        Lookup::Found(p) => Ok(Place::Cached(p.to_string_lossy().into_owned())),
        Lookup::Missing => Ok(Place::Missing),
        Lookup::Unknown if s.offline => {
            // The cache's own listing, when huggingface_hub wrote one, tells
            // a file the snapshot lacks from one that does not exist.
            let listed = s
                .cache
                .tree(&hp.repo, &hp.commit)
                .is_some_and(|t| t.contains_key(&hp.path));
            if listed {
                Err(StorageError::Denied {
                    location: location.to_string(),
                    message: format!(
                        "{} at commit {} is not in the Hugging Face cache ({}) and \
                         HF_HUB_OFFLINE is set: run without it, or fill the cache first",
                        hp.path,
                        hp.commit,
                        s.cache.repo_dir(&hp.repo).display()
                    ),
                })
            } else {
                Ok(Place::Missing)
            }
        }
        Lookup::Unknown => Ok(Place::Remote),
    }
}

fn read_only(location: &str) -> StorageError {
    StorageError::Denied {
        location: location.to_string(),
        message: "Hugging Face Hub locations are read-only here".into(),
    }
}

impl Storage for HubStorage {
    fn size(&self, location: &str) -> Result<u64, StorageError> {
        let hp = parse(location)?;
        match place(&hp, location)? {
            Place::Cached(p) => LocalStorage.size(&p),
            Place::Missing => Err(StorageError::NotFound {
                location: location.to_string(),
            }),
            Place::Remote => {
                if let Some(m) = client::known_meta(location) {
                    return Ok(m.size);
                }
                match client::tree(&hp.repo, &hp.commit)?.get(&hp.path) {
                    Some(e) => Ok(e.size),
                    None => Err(StorageError::NotFound {
                        location: location.to_string(),
                    }),
                }
            }
        }
    }

    fn exists(&self, location: &str) -> Result<bool, StorageError> {
        let hp = parse(location)?;
        match place(&hp, location) {
            Ok(Place::Cached(_)) => Ok(true),
            Ok(Place::Missing) => Ok(false),
            // Offline, listed but not cached: it exists (reading it will say why not).
            Err(StorageError::Denied { .. }) => Ok(true),
            Err(e) => Err(e),
            Ok(Place::Remote) => Ok(client::tree(&hp.repo, &hp.commit)?.contains_key(&hp.path)),
        }
    }

    fn read_into(&self, location: &str, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        let hp = parse(location)?;
        match place(&hp, location)? {
            Place::Cached(p) => return LocalStorage.read_into(&p, offset, buf),
            Place::Missing => {
                return Err(StorageError::NotFound {
                    location: location.to_string(),
                })
            }
            Place::Remote => {}
        }
        let end = offset + buf.len() as u64;
        let kept = prefixes()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(location)
            .cloned();
        // What the kept prefix holds is not fetched again.
        let mut at = 0;
        if let Some(k) = kept.filter(|k| offset < k.len() as u64) {
            let have = (k.len() as u64).min(end);
            at = (have - offset) as usize;
            buf[..at].copy_from_slice(&k[offset as usize..have as usize]);
            if have == end {
                return Ok(());
            }
        }
        let parts = client::read_range(&hp, offset + at as u64..end)?;
        for p in parts {
            buf[at..at + p.len()].copy_from_slice(&p);
            at += p.len();
        }
        if offset == 0 && buf.len() <= PREFIX_BYTES {
            prefixes()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(location.to_string())
                .and_modify(|k| {
                    if k.len() < buf.len() {
                        *k = Arc::new(buf.to_vec());
                    }
                })
                .or_insert_with(|| Arc::new(buf.to_vec()));
        }
        Ok(())
    }

    fn read_all(&self, location: &str) -> Result<Vec<u8>, StorageError> {
        let hp = parse(location)?;
        match place(&hp, location)? {
            Place::Cached(p) => LocalStorage.read_all(&p),
            Place::Missing => Err(StorageError::NotFound {
                location: location.to_string(),
            }),
            Place::Remote => client::read_all(&hp),
        }
    }

    fn put(&self, location: &str, _: &[u8]) -> Result<(), StorageError> {
        Err(read_only(location))
    }

    fn create(&self, location: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        Err(read_only(location))
    }

    fn delete(&self, location: &str) -> Result<(), StorageError> {
        Err(read_only(location))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let hp = parse(prefix)?;
        let s = settings();
        let files: Vec<String> = if s.offline {
            match s.cache.tree(&hp.repo, &hp.commit) {
                Some(t) => t.into_keys().collect(),
                None => s
                    .cache
                    .snapshot_files(&hp.repo, &hp.commit)
                    .into_keys()
                    .collect(),
            }
        } else {
            client::tree(&hp.repo, &hp.commit)?
                .keys()
                .cloned()
                .collect()
        };
        let dir = if hp.path.is_empty() {
            String::new()
        } else {
            format!("{}/", hp.path)
        };
        Ok(files
            .into_iter()
            .filter_map(|f| f.strip_prefix(&dir).map(str::to_string))
            .filter(|f| !f.is_empty())
            .collect())
    }
}
