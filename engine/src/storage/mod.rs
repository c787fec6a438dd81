//! Where bytes live. Every read of a checkpoint and every write of an output goes
//! through [`Storage`], addressed by a location string: a local path today, an
//! object-store URL when a backend for it is registered. Plans and work units
//! carry only location strings, never handles, so they travel between processes.

pub mod hub;
mod local;
mod object;
pub mod overrides;

pub use local::{LocalStorage, Mapped};
pub(crate) use object::{concurrency, install_crypto_provider, PART};

use std::ops::Range;
use std::sync::Arc;

/// A failed storage operation, with the location it concerned.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{location}: not found")]
    NotFound { location: String },
    #[error("{location}: {message}")]
    Io { location: String, message: String },
    /// Access refused (wrong or missing credentials): another attempt will not help.
    #[error("{location}: access denied: {message}")]
    Denied { location: String, message: String },
    #[error(
        "{location}: asked for bytes {start}..{end} but the object has {size} bytes (truncated, \
         or changed since the merge was planned)"
    )]
    OutOfRange {
        location: String,
        start: u64,
        end: u64,
        size: u64,
    },
    /// A conditional write found the object created or changed by someone else.
    #[error("{location}: changed by another writer")]
    Conflict { location: String },
    /// The reader asked to stop (see [`Storage::read_range_reporting`]): a
    /// worker whose lease was revoked gives its link back.
    #[error("{location}: reading stopped: the work it was for was cancelled")]
    Cancelled { location: String },
}

impl StorageError {
    pub fn io(location: &str, err: impl std::fmt::Display) -> Self {
        StorageError::Io {
            location: location.to_string(),
            message: err.to_string(),
        }
    }
}

/// An object's bytes and the version tag a conditional write can expect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub bytes: Vec<u8>,
    pub version: String,
}

/// The smallest upload chunk but the last that object stores accept (S3: 5 MiB).
pub const MIN_CHUNK: u64 = 5 << 20;
/// The upload chunk size the planner starts from.
pub const CHUNK: u64 = 16 << 20;
/// The most chunks of one multipart upload (S3's limit).
pub const MAX_CHUNKS: u64 = 10_000;

/// The upload chunks of `len` bytes cut in `chunk`-sized pieces: the byte
/// ranges (relative to the part), where a last piece shorter than
/// [`MIN_CHUNK`] is joined to the one before it, so that every chunk of a
/// part but the shard's very last is at least [`MIN_CHUNK`] when the part is.
pub fn upload_chunks(len: u64, chunk: u64) -> Vec<std::ops::Range<u64>> {
    let chunk = chunk.max(1);
    let mut n = len.div_ceil(chunk).max(1);
    if n > 1 && len - (n - 1) * chunk < MIN_CHUNK {
        n -= 1;
    }
    (0..n)
        .map(|i| {
            let start = i * chunk;
            let end = if i + 1 == n { len } else { start + chunk };
            start..end
        })
        .collect()
}

/// Where one part of a file written in parts (a work unit's part) goes: bytes `offset .. offset + len` of a file of
/// `shard_size` bytes; on an object store as upload chunks of `chunk` bytes
/// numbered from `first_chunk`, into the multipart upload `upload`.
#[derive(Debug, Clone, PartialEq)]
pub struct PartSpec {
    pub offset: u64,
    pub len: u64,
    pub shard_size: u64,
    pub chunk: u64,
    pub first_chunk: u32,
    pub upload: Option<String>,
}

/// Reads and writes objects by location. Implementations are cheap to share
/// between threads; every call is independent.
pub trait Storage: Send + Sync {
    /// Size in bytes of the object.
    fn size(&self, location: &str) -> Result<u64, StorageError>;

    /// Whether the object exists.
    fn exists(&self, location: &str) -> Result<bool, StorageError>;

    /// Fills `buf` with the bytes starting at `offset`.
    fn read_into(&self, location: &str, offset: u64, buf: &mut [u8]) -> Result<(), StorageError>;

