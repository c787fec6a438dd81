//! `fleetmerge verify OUT`: checks that a merged model is whole. Every shard the
//! index names exists and has a valid safetensors header that fits the file;
//! the index and the shard headers agree tensor by tensor; `total_size` is the
//! sum of the tensors' bytes; where the journal is present, every shard's size
//! and sha256 match what was recorded when it was written, and the merge's final
//! marker is there. With `scan`, every float tensor is also read and checked for
//! NaN and infinities. Every problem is collected, not just the first.

use crate::journal;
use fleetmerge_engine::checkpoint::{read_header, read_index, CheckpointError};
use fleetmerge_engine::dtype::decode_f32;
use fleetmerge_engine::output::INDEX_FILE as INDEX;
use fleetmerge_engine::storage::{self, Storage, StorageError};
use fleetmerge_engine::unit::UnitOutput;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

const SINGLE: &str = "model.safetensors";
/// Bytes read per request while hashing or scanning.
const READ: u64 = 64 << 20;

/// What `verify` found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    pub shards: usize,
    pub tensors: usize,
    /// Bytes of all shards.
    pub bytes: u64,
    /// Shards whose sha256 was compared with the journal.
    pub hashed: usize,
    /// Whether the journal was there to compare with.
    pub journal: bool,
    /// Tensors scanned for NaN/Inf (with `scan`).
    pub scanned: usize,
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Why a shard's header could not be read (a problem of the report).
#[derive(Debug, thiserror::Error)]
enum ShardProblem {
    #[error("{name}: missing")]
    Missing { name: String },
    #[error("{name}: {source}")]
    Storage { name: String, source: StorageError },
    #[error("{name}: {source}")]
    Header {
        name: String,
        source: CheckpointError,
    },
}

