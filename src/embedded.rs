//! The embedded driver of `fleetmerge run`: the coordinator crate's merge
//! (claim, side files, lease table, completions checked and journaled, index
//! last) with the worker crate's loop on in-process slots, fed by
//! [`InProcess`], the lease table as a unit source (leases that never expire,
//! so no heartbeats). Neither crate depends on the other; this is where they
//! meet, as the cluster's coordinator and workers meet over gRPC.

use fleetmerge_coordinator::lease_table::{LeaseReply, Refusal};
use fleetmerge_coordinator::{
    now_ms, AssembleOptions, CompleteError, Merge, MergeOptions, Opened, Report, RunError,
    RunSummary,
};
use fleetmerge_engine::exec::{Device, Progress};
use fleetmerge_engine::plan::Plan;
use fleetmerge_engine::unit::UnitOutput;
use fleetmerge_worker::{
    Completed, Lease, LoopOptions, Next, UnitFailure, UnitSource, WorkerError,
};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

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
    pub device: Device,
}

/// The merge's lease table as the worker loop's unit source. Slot `i` holds
/// its leases as `local-i`.
pub struct InProcess<'a> {
    merge: &'a Merge,
}

impl<'a> InProcess<'a> {
    pub fn new(merge: &'a Merge) -> Self {
        InProcess { merge }
    }
}

fn holder(slot: usize) -> String {
    format!("local-{slot}")
}

impl UnitSource for InProcess<'_> {
    fn lease(&self, slot: usize) -> Result<Next, WorkerError> {
        let reply = self.merge.table().lease(&holder(slot), now_ms());
        Ok(match reply {
            LeaseReply::Unit { lease, unit, .. } => Next::Unit(Lease {
                id: lease,
                unit: std::sync::Arc::unwrap_or_clone(unit),
                out_dir: self.merge.out_dir().to_string(),
            }),
            LeaseReply::Done(why) => Next::Done(why),
            // Every remaining unit is running in another slot; one may still
            // fail and come back to the queue.
            LeaseReply::Wait => Next::Wait(Duration::from_millis(5)),
        })
    }

    fn complete(
        &self,
        slot: usize,
        lease: &Lease,
        output: UnitOutput,
        _progress_bytes: u64,
    ) -> Result<Completed, WorkerError> {
        let unit = lease.unit.id as u64;
        let report = Report::InProcess(output);
        Ok(
            match self.merge.complete(&holder(slot), lease.id, unit, report) {
                Ok(_) => Completed::Accepted,
                Err(CompleteError::Refused(Refusal::AlreadyDone { .. })) => Completed::AlreadyDone,
                Err(e) => Completed::Refused(e.to_string()),
            },
        )
    }

    fn fail(&self, slot: usize, lease: u64, failure: &UnitFailure) -> Result<(), WorkerError> {
        self.merge.table().fail(
            lease,
            &holder(slot),
            &failure.to_string(),
            failure.retryable(),
        );
        Ok(())
    }
}

/// Merges `plan` into `out_dir` on this machine: the files around the tensors
/// first, then the shards from `opts.workers` in-process slots, the index
/// last. Units that an interrupted run of the same merge finished (per the
/// journal in `out_dir/.fleetmerge/`) are not computed again.
pub fn run(
    plan: &Plan,
    out_dir: &str,
    opts: &EmbeddedOptions,
    progress: &dyn Progress,
) -> anyhow::Result<RunSummary> {
    let merge_opts = MergeOptions {
        assemble: opts.assemble.clone(),
        restart: opts.restart,
        max_attempts: opts.max_attempts,
        lease_ms: u64::MAX,
        first_lease: 1,
    };
    // The output's lock is held until the merge returns.
    let (merge, _lock) = match Merge::open(plan, out_dir, &merge_opts)? {
        Opened::Complete(summary) => return Ok(summary),
        Opened::Started { merge, lock } => (merge, lock),
    };
    merge.report_resumed(plan, progress);
    let pending = plan.units.len() - merge.resumed().len();
    let loop_opts = LoopOptions {
        slots: opts.workers.clamp(1, pending.max(1)),
        max_memory: opts.max_memory,
        device: opts.device.clone(),
        paths: None,
        announce: false,
        // Local inputs are mapped: nothing to read ahead. (Remote ones
        // would gain, but `run`'s slots already overlap their units.)
        read_ahead: false,
    };
    let stop = AtomicBool::new(false);
    let worked = fleetmerge_worker::work(&InProcess::new(&merge), &loop_opts, &stop, progress);
    let finished = merge.finish(plan, "the workers stopped before every unit was done");
    match (finished, worked) {
        // A slot that stopped with an error says more than "not done".
        (Err(RunError::Unfinished(_)), Err(e)) => Err(e.into()),
        (finished, _) => Ok(finished?),
    }
}