    /// The bytes in `range`.
    fn read_range(&self, location: &str, range: Range<u64>) -> Result<Vec<u8>, StorageError> {
        let len = usize::try_from(range.end.saturating_sub(range.start))
            .map_err(|e| StorageError::io(location, e))?;
        let mut buf = vec![0u8; len];
        self.read_into(location, range.start, &mut buf)?;
        Ok(buf)
    }

    /// [`Self::read_range`], telling `arrived` the bytes as they arrive (on
    /// this thread): in pieces where the store fetches a large range in
    /// parts, or all at the end. Workers report reads in heartbeats, which
    /// is how the coordinator tells a slow node (see the lease table).
    /// `arrived` answers whether to go on: `false` stops the read, its
    /// requests dropped, with [`StorageError::Cancelled`]; a store that
    /// streams also calls it with 0 while it waits, so that a read can stop
    /// before its first byte.
    fn read_range_reporting(
        &self,
        location: &str,
        range: Range<u64>,
        arrived: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<u8>, StorageError> {
        if !arrived(0) {
            return Err(StorageError::Cancelled {
                location: location.to_string(),
            });
        }
        let bytes = self.read_range(location, range)?;
        arrived(bytes.len() as u64);
        Ok(bytes)
    }

    /// The whole object (for small files: configs, tokenizers, journals).
    fn read_all(&self, location: &str) -> Result<Vec<u8>, StorageError>;

    /// Writes a whole object so that readers see either nothing or all of it.
    fn put(&self, location: &str, bytes: &[u8]) -> Result<(), StorageError>;

    /// Starts a streamed object; nothing is visible under `location` until
    /// [`ObjectWriter::commit`] returns.
    fn create(&self, location: &str) -> Result<Box<dyn ObjectWriter>, StorageError>;

    /// Deletes the object; deleting a missing object is not an error.
    fn delete(&self, location: &str) -> Result<(), StorageError>;

    /// Names (relative to `prefix`) of the objects under a directory-like prefix.
    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError>;

    /// Writes `bytes` at `location` only if no object is there (`expect` is
    /// `None`) or only if it is still at version `expect`; returns the new
    /// version. [`StorageError::Conflict`] when the condition does not hold.
    /// Object stores only (local folders lock with `flock`).
    fn put_conditional(
        &self,
        location: &str,
        _bytes: &[u8],
        _expect: Option<&str>,
    ) -> Result<String, StorageError> {
        Err(StorageError::io(
            location,
            "conditional writes are not supported here",
        ))
    }

    /// An object's bytes with its version (for [`Storage::put_conditional`]).
    fn read_versioned(&self, location: &str) -> Result<Versioned, StorageError> {
        Err(StorageError::io(
            location,
            "versioned reads are not supported here",
        ))
    }

    /// Prepares `location` to be written in parts by several writers (a
    /// shard written by several work units) and returns what they need: the
    /// multipart upload's id on an object store; `None` on a local disk,
    /// where a hidden file of `size` bytes beside `location` takes the parts
    /// (an existing one is kept, with the parts already in it).
    fn parts_begin(&self, location: &str, _size: u64) -> Result<Option<String>, StorageError> {
        Err(StorageError::io(
            location,
            "this storage cannot take a file written in parts",
        ))
    }

    /// A writer of one part of `location` (prepared by [`Storage::parts_begin`]):
    /// bytes go in order from the part's offset; committing returns the ids of
    /// its upload chunks (object stores; none on a local disk).
    fn parts_writer(
        &self,
        location: &str,
        _part: &PartSpec,
    ) -> Result<Box<dyn ObjectWriter>, StorageError> {
        Err(StorageError::io(
            location,
            "this storage cannot take a file written in parts",
        ))
    }

    /// Makes the parts' file appear at `location` (every chunk id, in order).
    fn parts_finish(
        &self,
        location: &str,
        _upload: Option<&str>,
        _chunks: Vec<String>,
    ) -> Result<(), StorageError> {
        Err(StorageError::io(
            location,
            "this storage cannot take a file written in parts",
        ))
    }

    /// Discards an unfinished parts' file (nothing to discard is not an error).
    fn parts_abort(&self, _location: &str, _upload: Option<&str>) -> Result<(), StorageError> {
        Ok(())
    }

    /// Where an unfinished parts' file can be read before it is finished
    /// (local disks), or `None` (object stores: not before it is finished).
    fn parts_readable(&self, _location: &str) -> Option<String> {
        None
    }

    /// Joins a relative name onto a location (`dir` + `/` + `name`).
    fn join(&self, dir: &str, name: &str) -> String {
        format!("{}/{}", dir.trim_end_matches('/'), name)
    }
}

/// A streamed write of one object: bytes are appended in order, and the object
/// appears atomically on commit. Dropping it without committing discards it.
pub trait ObjectWriter: Send {
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), StorageError>;
    fn commit(self: Box<Self>) -> Result<(), StorageError>;
    /// [`ObjectWriter::commit`], returning the upload chunks' ids of a part
    /// writer ([`Storage::parts_writer`]); none for a whole object.
    fn commit_chunks(self: Box<Self>) -> Result<Vec<String>, StorageError> {
        self.commit().map(|()| Vec::new())
    }
}

