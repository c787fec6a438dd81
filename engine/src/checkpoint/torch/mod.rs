//! PyTorch checkpoints (`pytorch_model.bin`, what `torch.save` writes since
//! torch 1.6): a zip archive (`zip`) of a pickle, `ARCHIVE/data.pkl`, that
//! describes the state dict, and one stored entry per storage,
//! `ARCHIVE/data/KEY`, holding its raw little-endian bytes.
//!
//! The pickle is read by a restricted unpickler (`pickle`) that runs nothing;
//! each tensor is a view of a storage, and a contiguous view is a byte range of
//! the file, which the rest of fleetmerge reads as it reads a safetensors
//! tensor. [`read_torch`] lists a file's tensors as [`TensorInfo`] entries
//! (dtype, shape, absolute offset and length), like a safetensors header.
//!
//! Reads, by range: the file size, its last 64 KiB (the end record and, for
//! ordinary checkpoints, the central directory), then one batch of ranges
//! (data.pkl, byteorder and each storage's local header, neighbours within
//! [`GAP`] fetched as one range, the batches in parallel).
//!
//! Refused, with an error naming the file: any pickle global outside the
//! allow-list (see `pickle`), a compressed or encrypted entry, a non-contiguous
//! view (a transposed or strided tensor), a big-endian archive, and the legacy
//! pre-1.6 format (a bare pickle, no zip).

mod pickle;
mod zip;

#[cfg(test)]
pub(super) mod tests;

use super::safetensors::TensorInfo;
use super::CheckpointError;
use crate::storage::Storage;
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use zip::Entry;

/// Largest `data.pkl` accepted (a state dict takes about 150 bytes per tensor).
pub const MAX_PICKLE_LEN: u64 = 64 << 20;
/// Unneeded bytes a batched read may carry between two needed ranges.
const GAP: u64 = 64 << 10;
/// Longest batched read.
const MAX_SPAN: u64 = 8 << 20;
/// Longest local header (30 bytes, a name and an extra field of at most 64 KiB each).
const MAX_LOCAL_HEADER: u64 = zip::LOCAL_LEN + 2 * 0xffff;
/// How torch's legacy format (before 1.6) begins: protocol 2 and its magic number.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19";

/// Lists every tensor of the torch zip checkpoint at `location`, sorted by
/// offset, as a safetensors header lists its own. Tensors that share a
/// storage (tied weights) may share bytes.
pub fn read_torch(
    storage: &dyn Storage,
    location: &str,
) -> Result<Vec<(String, TensorInfo)>, CheckpointError> {
    read(storage, location, None)
}

/// Like [`read_torch`], but lists only the tensors whose storage holds one of
/// `offsets`, and reads only those storages' local headers: enough to check
/// the byte ranges a work unit reads.
pub fn read_torch_at(
    storage: &dyn Storage,
    location: &str,
    offsets: &[u64],
) -> Result<Vec<(String, TensorInfo)>, CheckpointError> {
    read(storage, location, Some(offsets))
}

fn zip_err(location: &str, message: impl Into<String>) -> CheckpointError {
    CheckpointError::TorchZip {
        location: location.to_string(),
        message: message.into(),
    }
}

