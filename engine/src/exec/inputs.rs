//! Checks a unit's input references against the files they point into: every
//! input (and block-scale) reference must be exactly a tensor entry of its
//! file's own safetensors header (name, dtype, shape and byte range). A unit
//! therefore reads only bytes that a checkpoint's header declares as that
//! tensor: not the header, not another file's bytes (a text file is not a
//! safetensors file), not bytes between tensors.
//!
//! Each file's header is read once per unit: local files from their memory map
//! (already open for the unit), objects of an object store with the usual
//! header read (a HEAD and one range request, two for a header over 64 KiB).

use super::read::Maps;
use super::ExecError;
use crate::checkpoint::{self, CheckpointError, TensorInfo};
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

/// Reads the header of every file the unit reads, once each.
fn headers(unit: &WorkUnit, maps: &Maps) -> Result<HashMap<String, Entries>, ExecError> {
    let mut files: Vec<&TensorRef> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for r in unit.tensors.iter().flat_map(|t| t.all_refs()) {
        if seen.insert(r.location.as_str()) {
            files.push(r);
        }
    }
    files
        .par_iter()
        .map(|r| {
            let location = r.location.as_str();
            let header = match maps.get(r) {
                Some(map) => local_header(location, map),
                None => checkpoint::read_header(storage::for_location(location).as_ref(), location),
            };
            let header = header.map_err(|e| match e {
                // Storage errors keep their kind (an I/O error may pass).
                CheckpointError::Storage(s) => ExecError::Storage(s),
                other => ExecError::NotSafetensors {
                    location: location.to_string(),
                    input: r.name.clone(),
                    message: other.to_string(),
                },
            })?;
            Ok((location.to_string(), header.tensors.into_iter().collect()))
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
