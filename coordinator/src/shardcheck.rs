//! What the coordinator checks before a worker's shard counts as done. A
//! worker's word is not enough (it may be buggy, or not ours): the shard must
//! exist in the output storage, have exactly the plan's header (tensor names,
//! dtypes, shapes and data offsets, byte for byte as the engine writes them),
//! the plan's size, and pass a data spot check.
//!
//! The data check: the coordinator recomputes one randomly chosen small tensor
//! of the unit itself (inputs at most [`SPOT_CHECK_MAX_BYTES`]) and compares it
//! with the shard's bytes at that tensor's offsets. A tensor's merge depends
//! only on the tensor and the unit's seed, so this costs one small ranged read
//! per input and one of the shard (kilobytes to a few MiB, even for a 5 GB
//! unit) and a little CPU, while the whole unit would cost the coordinator as
//! much as the worker. A worker that writes garbage under a correct header is
//! caught with a probability of the share of tensors it garbled, per attempt;
//! one that garbles everything is caught every time. Shards of at most
//! [`HASH_WHOLE_MAX_BYTES`] are also hashed whole and compared with the
//! reported sha256; larger ones are hashed by `fleetmerge verify`, which
//! checks every shard against the journal's sha256.
//!
//! A shard an in-process worker wrote is this process's own: it is only
//! looked up ([`check_own`]), as the executor's own output record is kept.

use fleetmerge_engine::dtype::DType;
use fleetmerge_engine::exec::compute_tensor;
use fleetmerge_engine::output::ShardLayout;
use fleetmerge_engine::storage::{self, StorageError};
use fleetmerge_engine::unit::UnitOutput;
use fleetmerge_engine::unit::WorkUnit;
use sha2::{Digest, Sha256};

/// Why a shard does not count as its unit's output. Each names the unit or
/// the shard's location.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("unit {unit} writes {planned}, not {reported}")]
    FileName {
        unit: usize,
        planned: String,
        /// As reported (cut to a readable length).
        reported: String,
    },
    #[error("sha256 {reported:?} is not 64 lowercase hex digits")]
    Sha256Format { reported: String },
    #[error("the reported tensors are not unit {unit}'s {count} tensors")]
    Tensors { unit: usize, count: usize },
    #[error("the worker reported {reported} bytes, but unit {unit}'s shard has {planned} (header and data)")]
    ReportedSize {
        unit: usize,
        reported: u64,
        planned: u64,
    },
    #[error("{shard} has {stored} bytes, the plan's shard has {planned}")]
    NotPlannedSize {
        shard: String,
        stored: u64,
        planned: u64,
    },
    #[error("{shard} has {stored} bytes, the worker reported {reported}")]
    NotReportedSize {
        shard: String,
        stored: u64,
        reported: u64,
    },
    #[error("unit {unit} reported {reported} upload chunk ids, its part has {planned}")]
    Chunks {
        unit: usize,
        reported: usize,
        planned: usize,
    },
    #[error("the worker reported {shard} written, but: {source}")]
    Missing { shard: String, source: StorageError },
    #[error("reading the header of {shard}: {source}")]
    ReadHeader { shard: String, source: StorageError },
    #[error("{shard}: {difference}")]
    Header { shard: String, difference: String },
    #[error("reading {tensor} from {shard}: {source}")]
    ReadTensor {
        shard: String,
        tensor: String,
        source: StorageError,
    },
    #[error(
        "{shard}: tensor {tensor} differs from the coordinator's own computation of it (first \
         at byte {at} of {len}): the shard's data is wrong"
    )]
    DataDiffers {
        shard: String,
        tensor: String,
        at: usize,
        len: u64,
    },
    #[error("reading {shard}: {source}")]
    Read { shard: String, source: StorageError },
    #[error("{shard} has sha256 {actual}, the worker reported {reported}")]
    Sha256 {
        shard: String,
        actual: String,
        reported: String,
    },
}

/// What a remote worker reports about a unit's shard.
#[derive(Debug, Clone)]
pub struct Reported {
    pub file_name: String,
    pub size: u64,
    pub sha256: String,
    /// The shard's tensor names, in order (empty: not reported).
    pub tensors: Vec<String>,
    /// A part's upload chunk ids (object-store outputs), in order.
    pub chunks: Vec<String>,
}

/// `text` cut to at most `max` bytes (on a character boundary), saying so.
pub fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{} ... (cut: {} bytes in all)", &text[..cut], text.len())
}

