//! The life of one merge into one output folder, the same whether its units
//! are computed by in-process workers (`fleetmerge run`: the embedded driver
//! in the binary) or by remote ones (`fleetmerge coordinator`:
//! [`crate::service`]):
//!
//! 1. [`Merge::open`] claims the output folder ([`crate::outdir::claim`]:
//!    overlap check, lock, ownership, journal). A merge the journal records as
//!    finished ends there; an unfinished one of the same plan resumes with the
//!    units it finished. The index of an earlier merge is removed (an
//!    unfinished merge never looks finished), then the files around the
//!    shards are written (config.json, tokenizer, mergekit_config.yml).
//! 2. The driver hands out units from the lease table ([`Merge::table`]) and
//!    reports each finished shard through [`Merge::complete`], which records
//!    it in the journal before the unit counts as done.
//! 3. [`Merge::finish`], once every unit is done: the model card and the index
//!    last, then the journal's final marker.
//!
//! The lease table sits behind one mutex that every worker call needs
//! (leases, heartbeats, failures, status, metrics), so nothing under that
//! lock touches storage. A completion takes three steps: under the lock the
//! lease must be the holder's, and the unit is then held as being checked (it
//! neither expires nor goes to anyone else); without the lock its shard is
//! checked in the output storage and its record written to the journal; under
//! the lock again the unit is done, or (rejected) handled as a failed attempt.
//! A unit is thus done only once its shard is checked and journaled, and a
//! second completion of a unit (a slow worker whose lease had expired) finds it
//! being checked or done and changes nothing.

use crate::assemble::{self, AssembleError, AssembleOptions};
use crate::journal::{Journal, JournalError};
use crate::lease_table::{Check, LeaseTable, Origin, Outcome, Refusal};
use crate::outdir::{OutDirError, OutputLock};
use crate::shardcheck::{self, Reported, ShardError};
use fleetmerge_engine::exec::Progress;
use fleetmerge_engine::plan::Plan;
use fleetmerge_engine::storage;
use fleetmerge_engine::storage::StorageError;
use fleetmerge_engine::unit::UnitOutput;
use fleetmerge_engine::unit::WorkUnit;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};

/// A shard written by several units (see `fleetmerge_engine::unit::UnitPart`):
/// once every part is checked and journaled, the shard is *finished* (the
/// upload completed, or the parts' file renamed) by whoever journaled the
/// last part, before that unit counts as done; so every unit is done only
/// once its shard is in place.
#[derive(Debug, Default)]
struct ShardParts {
    /// Its units (the parts in order).
    units: Vec<Arc<WorkUnit>>,
    upload: Option<String>,
    /// Journaled parts, by index.
    done: BTreeMap<u32, UnitOutput>,
    finished: bool,
}

/// Why a merge did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Output(#[from] OutDirError),
    #[error("recording a finished unit in the journal: {0}")]
    Record(#[from] StorageError),
    /// The coordinator could not serve (see [`crate::service::ServeError`]).
    #[error(transparent)]
    Serve(#[from] crate::service::ServeError),
    /// A unit failed for good: the lease table's account of it (the unit, its
    /// tensors, every attempt's worker and error).
    #[error("{0}")]
    Failed(String),
    /// The workers (or the coordinator) stopped before every unit was done.
    #[error("{0}")]
    Unfinished(&'static str),
}

/// What a finished merge wrote.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub outputs: Vec<UnitOutput>,
    pub total_size: u64,
    /// Units an earlier, interrupted run had already finished.
    pub resumed: usize,
}

/// How a merge is run (the same for both drivers but the leases' terms).
#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub assemble: AssembleOptions,
    /// Discard the journal of an earlier, unfinished merge into the same folder.
    pub restart: bool,
    /// Attempts per unit before the merge gives up (failures another attempt
    /// may fix: I/O errors, expired leases, rejected shards).
    pub max_attempts: u32,
    /// How long a lease lasts without a heartbeat (`u64::MAX`: for ever, as
    /// in-process workers do not go silent).
    pub lease_ms: u64,
    /// The first lease id handed out (a restarted coordinator starts above
    /// the ids workers of the previous one may still hold).
    pub first_lease: u64,
}

/// What [`Merge::open`] found.
pub enum Opened {
    /// The journal records this merge as finished: nothing to compute.
    Complete(RunSummary),
    /// Units to compute. The output folder stays locked while `lock` lives.
    Started { merge: Box<Merge>, lock: OutputLock },
}

/// A completion reported to [`Merge::complete`].
#[derive(Debug, Clone)]
pub enum Report {
    /// The executor of this process wrote the shard: its output record is
    /// kept as it is once the shard is in storage with that size.
    InProcess(UnitOutput),
    /// A remote worker reports the shard written: it is checked against the
    /// plan first ([`crate::shardcheck`]).
    Remote(Reported),
}

