//! Checks a unit's input references against the files they point into: every
//! input (and block-scale and LoRA-factor) reference must be exactly a tensor
//! entry of its file's own safetensors header, or a tensor of its torch zip
//! checkpoint's pickle (a `pytorch_model.bin` or an `adapter_model.bin`; name,
//! dtype, shape and byte range). A unit therefore reads only
//! bytes that a checkpoint declares as that tensor: not the header, not
//! another file's bytes (a text file is not a checkpoint), not bytes between
//! tensors.
//!
//! Each file's header is read once per unit: local safetensors files from
//! their memory map (already open for the unit), objects of an object store
//! with the usual header read (a HEAD and one range request, two for a header
//! over 64 KiB); a `.bin` file as `checkpoint::read_torch_at` reads it (its
//! end, its pickle and the local headers of the storages the unit reads).

use super::read::Maps;
use super::ExecError;
use crate::checkpoint::{self, CheckpointError, Format, TensorInfo};
use crate::storage::{self, StorageError};
use crate::unit::{TensorRef, WorkUnit};
use rayon::prelude::*;
use std::collections::HashMap;

/// A file's tensors by name.
type Entries = HashMap<String, TensorInfo>;

/// The header of a local file, read from its map.
fn local_header(
    location: &str,
    map: &storage::Mapped,
) -> Result<checkpoint::SafetensorsHeader, CheckpointError> {
    let size = map.len();
    if size < 8 {
        return Err(CheckpointError::FileTooSmall {
            location: location.to_string(),
            size,
        });
    }
    let len_bytes: [u8; 8] = map
        .bytes(0..8)?
        .try_into()
        .map_err(|_| StorageError::io(location, "reading the header length"))?;
    let len = u64::from_le_bytes(len_bytes);
    checkpoint::check_header_len(location, size, len)?;
    let header = checkpoint::parse_header(location, size, map.bytes(8..8 + len)?);
    map.release(0..8 + len);
    header
}

/// Reads the header of every file the unit reads, once each: a safetensors
/// header, or the tensors of a torch zip checkpoint whose storages hold the
/// unit's offsets.
fn headers(unit: &WorkUnit, maps: &Maps) -> Result<HashMap<String, Entries>, ExecError> {
    let mut files: Vec<&TensorRef> = Vec::new();
    let mut offsets: HashMap<&str, Vec<u64>> = HashMap::new();
    for r in unit.tensors.iter().flat_map(|t| t.all_refs()) {
        let at = offsets.entry(r.location.as_str()).or_default();
        if at.is_empty() {
            files.push(r);
        }
        at.push(r.offset);
    }
    files
        .par_iter()
        .map(|r| {
            let location = r.location.as_str();
            let format = Format::of(location);
            let tensors = match (format, maps.get(r)) {
                (Format::Safetensors, Some(map)) => local_header(location, map).map(|h| h.tensors),
                (Format::Safetensors, None) => {
                    checkpoint::read_header(storage::for_location(location).as_ref(), location)
                        .map(|h| h.tensors)
                }
                (Format::TorchZip, _) => checkpoint::read_torch_at(
                    storage::for_location(location).as_ref(),
                    location,
                    offsets.get(location).map_or(&[][..], Vec::as_slice),
                ),
            };
            let tensors = tensors.map_err(|e| match e {
                // Storage errors keep their kind (an I/O error may pass).
                CheckpointError::Storage(s) => ExecError::Storage(s),
                other => ExecError::UnusableInput {
                    location: location.to_string(),
                    input: r.name.clone(),
                    format: format.name(),
                    message: other.to_string(),
                },
            })?;
            Ok((location.to_string(), tensors.into_iter().collect()))
        })
        .collect()
}

/// Checks every input reference of `unit` against its file's header.
pub fn check(unit: &WorkUnit, maps: &Maps) -> Result<(), ExecError> {
    let headers = headers(unit, maps)?;
    for t in &unit.tensors {
        for r in t.all_refs() {
            let entry = headers.get(&r.location).and_then(|h| h.get(&r.name));
            let mismatch = |message: String| ExecError::InputMismatch {
                location: r.location.clone(),
                tensor: t.name.clone(),
                input: r.name.clone(),
                message,
            };
            let Some(e) = entry else {
                return Err(mismatch("the file's header has no such tensor".into()));
            };
            if (e.dtype, &e.shape, e.offset, e.len) != (r.dtype, &r.shape, r.offset, r.len) {
                return Err(mismatch(format!(
                    "the work unit reads {} {:?} at bytes {}..{}, but the file's header has {} \
                     {:?} at bytes {}..{}",
                    r.dtype,
                    r.shape,
                    r.offset,
                    r.offset.saturating_add(r.len),
                    e.dtype,
                    e.shape,
                    e.offset,
                    e.offset + e.len
                )));
            }
        }
    }
    Ok(())
}