/// Checks a remote worker's report on `unit` (file name, sha256 format,
/// tensor names when given), then its shard in `out_dir` ([`check_shard`]).
pub fn check_reported(
    unit: &WorkUnit,
    out_dir: &str,
    r: &Reported,
    pick: u64,
) -> Result<UnitOutput, ShardError> {
    if r.file_name != unit.file_name {
        return Err(ShardError::FileName {
            unit: unit.id,
            planned: unit.file_name.clone(),
            reported: truncated(&r.file_name, 256),
        });
    }
    if !is_sha256_hex(&r.sha256) {
        return Err(ShardError::Sha256Format {
            reported: truncated(&r.sha256, 80),
        });
    }
    if !r.tensors.is_empty()
        && (r.tensors.len() != unit.tensors.len()
            || r.tensors
                .iter()
                .zip(&unit.tensors)
                .any(|(a, b)| *a != b.name))
    {
        return Err(ShardError::Tensors {
            unit: unit.id,
            count: unit.tensors.len(),
        });
    }
    let Some(p) = &unit.part else {
        return check_shard(unit, out_dir, r.size, &r.sha256, pick);
    };
    let store = storage::for_location(out_dir);
    let shard = store.join(out_dir, &unit.file_name);
    if let Some(file) = store.parts_readable(&shard) {
        if !r.chunks.is_empty() {
            return Err(ShardError::Chunks {
                unit: unit.id,
                reported: r.chunks.len(),
                planned: 0,
            });
        }
        return check_part(
            unit,
            &file,
            r.size,
            &r.sha256,
            &[],
            pick,
            HASH_WHOLE_MAX_BYTES,
        );
    }
    // An object store: the part cannot be read before the shard is
    // finished; it is checked then (see crate::merge).
    let planned = fleetmerge_engine::unit::upload_chunks(p.len, p.chunk).len();
    if r.chunks.len() != planned || r.chunks.iter().any(|c| c.is_empty() || c.len() > 1024) {
        return Err(ShardError::Chunks {
            unit: unit.id,
            reported: r.chunks.len(),
            planned,
        });
    }
    if r.size != p.len {
        return Err(ShardError::ReportedSize {
            unit: unit.id,
            reported: r.size,
            planned: p.len,
        });
    }
    Ok(UnitOutput {
        unit: unit.id,
        file_name: unit.file_name.clone(),
        size: r.size,
        sha256: r.sha256.clone(),
        tensors: unit.tensors.iter().map(|t| t.name.clone()).collect(),
        offset: p.offset,
        chunks: r.chunks.clone(),
        non_finite: Vec::new(),
    })
}

/// Checks the shard an in-process worker wrote for `unit`: the file the
/// plan names, in `out_dir` with the size the executor reported.
pub fn check_own(unit: &WorkUnit, out_dir: &str, output: &UnitOutput) -> Result<(), ShardError> {
    if unit.part.is_some() && unit.file_name == output.file_name {
        // The executor of this process wrote its part (checked whole, with
        // the shard, when the shard is finished).
        return Ok(());
    }
    if unit.file_name != output.file_name {
        return Err(ShardError::FileName {
            unit: output.unit,
            planned: unit.file_name.clone(),
            reported: output.file_name.clone(),
        });
    }
    let store = storage::for_location(out_dir);
    let shard = store.join(out_dir, &output.file_name);
    match store.size(&shard) {
        Ok(s) if s == output.size => Ok(()),
        Ok(stored) => Err(ShardError::NotReportedSize {
            shard,
            stored,
            reported: output.size,
        }),
        Err(source) => Err(ShardError::Missing { shard, source }),
    }
}

/// Input bytes (and output bytes) of a tensor the coordinator recomputes.
pub const SPOT_CHECK_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Shards up to this size are hashed whole by the coordinator.
pub const HASH_WHOLE_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// A sha256 as the worker must report it: 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks the shard of `unit` in `out_dir` against the plan and the worker's
/// report (`size`, `sha256`); `pick` chooses the tensor recomputed. Returns
/// the unit's output record.
pub fn check_shard(
    unit: &WorkUnit,
    out_dir: &str,
    size: u64,
    sha256: &str,
    pick: u64,
) -> Result<UnitOutput, ShardError> {
    let layout = unit.layout();
    if size != layout.file_size {
        return Err(ShardError::ReportedSize {
            unit: unit.id,
            reported: size,
            planned: layout.file_size,
        });
    }
    let store = storage::for_location(out_dir);
    let shard = store.join(out_dir, &unit.file_name);
    match store.size(&shard) {
        Ok(s) if s == layout.file_size => {}
        Ok(stored) => {
            return Err(ShardError::NotPlannedSize {
                shard,
                stored,
                planned: layout.file_size,
            })
        }
        Err(source) => return Err(ShardError::Missing { shard, source }),
    }
    let header = match store.read_range(&shard, 0..layout.header.len() as u64) {
        Ok(h) => h,
        Err(source) => return Err(ShardError::ReadHeader { shard, source }),
    };
    if header != layout.header {
        let difference = header_difference(&header, &layout, size);
        return Err(ShardError::Header { shard, difference });
    }

    // The data spot check (see the module's comment for why this one).
    let offsets: Vec<(u64, u64)> = layout.tensors.iter().map(|t| (t.3, t.4)).collect();
    spot_check(unit, store.as_ref(), &shard, &offsets, pick)?;
    if size <= HASH_WHOLE_MAX_BYTES {
        check_hash(store.as_ref(), &shard, 0..size, sha256)?;
    }
    Ok(UnitOutput {
        offset: 0,
        chunks: Vec::new(),
        unit: unit.id,
        file_name: unit.file_name.clone(),
        size,
        sha256: sha256.to_string(),
        tensors: unit.tensors.iter().map(|t| t.name.clone()).collect(),
        // Workers log their own non-finite warnings.
        non_finite: Vec::new(),
    })
}