/// Why a completion did not count.
#[derive(Debug, thiserror::Error)]
pub enum CompleteError {
    /// Not checked: not the holder's to complete (or done already).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Checked and rejected: the lease table took it as a failed attempt.
    #[error("completion of unit {unit} rejected: {reason}")]
    Rejected { unit: usize, reason: Rejection },
}

/// Why a checked completion was rejected.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error("recording unit {unit} in the journal: {source}")]
    Journal { unit: usize, source: StorageError },
    /// The parts of a shard did not make the shard (finishing the upload
    /// or rename failed, or a part's bytes in the finished shard are wrong:
    /// the shard is then discarded and its parts computed again).
    #[error("finishing {shard} from its parts: {message}")]
    Finish { shard: String, message: String },
    /// The check itself panicked (a bug): the unit is not left being checked.
    #[error("the check stopped: {0}")]
    Stopped(String),
}

/// One merge into one output folder (see the module's comment).
pub struct Merge {
    table: Mutex<LeaseTable>,
    /// Shards written in parts: their parts' progress (see [`ShardParts`]).
    parts: Mutex<BTreeMap<String, ShardParts>>,
    journal: Journal,
    out_dir: String,
    assemble: AssembleOptions,
    /// Units an earlier run finished (their ids).
    resumed: Vec<usize>,
}

impl Merge {
    /// Claims `out_dir` for `plan` and writes what comes before the shards
    /// (see the module's comment).
    pub fn open(plan: &Plan, out_dir: &str, opts: &MergeOptions) -> Result<Opened, RunError> {
        let crate::outdir::Claimed {
            journal,
            resume,
            lock,
        } = crate::outdir::claim(plan, out_dir, opts.restart)?;
        if resume.finished {
            tracing::info!(out = %out_dir, "this merge is already complete");
            return Ok(Opened::Complete(RunSummary {
                total_size: plan.total_size(),
                resumed: resume.done.len(),
                outputs: resume.done.into_values().collect(),
            }));
        }
        assemble::remove_index(out_dir)?;
        assemble::write_side_files(plan, out_dir, &opts.assemble)?;
        let resumed: Vec<usize> = resume.done.keys().copied().collect();
        if !resumed.is_empty() {
            tracing::info!(
                done = resumed.len(),
                total = plan.units.len(),
                "resuming: units finished by an earlier run are kept"
            );
        }
        let (units, parts) = prepare_parts(plan, out_dir, &journal, &resume.done)?;
        let table = LeaseTable::new(
            units,
            resume.done,
            opts.lease_ms,
            opts.max_attempts,
            opts.first_lease,
        );
        let merge = Merge {
            table: Mutex::new(table),
            parts: Mutex::new(parts),
            journal,
            out_dir: out_dir.to_string(),
            assemble: opts.assemble.clone(),
            resumed,
        };
        Ok(Opened::Started {
            merge: Box::new(merge),
            lock,
        })
    }

    /// The lease table, locked: for bookkeeping only (no I/O while it is held).
    pub fn table(&self) -> MutexGuard<'_, LeaseTable> {
        // Every update of the table completes under the lock, so a thread
        // that panicked while holding it cannot have left it inconsistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the shards go.
    pub fn out_dir(&self) -> &str {
        &self.out_dir
    }

    /// Ids of the units an earlier run finished.
    pub fn resumed(&self) -> &[usize] {
        &self.resumed
    }

    /// Tells `progress` about the units an earlier run finished.
    pub fn report_resumed(&self, plan: &Plan, progress: &dyn Progress) {
        for u in plan.units.iter().filter(|u| self.resumed.contains(&u.id)) {
            progress.unit_done(u.input_bytes(), true);
        }
    }

