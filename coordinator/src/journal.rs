//! The journal of a merge, kept in `OUT/.fleetmerge/`: the plan, a fingerprint
//! of what the merge computes, one record per finished unit (written before the
//! unit counts as done), and a final marker once the index is written. A merge
//! that stops for any reason resumes from it: finished units whose shard is still
//! there with the recorded size are not computed again. Every file is written
//! whole (atomically), so the journal works the same on object stores. A
//! finished merge may be overwritten by a different one; an unfinished one is
//! resumed, or refused when the config or inputs changed (unless `--restart`).

use fleetmerge_engine::output::INDEX_FILE;
use fleetmerge_engine::plan::Plan;
use fleetmerge_engine::storage::{self, Storage, StorageError};
use fleetmerge_engine::unit::UnitOutput;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

const DIR: &str = ".fleetmerge";
const PLAN: &str = "plan.json";
const FINGERPRINT: &str = "fingerprint";
const UNITS: &str = "units";
const DONE: &str = "done";
/// The multipart uploads of shards written in parts (object stores):
/// `{shard file name: upload id}`, written before any part is handed out.
const UPLOADS: &str = "uploads.json";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(
        "{out} holds an unfinished merge of a different config or different inputs \
         (fingerprint {found}, this merge is {expected}); run with --restart to discard it, \
         or choose another output folder"
    )]
    Mismatch {
        out: String,
        found: String,
        expected: String,
    },
    #[error("{location}: unreadable journal record: {message}")]
    Record { location: String, message: String },
}