/// Recomputes one small tensor of `unit` (chosen by `pick`) and compares it
/// with its bytes in `shard` (`offsets`: each tensor's byte range there).
fn spot_check(
    unit: &WorkUnit,
    store: &dyn storage::Storage,
    shard: &str,
    offsets: &[(u64, u64)],
    pick: u64,
) -> Result<(), ShardError> {
    let shard = shard.to_string();
    let small: Vec<usize> = unit
        .tensors
        .iter()
        .enumerate()
        .filter(|(_, t)| {
            t.byte_len() > 0
                && t.byte_len() <= SPOT_CHECK_MAX_BYTES
                && t.input_bytes() <= SPOT_CHECK_MAX_BYTES
        })
        .map(|(i, _)| i)
        .collect();
    if small.is_empty() {
        tracing::info!(unit = unit.id, "no tensor small enough to spot-check");
    } else {
        let i = small[(pick % small.len() as u64) as usize];
        let t = &unit.tensors[i];
        match compute_tensor(unit, i) {
            Ok(expected) => {
                let (offset, len) = &offsets[i];
                let got = match store.read_range(&shard, *offset..offset + len) {
                    Ok(g) => g,
                    Err(source) => {
                        return Err(ShardError::ReadTensor {
                            shard,
                            tensor: t.name.clone(),
                            source,
                        })
                    }
                };
                if let Some(at) = first_difference(t.dtype, &got, &expected) {
                    return Err(ShardError::DataDiffers {
                        shard,
                        tensor: t.name.clone(),
                        at,
                        len: *len,
                    });
                }
            }
            // Not the worker's fault (the coordinator may lack the inputs'
            // credentials): the shard is not judged on it.
            Err(e) => tracing::warn!(unit = unit.id, tensor = %t.name, error = %e,
                "could not recompute a tensor to spot-check the shard; its data is not checked"),
        }
    }
    Ok(())
}

/// Checks the bytes a part `unit` wrote (reported: `size` bytes hashing to
/// `sha256`, in `chunks` upload chunks) as they are at `location`: the parts'
/// file before the shard is finished (local disks), or the finished shard.
/// The file must have the shard's size, the first part the shard's header;
/// one small tensor is recomputed, and a part up to `hash_max` bytes hashed.
pub fn check_part(
    unit: &WorkUnit,
    location: &str,
    size: u64,
    sha256: &str,
    chunks: &[String],
    pick: u64,
    hash_max: u64,
) -> Result<UnitOutput, ShardError> {
    let Some(p) = &unit.part else {
        return Err(ShardError::Header {
            shard: location.to_string(),
            difference: format!("unit {} is not a part of its shard", unit.id),
        });
    };
    if size != p.len {
        return Err(ShardError::ReportedSize {
            unit: unit.id,
            reported: size,
            planned: p.len,
        });
    }
    let store = storage::for_location(location);
    let shard = location.to_string();
    match store.size(&shard) {
        Ok(s) if s == p.shard_size => {}
        Ok(stored) => {
            return Err(ShardError::NotPlannedSize {
                shard,
                stored,
                planned: p.shard_size,
            })
        }
        Err(source) => return Err(ShardError::Missing { shard, source }),
    }
    let layout = unit.written_layout();
    if p.index == 0 {
        let header = match store.read_range(&shard, 0..layout.header.len() as u64) {
            Ok(h) => h,
            Err(source) => return Err(ShardError::ReadHeader { shard, source }),
        };
        if header != layout.header {
            let full = unit.layout();
            let difference = header_difference(&header, &full, p.shard_size);
            return Err(ShardError::Header { shard, difference });
        }
    }
    let offsets: Vec<(u64, u64)> = layout
        .tensors
        .iter()
        .map(|t| (t.3 + p.offset, t.4))
        .collect();
    spot_check(unit, store.as_ref(), &shard, &offsets, pick)?;
    if size <= hash_max {
        check_hash(store.as_ref(), &shard, p.offset..p.offset + size, sha256)?;
    }
    Ok(UnitOutput {
        unit: unit.id,
        file_name: unit.file_name.clone(),
        size,
        sha256: sha256.to_string(),
        tensors: unit.tensors.iter().map(|t| t.name.clone()).collect(),
        offset: p.offset,
        chunks: chunks.to_vec(),
        non_finite: Vec::new(),
    })
}

