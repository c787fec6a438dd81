//! fleetmerge-worker: the one loop every worker runs ([`work`]), wherever its
//! units come from. A [`UnitSource`] hands out leases and takes results: the
//! merge's own lease table in `fleetmerge run` (the embedded driver in the
//! binary wires it), or a coordinator over gRPC in `fleetmerge worker`
//! ([`remote::GrpcSource`]). The loop owns everything else, once for both:
//!
//! - `slots` lease loops on their own threads, each unit within its share of
//!   `max_memory`, computed on the worker's device;
//! - with `read_ahead`, one lease loop more, and at most `slots` units reading
//!   their inputs at a time: a loop leases its next unit once a unit in
//!   flight has read its inputs ([`Progress::inputs_read`]) and is only
//!   computing and writing, so the link is not idle while a unit's tail runs
//!   and between units (a [`ReadTurn`] is one of those `slots` turns);
//! - every unit checked before anything reads it ([`WorkUnit::validate`]),
//!   and, with a [`paths::PathPolicy`], where it reads and writes;
//! - heartbeats for the leases in flight, with the bytes read since the last
//!   one, when the source wants them; a lease the source says it revoked
//!   (another worker's copy of the unit finished first, or it expired) stops
//!   reading at once ([`Progress::cancelled`]: remote fetches are dropped
//!   mid-body), so a slow link is given back to the next unit;
//! - draining: once the stop flag is set (SIGTERM, the source saying the
//!   merge is over or telling a heartbeat to shut down, or a slot failing),
//!   no slot takes a new unit and those running finish theirs;
//! - failures reported with whether another attempt may pass; a panic while
//!   computing a unit is reported as that unit's failure (a bug of this
//!   worker, never the source's refusal), and a panic anywhere else in a slot
//!   fails the lease it held and ends the worker with an internal error.
//!
//! This crate knows nothing of the coordinator's internals: the coordinator
//! crate does not depend on it either.

pub mod paths;
pub mod remote;

use fleetmerge_engine::exec::{self, Device, ExecError, ExecLimits, Progress};
use fleetmerge_engine::storage::StorageError;
use fleetmerge_engine::unit::UnitOutput;
use fleetmerge_engine::unit::WorkUnit;
use paths::{PathError, PathPolicy};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

/// A unit handed to a worker under a lease.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The lease that identifies this attempt.
    pub id: u64,
    pub unit: WorkUnit,
    /// Where the unit's shard goes.
    pub out_dir: String,
}

/// What a source answers a slot asking for work.
#[derive(Debug)]
pub enum Next {
    Unit(Lease),
    /// A lease whose unit this worker cannot read: reported as a failure
    /// another attempt cannot fix.
    Unreadable {
        lease: u64,
        error: serde_json::Error,
    },
    /// Nothing to hand out now (the remaining units are running elsewhere
    /// and may come back): ask again after this long.
    Wait(Duration),
    /// The merge is over for this worker: why.
    Done(String),
}

/// What became of a completion.
#[derive(Debug, Clone, PartialEq)]
pub enum Completed {
    Accepted,
    /// The unit was done already (another attempt won; harmless).
    AlreadyDone,
    /// Not counted: the source says why (it re-queues the unit itself).
    Refused(String),
}

/// A source's answer to a heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Heartbeat {
    /// Take no new units.
    pub shutdown: bool,
    /// Leases this worker no longer holds (their results will not count).
    pub revoked: Vec<u64>,
}

/// Where a worker gets units from and reports them to. `slot` is the lease
/// loop calling (`0..slots`).
pub trait UnitSource: Sync {
    fn lease(&self, slot: usize) -> Result<Next, WorkerError>;
    /// Reports `lease` done with `output`; `progress_bytes` were read since
    /// the last report.
    fn complete(
        &self,
        slot: usize,
        lease: &Lease,
        output: UnitOutput,
        progress_bytes: u64,
    ) -> Result<Completed, WorkerError>;
    /// Reports that the attempt under lease `lease` failed.
    fn fail(&self, slot: usize, lease: u64, failure: &UnitFailure) -> Result<(), WorkerError>;
    /// How often leases must be renewed (`None`: they never expire).
    fn heartbeat_every(&self) -> Option<Duration> {
        None
    }
    /// Renews `leases`; `progress_bytes` were read since the last heartbeat.
    fn heartbeat(&self, _leases: &[u64], _progress_bytes: u64) -> Result<Heartbeat, WorkerError> {
        Ok(Heartbeat::default())
    }
}

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("coordinator address {address}: {message}")]
    Address { address: String, message: String },
    #[error("the coordinator at {address} refused this worker: {message}")]
    Refused { address: String, message: String },
    #[error("lost the coordinator at {address} for more than {seconds} s: {message}")]
    Unreachable {
        address: String,
        seconds: u64,
        message: String,
    },
    #[error(transparent)]
    Paths(#[from] PathError),
    /// A panic in a lease loop outside a unit's computation: a bug.
    #[error("internal error (a bug): {0}")]
    Internal(String),
    #[error(
        "{what}: a message between this worker and the coordinator at {address} is larger \
         than the protocol allows ({message}); run the same fleetmerge version on both"
    )]
    TooLarge {
        address: String,
        what: String,
        message: String,
    },
    /// The coordinator does not know this worker's session (handled by
    /// registering again).
    #[error("the coordinator at {address} no longer knows this worker: {message}")]
    SessionUnknown { address: String, message: String },
    /// A heartbeat that did not get through (logged; the next one may).
    #[error("{message}")]
    Heartbeat { message: String },
}