/// What the journal says about a merge when it is opened.
#[derive(Debug, Clone, PartialEq)]
pub struct Resume {
    /// Finished units (by id) whose shards are in place.
    pub done: BTreeMap<usize, UnitOutput>,
    /// The merge had already finished (index and final marker written).
    pub finished: bool,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the journal of an output folder records, read without planning.
#[derive(Debug, Clone)]
pub struct Records {
    /// The planned units, in order.
    pub plan: Plan,
    /// Records of finished units, by unit order.
    pub units: Vec<UnitOutput>,
    /// When each of `units` was recorded (Unix ms), where the record says.
    pub recorded_ms: Vec<Option<u64>>,
    /// Planned units without a record.
    pub missing: Vec<usize>,
    /// The final marker is there (the index was written).
    pub finished: bool,
}

/// Where the record of `unit` lives in the journal folder `dir`.
fn unit_location(store: &dyn Storage, dir: &str, unit: usize) -> String {
    store.join(&store.join(dir, UNITS), &format!("unit-{unit:06}.json"))
}

/// A unit's record and when it was written (`None`: no record).
fn read_record(
    store: &dyn Storage,
    loc: &str,
) -> Result<Option<(UnitOutput, Option<u64>)>, JournalError> {
    let bytes = match store.read_all(loc) {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let bad = |e: serde_json::Error| JournalError::Record {
        location: loc.to_string(),
        message: e.to_string(),
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(bad)?;
    let at = value.get("recorded_unix_ms").and_then(|t| t.as_u64());
    Ok(Some((serde_json::from_value(value).map_err(bad)?, at)))
}

/// The plan the journal in `out_dir` records: `None` when there is none.
pub fn read_plan(store: &dyn Storage, out_dir: &str) -> Result<Option<Plan>, JournalError> {
    let plan_loc = store.join(&store.join(out_dir, DIR), PLAN);
    match store.read_all(&plan_loc) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| JournalError::Record {
                location: plan_loc.clone(),
                message: e.to_string(),
            }),
        Err(StorageError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads the journal in `out_dir`: `None` when there is none.
pub fn read_records(store: &dyn Storage, out_dir: &str) -> Result<Option<Records>, JournalError> {
    let dir = store.join(out_dir, DIR);
    let Some(plan) = read_plan(store, out_dir)? else {
        return Ok(None);
    };
    let mut units = Vec::new();
    let mut recorded_ms = Vec::new();
    let mut missing = Vec::new();
    for unit in &plan.units {
        match read_record(store, &unit_location(store, &dir, unit.id))? {
            Some((output, at)) => {
                units.push(output);
                recorded_ms.push(at);
            }
            None => missing.push(unit.id),
        }
    }
    let finished = store.exists(&store.join(&dir, DONE))?;
    Ok(Some(Records {
        plan,
        units,
        recorded_ms,
        missing,
        finished,
    }))
}

/// The journal of one output folder.
pub struct Journal {
    store: Arc<dyn Storage>,
    out_dir: String,
    dir: String,
    fingerprint: String,
}

/// The fingerprint of a plan: a hash of everything that decides the output
/// bytes (config, resolved parameters, every input tensor's location, offset,
/// dtype and shape, LoRA factors and scales, shard layout, seed) plus the size
/// of every file read (inputs, block scales, adapters).
pub fn fingerprint(plan: &Plan) -> Result<String, StorageError> {
    let mut h = Sha256::new();
    let json = serde_json::to_vec(plan).map_err(|e| StorageError::io("plan", e))?;
    h.update(&json);
    let mut files: Vec<&str> = plan
        .units
        .iter()
        .flat_map(|u| {
            u.tensors
                .iter()
                .flat_map(|t| t.all_refs().map(|i| i.location.as_str()))
        })
        .collect();
    files.sort_unstable();
    files.dedup();
    for f in files {
        let size = storage::for_location(f).size(f)?;
        h.update(f.as_bytes());
        h.update(size.to_le_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

impl Journal {
    /// Opens (or starts) the journal of `plan` in `out_dir`. With `restart`, an
    /// earlier journal is discarded; otherwise a journal of a different merge is
    /// an error, and a matching one tells what is already done. `earlier` is
    /// the plan the folder's journal records ([`read_plan`]): when this merge
    /// replaces it, its finished markers and shards are removed first.
    pub fn open(
        plan: &Plan,
        earlier: Option<&Plan>,
        out_dir: &str,
        restart: bool,
    ) -> Result<(Journal, Resume), JournalError> {
        let store = storage::for_location(out_dir);
        let dir = store.join(out_dir, DIR);
        let journal = Journal {
            fingerprint: fingerprint(plan)?,
            out_dir: out_dir.to_string(),
            dir,
            store,
        };
        let fp_loc = journal.path(FINGERPRINT);
        let existing = match journal.store.read_all(&fp_loc) {
            Ok(b) => Some(String::from_utf8_lossy(&b).trim().to_string()),
            Err(StorageError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let mut resume = Resume {
            done: BTreeMap::new(),
            finished: false,
        };
        match existing {
            Some(found) if found == journal.fingerprint && !restart => {
                resume.finished = journal.store.exists(&journal.path(DONE))?;
                resume.done = journal.finished_units(plan)?;
            }
            // A different merge that finished may be overwritten, as mergekit
            // overwrites; an unfinished one is refused rather than mixed with.
            Some(found) if !restart && !journal.store.exists(&journal.path(DONE))? => {
                return Err(JournalError::Mismatch {
                    out: out_dir.to_string(),
                    found,
                    expected: journal.fingerprint.clone(),
                })
            }
            _ => {
                if let Some(earlier) = earlier {
                    journal.abort_parts(earlier)?;
                    journal.retire_earlier(earlier)?;
                }
                journal.clear()?;
                let plan_json =
                    serde_json::to_vec_pretty(plan).map_err(|e| StorageError::io("plan", e))?;
                journal.store.put(&journal.path(PLAN), &plan_json)?;
                journal.store.put(&fp_loc, journal.fingerprint.as_bytes())?;
            }
        }
        Ok((journal, resume))
    }

    /// The fingerprint of the merge this journal records.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn path(&self, name: &str) -> String {
        self.store.join(&self.dir, name)
    }

    fn unit_path(&self, unit: usize) -> String {
        unit_location(self.store.as_ref(), &self.dir, unit)
    }

    /// Before a new merge writes anything: removes what marks the earlier
    /// merge in this folder as finished (the final marker, the index, the model
    /// card), then the shards its plan names, and nothing else (a user's file
    /// named like a shard stays).
    fn retire_earlier(&self, earlier: &Plan) -> Result<(), StorageError> {
        self.store.delete(&self.path(DONE))?;
        for name in [INDEX_FILE, "README.md"] {
            self.store.delete(&self.store.join(&self.out_dir, name))?;
        }
        for unit in &earlier.units {
            self.store
                .delete(&self.store.join(&self.out_dir, &unit.file_name))?;
        }
        Ok(())
    }

    /// Removes every record of an earlier merge.
    fn clear(&self) -> Result<(), StorageError> {
        for name in self.store.list(&self.path(UNITS))? {
            self.store
                .delete(&self.store.join(&self.path(UNITS), &name))?;
        }
        for name in [DONE, FINGERPRINT, PLAN, UPLOADS] {
            self.store.delete(&self.path(name))?;
        }
        Ok(())
    }

    /// Records of finished units whose shard still exists with its recorded size.
    fn finished_units(&self, plan: &Plan) -> Result<BTreeMap<usize, UnitOutput>, JournalError> {
        let mut done = BTreeMap::new();
        let uploads = self.uploads()?;
        for unit in &plan.units {
            let Some((record, _)) = read_record(self.store.as_ref(), &self.unit_path(unit.id))?
            else {
                continue;
            };
            let shard = self.store.join(&self.out_dir, &record.file_name);
            if let Some(p) = &unit.part {
                if record.file_name == unit.file_name
                    && record.offset == p.offset
                    && record.size == p.len
                    && self.part_target_kept(&shard, p.shard_size, &uploads)?
                {
                    done.insert(unit.id, record);
                } else {
                    tracing::warn!(unit = unit.id, shard = %shard, "the shard this part was written into is gone or differs; computing it again");
                }
                continue;
            }
            let size = match self.store.size(&shard) {
                Ok(s) => s,
                Err(StorageError::NotFound { .. }) => {
                    tracing::warn!(unit = unit.id, shard = %shard, "journal records a unit whose shard is gone; computing it again");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if record.file_name != unit.file_name || size != record.size {
                tracing::warn!(unit = unit.id, shard = %shard, "shard differs from its journal record; computing it again");
                continue;
            }
            done.insert(unit.id, record);
        }
        Ok(done)
    }

    /// Records a finished unit (before anyone is told it is done).
    /// Whether the parts of `shard` written so far are still there: the
    /// shard itself is (finished), or its parts' file (local disks) with the
    /// shard's size, or the upload the journal names (object stores).
    fn part_target_kept(
        &self,
        shard: &str,
        size: u64,
        uploads: &BTreeMap<String, String>,
    ) -> Result<bool, JournalError> {
        let name = shard.rsplit('/').next().unwrap_or(shard);
        match self.store.size(shard) {
            Ok(s) if s == size => return Ok(true),
            Ok(_) | Err(StorageError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(file) = self.store.parts_readable(shard) {
            return Ok(std::fs::metadata(&file).is_ok_and(|m| m.len() == size));
        }
        Ok(uploads.contains_key(name))
    }

    /// The uploads of shards written in parts ([`UPLOADS`]).
    pub fn uploads(&self) -> Result<BTreeMap<String, String>, JournalError> {
        let loc = self.path(UPLOADS);
        match self.store.read_all(&loc) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| JournalError::Record {
                location: loc,
                message: e.to_string(),
            }),
            Err(StorageError::NotFound { .. }) => Ok(BTreeMap::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Records the uploads of shards written in parts (before any is used).
    pub fn save_uploads(&self, uploads: &BTreeMap<String, String>) -> Result<(), StorageError> {
        let json =
            serde_json::to_vec_pretty(uploads).map_err(|e| StorageError::io("uploads", e))?;
        self.store.put(&self.path(UPLOADS), &json)
    }

    /// Forgets that `unit` was finished (its part must be written again).
    pub fn unrecord(&self, unit: usize) -> Result<(), StorageError> {
        self.store.delete(&self.unit_path(unit))
    }

    /// Discards what an earlier merge left of shards written in parts: its
    /// uploads, and its parts' files.
    fn abort_parts(&self, earlier: &Plan) -> Result<(), JournalError> {
        let uploads = self.uploads()?;
        let mut seen = std::collections::BTreeSet::new();
        for unit in earlier.units.iter().filter(|u| u.part.is_some()) {
            if !seen.insert(unit.file_name.as_str()) {
                continue;
            }
            let shard = self.store.join(&self.out_dir, &unit.file_name);
            self.store
                .parts_abort(&shard, uploads.get(&unit.file_name).map(String::as_str))?;
        }
        Ok(())
    }

    pub fn record(&self, output: &UnitOutput) -> Result<(), StorageError> {
        let mut value =
            serde_json::to_value(output).map_err(|e| StorageError::io("unit record", e))?;
        // When it was recorded, for `fleetmerge status` (ignored when resuming).
        if let Some(map) = value.as_object_mut() {
            map.insert("recorded_unix_ms".into(), now_ms().into());
        }
        let json =
            serde_json::to_vec_pretty(&value).map_err(|e| StorageError::io("unit record", e))?;
        self.store.put(&self.unit_path(output.unit), &json)
    }

    /// Marks the merge finished (after the index).
    pub fn finish(&self) -> Result<(), StorageError> {
        self.store
            .put(&self.path(DONE), self.fingerprint.as_bytes())?;
        // Every upload is complete: their ids are of no more use.
        self.store.delete(&self.path(UPLOADS))
    }
}
