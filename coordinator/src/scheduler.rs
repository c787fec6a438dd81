//! `fleetmerge run`: the cluster's scheduler ([`Cluster`]) with in-process
//! workers. Units are leased one at a time; a completed unit is journaled with
//! its checksum before it counts; a unit that fails with an error another
//! attempt cannot fix (or too often) ends the merge with that unit's error.

use crate::assemble::{self, AssembleError, AssembleOptions};
use crate::cluster::{Cluster, LeaseReply, Outcome};
use crate::journal::{Journal, JournalError};
use crate::service::now_ms;
use fleetmerge_engine::exec::{ExecError, Progress};
use fleetmerge_engine::plan::Plan;
use fleetmerge_engine::unit::{UnitOutput, WorkUnit};
use fleetmerge_worker::{Lease, UnitSource};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Why a merge did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Output(#[from] crate::outdir::OutDirError),
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
    /// Memory the units in flight may use together (each gets its share).
    pub max_memory: Option<u64>,
    pub assemble: AssembleOptions,
    /// Discard the journal of an earlier, unfinished merge into the same folder.
    pub restart: bool,
    /// Attempts per unit when it fails with an error that may pass (I/O).
    pub max_attempts: u32,
    /// Where the units are computed.
    pub device: fleetmerge_engine::exec::Device,
}

/// What a finished merge wrote.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub outputs: Vec<UnitOutput>,
    pub total_size: u64,
    /// Units an earlier, interrupted run had already finished.
    pub resumed: usize,
}

/// Leases units to in-process workers from the same state machine that serves
/// the cluster's remote workers ([`Cluster`]), with leases that never expire.
pub struct Scheduler<'a> {
    cluster: Mutex<Cluster>,
    journal: &'a Journal,
    out_dir: String,
}

impl<'a> Scheduler<'a> {
    /// Every unit of the plan; those in `done` were finished by an earlier run.
    pub fn new(
        units: Vec<WorkUnit>,
        done: BTreeMap<usize, UnitOutput>,
        out_dir: &str,
        journal: &'a Journal,
        max_attempts: u32,
    ) -> Self {
        Scheduler {
            cluster: Mutex::new(Cluster::new(
                units,
                done,
                out_dir,
                u64::MAX,
                max_attempts,
                1,
            )),
            journal,
            out_dir: out_dir.to_string(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cluster> {
        // Every update of the state machine completes under the lock, so a
        // worker that panicked cannot leave it inconsistent.
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The outputs of every unit (in unit order), or the failure that ended the merge.
    pub fn finish(self) -> Result<Vec<UnitOutput>, RunError> {
        let c = self.cluster.into_inner().unwrap_or_else(|p| p.into_inner());
        match c.outcome() {
            Some(Outcome::AllDone) => Ok(c.outputs()),
            Some(Outcome::Failed(e)) => Err(RunError::Cluster(e.clone())),
            None => Err(RunError::Cluster(
                "the workers stopped before every unit was done".into(),
            )),
        }
    }
}

impl UnitSource for Scheduler<'_> {
    fn next(&self, worker: &str) -> Option<Lease> {
        loop {
            let reply = self.lock().lease(worker, now_ms());
            match reply {
                LeaseReply::Unit { lease, unit, .. } => {
                    return Some(Lease {
                        lease_id: lease,
                        worker: worker.to_string(),
                        unit: std::sync::Arc::unwrap_or_clone(unit),
                        out_dir: self.out_dir.clone(),
                    })
                }
                LeaseReply::Done(_) => return None,
                // Every remaining unit is running elsewhere; one may still fail
                // and come back to the queue.
                LeaseReply::Wait => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    fn complete(&self, lease: &Lease, output: UnitOutput) {
        // The journal record is durable before the unit counts as done.
        let mut c = self.lock();
        if let Err(e) = c.complete(lease.lease_id, output, self.journal) {
            c.fail(lease.lease_id, &lease.worker, &e, false);
        }
    }

    fn fail(&self, lease: &Lease, error: &ExecError) {
        self.lock().fail(
            lease.lease_id,
            &lease.worker,
            &error.to_string(),
            fleetmerge_worker::retryable(error),
        );
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
    let crate::outdir::Claimed {
        journal,
        resume,
        lock: _lock,
    } = crate::outdir::claim(plan, out_dir, opts.restart)?;
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
    let pending = plan.units.len() - resume.done.len();
    if !resume.done.is_empty() {
        tracing::info!(
            done = resume.done.len(),
            total = plan.units.len(),
            "resuming: units finished by an earlier run are kept"
        );
    }
    let resumed = resume.done.len();
    for u in plan
        .units
        .iter()
        .filter(|u| resume.done.contains_key(&u.id))
    {
        progress.unit_done(u.input_bytes(), true);
    }
    let scheduler = Scheduler::new(
        plan.units.clone(),
        resume.done,
        out_dir,
        &journal,
        opts.max_attempts,
    );
    let workers = opts.workers.clamp(1, pending.max(1));
    let budget = opts.max_memory.map(|m| m / workers as u64);
    std::thread::scope(|s| {
        for i in 0..workers {
            let scheduler = &scheduler;
            s.spawn(move || {
                fleetmerge_worker::work(
                    &format!("local-{i}"),
                    scheduler,
                    progress,
                    budget,
                    &opts.device,
                )
            });
        }
    });
    let outputs = scheduler.finish()?;
    assemble::write_index(
        plan,
        out_dir,
        &opts.assemble,
        &outputs,
        journal.fingerprint(),
    )?;
    journal.finish()?;
    Ok(RunSummary {
        total_size: plan.total_size(),
        outputs,
        resumed,
    })
}
