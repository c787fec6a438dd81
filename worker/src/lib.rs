//! fleetmerge-worker: the loop every worker runs, wherever its units come from.
//! It asks a [`UnitSource`] for a unit, executes it (reads inputs, merges, writes
//! the output shard) and reports the result. In `fleetmerge run` the source is the
//! in-process scheduler; in cluster mode it is the coordinator over gRPC.

pub mod paths;
pub mod remote;

use fleetmerge_engine::exec::{self, Device, ExecError, ExecLimits, Progress};
use fleetmerge_engine::storage::StorageError;
use fleetmerge_engine::unit::{UnitOutput, WorkUnit};

/// A unit handed to a worker, with the lease that identifies this attempt.
#[derive(Debug, Clone)]
pub struct Lease {
    pub lease_id: u64,
    /// The worker holding the lease.
    pub worker: String,
    pub unit: WorkUnit,
    /// Where the unit's shard goes.
    pub out_dir: String,
}

/// Where a worker gets units from and reports them to.
pub trait UnitSource: Sync {
    /// The next unit to work on; `None` when there is nothing left for this worker.
    fn next(&self, worker: &str) -> Option<Lease>;
    fn complete(&self, lease: &Lease, output: UnitOutput);
    fn fail(&self, lease: &Lease, error: &ExecError);
}

/// Whether another attempt (here or on another worker) might succeed: I/O
/// errors may pass; a corrupt input, a bad parameter or a method error will not.
pub fn retryable(e: &ExecError) -> bool {
    // A GPU error (out of memory while other units ran) may pass too.
    matches!(
        e,
        ExecError::Storage(StorageError::Io { .. }) | ExecError::Gpu(_)
    )
}

/// Works until the source has nothing left, each unit within `max_memory`
/// bytes when given, computing on `device`. Returns the number of units
/// completed.
pub fn work(
    worker: &str,
    source: &dyn UnitSource,
    progress: &dyn Progress,
    max_memory: Option<u64>,
    device: &Device,
) -> usize {
    let mut done = 0;
    while let Some(lease) = source.next(worker) {
        tracing::debug!(worker, unit = lease.unit.id, file = %lease.unit.file_name, "unit leased");
        // Checked before anything else looks at it (the executor checks again).
        let result = lease
            .unit
            .validate()
            .map_err(ExecError::from)
            .and_then(|()| ExecLimits::for_unit(&lease.unit, &lease.out_dir, max_memory))
            .and_then(|l| exec::execute_unit_on(&lease.unit, &lease.out_dir, progress, &l, device));
        match result {
            Ok(output) => {
                tracing::debug!(worker, unit = lease.unit.id, sha256 = %output.sha256, "unit done");
                source.complete(&lease, output);
                progress.unit_done(lease.unit.input_bytes(), false);
                done += 1;
            }
            Err(e) => {
                tracing::warn!(worker, unit = lease.unit.id, error = %e, "unit failed");
                source.fail(&lease, &e);
            }
        }
    }
    done
}
