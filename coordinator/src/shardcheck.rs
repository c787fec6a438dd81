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

use fleetmerge_engine::dtype::DType;
use fleetmerge_engine::exec::compute_tensor;
use fleetmerge_engine::output::ShardLayout;
use fleetmerge_engine::storage;
use fleetmerge_engine::unit::{UnitOutput, WorkUnit};
use sha2::{Digest, Sha256};

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
) -> Result<UnitOutput, String> {
    let layout = unit.layout();
    if size != layout.file_size {
        return Err(format!(
            "the worker reported {size} bytes, but unit {}'s shard has {} (header and data)",
            unit.id, layout.file_size
        ));
    }
    let store = storage::for_location(out_dir);
    let shard = store.join(out_dir, &unit.file_name);
    match store.size(&shard) {
        Ok(s) if s == layout.file_size => {}
        Ok(s) => {
            return Err(format!(
                "{shard} has {s} bytes, the plan's shard has {}",
                layout.file_size
            ))
        }
        Err(e) => return Err(format!("the worker reported {shard} written, but: {e}")),
    }
    let header = store
        .read_range(&shard, 0..layout.header.len() as u64)
        .map_err(|e| format!("reading the header of {shard}: {e}"))?;
    if header != layout.header {
        return Err(format!(
            "{shard}: {}",
            header_difference(&header, &layout, size)
        ));
    }

    // The data spot check (see the module's comment for why this one).
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
                let (_, _, _, offset, len) = &layout.tensors[i];
                let got = store
                    .read_range(&shard, *offset..offset + len)
                    .map_err(|e| format!("reading {} from {shard}: {e}", t.name))?;
                if let Some(at) = first_difference(t.dtype, &got, &expected) {
                    return Err(format!(
                        "{shard}: tensor {} differs from the coordinator's own computation \
                         of it (first at byte {at} of {len}): the shard's data is wrong",
                        t.name
                    ));
                }
            }
            // Not the worker's fault (the coordinator may lack the inputs'
            // credentials): the shard is not judged on it.
            Err(e) => tracing::warn!(unit = unit.id, tensor = %t.name, error = %e,
                "could not recompute a tensor to spot-check the shard; its data is not checked"),
        }
    }
    if size <= HASH_WHOLE_MAX_BYTES {
        let bytes = store
            .read_range(&shard, 0..size)
            .map_err(|e| format!("reading {shard}: {e}"))?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != sha256 {
            return Err(format!(
                "{shard} has sha256 {actual}, the worker reported {sha256}"
            ));
        }
    }
    Ok(UnitOutput {
        unit: unit.id,
        file_name: unit.file_name.clone(),
        size,
        sha256: sha256.to_string(),
        tensors: unit.tensors.iter().map(|t| t.name.clone()).collect(),
        // Workers log their own non-finite warnings.
        non_finite: Vec::new(),
    })
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