/// Verifies the merged model in `out`.
pub fn verify(out: &str, scan: bool) -> Report {
    let store = storage::for_location(out);
    let mut report = Report::default();
    // Tensor -> shard, as the index (or the single file) says.
    let index_loc = store.join(out, INDEX);
    let (weight_map, total_size): (BTreeMap<String, String>, Option<u64>) =
        match store.exists(&index_loc) {
            Ok(true) => match read_index(store.as_ref(), &index_loc) {
                Ok(index) if index.weight_map.is_empty() => {
                    report
                        .problems
                        .push(format!("{index_loc}: weight_map is empty"));
                    return report;
                }
                Ok(index) => (index.weight_map.into_iter().collect(), index.total_size),
                Err(e) => {
                    report.problems.push(e.to_string());
                    return report;
                }
            },
            Ok(false) => {
                let single = store.join(out, SINGLE);
                match store.exists(&single) {
                    Ok(true) => (BTreeMap::new(), None),
                    Ok(false) => {
                        report.problems.push(format!(
                            "{out}: neither {INDEX} nor {SINGLE}: not a finished model"
                        ));
                        return report;
                    }
                    Err(e) => {
                        report.problems.push(e.to_string());
                        return report;
                    }
                }
            }
            Err(e) => {
                report.problems.push(e.to_string());
                return report;
            }
        };
    let single = weight_map.is_empty();
    let shard_names: BTreeSet<String> = if single {
        [SINGLE.to_string()].into()
    } else {
        weight_map.values().cloned().collect()
    };
    report.shards = shard_names.len();

    // Headers of every shard, checked against the file and the index.
    let headers: Vec<(String, Result<_, ShardProblem>)> = shard_names
        .par_iter()
        .map(|name| {
            let loc = store.join(out, name);
            let name = name.clone();
            let r = match store.size(&loc) {
                Err(StorageError::NotFound { .. }) => {
                    Err(ShardProblem::Missing { name: name.clone() })
                }
                Err(source) => Err(ShardProblem::Storage {
                    name: name.clone(),
                    source,
                }),
                Ok(size) => match read_header(store.as_ref(), &loc) {
                    Ok(h) => Ok((size, h)),
                    Err(source) => Err(ShardProblem::Header {
                        name: name.clone(),
                        source,
                    }),
                },
            };
            (name, r)
        })
        .collect();
    let mut data_bytes = 0u64;
    let mut present: BTreeMap<String, (u64, Vec<(String, _)>)> = BTreeMap::new();
    for (name, r) in headers {
        match r {
            Err(e) => report.problems.push(e.to_string()),
            Ok((size, h)) => {
                report.bytes += size;
                let end = h.tensors.iter().map(|(_, t)| t.offset + t.len).max();
                let end = end.unwrap_or(h.data_start);
                if end < size {
                    report.problems.push(format!(
                        "{name}: {} bytes after the last tensor (file {size} bytes, tensors end at {end})",
                        size - end
                    ));
                }
                for (tensor, _) in &h.tensors {
                    if !single && weight_map.get(tensor) != Some(&name) {
                        report.problems.push(format!(
                            "{name}: holds {tensor}, which the index {}",
                            match weight_map.get(tensor) {
                                Some(other) => format!("puts in {other}"),
                                None => "does not list".to_string(),
                            }
                        ));
                    }
                }
                data_bytes += h.tensors.iter().map(|(_, t)| t.len).sum::<u64>();
                report.tensors += h.tensors.len();
                present.insert(name, (size, h.tensors));
            }
        }
    }
    for (tensor, shard) in &weight_map {
        if let Some((_, tensors)) = present.get(shard) {
            if !tensors.iter().any(|(t, _)| t == tensor) {
                report.problems.push(format!(
                    "{shard}: does not hold {tensor}, which the index puts there"
                ));
            }
        }
    }
    if let Some(total) = total_size {
        if present.len() == shard_names.len() && total != data_bytes {
            report.problems.push(format!(
                "{INDEX}: total_size is {total}, but the shards' tensors hold {data_bytes} bytes"
            ));
        }
    }

    check_journal(store.as_ref(), out, &present, &mut report);

    if scan {
        let tensors: Vec<(String, String, _)> = present
            .iter()
            .flat_map(|(shard, (_, ts))| {
                ts.iter()
                    .filter(|(_, t)| t.dtype.is_float())
                    .map(move |(name, t)| (shard.clone(), name.clone(), t.clone()))
            })
            .collect();
        report.scanned = tensors.len();
        let found: Vec<String> = tensors
            .par_iter()
            .filter_map(|(shard, name, t)| {
                let loc = store.join(out, shard);
                match count_nonfinite(store.as_ref(), &loc, t.dtype, t.offset, t.len) {
                    Ok((0, 0)) => None,
                    Ok((nan, inf)) => Some(format!(
                        "{shard}: {name} holds {nan} NaN and {inf} infinite values"
                    )),
                    Err(e) => Some(format!("{shard}: {name}: {e}")),
                }
            })
            .collect();
        report.problems.extend(found);
    }
    report
}