/// Why one attempt at a unit failed (reported to the source).
#[derive(Debug, thiserror::Error)]
pub enum UnitFailure {
    #[error("unreadable work unit: {0}")]
    Unreadable(serde_json::Error),
    /// The unit reads or writes where this worker does not (see [`paths`]).
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// A panic that escaped the executor's own guards: a bug of this worker.
    #[error(
        "internal error (a bug): the worker panicked computing unit {unit} ({file}): {message}"
    )]
    Panicked {
        unit: usize,
        file: String,
        message: String,
    },
}

impl UnitFailure {
    /// Whether another attempt (here or on another worker) might succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, UnitFailure::Exec(e) if retryable(e))
    }
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

/// How a worker works.
#[derive(Debug)]
pub struct LoopOptions {
    /// Units computed at the same time.
    pub slots: usize,
    /// Memory all slots together may use (each gets an equal share).
    pub max_memory: Option<u64>,
    pub device: Device,
    /// Where units may read and write; `None` for units this process planned
    /// itself.
    pub paths: Option<PathPolicy>,
    /// Log every unit taken and finished at `info` (a worker process), not
    /// at `debug` (`fleetmerge run`, whose progress display shows them).
    pub announce: bool,
    /// Lease the next unit while the current one computes and writes, once
    /// its inputs are read (one lease loop more than `slots`; see the module
    /// comment).
    pub read_ahead: bool,
}

/// A panic's message.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Passes progress on, counting the bytes read (for heartbeats and reports),
/// gives back the unit's read turn once its inputs are read, and tells the
/// executor when the lease was revoked.
struct Counted<'a> {
    inner: &'a dyn Progress,
    read: &'a AtomicU64,
    turn: Option<&'a ReadTurn<'a>>,
    revoked: &'a AtomicBool,
}

impl Progress for Counted<'_> {
    fn read(&self, bytes: u64) {
        self.read.fetch_add(bytes, Ordering::Relaxed);
        self.inner.read(bytes);
    }
    fn written(&self, bytes: u64) {
        self.inner.written(bytes);
    }
    fn unit_done(&self, input_bytes: u64, resumed: bool) {
        self.inner.unit_done(input_bytes, resumed);
    }
    fn inputs_read(&self) {
        if let Some(turn) = self.turn {
            turn.release();
        }
        self.inner.inputs_read();
    }
    fn cancelled(&self) -> bool {
        self.revoked.load(Ordering::Relaxed)
    }
}

/// One of the `slots` turns to read inputs that a read-ahead worker's lease
/// loops share: taken before leasing, given back when the unit's inputs are
/// read, when the lease brings no unit, or at the latest when it is dropped.
struct ReadTurn<'a> {
    turns: &'a (Mutex<usize>, Condvar),
    held: AtomicBool,
}