/// The bytes `range` of `shard` hash to the reported `sha256`.
fn check_hash(
    store: &dyn storage::Storage,
    shard: &str,
    range: std::ops::Range<u64>,
    sha256: &str,
) -> Result<(), ShardError> {
    let bytes = store
        .read_range(shard, range)
        .map_err(|source| ShardError::Read {
            shard: shard.to_string(),
            source,
        })?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != sha256 {
        return Err(ShardError::Sha256 {
            shard: shard.to_string(),
            actual,
            reported: sha256.to_string(),
        });
    }
    Ok(())
}

/// Why a header is not the plan's, for the error message.
fn header_difference(header: &[u8], layout: &ShardLayout, file_size: u64) -> String {
    let parsed = fleetmerge_engine::checkpoint::parse_header("shard", file_size, &header[8..]);
    let parsed = match parsed {
        Ok(h) if header[..8] == layout.header[..8] => h,
        Ok(_) => return "its header length is not the plan's".into(),
        Err(e) => return format!("not a valid safetensors header: {e}"),
    };
    if parsed.tensors.len() != layout.tensors.len() {
        return format!(
            "its header lists {} tensors, the plan's {}",
            parsed.tensors.len(),
            layout.tensors.len()
        );
    }
    for ((name, info), (want, dtype, shape, offset, len)) in
        parsed.tensors.iter().zip(&layout.tensors)
    {
        if name != want || info.dtype != *dtype || &info.shape != shape {
            return format!(
                "its header has {name} ({:?} {:?}) where the plan has {want} ({dtype:?} {shape:?})",
                info.dtype, info.shape
            );
        }
        if (info.offset, info.len) != (*offset, *len) {
            return format!(
                "{name} is at bytes {}..{}, the plan puts it at {offset}..{}",
                info.offset,
                info.offset + info.len,
                offset + len
            );
        }
    }
    "its header's bytes differ from the plan's (metadata or layout)".into()
}

/// The first byte at which `got` and `want` differ, element by element; for
/// float tensors two NaNs are equal (a GPU returns its canonical NaN where
/// the CPU keeps a payload).
fn first_difference(dtype: DType, got: &[u8], want: &[u8]) -> Option<usize> {
    if got == want {
        return None;
    }
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    let n = dtype.size().max(1);
    let nan = |b: &[u8]| match dtype {
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_nan(),
        DType::F64 => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]).is_nan(),
        DType::F16 => {
            let v = u16::from_le_bytes([b[0], b[1]]);
            v & 0x7c00 == 0x7c00 && v & 0x03ff != 0
        }
        DType::BF16 => {
            let v = u16::from_le_bytes([b[0], b[1]]);
            v & 0x7f80 == 0x7f80 && v & 0x007f != 0
        }
        _ => false,
    };
    got.chunks(n)
        .zip(want.chunks(n))
        .position(|(a, b)| a != b && !(a.len() == n && nan(a) && nan(b)))
        .map(|i| i * n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_must_be_64_lowercase_hex_digits() {
        assert!(is_sha256_hex(&"ab".repeat(32)));
        for bad in [
            "not-a-hash",
            "",
            &"AB".repeat(32),
            &"ab".repeat(33),
            &"zz".repeat(32),
        ] {
            assert!(!is_sha256_hex(bad), "{bad}");
        }
    }

    #[test]
    fn nans_compare_equal_other_bytes_do_not() {
        let nan1 = f32::from_bits(0x7fc0_0001).to_le_bytes();
        let nan2 = f32::from_bits(0x7fc0_0000).to_le_bytes();
        let one = 1f32.to_le_bytes();
        let a = [one, nan1].concat();
        let b = [one, nan2].concat();
        assert_eq!(first_difference(DType::F32, &a, &b), None);
        let c = [2f32.to_le_bytes(), nan2].concat();
        assert_eq!(first_difference(DType::F32, &a, &c), Some(0));
        assert_eq!(first_difference(DType::I32, &a, &b), Some(4));
    }
}