/// Compares shard sizes and hashes with the journal, if there is one.
fn check_journal<T: Sync>(
    store: &dyn Storage,
    out: &str,
    present: &BTreeMap<String, (u64, T)>,
    report: &mut Report,
) {
    let records = match journal::read_records(store, out) {
        Ok(None) => return,
        Ok(Some(r)) => r,
        Err(e) => {
            report.problems.push(format!("journal: {e}"));
            return;
        }
    };
    report.journal = true;
    if !records.finished {
        report.problems.push(
            "journal: the merge has not finished (no final marker): it is running, or was \
             interrupted; run it again to resume"
                .into(),
        );
    }
    for unit in &records.missing {
        report.problems.push(format!(
            "journal: unit {unit} has no record of being finished"
        ));
    }
    let by_file: BTreeMap<&str, &UnitOutput> = records
        .units
        .iter()
        .map(|u| (u.file_name.as_str(), u))
        .collect();
    for name in present.keys() {
        if !by_file.contains_key(name.as_str()) {
            report.problems.push(format!(
                "{name}: not in the journal (written by another merge?)"
            ));
        }
    }
    let checks: Vec<Option<String>> = records
        .units
        .par_iter()
        .filter(|u| present.contains_key(&u.file_name))
        .map(|u| {
            let size = present.get(&u.file_name).map(|p| p.0).unwrap_or_default();
            let part = records
                .plan
                .units
                .iter()
                .find(|p| p.id == u.unit)
                .and_then(|p| p.part.as_ref());
            if let Some(p) = part {
                // A part of its shard: its byte range.
                if size != p.shard_size || u.offset != p.offset || u.size != p.len {
                    return Some(format!(
                        "{}: {size} bytes, the journal recorded a part of bytes {}..+{} of {}",
                        u.file_name, u.offset, u.size, p.shard_size
                    ));
                }
                let loc = store.join(out, &u.file_name);
                return match sha256_range(store, &loc, u.offset..u.offset + u.size) {
                    Ok(h) if h == u.sha256 => None,
                    Ok(h) => Some(format!(
                        "{} bytes {}..{}: sha256 {h}, the journal recorded {} (the file changed after it was written)",
                        u.file_name, u.offset, u.offset + u.size, u.sha256
                    )),
                    Err(e) => Some(format!("{}: {e}", u.file_name)),
                };
            }
            if size != u.size {
                return Some(format!(
                    "{}: {size} bytes, the journal recorded {}",
                    u.file_name, u.size
                ));
            }
            let loc = store.join(out, &u.file_name);
            match sha256(store, &loc, size) {
                Ok(h) if h == u.sha256 => None,
                Ok(h) => Some(format!(
                    "{}: sha256 {h}, the journal recorded {} (the file changed after it was written)",
                    u.file_name, u.sha256
                )),
                Err(e) => Some(format!("{}: {e}", u.file_name)),
            }
        })
        .collect();
    report.hashed = checks.len();
    report.problems.extend(checks.into_iter().flatten());
}

fn sha256(store: &dyn Storage, loc: &str, size: u64) -> Result<String, StorageError> {
    sha256_range(store, loc, 0..size)
}

fn sha256_range(
    store: &dyn Storage,
    loc: &str,
    range: std::ops::Range<u64>,
) -> Result<String, StorageError> {
    let mut h = Sha256::new();
    let (mut at, size) = (range.start, range.end);
    while at < size {
        let end = (at + READ).min(size);
        h.update(store.read_range(loc, at..end)?);
        at = end;
    }
    Ok(hex::encode(h.finalize()))
}

/// (NaN count, infinity count) of one tensor.
fn count_nonfinite(
    store: &dyn Storage,
    loc: &str,
    dtype: fleetmerge_engine::DType,
    offset: u64,
    len: u64,
) -> Result<(u64, u64), StorageError> {
    let size = dtype.size() as u64;
    let step = READ / size * size;
    let (mut nan, mut inf) = (0u64, 0u64);
    let mut buf = Vec::new();
    let mut at = 0;
    while at < len {
        let end = (at + step).min(len);
        let bytes = store.read_range(loc, offset + at..offset + end)?;
        if dtype == fleetmerge_engine::DType::F64 {
            // Not through f32: a large finite f64 would read as infinite.
            for b in bytes.chunks_exact(8) {
                let x = f64::from_le_bytes(b.try_into().unwrap_or_default());
                nan += x.is_nan() as u64;
                inf += x.is_infinite() as u64;
            }
        } else {
            buf.resize(bytes.len() / size as usize, 0.0f32);
            decode_f32(dtype, &bytes, &mut buf);
            nan += buf.iter().filter(|x| x.is_nan()).count() as u64;
            inf += buf.iter().filter(|x| x.is_infinite()).count() as u64;
        }
        at = end;
    }
    Ok((nan, inf))
}
