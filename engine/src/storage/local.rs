//! Local files: positioned reads (`pread`) or memory maps, writes to a temporary
//! sibling that is renamed into place on commit. Large files (output shards) are
//! written with `O_DIRECT` where the filesystem allows it, from aligned blocks
//! that an I/O thread writes while the caller fills the next: on this project's
//! machine a buffered write costs 0.7-2.2 s of CPU per GB in the kernel (fresh
//! page-cache pages), a direct one 0.05 s.

use super::{ObjectWriter, Storage, StorageError};
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::ops::Range;
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

/// A FIFO, socket, device or directory where a file is expected: reading it
/// could block forever or read without end, so it is refused (for good: another
/// attempt will not help).
fn not_regular(location: &str) -> StorageError {
    StorageError::Denied {
        location: location.to_string(),
        message: "not a regular file (a FIFO, socket, device or directory); only regular files \
                  are read"
            .into(),
    }
}

/// Opens a local file for reading if it is a regular file: checked before the
/// open, opened with `O_NONBLOCK` (so that a FIFO or device put there in the
/// meantime cannot block the open; it does not change reads of a regular file)
/// and `O_NOCTTY`, and checked again on the open descriptor.
pub(crate) fn open_regular(location: &str) -> Result<File, StorageError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = path_of(location);
    let meta = fs::metadata(path).map_err(|e| map_err(location, e))?;
    if !meta.is_file() {
        return Err(not_regular(location));
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| map_err(location, e))?;
    let meta = file.metadata().map_err(|e| map_err(location, e))?;
    if !meta.is_file() {
        return Err(not_regular(location));
    }
    Ok(file)
}

impl Storage for LocalStorage {
    fn size(&self, location: &str) -> Result<u64, StorageError> {
        let meta = fs::metadata(path_of(location)).map_err(|e| map_err(location, e))?;
        if !meta.is_file() {
            return Err(not_regular(location));
        }
        Ok(meta.len())
    }

    fn exists(&self, location: &str) -> Result<bool, StorageError> {
        Ok(path_of(location).exists())
    }

