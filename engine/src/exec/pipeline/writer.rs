//! The write stage: on a thread of its own, writes the shard (the header, then
//! every filled output buffer in order), hashing it and scanning it for
//! non-finite values as it goes, and gives each buffer back for reuse.
//!
//! The compute stage holds the other end, [`OutputBuffers`]: two buffers that
//! go to the writer over the `filled` channel and come back over `free`.

use crate::exec::finite::FiniteScan;
use crate::exec::{guard, ExecError, Progress};
use crate::output::ShardLayout;
use crate::storage::{ObjectWriter, StorageError};
use crate::unit::NonFinite;
use sha2::{Digest, Sha256};
use std::sync::{mpsc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};

/// A filled buffer on its way to the writer: the buffer and how much of it is
/// output.
type Filled = (Vec<u8>, usize);

/// What the write stage wrote: the shard's writer (to commit), its hash, its
/// size, and the tensors with non-finite values.
pub(super) struct Written {
    pub(super) writer: Box<dyn ObjectWriter>,
    pub(super) hasher: Sha256,
    pub(super) size: u64,
    pub(super) non_finite: Vec<NonFinite>,
}

/// Starts the write stage on `scope`: `writer` receives the shard of
/// `layout` (writes are reported to `progress`). Returns the compute stage's
/// end, and the stage's thread, which ends once the [`OutputBuffers`] are
/// dropped.
pub(super) fn spawn<'scope, 'env>(
    scope: &'scope Scope<'scope, 'env>,
    writer: Box<dyn ObjectWriter>,
    layout: &'env ShardLayout,
    progress: &'env dyn Progress,
    location: &'env str,
) -> (
    OutputBuffers<'env>,
    ScopedJoinHandle<'scope, Result<Written, ExecError>>,
) {
    let (filled_tx, filled_rx) = mpsc::sync_channel::<Filled>(1);
    let (free_tx, free_rx) = mpsc::sync_channel::<Vec<u8>>(2);
    let writing = scope.spawn(move || {
        guard::catch(move || -> Result<_, ExecError> {
            let mut writer = writer;
            let mut hasher = Sha256::new();
            let mut scan = FiniteScan::new(layout);
            let header = &layout.header;
            writer.write_all(header)?;
            hasher.update(header);
            let mut size = header.len() as u64;
            for (buf, len) in filled_rx {
                writer.write_all(&buf[..len])?;
                hasher.update(&buf[..len]);
                scan.update(&buf[..len]);
                size += len as u64;
                progress.written(len as u64);
                let _ = free_tx.send(buf);
            }
            Ok(Written {
                writer,
                hasher,
                size,
                non_finite: scan.finish(),
            })
        })
    });
    let buffers = OutputBuffers {
        filled: filled_tx,
        pool: Mutex::new(Pool {
            spare: vec![Vec::new(), Vec::new()],
            free: free_rx,
        }),
        location,
    };
    (buffers, writing)
}

/// The compute stage's end of the write stage: free output buffers to fill,
/// and the channel that takes filled ones to the writer.
pub(super) struct OutputBuffers<'a> {
    filled: mpsc::SyncSender<Filled>,
    pool: Mutex<Pool>,
    /// The shard (names errors).
    location: &'a str,
}

/// The free output buffers: spare ones, and those the writer gives back.
struct Pool {
    spare: Vec<Vec<u8>>,
    free: mpsc::Receiver<Vec<u8>>,
}

impl OutputBuffers<'_> {
    /// The shard being written.
    pub(super) fn location(&self) -> &str {
        self.location
    }

    /// A free buffer of at least `len` bytes, waiting for the writer to
    /// return one if need be.
    pub(super) fn take(&self, len: usize) -> Result<Vec<u8>, StorageError> {
        let mut p = self
            .pool
            .lock()
            .map_err(|_| StorageError::io(self.location, "output buffers lost"))?;
        let mut buf = match p.spare.pop() {
            Some(b) => b,
            None => p
                .free
                .recv()
                .map_err(|_| StorageError::io(self.location, "output writer stopped"))?,
        };
        drop(p);
        if buf.len() < len {
            buf.resize(len, 0);
        }
        Ok(buf)
    }

    /// Gives back a buffer that was not sent.
    pub(super) fn put(&self, buf: Vec<u8>) {
        if let Ok(mut p) = self.pool.lock() {
            p.spare.push(buf);
        }
    }

    /// Sends the first `len` bytes of `buf` to the writer.
    pub(super) fn send(&self, buf: Vec<u8>, len: usize) -> Result<(), StorageError> {
        self.filled
            .send((buf, len))
            .map_err(|_| StorageError::io(self.location, "output writer stopped"))
    }

    /// Sends a copy of `bytes` to the writer (a streamed tensor's segments).
    pub(super) fn emit(&self, bytes: &[u8]) -> Result<(), StorageError> {
        let mut buf = self.take(bytes.len())?;
        buf[..bytes.len()].copy_from_slice(bytes);
        self.send(buf, bytes.len())
    }
}