    /// `holder` reports unit `unit` done under `lease` (see the module's
    /// comment for the three steps). Returns the unit's output record once it
    /// is journaled and the unit done.
    pub fn complete(
        &self,
        holder: &str,
        lease: u64,
        unit: u64,
        report: Report,
    ) -> Result<UnitOutput, CompleteError> {
        let origin = match report {
            Report::InProcess(_) => Origin::InProcess,
            Report::Remote(_) => Origin::Remote,
        };
        let check = self.table().begin_check(holder, lease, unit, origin)?;
        // Storage I/O, without the lock. A panic in it must not leave the
        // unit being checked for ever.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.check_and_record(&check, report)
        }))
        .unwrap_or_else(|p| Err(Rejection::Stopped(panic_message(p.as_ref()))));
        self.table()
            .finish_check(&check, result.as_ref().map(Clone::clone));
        result.map_err(|reason| CompleteError::Rejected {
            unit: check.unit.id,
            reason,
        })
    }

    /// The shard checked as its origin deserves, then journaled.
    fn check_and_record(&self, check: &Check, report: Report) -> Result<UnitOutput, Rejection> {
        let output = match report {
            Report::InProcess(output) => {
                shardcheck::check_own(&check.unit, &self.out_dir, &output)?;
                output
            }
            Report::Remote(r) => {
                shardcheck::check_reported(&check.unit, &self.out_dir, &r, random_u64())?
            }
        };
        self.journal
            .record(&output)
            .map_err(|source| Rejection::Journal {
                unit: output.unit,
                source,
            })?;
        if let Some(p) = &check.unit.part {
            self.part_done(&check.unit.file_name, p.index, &output)?;
        }
        Ok(output)
    }

    /// A part of `file` is journaled: the last one finishes the shard.
    fn part_done(&self, file: &str, index: u32, output: &UnitOutput) -> Result<(), Rejection> {
        let ready = {
            let mut all = self.parts.lock().unwrap_or_else(|p| p.into_inner());
            let Some(s) = all.get_mut(file) else {
                return Ok(());
            };
            s.done.insert(index, output.clone());
            (s.done.len() == s.units.len() && !s.finished).then(|| {
                (
                    s.units.clone(),
                    s.upload.clone(),
                    s.done.values().cloned().collect::<Vec<_>>(),
                )
            })
        };
        let Some((units, upload, outputs)) = ready else {
            return Ok(());
        };
        let result = finish_shard(&self.out_dir, &units, upload.as_deref(), &outputs);
        {
            let mut all = self.parts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = all.get_mut(file) {
                match &result {
                    Ok(()) => s.finished = true,
                    // This part is not done; the others stay journaled.
                    Err(_) => {
                        s.done.remove(&index);
                    }
                }
            }
        }
        if let (Err(e), Some(old)) = (&result, upload) {
            // An upload that did not make a good shard is gone (completed
            // and deleted, or refused): every part is written again, into
            // a new one. This part's completion still counts as a failed
            // attempt, so a shard that never comes out right ends the merge.
            if let Err(again) = self.redo_shard(file, &units, &old) {
                return Err(Rejection::Finish {
                    shard: file.to_string(),
                    message: format!("{e}; and starting it again failed: {again}"),
                });
            }
        }
        result
    }

    /// Starts shard `file` (written in parts into upload `old`) again: a new
    /// multipart upload, journaled before anything else changes, then every
    /// part's record forgotten and its unit (now for the new upload) queued
    /// again.
    fn redo_shard(
        &self,
        file: &str,
        units: &[Arc<WorkUnit>],
        old: &str,
    ) -> Result<(), StorageError> {
        let store = storage::for_location(&self.out_dir);
        let shard = store.join(&self.out_dir, file);
        // Completed or refused already, most likely: nothing to abort then.
        let _ = store.parts_abort(&shard, Some(old));
        let size = units[0].part.as_ref().map_or(0, |p| p.shard_size);
        let upload = store.parts_begin(&shard, size)?;
        let mut uploads = self
            .journal
            .uploads()
            .map_err(|e| StorageError::io(&shard, e))?;
        match &upload {
            Some(id) => uploads.insert(file.to_string(), id.clone()),
            None => uploads.remove(file),
        };
        self.journal.save_uploads(&uploads)?;
        let fresh: Vec<Arc<WorkUnit>> = units
            .iter()
            .map(|u| {
                let mut u = WorkUnit::clone(u);
                if let Some(p) = u.part.as_mut() {
                    p.upload = upload.clone();
                }
                Arc::new(u)
            })
            .collect();
        for u in &fresh {
            self.journal.unrecord(u.id)?;
        }
        {
            let mut all = self.parts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = all.get_mut(file) {
                s.units = fresh.clone();
                s.upload = upload.clone();
                s.done.clear();
                s.finished = false;
            }
        }
        self.table().redo(&fresh);
        tracing::warn!(
            shard = %shard,
            parts = fresh.len(),
            "the shard's parts did not make a good shard: every part is written again into a new upload"
        );
        Ok(())
    }

    /// Ends the merge: with every unit done, writes the model card and the
    /// index, then the journal's final marker; otherwise returns why not
    /// (`stopped`: what to say when no unit failed but not all are done).
    pub fn finish(&self, plan: &Plan, stopped: &'static str) -> Result<RunSummary, RunError> {
        let (outcome, outputs) = {
            let t = self.table();
            (t.outcome().cloned(), t.outputs())
        };
        match outcome {
            Some(Outcome::AllDone) => {
                assemble::write_index(
                    plan,
                    &self.out_dir,
                    &self.assemble,
                    &outputs,
                    self.journal.fingerprint(),
                )?;
                self.journal.finish()?;
                Ok(RunSummary {
                    total_size: plan.total_size(),
                    outputs,
                    resumed: self.resumed.len(),
                })
            }
            Some(Outcome::Failed(e)) => Err(RunError::Failed(e)),
            None => Err(RunError::Unfinished(stopped)),
        }
    }
}