fn read(
    storage: &dyn Storage,
    location: &str,
    only: Option<&[u64]>,
) -> Result<Vec<(String, TensorInfo)>, CheckpointError> {
    let size = storage.size(location)?;
    let tail_start = size.saturating_sub(zip::TAIL_READ);
    let tail = storage.read_range(location, tail_start..size)?;
    let Some(dir) = zip::find_directory(location, &tail, tail_start, size)? else {
        return Err(not_zip(storage, location, &tail, tail_start)?);
    };
    // find_directory checked that the directory lies within the file.
    let read_directory;
    let directory = match dir.offset.checked_sub(tail_start) {
        Some(at) => usize::try_from(at)
            .ok()
            .and_then(|at| tail.get(at..at.checked_add(usize::try_from(dir.len).ok()?)?))
            .ok_or_else(|| zip_err(location, "the central directory lies past the end"))?,
        None => {
            read_directory = storage.read_range(location, dir.offset..dir.offset + dir.len)?;
            &read_directory[..]
        }
    };
    let entries = zip::parse_directory(location, dir, directory)?;
    let entries = entries.as_slice();
    let archive = Archive::new(location, entries)?;

    // Which storages' local headers to read.
    let wanted: Vec<&Entry> = match only {
        None => archive.storages.values().copied().collect(),
        Some(offsets) => {
            // The entry whose bytes hold the offset; an empty one's data
            // begins at its end, where the next entry's header starts.
            let mut set: Vec<&Entry> = offsets
                .iter()
                .flat_map(|&o| {
                    let i = entries.partition_point(|e| e.header_offset <= o);
                    [i.checked_sub(1), i.checked_sub(2)]
                        .into_iter()
                        .flatten()
                        .filter_map(move |i| entries.get(i).filter(|e| o <= e.end))
                })
                .filter(|e| archive.storages.contains_key(e.name.as_str()))
                .collect();
            set.sort_by_key(|e| e.header_offset);
            set.dedup_by_key(|e| e.header_offset);
            set
        }
    };

    let whole = |e: &Entry| {
        let end = e.end.min(
            e.header_offset
                .saturating_add(MAX_LOCAL_HEADER)
                .saturating_add(e.size),
        );
        e.header_offset..end
    };
    let mut ranges = vec![whole(archive.pickle)];
    ranges.extend(archive.byteorder.map(whole));
    ranges.extend(wanted.iter().map(|e| {
        let name = e.name.len() as u64;
        e.header_offset..e.end.min(e.header_offset + zip::LOCAL_LEN + name)
    }));
    let fetched = Fetched::read(storage, location, &ranges)?;

    let pickle = fetched.entry_data(location, archive.pickle)?;
    if let Some(b) = archive.byteorder {
        match fetched.entry_data(location, b)? {
            b"little" => {}
            b"big" => {
                return Err(zip_err(
                    location,
                    "a big-endian checkpoint (byteorder: big), which fleetmerge does not read",
                ))
            }
            other => {
                return Err(zip_err(
                    location,
                    format!("unknown byteorder {:?}", String::from_utf8_lossy(other)),
                ))
            }
        }
    }
    let mut data_start: HashMap<&str, u64> = HashMap::with_capacity(wanted.len());
    for e in &wanted {
        data_start.insert(e.name.as_str(), fetched.data_offset(location, e)?);
    }

    let items = pickle::load(pickle).map_err(|e| match e {
        pickle::PickleError::Unsafe(global) => CheckpointError::UnsafePickle {
            location: location.to_string(),
            pickle: archive.pickle.name.clone(),
            global,
        },
        pickle::PickleError::Invalid(message) => CheckpointError::TorchPickle {
            location: location.to_string(),
            pickle: archive.pickle.name.clone(),
            message,
        },
    })?;

    let mut seen = HashSet::with_capacity(items.len());
    let mut out = Vec::with_capacity(items.len());
    for (name, item) in items {
        if !seen.insert(name.clone()) {
            return Err(CheckpointError::TorchPickle {
                location: location.to_string(),
                pickle: archive.pickle.name.clone(),
                message: format!("the state dict names {name} twice"),
            });
        }
        let view = match item {
            pickle::Item::Tensor(v) => v,
            pickle::Item::Other(kind) => {
                tracing::warn!(file = %location, entry = %name, "state dict entry is {kind}, not a tensor; ignoring it");
                continue;
            }
        };
        let entry_name = format!("{}data/{}", archive.prefix, view.storage.key);
        let Some(entry) = archive.storages.get(entry_name.as_str()) else {
            return Err(tensor_err(
                location,
                &name,
                format!(
                    "its storage {} has no entry {entry_name} in the archive",
                    view.storage.key
                ),
            ));
        };
        let Some(&start) = data_start.get(entry.name.as_str()) else {
            // Only with `only`: a storage the caller does not read.
            continue;
        };
        let (offset, len) = byte_range(location, &name, &view, entry)?;
        out.push((
            name,
            TensorInfo {
                dtype: view.dtype,
                shape: view.shape,
                // Both within the entry, which lies within the file.
                offset: start + offset,
                len,
            },
        ));
    }
    out.sort_by(|(an, a), (bn, b)| (a.offset, a.len, an).cmp(&(b.offset, b.len, bn)));
    Ok(out)
}

