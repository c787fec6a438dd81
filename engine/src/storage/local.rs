//! Local files: positioned reads (`pread`), writes to a temporary sibling that is
//! renamed into place on commit.

use super::{ObjectWriter, Storage, StorageError};
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The local filesystem. Locations are paths (a `file://` prefix is accepted).
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalStorage;

fn path_of(location: &str) -> &Path {
    Path::new(location.strip_prefix("file://").unwrap_or(location))
}

fn map_err(location: &str, e: std::io::Error) -> StorageError {
    if e.kind() == ErrorKind::NotFound {
        StorageError::NotFound {
            location: location.to_string(),
        }
    } else {
        StorageError::io(location, e)
    }
}

impl Storage for LocalStorage {
    fn size(&self, location: &str) -> Result<u64, StorageError> {
        let meta = fs::metadata(path_of(location)).map_err(|e| map_err(location, e))?;
        if !meta.is_file() {
            return Err(StorageError::io(location, "not a regular file"));
        }
        Ok(meta.len())
    }

    fn exists(&self, location: &str) -> Result<bool, StorageError> {
        Ok(path_of(location).exists())
    }

    fn read_into(&self, location: &str, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        let file = File::open(path_of(location)).map_err(|e| map_err(location, e))?;
        file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == ErrorKind::UnexpectedEof {
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                StorageError::OutOfRange {
                    location: location.to_string(),
                    start: offset,
                    end: offset + buf.len() as u64,
                    size,
                }
            } else {
                map_err(location, e)
            }
        })
    }

    fn read_all(&self, location: &str) -> Result<Vec<u8>, StorageError> {
        fs::read(path_of(location)).map_err(|e| map_err(location, e))
    }

    fn put(&self, location: &str, bytes: &[u8]) -> Result<(), StorageError> {
        let mut w = self.create(location)?;
        w.write_all(bytes)?;
        w.commit()
    }

    fn create(&self, location: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let target = path_of(location).to_path_buf();
        if let Some(parent) = target.parent() {
            if !parent.as_os_str().is_empty() {
                fs::create_dir_all(parent).map_err(|e| map_err(location, e))?;
            }
        }
        let file_name = target
            .file_name()
            .ok_or_else(|| StorageError::io(location, "location has no file name"))?
            .to_string_lossy()
            .into_owned();
        let temp = target.with_file_name(format!(
            ".{file_name}.partial-{}-{}",
            std::process::id(),
            unique_suffix()
        ));
        let file = File::create(&temp).map_err(|e| map_err(location, e))?;
        Ok(Box::new(LocalWriter {
            location: location.to_string(),
            target,
            temp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
        }))
    }

    fn delete(&self, location: &str) -> Result<(), StorageError> {
        match fs::remove_file(path_of(location)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(map_err(location, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let dir = path_of(prefix);
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(map_err(prefix, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| map_err(prefix, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Objects being written (`.NAME.partial-...`) do not exist yet.
            let in_progress = name.starts_with('.') && name.contains(".partial-");
            if !in_progress && entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

fn unique_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

struct LocalWriter {
    location: String,
    target: PathBuf,
    temp: PathBuf,
    file: Option<std::io::BufWriter<File>>,
}

impl ObjectWriter for LocalWriter {
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| StorageError::io(&self.location, "write after commit"))?;
        file.write_all(bytes)
            .map_err(|e| map_err(&self.location, e))
    }

    fn commit(mut self: Box<Self>) -> Result<(), StorageError> {
        let file = self
            .file
            .take()
            .ok_or_else(|| StorageError::io(&self.location, "committed twice"))?;
        let file = file
            .into_inner()
            .map_err(|e| map_err(&self.location, e.into_error()))?;
        file.sync_all().map_err(|e| map_err(&self.location, e))?;
        drop(file);
        fs::rename(&self.temp, &self.target).map_err(|e| map_err(&self.location, e))
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_appear_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let loc = dir.path().join("sub/a.bin").to_string_lossy().into_owned();
        let s = LocalStorage;
        let mut w = s.create(&loc).unwrap();
        w.write_all(b"hello").unwrap();
        assert!(!s.exists(&loc).unwrap());
        w.commit().unwrap();
        assert_eq!(s.read_all(&loc).unwrap(), b"hello");
        assert_eq!(s.read_range(&loc, 1..4).unwrap(), b"ell");
        assert!(matches!(
            s.read_range(&loc, 3..9),
            Err(StorageError::OutOfRange { size: 5, .. })
        ));
        // An abandoned writer leaves nothing behind.
        let loc2 = dir.path().join("sub/b.bin").to_string_lossy().into_owned();
        let mut w = s.create(&loc2).unwrap();
        w.write_all(b"x").unwrap();
        let sub = dir.path().join("sub");
        assert_eq!(std::fs::read_dir(&sub).unwrap().count(), 2, "temp file");
        assert_eq!(
            s.list(&sub.to_string_lossy()).unwrap(),
            vec!["a.bin"],
            "an object being written is not listed"
        );
        drop(w);
        assert_eq!(
            s.list(&dir.path().join("sub").to_string_lossy()).unwrap(),
            vec!["a.bin"]
        );
    }

    #[test]
    fn missing_file_is_not_found() {
        let s = LocalStorage;
        assert!(matches!(
            s.size("/nonexistent/x/y"),
            Err(StorageError::NotFound { .. })
        ));
    }
}
