//! The unit queue: pending units are leased to workers one at a time; a
//! completed unit is recorded with its checksum; the first failure stops new
//! leases and ends the merge with that unit's error. `run_embedded` drives it
//! with in-process workers, the way `fleetmerge run` merges on one machine.

use crate::assemble::{self, AssembleError, AssembleOptions};
use crate::journal::{Journal, JournalError};
use fleetmerge_engine::exec::{ExecError, Progress, UnitOutput};
use fleetmerge_engine::plan::{Plan, WorkUnit};
use fleetmerge_worker::{Lease, UnitSource};
use std::collections::VecDeque;
use std::sync::Mutex;

/// Why a merge did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("work unit {unit} ({file}, tensors {tensors}) failed: {error}")]
    Unit {
        unit: usize,
        file: String,
        tensors: String,
        error: String,
    },
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("recording a finished unit in the journal: {0}")]
    Record(#[from] fleetmerge_engine::storage::StorageError),
    #[error("{0}")]
    Serve(String),
    #[error("{0}")]
    Cluster(String),
}

/// Options of an embedded (single-machine) run.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Units executed at the same time (each uses the shared thread pool).
    pub workers: usize,
    pub assemble: AssembleOptions,
    /// Discard the journal of an earlier, unfinished merge into the same folder.
    pub restart: bool,
}

/// What a finished merge wrote.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub outputs: Vec<UnitOutput>,
    pub total_size: u64,
    /// Units an earlier, interrupted run had already finished.
    pub resumed: usize,
}

struct State {
    pending: VecDeque<WorkUnit>,
    next_lease: u64,
    done: Vec<UnitOutput>,
    failed: Option<RunError>,
}

/// Leases units to in-process workers.
pub struct Scheduler<'a> {
    out_dir: String,
    journal: Option<&'a Journal>,
    state: Mutex<State>,
}

fn describe(unit: &WorkUnit) -> String {
    let names: Vec<&str> = unit.tensors.iter().map(|t| t.name.as_str()).collect();
    match names.as_slice() {
        [] => "none".into(),
        [one] => one.to_string(),
        [first, .., last] => format!("{first} .. {last} ({} tensors)", names.len()),
    }
}

impl<'a> Scheduler<'a> {
    /// A queue of `units`; finished ones are recorded in `journal` when given.
    pub fn new(units: Vec<WorkUnit>, out_dir: &str, journal: Option<&'a Journal>) -> Self {
        Scheduler {
            out_dir: out_dir.to_string(),
            journal,
            state: Mutex::new(State {
                pending: units.into(),
                next_lease: 1,
                done: Vec::new(),
                failed: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A worker that panicked cannot leave the queue inconsistent: every
        // update is a single push or pop.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The outputs of every unit, or the first failure.
    pub fn finish(self) -> Result<Vec<UnitOutput>, RunError> {
        let state = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = state.failed {
            return Err(e);
        }
        let mut done = state.done;
        done.sort_by_key(|o| o.unit);
        Ok(done)
    }
}

impl UnitSource for Scheduler<'_> {
    fn next(&self, _worker: &str) -> Option<Lease> {
        let mut s = self.lock();
        if s.failed.is_some() {
            return None;
        }
        let unit = s.pending.pop_front()?;
        let lease_id = s.next_lease;
        s.next_lease += 1;
        Some(Lease {
            lease_id,
            unit,
            out_dir: self.out_dir.clone(),
        })
    }

    fn complete(&self, lease: &Lease, output: UnitOutput) {
        // The record is durable before the unit counts as done.
        if let Some(journal) = self.journal {
            if let Err(e) = journal.record(&output) {
                let mut s = self.lock();
                if s.failed.is_none() {
                    s.failed = Some(RunError::Unit {
                        unit: lease.unit.id,
                        file: lease.unit.file_name.clone(),
                        tensors: describe(&lease.unit),
                        error: format!("recording it in the journal: {e}"),
                    });
                }
                return;
            }
        }
        self.lock().done.push(output);
    }

    fn fail(&self, lease: &Lease, error: &ExecError) {
        let mut s = self.lock();
        if s.failed.is_none() {
            s.failed = Some(RunError::Unit {
                unit: lease.unit.id,
                file: lease.unit.file_name.clone(),
                tensors: describe(&lease.unit),
                error: error.to_string(),
            });
        }
    }
}

/// Merges `plan` into `out_dir` on this machine: the files around the tensors
/// first, then the shards from `opts.workers` in-process workers, the index last.
/// Units that an interrupted run of the same merge finished (per the journal in
/// `out_dir/.fleetmerge/`) are not computed again.
pub fn run_embedded(
    plan: &Plan,
    out_dir: &str,
    opts: &EmbeddedOptions,
    progress: &dyn Progress,
) -> Result<RunSummary, RunError> {
    let (journal, resume) = Journal::open(plan, out_dir, opts.restart)?;
    if resume.finished {
        tracing::info!(out = out_dir, "this merge is already complete");
        return Ok(RunSummary {
            total_size: plan.total_size(),
            resumed: resume.done.len(),
            outputs: resume.done.into_values().collect(),
        });
    }
    assemble::remove_index(out_dir)?;
    assemble::write_side_files(plan, out_dir, &opts.assemble)?;
    let pending: Vec<WorkUnit> = plan
        .units
        .iter()
        .filter(|u| !resume.done.contains_key(&u.id))
        .cloned()
        .collect();
    if !resume.done.is_empty() {
        tracing::info!(
            done = resume.done.len(),
            total = plan.units.len(),
            "resuming: units finished by an earlier run are kept"
        );
    }
    let scheduler = Scheduler::new(pending.clone(), out_dir, Some(&journal));
    let workers = opts.workers.clamp(1, pending.len().max(1));
    std::thread::scope(|s| {
        for i in 0..workers {
            let scheduler = &scheduler;
            s.spawn(move || fleetmerge_worker::work(&format!("local-{i}"), scheduler, progress));
        }
    });
    let mut outputs = scheduler.finish()?;
    let resumed = resume.done.len();
    outputs.extend(resume.done.into_values());
    outputs.sort_by_key(|o| o.unit);
    assemble::write_index(plan, out_dir)?;
    journal.finish()?;
    Ok(RunSummary {
        total_size: plan.total_size(),
        outputs,
        resumed,
    })
}