fn tensor_err(location: &str, tensor: &str, message: String) -> CheckpointError {
    CheckpointError::TorchTensor {
        location: location.to_string(),
        tensor: tensor.to_string(),
        message,
    }
}

/// A view's bytes within its storage's entry: (offset, length). The view must
/// be contiguous (row-major strides; a dimension of size 1 may have any
/// stride) and lie within the storage, which must fit in its entry.
fn byte_range(
    location: &str,
    name: &str,
    view: &pickle::TensorView,
    entry: &Entry,
) -> Result<(u64, u64), CheckpointError> {
    let err = |m: String| tensor_err(location, name, m);
    let overflow = || err(format!("shape {:?} is too large to address", view.shape));
    let storage_bytes = view
        .storage
        .numel
        .checked_mul(view.storage.dtype.size() as u64)
        .ok_or_else(overflow)?;
    if storage_bytes > entry.size {
        return Err(err(format!(
            "its storage {} holds {storage_bytes} bytes but its entry {} has {} (the file is \
             truncated?)",
            view.storage.key, entry.name, entry.size
        )));
    }
    let numel = view
        .shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .ok_or_else(overflow)?;
    let elem = view.dtype.size() as u64;
    let len = numel.checked_mul(elem).ok_or_else(overflow)?;
    if numel == 0 {
        return Ok((0, 0));
    }
    let mut expected = 1u64;
    for (&dim, &stride) in view.shape.iter().zip(&view.stride).rev() {
        if dim != 1 && stride != expected {
            return Err(err(format!(
                "a non-contiguous view (shape {:?}, strides {:?}), which fleetmerge does not \
                 read; save it with .contiguous(), or convert the checkpoint to safetensors",
                view.shape, view.stride
            )));
        }
        expected = expected.saturating_mul(dim);
    }
    let start = view.offset.checked_mul(elem).ok_or_else(overflow)?;
    if start.checked_add(len).is_none_or(|end| end > storage_bytes) {
        return Err(err(format!(
            "its {len} bytes at element {} run past the end of its storage {} ({storage_bytes} \
             bytes)",
            view.offset, view.storage.key
        )));
    }
    Ok((start, len))
}

/// The entries of the archive that matter, by role.
struct Archive<'a> {
    /// `ARCHIVE/`, the folder every entry is in.
    prefix: String,
    pickle: &'a Entry,
    byteorder: Option<&'a Entry>,
    /// `ARCHIVE/data/KEY` entries by name.
    storages: HashMap<&'a str, &'a Entry>,
}