impl<'a> ReadTurn<'a> {
    /// Waits for a free turn (`None` once the worker is stopping).
    fn take(turns: &'a (Mutex<usize>, Condvar), max: usize, stop: &AtomicBool) -> Option<Self> {
        let (free, cv) = turns;
        let mut taken = free.lock().unwrap_or_else(|p| p.into_inner());
        while *taken >= max {
            if stop.load(Ordering::SeqCst) {
                return None;
            }
            taken = cv
                .wait_timeout(taken, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *taken += 1;
        Some(ReadTurn {
            turns,
            held: AtomicBool::new(true),
        })
    }

    fn release(&self) {
        if self.held.swap(false, Ordering::SeqCst) {
            let (taken, cv) = self.turns;
            *taken.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
            cv.notify_one();
        }
    }
}

impl Drop for ReadTurn<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// The state the slots share.
struct Loop<'a> {
    source: &'a dyn UnitSource,
    opts: &'a LoopOptions,
    stop: &'a AtomicBool,
    progress: &'a dyn Progress,
    /// Memory each slot's unit may use.
    budget: Option<u64>,
    /// Leases being computed (renewed by heartbeats), each with the flag a
    /// heartbeat sets when the source revoked it (the unit then stops
    /// reading: see [`Progress::cancelled`]).
    active: Mutex<BTreeMap<u64, Arc<AtomicBool>>>,
    /// Bytes read since the last heartbeat or report.
    read: AtomicU64,
    /// With read-ahead: the read turns taken (at most `opts.slots`).
    turns: (Mutex<usize>, Condvar),
}

macro_rules! announce {
    ($announce:expr, $($arg:tt)+) => {
        if $announce {
            tracing::info!($($arg)+)
        } else {
            tracing::debug!($($arg)+)
        }
    };
}

/// Works for `source` until it has nothing left for this worker, or `stop`
/// is set (then the units running finish first). Returns the number of units
/// completed, or the first error that ended a slot.
pub fn work(
    source: &dyn UnitSource,
    opts: &LoopOptions,
    stop: &AtomicBool,
    progress: &dyn Progress,
) -> Result<usize, WorkerError> {
    // With read-ahead, one loop more than there are units reading at once.
    let slots = opts.slots.max(1) + usize::from(opts.read_ahead);
    let state = Loop {
        source,
        opts,
        stop,
        progress,
        budget: opts.max_memory.map(|m| m / slots as u64),
        active: Mutex::new(BTreeMap::new()),
        read: AtomicU64::new(0),
        turns: (Mutex::new(0), Condvar::new()),
    };
    let state = &state;
    let (finished, heartbeats_end) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        let heartbeats = source
            .heartbeat_every()
            .map(|period| s.spawn(move || state.heartbeats(period, heartbeats_end)));
        let handles: Vec<_> = (0..slots)
            .map(|slot| s.spawn(move || state.slot(slot)))
            .collect();
        let mut completed = 0;
        let mut first_error = None;
        for h in handles {
            match h.join() {
                Ok(Ok(n)) => completed += n,
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                // `slot` catches its panics; this is a panic in that handling.
                Err(p) => {
                    stop.store(true, Ordering::SeqCst);
                    first_error.get_or_insert(WorkerError::Internal(format!(
                        "a worker task panicked: {}",
                        panic_message(p.as_ref())
                    )));
                }
            }
        }
        drop(finished);
        if let Some(h) = heartbeats {
            let _ = h.join();
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(completed),
        }
    })
}