    fn read_into(&self, location: &str, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        let file = open_regular(location)?;
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
        use std::io::Read;
        let mut bytes = Vec::new();
        open_regular(location)?
            .read_to_end(&mut bytes)
            .map_err(|e| map_err(location, e))?;
        Ok(bytes)
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
            sink: Some(Sink::Pending(file, Vec::new())),
            committed: false,
        }))
    }

    fn parts_begin(&self, location: &str, size: u64) -> Result<Option<String>, StorageError> {
        let temp = parts_file(location)?;
        if let Some(parent) = temp.parent() {
            if !parent.as_os_str().is_empty() {
                fs::create_dir_all(parent).map_err(|e| map_err(location, e))?;
            }
        }
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&temp)
            .map_err(|e| map_err(location, e))?;
        // Only ever grown: parts already written (by an earlier run, or a
        // writer that opened it first) stay.
        let len = file.metadata().map_err(|e| map_err(location, e))?.len();
        if len != size {
            if len > size {
                file.set_len(0).map_err(|e| map_err(location, e))?;
            }
            file.set_len(size).map_err(|e| map_err(location, e))?;
        }
        Ok(None)
    }

    fn parts_writer(
        &self,
        location: &str,
        part: &super::PartSpec,
    ) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let temp = parts_file(location)?;
        // Never created here: a target that is gone was finished (or given
        // up) by the coordinator, and must not come back as a stray file.
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&temp)
            .map_err(|e| map_err(&temp.to_string_lossy(), e))?;
        let len = file.metadata().map_err(|e| map_err(location, e))?.len();
        if len != part.shard_size {
            return Err(StorageError::io(
                &temp.to_string_lossy(),
                format!(
                    "holds {len} bytes, the shard has {}: not this merge's parts",
                    part.shard_size
                ),
            ));
        }
        Ok(Box::new(PartWriter {
            location: temp.to_string_lossy().into_owned(),
            file,
            at: part.offset,
            end: part.offset.saturating_add(part.len),
        }))
    }

    fn parts_finish(
        &self,
        location: &str,
        _upload: Option<&str>,
        _chunks: Vec<String>,
    ) -> Result<(), StorageError> {
        let temp = parts_file(location)?;
        File::open(&temp)
            .and_then(|f| f.sync_all())
            .map_err(|e| map_err(&temp.to_string_lossy(), e))?;
        fs::rename(&temp, path_of(location)).map_err(|e| map_err(location, e))?;
        sync_parent(path_of(location));
        Ok(())
    }

    fn parts_abort(&self, location: &str, _upload: Option<&str>) -> Result<(), StorageError> {
        let temp = parts_file(location)?;
        match fs::remove_file(&temp) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(map_err(&temp.to_string_lossy(), e)),
        }
    }

    fn parts_readable(&self, location: &str) -> Option<String> {
        parts_file(location)
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
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

/// A read-only memory map of a local input file, for reading tensors without a
/// copy. Pages are mapped on demand from the page cache; callers release the
/// ranges they are done with ([`Mapped::release`]) so that resident memory stays
/// bounded by the tensors in flight.
///
/// A file truncated while it is mapped would fault on access (SIGBUS), as in
/// every mmap-based loader (safetensors, PyTorch); inputs must not be rewritten
/// during a merge. The size is checked against every range before use.
pub struct Mapped {
    location: String,
    map: Option<memmap2::Mmap>,
}

impl Mapped {
    /// Maps `location`, which must be a regular file (see [`open_regular`]).
    pub fn open(location: &str) -> Result<Self, StorageError> {
        let file = open_regular(location)?;
        let len = file.metadata().map_err(|e| map_err(location, e))?.len();
        // An empty file cannot be mapped; every range of it is out of range anyway.
        let map = if len == 0 {
            None
        } else {
            // SAFETY: a read-only private mapping; the file is not modified by us,
            // and ranges are checked against its size before they are read.
            Some(
                unsafe { memmap2::MmapOptions::new().map(&file) }
                    .map_err(|e| map_err(location, e))?,
            )
        };
        Ok(Mapped {
            location: location.to_string(),
            map,
        })
    }

    pub fn len(&self) -> u64 {
        self.map.as_ref().map_or(0, |m| m.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of `range`, or why not.
    pub fn bytes(&self, range: Range<u64>) -> Result<&[u8], StorageError> {
        let size = self.len();
        if range.start > range.end || range.end > size {
            return Err(StorageError::OutOfRange {
                location: self.location.clone(),
                start: range.start,
                end: range.end,
                size,
            });
        }
        match &self.map {
            Some(m) => Ok(&m[range.start as usize..range.end as usize]),
            None => Ok(&[]),
        }
    }

    /// Maps `range` now (reading it from disk if it is not cached), so that the
    /// compute that follows does not stop on page faults.
    pub fn prefetch(&self, range: Range<u64>) {
        let Some((m, start, len)) = self.pages(range) else {
            return;
        };
        #[cfg(target_os = "linux")]
        if m.advise_range(memmap2::Advice::PopulateRead, start, len)
            .is_ok()
        {
            return;
        }
        let _ = m.advise_range(memmap2::Advice::WillNeed, start, len);
    }

    /// Unmaps the pages of `range` from this process (they stay in the page
    /// cache; reading them again maps them again).
    pub fn release(&self, range: Range<u64>) {
        let Some((m, start, len)) = self.pages(range) else {
            return;
        };
        // SAFETY: the mapping is a read-only view of a file: dropping its pages
        // only means that a later access reads them from the file again.
        let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
    }

    /// `range` widened to whole pages and clamped to the map.
    fn pages(&self, range: Range<u64>) -> Option<(&memmap2::Mmap, usize, usize)> {
        const PAGE: u64 = 4096;
        let m = self.map.as_ref()?;
        let end = range.end.min(m.len() as u64);
        let start = range.start / PAGE * PAGE;
        let end = end.div_ceil(PAGE) * PAGE;
        let end = end.min(m.len() as u64);
        (start < end).then_some((m, start as usize, (end - start) as usize))
    }
}

fn unique_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// The hidden file beside `location` that its parts are written into:
/// `.NAME.fleetmerge-parts`.
pub fn parts_file(location: &str) -> Result<PathBuf, StorageError> {
    let target = path_of(location);
    let name = target
        .file_name()
        .ok_or_else(|| StorageError::io(location, "location has no file name"))?
        .to_string_lossy();
    Ok(target.with_file_name(format!(".{name}.fleetmerge-parts")))
}

/// Fsyncs the directory holding `path` (a rename in it is then durable);
/// best effort.
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// One part written at its offset into the parts' file.
struct PartWriter {
    location: String,
    file: File,
    at: u64,
    end: u64,
}

impl ObjectWriter for PartWriter {
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        let n = bytes.len() as u64;
        if self.at.saturating_add(n) > self.end {
            return Err(StorageError::io(
                &self.location,
                format!("a part write past its end (byte {})", self.end),
            ));
        }
        self.file
            .write_all_at(bytes, self.at)
            .map_err(|e| map_err(&self.location, e))?;
        self.at += n;
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<(), StorageError> {
        if self.at != self.end {
            return Err(StorageError::io(
                &self.location,
                format!("a part ended at byte {} of {}", self.at, self.end),
            ));
        }
        self.file
            .sync_data()
            .map_err(|e| map_err(&self.location, e))
    }
}

struct LocalWriter {
    location: String,
    target: PathBuf,
    temp: PathBuf,
    sink: Option<Sink>,
    /// Renamed into place: the temporary file is gone. Until then, dropping
    /// the writer (on any error path, a failed commit included) removes it.
    committed: bool,
}

/// Size of a direct-I/O block; a file smaller than this is written plainly.
const BLOCK: usize = 8 << 20;
/// Alignment of direct-I/O buffers, offsets and lengths.
const ALIGN: usize = 4096;
/// Memory of a large file's writer: three direct-I/O blocks in rotation.
pub(super) const WRITE_BUFFER_BYTES: u64 = 3 * (BLOCK + ALIGN) as u64;

enum Sink {
    /// Under one block so far: held in memory.
    Pending(File, Vec<u8>),
    Buffered(std::io::BufWriter<File>),
    Direct(DirectWriter),
}

/// A buffer with a `BLOCK`-long, `ALIGN`-aligned window.
fn aligned_block() -> Vec<u8> {
    vec![0u8; BLOCK + ALIGN]
}

fn window(buf: &mut [u8]) -> &mut [u8] {
    let off = buf.as_ptr().align_offset(ALIGN);
    &mut buf[off..off + BLOCK]
}

/// Writes whole aligned blocks through an `O_DIRECT` descriptor on an I/O
/// thread, three blocks in rotation.
struct DirectWriter {
    block: Vec<u8>,
    filled: usize,
    total: u64,
    spare: Vec<Vec<u8>>,
    to_io: Option<std::sync::mpsc::SyncSender<(Vec<u8>, usize)>>,
    free: std::sync::mpsc::Receiver<Vec<u8>>,
    io: Option<std::thread::JoinHandle<std::io::Result<File>>>,
}

impl DirectWriter {
    /// Opens `temp` for direct I/O and writes `first` (one full block) through
    /// it; `None` when the filesystem does not take direct I/O.
    #[cfg(target_os = "linux")]
    fn start(temp: &Path, first: &[u8]) -> Option<DirectWriter> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(temp)
            .ok()?;
        let mut block = aligned_block();
        window(&mut block).copy_from_slice(first);
        file.write_all(window(&mut block)).ok()?;
        let (to_io, jobs) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(1);
        let (give_back, free) = std::sync::mpsc::channel();
        let io = std::thread::Builder::new()
            .name("direct-write".into())
            .spawn(move || {
                for (mut buf, len) in jobs {
                    file.write_all(&window(&mut buf)[..len])?;
                    let _ = give_back.send(buf);
                }
                Ok(file)
            })
            .ok()?;
        Some(DirectWriter {
            block,
            filled: 0,
            total: BLOCK as u64,
            spare: vec![aligned_block()],
            to_io: Some(to_io),
            free,
            io: Some(io),
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn start(_temp: &Path, _first: &[u8]) -> Option<DirectWriter> {
        None
    }

    /// The I/O thread's error, once it has stopped.
    fn io_error(&mut self) -> std::io::Error {
        match self.io.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => e,
            _ => std::io::Error::other("the direct-write thread stopped"),
        }
    }

    fn send(&mut self, len: usize) -> std::io::Result<()> {
        let next = match self.spare.pop() {
            Some(b) => b,
            None => match self.free.recv() {
                Ok(b) => b,
                Err(_) => return Err(self.io_error()),
            },
        };
        let full = std::mem::replace(&mut self.block, next);
        let sent = self.to_io.as_ref().map(|tx| tx.send((full, len)));
        if !matches!(sent, Some(Ok(()))) {
            return Err(self.io_error());
        }
        self.filled = 0;
        Ok(())
    }

    fn write_all(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let n = (BLOCK - self.filled).min(bytes.len());
            let filled = self.filled;
            window(&mut self.block)[filled..filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            self.total += n as u64;
            bytes = &bytes[n..];
            if self.filled == BLOCK {
                self.send(BLOCK)?;
            }
        }
        Ok(())
    }

    /// Writes the last block (padded to the alignment, then cut back to size).
    fn finish(mut self) -> std::io::Result<File> {
        if self.filled > 0 {
            let (filled, padded) = (self.filled, self.filled.next_multiple_of(ALIGN));
            window(&mut self.block)[filled..padded].fill(0);
            self.send(padded)?;
        }
        drop(self.to_io.take());
        let file = match self.io.take().map(|h| h.join()) {
            Some(Ok(r)) => r?,
            _ => return Err(std::io::Error::other("the direct-write thread died")),
        };
        file.set_len(self.total)?;
        Ok(file)
    }
}

impl LocalWriter {
    fn sink(&mut self) -> Result<&mut Sink, StorageError> {
        self.sink
            .as_mut()
            .ok_or_else(|| StorageError::io(&self.location, "write after commit"))
    }
}

impl ObjectWriter for LocalWriter {
    fn write_all(&mut self, mut bytes: &[u8]) -> Result<(), StorageError> {
        let location = self.location.clone();
        let err = |e| map_err(&location, e);
        while !bytes.is_empty() {
            match self.sink()? {
                Sink::Buffered(w) => return w.write_all(bytes).map_err(err),
                Sink::Direct(d) => return d.write_all(bytes).map_err(err),
                Sink::Pending(_, pending) => {
                    let n = (BLOCK - pending.len()).min(bytes.len());
                    pending.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if pending.len() < BLOCK {
                        continue;
                    }
                }
            }
            // A full block: go direct if the filesystem allows, else buffered.
            let Some(Sink::Pending(file, pending)) = self.sink.take() else {
                unreachable!("only a pending sink gets here");
            };
            self.sink = Some(match DirectWriter::start(&self.temp, &pending) {
                Some(d) => Sink::Direct(d),
                None => {
                    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
                    w.write_all(&pending).map_err(err)?;
                    Sink::Buffered(w)
                }
            });
        }
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<(), StorageError> {
        let location = self.location.clone();
        let err = |e| map_err(&location, e);
        let file = match self
            .sink
            .take()
            .ok_or_else(|| StorageError::io(&self.location, "committed twice"))?
        {
            Sink::Pending(mut file, pending) => {
                file.write_all(&pending).map_err(err)?;
                file
            }
            Sink::Buffered(w) => w.into_inner().map_err(|e| err(e.into_error()))?,
            Sink::Direct(d) => d.finish().map_err(err)?,
        };
        file.sync_all().map_err(err)?;
        drop(file);
        fs::rename(&self.temp, &self.target).map_err(err)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        // Close the file (and stop a direct-write thread) before removing it.
        drop(self.sink.take());
        if !self.committed {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_files_round_trip_through_direct_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage;
        // Around the block size and the alignment, written in odd pieces.
        for size in [
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            2 * BLOCK + ALIGN + 13,
            3 * BLOCK,
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 131 % 251) as u8).collect();
            let loc = dir.path().join(format!("{size}.bin"));
            let loc = loc.to_string_lossy().into_owned();
            let mut w = s.create(&loc).unwrap();
            for piece in data.chunks(1_000_003) {
                w.write_all(piece).unwrap();
            }
            assert!(!s.exists(&loc).unwrap());
            w.commit().unwrap();
            assert_eq!(s.size(&loc).unwrap(), size as u64);
            assert!(s.read_all(&loc).unwrap() == data, "{size} bytes differ");
        }
        // Abandoned mid-way through a direct write: nothing left behind.
        let loc = dir.path().join("gone.bin").to_string_lossy().into_owned();
        let mut w = s.create(&loc).unwrap();
        w.write_all(&vec![7u8; 2 * BLOCK + 5]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 5);
    }

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

    /// A FIFO (or device) where a file is expected is refused at once: opening
    /// or reading it would wait for a writer for ever.
    #[test]
    fn fifos_are_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let loc = fifo.to_string_lossy().into_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let s = LocalStorage;
            let results = [
                Mapped::open(&loc).map(|_| ()),
                s.read_all(&loc).map(|_| ()),
                s.read_range(&loc, 0..8).map(|_| ()),
                s.size(&loc).map(|_| ()),
            ];
            let _ = tx.send(results);
        });
        let results = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("reading a FIFO must not block");
        for r in results {
            match r {
                Err(StorageError::Denied { message, .. }) => {
                    assert!(message.contains("not a regular file"), "{message}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_failed_commit_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage;
        // The target is a non-empty folder: the final rename fails.
        let target = dir.path().join("t.bin");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"x").unwrap();
        for len in [10, BLOCK + 10] {
            let mut w = s.create(&target.to_string_lossy()).unwrap();
            w.write_all(&vec![7u8; len]).unwrap();
            assert!(w.commit().is_err());
            let left: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(left, vec![std::ffi::OsString::from("t.bin")], "{len} bytes");
        }
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