impl<'a> Archive<'a> {
    fn new(location: &str, entries: &'a [Entry]) -> Result<Archive<'a>, CheckpointError> {
        let pickles: Vec<&Entry> = entries
            .iter()
            .filter(|e| e.name.ends_with("/data.pkl") && e.name.matches('/').count() == 1)
            .collect();
        let pickle = match pickles.as_slice() {
            [one] => *one,
            [] => {
                return Err(zip_err(
                    location,
                    "a zip archive without ARCHIVE/data.pkl, so not a torch.save checkpoint",
                ))
            }
            [a, b, ..] => {
                return Err(zip_err(
                    location,
                    format!(
                        "two pickles, {} and {}: which one is the checkpoint?",
                        a.name, b.name
                    ),
                ))
            }
        };
        if pickle.size > MAX_PICKLE_LEN {
            return Err(zip_err(
                location,
                format!(
                    "{} has {} bytes, beyond the limit of {MAX_PICKLE_LEN}",
                    pickle.name, pickle.size
                ),
            ));
        }
        let prefix = pickle.name[..pickle.name.len() - "data.pkl".len()].to_string();
        let byteorder = entries
            .iter()
            .find(|e| e.name.strip_prefix(&prefix) == Some("byteorder"));
        if byteorder.is_some_and(|b| b.size > 16) {
            return Err(zip_err(
                location,
                "its byteorder entry is not little or big",
            ));
        }
        let data = format!("{prefix}data/");
        let storages = entries
            .iter()
            .filter(|e| {
                e.name
                    .strip_prefix(&data)
                    .is_some_and(|k| !k.is_empty() && !k.contains('/'))
            })
            .map(|e| (e.name.as_str(), e))
            .collect();
        Ok(Archive {
            prefix,
            pickle,
            byteorder,
            storages,
        })
    }
}

/// Ranges of one file, read in batches: neighbours within [`GAP`] as one
/// range, the batches in parallel.
struct Fetched {
    spans: Vec<(u64, Vec<u8>)>,
}

impl Fetched {
    fn read(
        storage: &dyn Storage,
        location: &str,
        ranges: &[Range<u64>],
    ) -> Result<Fetched, CheckpointError> {
        let mut sorted: Vec<Range<u64>> =
            ranges.iter().filter(|r| r.end > r.start).cloned().collect();
        sorted.sort_by_key(|r| r.start);
        let mut spans: Vec<Range<u64>> = Vec::new();
        for r in sorted {
            match spans.last_mut() {
                Some(s)
                    if r.start <= s.end.saturating_add(GAP)
                        && r.end.max(s.end) - s.start <= MAX_SPAN =>
                {
                    s.end = s.end.max(r.end)
                }
                _ => spans.push(r),
            }
        }
        let spans = spans
            .into_par_iter()
            .map(|s| Ok((s.start, storage.read_range(location, s)?)))
            .collect::<Result<Vec<_>, CheckpointError>>()?;
        Ok(Fetched { spans })
    }

    /// The bytes of `range`, which a span holds.
    fn get(&self, location: &str, range: Range<u64>) -> Result<&[u8], CheckpointError> {
        let i = self.spans.partition_point(|(s, _)| *s <= range.start);
        let found = i
            .checked_sub(1)
            .and_then(|i| self.spans.get(i))
            .and_then(|(s, b)| {
                let from = usize::try_from(range.start - s).ok()?;
                let to = usize::try_from(range.end - s).ok()?;
                b.get(from..to)
            });
        found.ok_or_else(|| zip_err(location, format!("bytes {range:?} were not read (a bug)")))
    }

    /// Where `e`'s data begins, from its local header.
    fn data_offset(&self, location: &str, e: &Entry) -> Result<u64, CheckpointError> {
        let head_end = e.end.min(e.header_offset + zip::LOCAL_LEN);
        if head_end - e.header_offset < zip::LOCAL_LEN {
            return Err(zip_err(
                location,
                format!("{}: its local header is cut short", e.name),
            ));
        }
        let head = self.get(location, e.header_offset..head_end)?;
        let len = zip::local_header_len(location, e, head)?;
        let name_end = e.header_offset + zip::LOCAL_LEN + e.name.len() as u64;
        let header = self.get(location, e.header_offset..name_end.min(e.end))?;
        zip::check_local_name(location, e, header)?;
        Ok(e.header_offset + len)
    }

    /// The data of a small entry read whole.
    fn entry_data(&self, location: &str, e: &Entry) -> Result<&[u8], CheckpointError> {
        let start = self.data_offset(location, e)?;
        self.get(location, start..start + e.size)
    }
}

/// The error for a `.bin` file without a zip end record: torch's legacy
/// format, or something else.
fn not_zip(
    storage: &dyn Storage,
    location: &str,
    tail: &[u8],
    tail_start: u64,
) -> Result<CheckpointError, CheckpointError> {
    let head = if tail_start == 0 {
        tail.get(..LEGACY_MAGIC.len()).unwrap_or(tail).to_vec()
    } else {
        storage.read_range(location, 0..LEGACY_MAGIC.len() as u64)?
    };
    Ok(if head == LEGACY_MAGIC {
        CheckpointError::TorchLegacy {
            location: location.to_string(),
        }
    } else {
        zip_err(
            location,
            "no zip end record, so not a torch.save checkpoint (or the file is truncated)",
        )
    })
}