/// The storage for a location string: a local path (or `file://` URL), an
/// object-store URL (`s3://`, `gs://`, `az://`, `http(s)://`), or a Hugging
/// Face Hub location (`hf://repo@commit/file`, see [`crate::storage::hub`]).
pub fn for_location(location: &str) -> Arc<dyn Storage> {
    if crate::storage::hub::is_hub_location(location) {
        return Arc::new(crate::storage::hub::HubStorage);
    }
    if !is_object_url(location) {
        return Arc::new(LocalStorage);
    }
    match object::for_url(location) {
        Ok(s) => s,
        Err(e) => Arc::new(Unavailable(e.to_string())),
    }
}

/// Whether `location` is an object-store URL rather than a local path.
pub fn is_url(location: &str) -> bool {
    is_object_url(location) || crate::storage::hub::is_hub_location(location)
}

/// Whether `location` is an object-store URL (S3, GCS, Azure, HTTP).
fn is_object_url(location: &str) -> bool {
    [
        "s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://", "http://", "https://",
    ]
    .iter()
    .any(|p| location.starts_with(p))
}

/// The local file to memory-map for `location`: itself when it is a local
/// path, the cached file of a Hugging Face Hub location the cache holds,
/// `None` when its bytes are remote.
pub fn local_file(location: &str) -> Option<String> {
    if !is_url(location) {
        return Some(location.to_string());
    }
    crate::storage::hub::local_file(location)
}

/// Bytes a streamed write (`create`) to `location` buffers at most: for an
/// object store the parts in flight and the one filling, for a local file its
/// direct-I/O blocks.
pub fn write_buffer_bytes(location: &str) -> u64 {
    if is_url(location) {
        (object::concurrency() as u64 + 1) * object::PART as u64
    } else {
        local::WRITE_BUFFER_BYTES
    }
}

/// A store whose client could not be built (bad URL, bad credentials config):
/// every call reports why.
struct Unavailable(String);

impl Unavailable {
    fn err<T>(&self, location: &str) -> Result<T, StorageError> {
        Err(StorageError::Denied {
            location: location.to_string(),
            message: self.0.clone(),
        })
    }
}

impl Storage for Unavailable {
    fn size(&self, location: &str) -> Result<u64, StorageError> {
        self.err(location)
    }
    fn exists(&self, location: &str) -> Result<bool, StorageError> {
        self.err(location)
    }
    fn read_into(&self, location: &str, _: u64, _: &mut [u8]) -> Result<(), StorageError> {
        self.err(location)
    }
    fn read_all(&self, location: &str) -> Result<Vec<u8>, StorageError> {
        self.err(location)
    }
    fn put(&self, location: &str, _: &[u8]) -> Result<(), StorageError> {
        self.err(location)
    }
    fn create(&self, location: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        self.err(location)
    }
    fn delete(&self, location: &str) -> Result<(), StorageError> {
        self.err(location)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        self.err(prefix)
    }
}