impl Loop<'_> {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn active(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<AtomicBool>>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every `period` until `end` closes: renews the leases in flight.
    fn heartbeats(&self, period: Duration, end: mpsc::Receiver<()>) {
        while let Err(mpsc::RecvTimeoutError::Timeout) = end.recv_timeout(period) {
            let leases: Vec<u64> = self.active().keys().copied().collect();
            match self
                .source
                .heartbeat(&leases, self.read.swap(0, Ordering::Relaxed))
            {
                Ok(h) => {
                    if h.shutdown {
                        self.stop.store(true, Ordering::SeqCst);
                    }
                    for l in h.revoked {
                        tracing::warn!(
                            lease = l,
                            "lease revoked by the coordinator; its result will not count: \
                             stopping its reads"
                        );
                        if let Some(flag) = self.active().get(&l) {
                            flag.store(true, Ordering::Relaxed);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    }

    /// One lease loop. A panic in it fails the lease it held (reported to
    /// the source) and ends the worker with an internal error; any error
    /// stops the other slots from taking new units.
    fn slot(&self, slot: usize) -> Result<usize, WorkerError> {
        let held = std::cell::Cell::new(None);
        let result = catch_unwind(AssertUnwindSafe(|| self.lease_loop(slot, &held)))
            .unwrap_or_else(|p| {
                let message = panic_message(p.as_ref());
                if let Some((lease, unit, file)) = held.take() {
                    self.active().remove(&lease);
                    let failure = UnitFailure::Panicked {
                        unit,
                        file,
                        message: message.clone(),
                    };
                    let _ = self.report_failure(slot, lease, Some(unit), &failure);
                }
                Err(WorkerError::Internal(format!(
                    "a worker task panicked: {message}"
                )))
            });
        if result.is_err() {
            self.stop.store(true, Ordering::SeqCst);
        }
        result
    }

    fn lease_loop(
        &self,
        slot: usize,
        held: &std::cell::Cell<Option<(u64, usize, String)>>,
    ) -> Result<usize, WorkerError> {
        let announce = self.opts.announce;
        let mut completed = 0;
        while !self.stopping() {
            let turn = if self.opts.read_ahead {
                match ReadTurn::take(&self.turns, self.opts.slots.max(1), self.stop) {
                    Some(t) => Some(t),
                    None => break,
                }
            } else {
                None
            };
            let mut lease = match self.source.lease(slot)? {
                Next::Unit(l) => l,
                Next::Unreadable { lease, error } => {
                    drop(turn);
                    self.report_failure(slot, lease, None, &UnitFailure::Unreadable(error))?;
                    continue;
                }
                Next::Wait(d) => {
                    drop(turn);
                    std::thread::sleep(d);
                    continue;
                }
                Next::Done(why) => {
                    announce!(announce, slot, reason = %why, "the coordinator has no more work");
                    self.stop.store(true, Ordering::SeqCst);
                    break;
                }
            };
            let (id, unit) = (lease.id, lease.unit.id);
            held.set(Some((id, unit, lease.unit.file_name.clone())));
            let revoked = Arc::new(AtomicBool::new(false));
            self.active().insert(id, revoked.clone());
            announce!(announce, slot, unit, lease = id, file = %lease.unit.file_name, "working");
            let result = catch_unwind(AssertUnwindSafe(|| {
                self.compute(&mut lease, turn.as_ref(), &revoked)
            }))
            .unwrap_or_else(|p| {
                Err(UnitFailure::Panicked {
                    unit,
                    file: lease.unit.file_name.clone(),
                    message: panic_message(p.as_ref()),
                })
            });
            self.active().remove(&id);
            // Read or not, this unit reads no more.
            drop(turn);
            match result {
                Ok(output) => {
                    let read = self.read.swap(0, Ordering::Relaxed);
                    let sha256 = output.sha256.clone();
                    match self.source.complete(slot, &lease, output, read)? {
                        Completed::Refused(message) => {
                            tracing::warn!(unit, %message, "completion refused")
                        }
                        done => {
                            let accepted = done == Completed::Accepted;
                            announce!(announce, slot, unit, accepted, %sha256, "unit done");
                            self.progress.unit_done(lease.unit.input_bytes(), false);
                            completed += 1;
                        }
                    }
                }
                // Stopped because the lease was revoked: nothing to report
                // (the source no longer counts this lease).
                Err(UnitFailure::Exec(ExecError::Storage(StorageError::Cancelled { .. })))
                    if revoked.load(Ordering::Relaxed) =>
                {
                    announce!(announce, slot, unit, lease = id, "stopped: lease revoked")
                }
                Err(failure) => self.report_failure(slot, id, Some(unit), &failure)?,
            }
            held.set(None);
        }
        Ok(completed)
    }

    /// Checks the unit and where it reads and writes, then computes it.
    fn compute(
        &self,
        lease: &mut Lease,
        turn: Option<&ReadTurn<'_>>,
        revoked: &AtomicBool,
    ) -> Result<UnitOutput, UnitFailure> {
        // Checked before anything else looks at it (the executor checks again).
        lease.unit.validate().map_err(ExecError::from)?;
        let out_dir = match &self.opts.paths {
            Some(policy) => policy.admit(&mut lease.unit, &lease.out_dir)?,
            None => lease.out_dir.clone(),
        };
        let limits = ExecLimits::for_unit(&lease.unit, &out_dir, self.budget)?;
        let progress = Counted {
            inner: self.progress,
            read: &self.read,
            turn,
            revoked,
        };
        Ok(exec::execute_unit_on(
            &lease.unit,
            &out_dir,
            &progress,
            &limits,
            &self.opts.device,
        )?)
    }

    fn report_failure(
        &self,
        slot: usize,
        lease: u64,
        unit: Option<usize>,
        failure: &UnitFailure,
    ) -> Result<(), WorkerError> {
        let retryable = failure.retryable();
        match unit {
            Some(unit) => {
                tracing::warn!(slot, unit, lease, retryable, error = %failure, "unit failed")
            }
            None => tracing::warn!(slot, lease, retryable, error = %failure, "unit failed"),
        }
        self.source.fail(slot, lease, failure)
    }
}

#[cfg(test)]
mod tests;