/// Prepares every unfinished shard written in parts (its parts' file, or
/// its multipart upload, recorded in the journal before any part is handed
/// out; an earlier run's are kept), and finishes those whose parts an
/// earlier run wrote all of. Returns the units to lease (uploads filled in).
fn prepare_parts(
    plan: &Plan,
    out_dir: &str,
    journal: &Journal,
    done: &BTreeMap<usize, UnitOutput>,
) -> Result<(Vec<WorkUnit>, BTreeMap<String, ShardParts>), RunError> {
    let mut units = plan.units.clone();
    if units.iter().all(|u| u.part.is_none()) {
        return Ok((units, BTreeMap::new()));
    }
    let store = storage::for_location(out_dir);
    let mut uploads = journal.uploads()?;
    let mut shards: BTreeMap<String, ShardParts> = BTreeMap::new();
    let mut prepared: BTreeMap<String, Option<String>> = BTreeMap::new();
    for unit in units.iter_mut() {
        let Some(p) = unit.part.as_mut() else {
            continue;
        };
        let file = unit.file_name.clone();
        if !prepared.contains_key(&file) {
            let shard = store.join(out_dir, &file);
            let upload = if store.parts_readable(&shard).is_some() {
                store.parts_begin(&shard, p.shard_size)?
            } else if let Some(id) = uploads.get(&file) {
                Some(id.clone())
            } else {
                // Journaled at once: a coordinator killed now leaves at most
                // this one upload unknown to the next.
                let id = store.parts_begin(&shard, p.shard_size)?;
                if let Some(id) = &id {
                    uploads.insert(file.clone(), id.clone());
                    journal.save_uploads(&uploads)?;
                }
                id
            };
            prepared.insert(file.clone(), upload);
        }
        p.upload = prepared[&file].clone();
    }
    for unit in &units {
        let Some(p) = &unit.part else { continue };
        let s = shards.entry(unit.file_name.clone()).or_default();
        s.upload = p.upload.clone();
        s.units.push(Arc::new(unit.clone()));
        if let Some(out) = done.get(&unit.id) {
            s.done.insert(p.index, out.clone());
        }
    }
    for (file, s) in shards.iter_mut() {
        if s.done.len() < s.units.len() {
            continue;
        }
        let shard = store.join(out_dir, file);
        let size = s.units[0].part.as_ref().map_or(0, |p| p.shard_size);
        if matches!(store.size(&shard), Ok(n) if n == size)
            && store
                .parts_readable(&shard)
                .is_none_or(|f| !std::path::Path::new(&f).exists())
        {
            s.finished = true;
            continue;
        }
        let outputs: Vec<UnitOutput> = s.done.values().cloned().collect();
        finish_shard(out_dir, &s.units, s.upload.as_deref(), &outputs).map_err(|e| {
            RunError::Failed(format!(
                "resuming: {e}; run with --restart to compute it again"
            ))
        })?;
        s.finished = true;
    }
    Ok((units, shards))
}

/// Makes shard `units[0].file_name` from its journaled parts: the upload
/// completed (object stores; then every part is checked in the shard: the
/// header, one recomputed tensor each; `fleetmerge verify` hashes them) or the parts' file renamed (local disks, where each part was
/// checked before it was journaled).
fn finish_shard(
    out_dir: &str,
    units: &[Arc<WorkUnit>],
    upload: Option<&str>,
    outputs: &[UnitOutput],
) -> Result<(), Rejection> {
    let store = storage::for_location(out_dir);
    let file = &units[0].file_name;
    let shard = store.join(out_dir, file);
    let failed = |message: String| Rejection::Finish {
        shard: shard.clone(),
        message,
    };
    let chunks: Vec<String> = outputs.iter().flat_map(|o| o.chunks.clone()).collect();
    let local = store.parts_readable(&shard).is_some();
    store
        .parts_finish(&shard, upload, chunks)
        .map_err(|e| failed(e.to_string()))?;
    if local {
        tracing::info!(shard = %shard, parts = units.len(), "shard finished from its parts");
        return Ok(());
    }
    for (unit, out) in units.iter().zip(outputs) {
        if let Err(e) = shardcheck::check_part(
            unit,
            &shard,
            out.size,
            &out.sha256,
            &out.chunks,
            random_u64(),
            0,
        ) {
            let _ = store.delete(&shard);
            return Err(failed(format!(
                "{} is wrong in the finished shard ({e}); the shard was deleted",
                unit.describe_target()
            )));
        }
    }
    tracing::info!(shard = %shard, parts = units.len(), "shard finished from its parts");
    Ok(())
}

/// A panic's message.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// A random number for the shard spot check's choice of tensor.
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    u64::from_le_bytes(bytes)
}
