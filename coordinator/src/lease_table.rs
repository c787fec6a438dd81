//! The lease table of one merge: every unit is pending, leased (to a worker,
//! until a deadline that heartbeats extend), being checked (a completion whose
//! shard is checked and journaled outside the table's lock), done or failed.
//! Expired leases go back to the queue; a unit that failed `max_attempts`
//! times, or failed in a way another attempt cannot fix, ends the merge with an
//! error naming the unit, its tensors, the workers and their errors. Pure
//! bookkeeping: no storage, no network, no clock of its own, so that the lock
//! around it (see [`crate::merge`]) is only ever held for a few microseconds.
//!
//! Leases belong to a *holder*: the session id of a registered remote worker
//! (see [`LeaseTable::register`]), or the name of an in-process worker of
//! `fleetmerge run`. Only the holder can extend, complete or fail its lease.

use fleetmerge_engine::unit::UnitOutput;
use fleetmerge_engine::unit::WorkUnit;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Display;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
enum State {
    Pending,
    Leased {
        lease: u64,
        worker: String,
        deadline_ms: u64,
    },
    /// A completion of `lease` by `worker` is being checked (outside the lock):
    /// the unit is neither leased again nor expired meanwhile.
    Checking {
        lease: u64,
        worker: String,
    },
    Done,
    Failed,
}

/// A second copy of a leased unit given to an idle worker near the end of
/// the merge (speculative re-execution): whichever copy completes first
/// wins (shards are deterministic), the other lease is revoked.
#[derive(Debug, Clone, PartialEq)]
struct Backup {
    lease: u64,
    worker: String,
    deadline_ms: u64,
    /// When it was given.
    leased_ms: u64,
    /// Its holder's input bytes read then.
    read_at_lease: u64,
}

#[derive(Debug)]
struct Unit {
    unit: Arc<WorkUnit>,
    state: State,
    /// When its current lease was given (the table's clock).
    leased_ms: u64,
    /// Its holder's input bytes read (heartbeats' account) when it was leased.
    read_at_lease: u64,
    backup: Option<Backup>,
    attempts: u32,
    /// (worker, error) of every failed attempt.
    errors: Vec<(String, String)>,
}

/// A worker the coordinator has heard from (one registration: a session).
#[derive(Debug, Clone, Default)]
pub struct WorkerInfo {
    /// The name it registered with (`--worker-id`).
    pub id: String,
    pub device: String,
    pub slots: u32,
    pub last_seen_ms: u64,
    pub bytes_read: u64,
    /// Told that the merge is over.
    pub dismissed: bool,
}

/// What a worker asking for work gets.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseReply {
    Unit {
        lease: u64,
        unit: Arc<WorkUnit>,
        deadline_ms: u64,
    },
    Wait,
    Done(String),
}

/// Who wrote the shard of a completion, which decides what a rejected one
/// costs (see [`LeaseTable::finish_check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An in-process worker of `fleetmerge run`: its shard is this process's
    /// own, so a completion that cannot be recorded (the output storage
    /// failed) ends the merge, and one that comes after another unit ended
    /// the merge is still recorded (a resumed run keeps it).
    InProcess,
    /// A remote worker: a rejected shard is a failed attempt (the unit goes
    /// back to the queue), and nothing is accepted once the merge is over.
    Remote,
}

/// A completion whose shard may now be checked (see [`LeaseTable::begin_check`]).
#[derive(Debug, Clone)]
pub struct Check {
    pub unit: Arc<WorkUnit>,
    pub lease: u64,
    /// The session's lease had expired (the unit was still pending).
    pub late: bool,
    pub origin: Origin,
}

/// Why a completion is not checked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// The unit was done already (a slow worker whose lease had expired:
    /// harmless, the first commit won).
    #[error("unit {unit} is done already")]
    AlreadyDone { unit: u64 },
    #[error("lease {lease} was never given to this worker (unit {unit})")]
    NeverGiven { lease: u64, unit: u64 },
    #[error("lease {lease} belongs to another worker")]
    NotYours { lease: u64 },
    #[error("lease {lease} is for unit {leased}, not unit {unit}")]
    OtherUnit {
        lease: u64,
        leased: usize,
        unit: u64,
    },
    #[error("unit {unit} failed; the merge is over")]
    UnitFailed { unit: u64 },
    #[error("lease {lease} expired and unit {unit} went to another worker")]
    Reassigned { lease: u64, unit: u64 },
    /// The merge ended (`outcome`, as its debug form) before this completion.
    #[error("the merge is over ({outcome})")]
    MergeOver { outcome: String },
}

/// A new session refused: the table holds as many as it keeps.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "too many workers registered ({sessions}, the most this coordinator keeps); \
     silent ones are forgotten after {idle_s} s"
)]
pub struct TooManySessions {
    pub sessions: usize,
    pub idle_s: u64,
}

/// What a failure report does.
#[derive(Debug, Clone, PartialEq)]
pub enum FailReply {
    /// Recorded: the unit goes back to the queue, or the merge gives up.
    Recorded,
    /// The lease was this holder's but is no longer current, or this
    /// coordinator never gave it: ignored.
    Stale,
    /// The lease was given to another holder: refused.
    NotYours,
}
/// Counts for status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub total: usize,
    pub done: usize,
    pub running: usize,
    pub pending: usize,
    pub failed: usize,
    pub bytes_written: u64,
}

/// How the merge ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every unit is done (assembly not yet run).
    AllDone,
    Failed(String),
}

/// The lease table (see the module's comment).
pub struct LeaseTable {
    units: Vec<Unit>,
    queue: VecDeque<usize>,
    by_lease: BTreeMap<u64, usize>,
    next_lease: u64,
    lease_ms: u64,
    max_attempts: u32,
    /// Registered remote workers by session id.
    pub workers: BTreeMap<String, WorkerInfo>,
    /// Every lease handed out: (unit index, holder).
    issued: HashMap<u64, (usize, String)>,
    /// Most sessions at once, and how long a session that holds no lease may
    /// stay silent before it is forgotten.
    max_sessions: usize,
    idle_ms: u64,
    /// Leases that ran out without a heartbeat.
    pub lease_expiries: u64,
    /// Leases of a unit beyond its first (after an expiry or a failure).
    pub retries: u64,
    /// Attempts that ended in a reported failure.
    pub failures: u64,
    outputs: BTreeMap<usize, UnitOutput>,
    outcome: Option<Outcome>,
    /// The latest time a caller told the table (ms).
    clock_ms: u64,
    /// How long finished units took (lease to completion), for speculation.
    durations: Vec<u64>,
    /// Second copies handed out (see [`Backup`]).
    pub speculative: u64,
}

/// A unit is copied to an idle worker when it has run this much longer than
/// the median unit ([`SPECULATE_FACTOR`]), and at least [`SPECULATE_MIN_MS`].
const SPECULATE_FACTOR: f64 = 1.5;
const SPECULATE_MIN_MS: u64 = 2_000;

fn describe(unit: &WorkUnit) -> String {
    let names: Vec<&str> = unit.tensors.iter().map(|t| t.name.as_str()).collect();
    match names.as_slice() {
        [] => "no tensors".into(),
        [one] => one.to_string(),
        [first, .., last] => format!("{first} .. {last} ({} tensors)", names.len()),
    }
}

impl LeaseTable {
    /// Units in plan order; those in `done` were finished by an earlier run.
    pub fn new(
        units: Vec<WorkUnit>,
        done: BTreeMap<usize, UnitOutput>,
        lease_ms: u64,
        max_attempts: u32,
        first_lease: u64,
    ) -> Self {
        let mut queue = VecDeque::new();
        let units: Vec<Unit> = units
            .into_iter()
            .enumerate()
            .map(|(i, unit)| {
                let unit = Arc::new(unit);
                let state = if done.contains_key(&unit.id) {
                    State::Done
                } else {
                    State::Pending
                };
                if state == State::Pending {
                    queue.push_back(i);
                }
                Unit {
                    unit,
                    state,
                    leased_ms: 0,
                    read_at_lease: 0,
                    backup: None,
                    attempts: 0,
                    errors: Vec::new(),
                }
            })
            .collect();
        // Largest first (stable: plan order among equals), so that the
        // merge ends on small units and the nodes finish together.
        let mut order: Vec<usize> = queue.into_iter().collect();
        order.sort_by_key(|&i| std::cmp::Reverse(units[i].unit.input_bytes()));
        let queue: VecDeque<usize> = order.into_iter().collect();
        let outcome = queue.is_empty().then_some(Outcome::AllDone);
        LeaseTable {
            units,
            queue,
            by_lease: BTreeMap::new(),
            next_lease: first_lease.max(1),
            lease_ms,
            max_attempts: max_attempts.max(1),
            workers: BTreeMap::new(),
            issued: HashMap::new(),
            max_sessions: usize::MAX,
            idle_ms: u64::MAX,
            lease_expiries: 0,
            retries: 0,
            failures: 0,
            outputs: done,
            outcome,
            clock_ms: 0,
            durations: Vec::new(),
            speculative: 0,
        }
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// Outputs of every finished unit, in unit order.
    pub fn outputs(&self) -> Vec<UnitOutput> {
        self.outputs.values().cloned().collect()
    }

    /// Bounds the sessions: at most `max` at once; one that holds no lease and
    /// was not heard from for `idle_ms` is forgotten.
    pub fn limit_sessions(&mut self, max: usize, idle_ms: u64) {
        self.max_sessions = max.max(1);
        self.idle_ms = idle_ms;
    }

    /// A new session for a worker (`session` is the caller's fresh random id).
    pub fn register(&mut self, session: &str, info: WorkerInfo) -> Result<(), TooManySessions> {
        self.evict(info.last_seen_ms);
        if self.workers.len() >= self.max_sessions {
            return Err(TooManySessions {
                sessions: self.workers.len(),
                idle_s: self.idle_ms / 1000,
            });
        }
        self.workers.insert(session.to_string(), info);
        Ok(())
    }

    /// The session's worker, marked as heard from now; `None` when unknown.
    pub fn session(&mut self, session: &str, now_ms: u64) -> Option<&mut WorkerInfo> {
        let info = self.workers.get_mut(session)?;
        info.last_seen_ms = now_ms;
        Some(info)
    }

    /// The name of a lease holder: its worker id, or the holder itself (an
    /// in-process worker, or a session already forgotten).
    pub fn name_of(&self, holder: &str) -> String {
        self.workers
            .get(holder)
            .map(|w| w.id.clone())
            .unwrap_or_else(|| holder.to_string())
    }

    /// Forgets sessions that hold no lease and were silent for too long.
    pub fn evict(&mut self, now_ms: u64) {
        if self.idle_ms == u64::MAX {
            return;
        }
        let holding: std::collections::HashSet<&str> = self
            .units
            .iter()
            .filter_map(|u| match &u.state {
                State::Leased { worker, .. } | State::Checking { worker, .. } => {
                    Some(worker.as_str())
                }
                _ => None,
            })
            .collect();
        let idle = self.idle_ms;
        let gone: Vec<String> = self
            .workers
            .iter()
            .filter(|(s, w)| {
                now_ms.saturating_sub(w.last_seen_ms) > idle && !holding.contains(s.as_str())
            })
            .map(|(s, _)| s.clone())
            .collect();
        for s in gone {
            if let Some(w) = self.workers.remove(&s) {
                tracing::info!(worker = %w.id, "forgot a silent worker that held no lease");
            }
        }
    }

    fn give_up(&mut self, i: usize, why: &str) {
        let u = &mut self.units[i];
        u.state = State::Failed;
        let workers: Vec<String> = u.errors.iter().map(|(w, e)| format!("{w}: {e}")).collect();
        self.outcome = Some(Outcome::Failed(format!(
            "work unit {} ({}, tensors {}) {why}; attempts: {}",
            u.unit.id,
            u.unit.file_name,
            describe(&u.unit),
            if workers.is_empty() {
                "none".into()
            } else {
                workers.join("; ")
            }
        )));
    }

    /// Puts units whose lease ran out back in the queue (or gives up on them).
    pub fn expire(&mut self, now_ms: u64) {
        self.clock_ms = self.clock_ms.max(now_ms);
        for i in 0..self.units.len() {
            if let Some(b) = self.units[i].backup.clone() {
                if b.deadline_ms < now_ms {
                    self.by_lease.remove(&b.lease);
                    self.units[i].backup = None;
                }
            }
            if let State::Leased {
                lease,
                worker,
                deadline_ms,
            } = self.units[i].state.clone()
            {
                if deadline_ms < now_ms {
                    self.lease_expiries += 1;
                    let name = self.name_of(&worker);
                    tracing::warn!(unit = i, worker = %name, "lease expired; handing the unit to another worker");
                    self.by_lease.remove(&lease);
                    self.units[i]
                        .errors
                        .push((name, "lease expired (no heartbeat)".into()));
                    if self.promote_backup(i) {
                        continue;
                    }
                    if self.units[i].attempts >= self.max_attempts {
                        self.give_up(i, &format!("failed {} times", self.units[i].attempts));
                    } else {
                        self.units[i].state = State::Pending;
                        self.queue.push_back(i);
                    }
                }
            }
        }
        self.evict(now_ms);
    }

    pub fn lease(&mut self, worker: &str, now_ms: u64) -> LeaseReply {
        self.expire(now_ms);
        if let Some(o) = &self.outcome {
            return LeaseReply::Done(match o {
                Outcome::AllDone => "the merge is complete".into(),
                Outcome::Failed(e) => format!("the merge failed: {e}"),
            });
        }
        // A queued unit may have been completed meanwhile by a worker whose
        // lease had expired (or that a previous coordinator had leased it to).
        if let Some(reply) = self.speculate_early(worker, now_ms) {
            return reply;
        }
        let Some(i) = std::iter::from_fn(|| self.queue.pop_front())
            .find(|&i| self.units[i].state == State::Pending)
        else {
            return self.speculate(worker, now_ms);
        };
        let lease = self.next_lease;
        self.next_lease += 1;
        let deadline_ms = now_ms.saturating_add(self.lease_ms);
        let u = &mut self.units[i];
        u.attempts += 1;
        if u.attempts > 1 {
            self.retries += 1;
        }
        u.state = State::Leased {
            lease,
            worker: worker.to_string(),
            deadline_ms,
        };
        u.leased_ms = now_ms;
        u.read_at_lease = self.workers.get(worker).map_or(0, |w| w.bytes_read);
        self.by_lease.insert(lease, i);
        self.issued.insert(lease, (i, worker.to_string()));
        LeaseReply::Unit {
            lease,
            unit: u.unit.clone(),
            deadline_ms,
        }
    }

    /// Extends the worker's leases; returns the ones it no longer holds.
    pub fn heartbeat(&mut self, worker: &str, leases: &[u64], now_ms: u64) -> Vec<u64> {
        self.expire(now_ms);
        self.clock_ms = self.clock_ms.max(now_ms);
        let deadline = now_ms.saturating_add(self.lease_ms);
        let mut revoked = Vec::new();
        for &l in leases {
            match self.by_lease.get(&l).map(|&i| &mut self.units[i].state) {
                Some(State::Leased {
                    worker: w,
                    deadline_ms,
                    ..
                }) if w == worker => *deadline_ms = deadline,
                Some(_) => match self
                    .by_lease
                    .get(&l)
                    .and_then(|&i| self.units[i].backup.as_mut())
                {
                    Some(b) if b.lease == l && b.worker == worker => b.deadline_ms = deadline,
                    _ => revoked.push(l),
                },
                None => revoked.push(l),
            }
        }
        revoked
    }

    /// First half of a completion, under the lock: `holder` reports unit
    /// `unit` done under `lease`. The lease must be one this holder was given
    /// for that unit, and current; or expired, with the unit still pending
    /// (nobody else took it). The unit is then held as being checked (it
    /// neither expires nor goes to anyone else) until
    /// [`LeaseTable::finish_check`]; the check itself (storage I/O) happens
    /// without the lock.
    pub fn begin_check(
        &mut self,
        holder: &str,
        lease: u64,
        unit: u64,
        origin: Origin,
    ) -> Result<Check, Refusal> {
        let Some((i, owner)) = self.issued.get(&lease).cloned() else {
            return Err(Refusal::NeverGiven { lease, unit });
        };
        if owner != holder {
            return Err(Refusal::NotYours { lease });
        }
        if self.units[i].unit.id as u64 != unit {
            return Err(Refusal::OtherUnit {
                lease,
                leased: self.units[i].unit.id,
                unit,
            });
        }
        let late = match &self.units[i].state {
            State::Done => return Err(Refusal::AlreadyDone { unit }),
            State::Failed => return Err(Refusal::UnitFailed { unit }),
            State::Leased {
                lease: l,
                worker: w,
                ..
            } if *l == lease && w == holder => false,
            State::Leased { .. }
                if self.units[i]
                    .backup
                    .as_ref()
                    .is_some_and(|b| b.lease == lease && b.worker == holder) =>
            {
                false
            }
            State::Pending => true,
            State::Leased { .. } | State::Checking { .. } => {
                return Err(Refusal::Reassigned { lease, unit })
            }
        };
        if let Some(o) = &self.outcome {
            if origin == Origin::Remote {
                return Err(Refusal::MergeOver {
                    outcome: format!("{o:?}"),
                });
            }
        }
        // The first copy to complete wins; the other lease is revoked.
        if let State::Leased { lease: l, .. } = &self.units[i].state {
            self.by_lease.remove(l);
        }
        if let Some(b) = self.units[i].backup.take() {
            self.by_lease.remove(&b.lease);
        }
        self.by_lease.remove(&lease);
        self.units[i].state = State::Checking {
            lease,
            worker: holder.to_string(),
        };
        Ok(Check {
            unit: self.units[i].unit.clone(),
            lease,
            late,
            origin,
        })
    }

    /// Second half of a completion, under the lock again: the shard checked
    /// and journaled (`Ok`: the unit is done), or rejected (`Err`). A remote
    /// worker's rejected shard is a failed attempt (the unit goes back to the
    /// queue, or the merge gives up after `max_attempts`); an in-process one
    /// ends the merge (see [`Origin`]).
    pub fn finish_check<E: Display + ?Sized>(
        &mut self,
        check: &Check,
        result: Result<UnitOutput, &E>,
    ) {
        let Some(i) = self.units.iter().position(|u| u.unit.id == check.unit.id) else {
            return;
        };
        let State::Checking { lease, worker } = self.units[i].state.clone() else {
            return;
        };
        if lease != check.lease {
            return;
        }
        match result {
            Ok(output) => {
                if check.late {
                    tracing::info!(unit = output.unit, lease, "a unit was completed under a lease that had expired; its shard is checked and kept");
                }
                self.units[i].state = State::Done;
                let took = self.clock_ms.saturating_sub(self.units[i].leased_ms);
                self.durations.push(took);
                self.outputs.insert(output.unit, output);
                if self.units.iter().all(|u| u.state == State::Done) {
                    self.outcome = Some(Outcome::AllDone);
                }
            }
            Err(e) => {
                self.units[i].state = State::Leased {
                    lease,
                    worker: worker.clone(),
                    deadline_ms: 0,
                };
                self.by_lease.insert(lease, i);
                match check.origin {
                    Origin::Remote => {
                        self.fail(lease, &worker, &format!("completion rejected: {e}"), true)
                    }
                    Origin::InProcess => self.fail(lease, &worker, &e.to_string(), false),
                };
            }
        }
    }

    /// The units of a shard that must be written again (a shard of parts
    /// that did not make a good shard was discarded; see `Merge`): each is
    /// replaced by the given unit of the same id (its part now going to a new
    /// upload), and one that was done goes back to the front of the queue,
    /// its output forgotten. A unit leased or being checked keeps its state:
    /// its next lease hands out the new unit.
    pub fn redo(&mut self, units: &[Arc<WorkUnit>]) {
        for new in units {
            let Some(i) = self.units.iter().position(|u| u.unit.id == new.id) else {
                continue;
            };
            self.units[i].unit = new.clone();
            if self.units[i].state == State::Done {
                self.units[i].state = State::Pending;
                self.outputs.remove(&new.id);
                self.queue.push_front(i);
            }
        }
        if self.outcome == Some(Outcome::AllDone) {
            self.outcome = None;
        }
    }

    /// Records a failed attempt reported by `worker` (the lease's holder).
    pub fn fail(&mut self, lease: u64, worker: &str, error: &str, retryable: bool) -> FailReply {
        // A lease this coordinator never gave (one of a coordinator before a
        // restart) changes nothing: ignored, as a lease no longer current.
        let not_current = match self.issued.get(&lease) {
            Some((_, owner)) if owner != worker => FailReply::NotYours,
            _ => FailReply::Stale,
        };
        let Some(&i) = self.by_lease.get(&lease) else {
            return not_current;
        };
        let is_backup = self.units[i]
            .backup
            .as_ref()
            .is_some_and(|b| b.lease == lease && b.worker == worker);
        if !is_backup
            && !matches!(&self.units[i].state, State::Leased { lease: l, worker: w, .. } if *l == lease && w == worker)
        {
            return not_current;
        }
        self.by_lease.remove(&lease);
        self.failures += 1;
        let name = self.name_of(worker);
        self.units[i].errors.push((name, error.to_string()));
        if is_backup {
            // The first copy still runs.
            self.units[i].backup = None;
            if !retryable {
                self.give_up(i, "failed with an error that another attempt cannot fix");
            }
            return FailReply::Recorded;
        }
        if retryable && self.promote_backup(i) {
            return FailReply::Recorded;
        }
        if !retryable {
            self.give_up(i, "failed with an error that another attempt cannot fix");
        } else if self.units[i].attempts >= self.max_attempts {
            self.give_up(i, &format!("failed {} times", self.units[i].attempts));
        } else {
            self.units[i].state = State::Pending;
            self.queue.push_back(i);
        }
        FailReply::Recorded
    }

    /// The unit's second copy (if any) becomes its lease, its first having
    /// ended; returns whether there was one.
    fn promote_backup(&mut self, i: usize) -> bool {
        let Some(b) = self.units[i].backup.take() else {
            return false;
        };
        self.units[i].state = State::Leased {
            lease: b.lease,
            worker: b.worker,
            deadline_ms: b.deadline_ms,
        };
        self.units[i].leased_ms = b.leased_ms;
        self.units[i].read_at_lease = b.read_at_lease;
        true
    }

    /// How far the holder of leased unit `i` has read it: (input bytes read,
    /// ms since the lease). A worker reads its units one after the other
    /// (it leases the next once the current one's inputs are read), so the
    /// bytes it reported since its latest lease are that unit's, and a unit
    /// leased before another of the same holder is read whole. With several
    /// slots the latest leases share the bytes: each is credited with all of
    /// them, which can only make a unit look faster (no copy).
    /// `latest`: each holder's most recent lease time ([`Self::latest_leases`]).
    fn read_progress(
        &self,
        i: usize,
        now_ms: u64,
        latest: &HashMap<&str, u64>,
    ) -> Option<(u64, u64)> {
        let u = &self.units[i];
        let State::Leased { worker, .. } = &u.state else {
            return None;
        };
        let info = self.workers.get(worker)?;
        let total = u.unit.input_bytes();
        let later = latest
            .get(worker.as_str())
            .is_some_and(|&t| t > u.leased_ms);
        let read = if later {
            total
        } else {
            info.bytes_read.saturating_sub(u.read_at_lease).min(total)
        };
        Some((read, now_ms.saturating_sub(u.leased_ms)))
    }

    /// When each holder took its most recent lease (first copies and second
    /// copies alike).
    fn latest_leases(&self) -> HashMap<&str, u64> {
        let mut latest: HashMap<&str, u64> = HashMap::new();
        for u in &self.units {
            let held = match &u.state {
                State::Leased { worker, .. } => Some((worker.as_str(), u.leased_ms)),
                _ => None,
            };
            let backup = u.backup.as_ref().map(|b| (b.worker.as_str(), b.leased_ms));
            for (w, t) in held.into_iter().chain(backup) {
                let e = latest.entry(w).or_insert(t);
                *e = (*e).max(t);
            }
        }
        latest
    }

    /// A second copy of a straggler *before* the queue runs dry (after
    /// LATE, Zaharia et al., OSDI 2008): a unit whose holder reads it at less
    /// than half the median rate of the units being read, and would need
    /// more than twice as long for the rest of it as a worker at that median
    /// rate needs for all of it, and longer than all workers together need
    /// for all the work left, goes to the asking worker instead of a queued
    /// unit. Otherwise the merge would wait for it at the end (a unit taken at
    /// the start by a node at a quarter of the others' rate); a slow node's
    /// unit that ends before the rest is done is left to it (copying it would
    /// throw its work away: the slow node's units would all be copied). Rates come from
    /// the holders' heartbeats (input bytes read), so only remote workers' units
    /// are copied, and only those that ran at least [`SPECULATE_MIN_MS`].
    fn speculate_early(&mut self, worker: &str, now_ms: u64) -> Option<LeaseReply> {
        if self.lease_ms == u64::MAX || self.queue.is_empty() {
            return None;
        }
        // (unit, bytes read, ms it ran) of every unit being read for long
        // enough to tell.
        let latest = self.latest_leases();
        let reading: Vec<(usize, u64, u64)> = (0..self.units.len())
            .filter_map(|i| {
                let (read, ran) = self.read_progress(i, now_ms, &latest)?;
                let total = self.units[i].unit.input_bytes();
                (ran >= SPECULATE_MIN_MS && read < total).then_some((i, read, ran))
            })
            .collect();
        // The median rate (bytes per ms) of those that told some bytes.
        let mut rates: Vec<f64> = reading
            .iter()
            .filter(|r| r.1 > 0)
            .map(|&(_, read, ran)| read as f64 / ran as f64)
            .collect();
        if rates.len() < 2 {
            return None;
        }
        // All of them together: how long the work left takes at that rate
        // (a straggler that ends before then is not the merge's tail: its
        // copy would cost the asking worker a queued unit and gain nothing).
        let aggregate: f64 = rates.iter().sum();
        let left: u64 = (0..self.units.len())
            .map(|i| {
                let total = self.units[i].unit.input_bytes();
                match &self.units[i].state {
                    State::Pending => total,
                    State::Leased { .. } => {
                        let read = self.read_progress(i, now_ms, &latest).map_or(0, |r| r.0);
                        total - read.min(total)
                    }
                    _ => 0,
                }
            })
            .sum();
        let drain = left as f64 / aggregate;
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        if median <= 0.0 {
            return None;
        }
        let (i, remaining_ms) = reading
            .iter()
            .filter(|&&(i, _, _)| {
                let u = &self.units[i];
                u.backup.is_none()
                    && !matches!(&u.state, State::Leased { worker: w, .. } if w == worker)
            })
            .filter_map(|&(i, read, ran)| {
                let total = self.units[i].unit.input_bytes();
                let fresh = total as f64 / median;
                if read == 0 {
                    // Nothing told yet (a window fetched in one piece, or read
                    // from a local file or streamed, tells its bytes at the
                    // end): a straggler only once it has run twice what the
                    // whole unit takes at the median rate.
                    return (ran as f64 > 2.0 * fresh).then_some((i, f64::INFINITY));
                }
                let rate = read as f64 / ran as f64;
                let remaining = (total - read) as f64 / rate;
                (rate < median / 2.0 && remaining > 2.0 * fresh && remaining > drain)
                    .then_some((i, remaining))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))?;
        tracing::info!(
            unit = self.units[i].unit.id,
            remaining_s = format!("{:.0}", remaining_ms / 1000.0),
            "a unit is read at less than half the median rate: a second copy goes to another worker now (the first to finish wins)"
        );
        Some(self.give_backup(i, worker, now_ms))
    }

    /// Leases a second copy of unit `i` to `worker`.
    fn give_backup(&mut self, i: usize, worker: &str, now_ms: u64) -> LeaseReply {
        let lease = self.next_lease;
        self.next_lease += 1;
        let deadline_ms = now_ms.saturating_add(self.lease_ms);
        self.units[i].backup = Some(Backup {
            lease,
            worker: worker.to_string(),
            deadline_ms,
            leased_ms: now_ms,
            read_at_lease: self.workers.get(worker).map_or(0, |w| w.bytes_read),
        });
        self.speculative += 1;
        self.by_lease.insert(lease, i);
        self.issued.insert(lease, (i, worker.to_string()));
        LeaseReply::Unit {
            lease,
            unit: self.units[i].unit.clone(),
            deadline_ms,
        }
    }

    /// Nothing is pending: gives `worker` a second copy of the unit that has
    /// run longest, when it runs well beyond the median unit (a straggler:
    /// a slow or stuck node), or asks it to wait.
    fn speculate(&mut self, worker: &str, now_ms: u64) -> LeaseReply {
        if self.lease_ms == u64::MAX || self.durations.is_empty() {
            // In-process workers (`run`) share one machine: no copies.
            return LeaseReply::Wait;
        }
        let mut sorted = self.durations.clone();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        let threshold = ((median as f64 * SPECULATE_FACTOR) as u64).max(SPECULATE_MIN_MS);
        let candidate = self
            .units
            .iter()
            .enumerate()
            .filter(|(_, u)| u.backup.is_none())
            .filter_map(|(i, u)| match &u.state {
                State::Leased { worker: w, .. } if w != worker => {
                    Some((i, now_ms.saturating_sub(u.leased_ms)))
                }
                _ => None,
            })
            .filter(|&(_, ran)| ran > threshold)
            .max_by_key(|&(_, ran)| ran);
        let Some((i, ran)) = candidate else {
            return LeaseReply::Wait;
        };
        tracing::info!(
            unit = self.units[i].unit.id,
            ran_ms = ran,
            median_ms = median,
            "a unit runs long: a second copy goes to an idle worker (the first to finish wins)"
        );
        self.give_backup(i, worker, now_ms)
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts {
            total: self.units.len(),
            ..Counts::default()
        };
        for u in &self.units {
            match u.state {
                State::Pending => c.pending += 1,
                State::Leased { .. } | State::Checking { .. } => c.running += 1,
                State::Done => c.done += 1,
                State::Failed => c.failed += 1,
            }
        }
        c.bytes_written = self.outputs.values().map(|o| o.size).sum();
        c
    }

    /// Ids of the units that are done.
    pub fn done_units(&self) -> Vec<usize> {
        self.units
            .iter()
            .filter(|u| matches!(u.state, State::Done))
            .map(|u| u.unit.id)
            .collect()
    }

    /// Units a worker currently holds (leased, or being checked).
    pub fn leases_of(&self, worker: &str) -> Vec<usize> {
        self.units
            .iter()
            .filter(|u| {
                matches!(&u.state, State::Leased { worker: w, .. } | State::Checking { worker: w, .. } if w == worker)
            })
            .map(|u| u.unit.id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units(n: usize) -> Vec<WorkUnit> {
        (0..n)
            .map(|id| WorkUnit {
                part: None,
                format: fleetmerge_engine::unit::PLAN_FORMAT,
                id,
                file_name: format!("model-{:05}-of-{n:05}.safetensors", id + 1),
                merge_method: "linear".into(),
                seed: 0,
                tensors: Vec::new(),
            })
            .collect()
    }

    fn cluster(n: usize, max_attempts: u32) -> LeaseTable {
        LeaseTable::new(units(n), BTreeMap::new(), 1000, max_attempts, 1)
    }

    fn lease(c: &mut LeaseTable, worker: &str, now: u64) -> (u64, usize) {
        match c.lease(worker, now) {
            LeaseReply::Unit { lease, unit, .. } => (lease, unit.id),
            other => panic!("expected a unit, got {other:?}"),
        }
    }

    #[test]
    fn units_are_leased_in_order_then_workers_wait() {
        let mut c = cluster(2, 3);
        assert_eq!(lease(&mut c, "a", 0).1, 0);
        assert_eq!(lease(&mut c, "b", 0).1, 1);
        assert_eq!(c.lease("c", 0), LeaseReply::Wait);
        assert_eq!(c.counts().running, 2);
        assert_eq!(c.leases_of("a"), vec![0]);
    }

    #[test]
    fn an_expired_lease_goes_to_another_worker_and_heartbeats_keep_it() {
        let mut c = cluster(1, 3);
        let (l, _) = lease(&mut c, "a", 0);
        // Heartbeats extend the lease past its first deadline.
        assert!(c.heartbeat("a", &[l], 900).is_empty());
        assert_eq!(c.lease("b", 1500), LeaseReply::Wait);
        // Silence: the unit goes to b, and a's lease is revoked.
        let (l2, id) = lease(&mut c, "b", 2000);
        assert_eq!(id, 0);
        assert_ne!(l, l2);
        assert_eq!(c.heartbeat("a", &[l], 2001), vec![l]);
        // Another worker cannot extend b's lease.
        assert_eq!(c.heartbeat("a", &[l2], 2002), vec![l2]);
        // a's late failure report does not touch b's attempt.
        c.fail(l, "a", "late", true);
        c.fail(l2, "a", "not mine", false);
        assert_eq!(c.counts().running, 1);
        assert!(c.outcome().is_none());
    }

    #[test]
    fn gives_up_after_max_attempts_naming_unit_workers_and_errors() {
        let mut c = cluster(2, 2);
        let (l, _) = lease(&mut c, "w1", 0);
        c.fail(l, "w1", "disk full", true);
        let (_, id) = lease(&mut c, "w2", 0); // unit 1
        assert_eq!(id, 1);
        let (l, id) = lease(&mut c, "w3", 0);
        assert_eq!(id, 0);
        c.fail(l, "w3", "connection reset", true);
        let Some(Outcome::Failed(e)) = c.outcome() else {
            panic!("expected a failure, got {:?}", c.outcome());
        };
        for part in [
            "work unit 0",
            "model-00001-of-00002.safetensors",
            "failed 2 times",
            "w1: disk full",
            "w3: connection reset",
        ] {
            assert!(e.contains(part), "{part:?} missing from: {e}");
        }
        assert!(matches!(c.lease("w4", 0), LeaseReply::Done(m) if m.contains("failed")));
        assert_eq!(c.counts().failed, 1);
    }

    #[test]
    fn a_permanent_failure_ends_the_merge_at_once() {
        let mut c = cluster(3, 5);
        let (l, _) = lease(&mut c, "w1", 0);
        c.fail(l, "w1", "bytes 0..8 out of range", false);
        let Some(Outcome::Failed(e)) = c.outcome() else {
            panic!("expected a failure");
        };
        assert!(
            e.contains("cannot fix") && e.contains("out of range"),
            "{e}"
        );
    }

    #[test]
    fn expiry_counts_as_an_attempt() {
        let mut c = cluster(1, 2);
        lease(&mut c, "a", 0);
        lease(&mut c, "b", 1001);
        c.expire(2002);
        let Some(Outcome::Failed(e)) = c.outcome() else {
            panic!("expected a failure");
        };
        assert!(
            e.contains("a: lease expired") && e.contains("b: lease expired"),
            "{e}"
        );
    }

    fn output(unit: usize) -> UnitOutput {
        UnitOutput {
            offset: 0,
            chunks: Vec::new(),
            unit,
            file_name: format!("model-{:05}-of-00002.safetensors", unit + 1),
            size: 8,
            sha256: String::new(),
            tensors: Vec::new(),
            non_finite: Vec::new(),
        }
    }

    #[test]
    fn only_the_lease_holder_can_complete_and_a_rejection_is_a_failed_attempt() {
        let mut c = cluster(2, 2);
        let (l, id) = lease(&mut c, "s1", 0);
        // Another session, a lease never given, another unit: refused.
        for (holder, lease, unit) in [("s2", l, id as u64), ("s1", 0, 0), ("s1", l, 1)] {
            assert!(
                matches!(
                    c.begin_check(holder, lease, unit, Origin::Remote),
                    Err(r) if !matches!(r, Refusal::AlreadyDone { .. })
                ),
                "{holder} {lease} {unit}"
            );
        }
        assert_eq!(c.fail(l, "s2", "boom", false), FailReply::NotYours);
        assert!(c.outcome().is_none());
        // The holder's completion is checked; meanwhile it neither expires
        // nor goes to anyone else.
        let check = c.begin_check("s1", l, id as u64, Origin::Remote).unwrap();
        c.expire(1_000_000);
        assert_eq!(c.counts().running, 1);
        assert_eq!(lease(&mut c, "s2", 1_000_000).1, 1);
        c.finish_check(&check, Err("garbage data"));
        assert_eq!((c.counts().pending, c.failures), (1, 1));
        assert_eq!(c.fail(l, "s1", "late", true), FailReply::Stale);
        // The next attempt passes.
        let (l2, _) = lease(&mut c, "s3", 1_000_000);
        let check = c.begin_check("s3", l2, 0, Origin::Remote).unwrap();
        c.finish_check::<str>(&check, Ok(output(0)));
        assert_eq!(c.counts().done, 1);
        assert_eq!(
            c.begin_check("s1", l, 0, Origin::Remote).unwrap_err(),
            Refusal::AlreadyDone { unit: 0 }
        );
    }

    #[test]
    fn a_late_completion_counts_only_while_nobody_else_holds_the_unit() {
        let mut c = cluster(1, 5);
        let (l, _) = lease(&mut c, "s1", 0);
        c.expire(5000);
        // Expired, still pending: s1's shard is checked and kept.
        let check = c.begin_check("s1", l, 0, Origin::Remote).unwrap();
        assert!(check.late);
        c.finish_check(&check, Err("bad"));
        // Expired and handed to s2: s1's completion no longer counts.
        let (l2, _) = lease(&mut c, "s2", 5000);
        assert!(
            matches!(c.begin_check("s1", l, 0, Origin::Remote), Err(r) if r.to_string().contains("another worker"))
        );
        assert!(c.begin_check("s2", l2, 0, Origin::Remote).is_ok());
    }

    /// An in-process shard that cannot be recorded ends the merge (this
    /// process's own storage failed); one finished after another unit ended
    /// the merge is still recorded (a resumed run keeps it), where a remote
    /// worker's is refused.
    #[test]
    fn in_process_completions_end_the_merge_when_rejected_and_count_after_a_failure() {
        let mut c = cluster(3, 3);
        let (l0, _) = lease(&mut c, "local-0", 0);
        let (l1, _) = lease(&mut c, "local-1", 0);
        let (l2, _) = lease(&mut c, "s1", 0);
        let check = c.begin_check("local-0", l0, 0, Origin::InProcess).unwrap();
        c.finish_check(&check, Err("recording unit 0 in the journal: disk gone"));
        let Some(Outcome::Failed(e)) = c.outcome() else {
            panic!("expected a failure, got {:?}", c.outcome());
        };
        assert!(
            e.contains("cannot fix") && e.contains("local-0: recording unit 0 in the journal"),
            "{e}"
        );
        let check = c.begin_check("local-1", l1, 1, Origin::InProcess).unwrap();
        c.finish_check::<str>(&check, Ok(output(1)));
        assert_eq!(c.done_units(), vec![1]);
        assert!(matches!(
            c.begin_check("s1", l2, 2, Origin::Remote),
            Err(Refusal::MergeOver { .. })
        ));
    }

    #[test]
    fn sessions_are_bounded_and_silent_ones_without_leases_forgotten() {
        let mut c = cluster(1, 3);
        c.limit_sessions(2, 1000);
        let info = |t| WorkerInfo {
            id: "w".into(),
            last_seen_ms: t,
            ..WorkerInfo::default()
        };
        c.register("a", info(0)).unwrap();
        c.register("b", info(0)).unwrap();
        assert!(c
            .register("c", info(10))
            .unwrap_err()
            .to_string()
            .contains("too many"));
        lease(&mut c, "a", 10);
        // b was silent and holds nothing: forgotten; a holds a lease: kept.
        c.register("c", info(1500)).unwrap();
        assert!(c.workers.contains_key("a") && !c.workers.contains_key("b"));
        assert!(c.session("b", 1500).is_none());
    }

    #[test]
    fn finished_units_of_an_earlier_run_are_not_leased() {
        let done: BTreeMap<usize, UnitOutput> = [(
            0,
            UnitOutput {
                offset: 0,
                chunks: Vec::new(),
                unit: 0,
                file_name: "model-00001-of-00002.safetensors".into(),
                size: 8,
                sha256: String::new(),
                tensors: Vec::new(),
                non_finite: Vec::new(),
            },
        )]
        .into();
        let mut c = LeaseTable::new(units(2), done, 1000, 3, 1);
        assert_eq!(lease(&mut c, "a", 0).1, 1);
        assert_eq!(c.lease("a", 0), LeaseReply::Wait);
        assert_eq!(c.counts().done, 1);
    }

    fn done(c: &mut LeaseTable, holder: &str, lease: u64, unit: usize) {
        let check = c
            .begin_check(holder, lease, unit as u64, Origin::Remote)
            .unwrap();
        c.finish_check::<str>(&check, Ok(output(unit)));
    }

    #[test]
    fn a_straggler_gets_a_second_copy_and_the_first_completion_wins() {
        let mut c = LeaseTable::new(units(3), BTreeMap::new(), 60_000, 3, 1);
        let (l0, u0) = lease(&mut c, "a", 0);
        let (l1, u1) = lease(&mut c, "b", 0);
        let (l2, u2) = lease(&mut c, "slow", 0);
        done(&mut c, "a", l0, u0);
        c.heartbeat("b", &[l1], 3_000);
        done(&mut c, "b", l1, u1);
        // Nothing pending; the slow unit has run 3 s, the median 3 s: not yet.
        assert_eq!(c.lease("a", 3_000), LeaseReply::Wait);
        // At 10 s it runs well beyond the median: a copy for an idle worker,
        // never for its own holder.
        assert_eq!(c.lease("slow", 10_000), LeaseReply::Wait);
        let (copy, unit) = lease(&mut c, "a", 10_000);
        assert_eq!(unit, u2);
        assert_eq!(c.speculative, 1);
        // One copy per unit.
        assert_eq!(c.lease("b", 10_000), LeaseReply::Wait);
        // Both leases are kept alive by heartbeats.
        assert!(c.heartbeat("a", &[copy], 11_000).is_empty());
        assert!(c.heartbeat("slow", &[l2], 11_000).is_empty());
        // The copy completes first and wins; the straggler's lease is revoked.
        done(&mut c, "a", copy, u2);
        assert_eq!(c.heartbeat("slow", &[l2], 12_000), vec![l2]);
        assert_eq!(
            c.begin_check("slow", l2, u2 as u64, Origin::Remote)
                .unwrap_err(),
            Refusal::AlreadyDone { unit: u2 as u64 }
        );
        assert_eq!(c.outcome(), Some(&Outcome::AllDone));
    }

    #[test]
    fn a_failed_or_expired_first_copy_leaves_the_unit_to_its_second() {
        let mut c = LeaseTable::new(units(2), BTreeMap::new(), 60_000, 2, 1);
        let (l0, u0) = lease(&mut c, "a", 0);
        let (l1, u1) = lease(&mut c, "slow", 0);
        c.heartbeat("a", &[l0], 2_000);
        done(&mut c, "a", l0, u0);
        let (copy, unit) = lease(&mut c, "a", 20_000);
        assert_eq!(unit, u1);
        // The first copy fails: the second keeps the unit (not queued again).
        assert_eq!(c.fail(l1, "slow", "disk full", true), FailReply::Recorded);
        assert_eq!(c.lease("b", 20_000), LeaseReply::Wait);
        assert!(c.heartbeat("a", &[copy], 21_000).is_empty());
        done(&mut c, "a", copy, u1);
        assert_eq!(c.outcome(), Some(&Outcome::AllDone));
    }

    #[test]
    fn in_process_merges_make_no_copies() {
        let mut c = LeaseTable::new(units(2), BTreeMap::new(), u64::MAX, 2, 1);
        let (l0, u0) = lease(&mut c, "local-0", 0);
        lease(&mut c, "local-1", 0);
        done(&mut c, "local-0", l0, u0);
        assert_eq!(c.lease("local-0", 1_000_000), LeaseReply::Wait);
    }

    /// A discarded shard's units: the done ones go back to the front of the
    /// queue with their outputs forgotten and hand out the new unit; the one
    /// being checked fails its attempt as usual and is leased again, new.
    #[test]
    fn units_redone_are_queued_again_with_their_new_unit() {
        let mut c = cluster(4, 3);
        let leases: Vec<(u64, usize)> = (0..3).map(|_| lease(&mut c, "a", 0)).collect();
        done(&mut c, "a", leases[0].0, leases[0].1);
        done(&mut c, "a", leases[1].0, leases[1].1);
        let check = c
            .begin_check("a", leases[2].0, leases[2].1 as u64, Origin::Remote)
            .unwrap();
        let fresh: Vec<Arc<WorkUnit>> = [leases[0].1, leases[1].1, leases[2].1]
            .iter()
            .map(|&id| {
                let mut u = units(4).remove(id);
                u.seed = 7;
                Arc::new(u)
            })
            .collect();
        c.redo(&fresh);
        c.finish_check::<str>(&check, Err("the shard was wrong"));
        assert_eq!(c.counts().done, 0);
        assert!(c.outputs().is_empty());
        // The redone units first (most recently queued first), then the rest.
        let mut got = Vec::new();
        while let LeaseReply::Unit { unit, .. } = c.lease("b", 10) {
            got.push((unit.id, unit.seed));
        }
        let mut ids: Vec<usize> = got.iter().map(|g| g.0).collect();
        ids.sort();
        assert_eq!(ids, vec![0, 1, 2, 3], "{got:?}");
        assert!(
            got.iter()
                .all(|&(id, seed)| seed == if id < 3 { 7 } else { 0 }),
            "{got:?}"
        );
        assert!(c.outcome().is_none());
    }

    /// Units of the given input sizes (one input tensor each).
    fn sized_units(sizes: &[u64]) -> Vec<WorkUnit> {
        use fleetmerge_engine::dtype::DType;
        use fleetmerge_engine::unit::{OutputTensor, TensorOp, TensorParams, TensorRef};
        let mut units = units(sizes.len());
        for (u, &len) in units.iter_mut().zip(sizes) {
            u.tensors = vec![OutputTensor {
                name: "t".into(),
                dtype: DType::BF16,
                shape: vec![len / 2],
                op: TensorOp::Merge,
                inputs: vec![TensorRef {
                    model: 0,
                    name: "t".into(),
                    location: "/m/model.safetensors".into(),
                    offset: 8,
                    len,
                    dtype: DType::BF16,
                    shape: vec![len / 2],
                    lora: None,
                }],
                base: None,
                params: TensorParams::default(),
                scales: Vec::new(),
                block: None,
                requant: None,
                vocab: None,
                packed: None,
            }];
        }
        units
    }

    fn read(c: &mut LeaseTable, worker: &str, bytes: u64) {
        c.workers.get_mut(worker).unwrap().bytes_read += bytes;
    }

    /// A node reading its unit at a tenth of the others' rate: the next
    /// worker to ask gets a copy of it at once, though units are queued; the
    /// next one gets a queued unit (one copy per unit). At equal rates nobody
    /// gets a copy.
    #[test]
    fn a_unit_read_far_below_the_median_rate_is_copied_while_units_are_queued() {
        const M: u64 = 1 << 20;
        for slow in [true, false] {
            let mut c = LeaseTable::new(
                sized_units(&[100 * M, 100 * M, 100 * M, 100 * M, 10 * M, 10 * M]),
                BTreeMap::new(),
                60_000,
                3,
                1,
            );
            for w in ["a", "b", "c", "d"] {
                c.register(w, WorkerInfo::default()).unwrap();
            }
            let held: Vec<(u64, usize)> = ["a", "b", "c", "d"]
                .iter()
                .map(|w| lease(&mut c, w, 0))
                .collect();
            read(&mut c, "a", if slow { 5 * M } else { 50 * M });
            for w in ["b", "c", "d"] {
                read(&mut c, w, 50 * M);
            }
            c.heartbeat("a", &[held[0].0], 5_000);
            let (_, got) = lease(&mut c, "d", 5_000);
            if slow {
                assert_eq!(got, held[0].1, "d copies a's unit");
                assert_eq!(c.speculative, 1);
                // One copy per unit: c gets a queued unit.
                let (_, next) = lease(&mut c, "c", 5_000);
                assert!(next >= 4, "{next}");
            } else {
                assert!(got >= 4, "{got}");
                assert_eq!(c.speculative, 0);
            }
        }
    }

    /// A node at a quarter of the others' rate whose unit ends well before
    /// the queued work is done keeps it: nothing is copied. Late in the
    /// merge, when its rest would outlast all the work left, it is.
    #[test]
    fn a_slow_units_copy_waits_until_it_would_be_the_tail() {
        const M: u64 = 1 << 20;
        let mut c = LeaseTable::new(sized_units(&[40 * M; 22]), BTreeMap::new(), 600_000, 3, 1);
        for w in ["slow", "f1", "f2"] {
            c.register(w, WorkerInfo::default()).unwrap();
        }
        let (lease_slow, slow_unit) = lease(&mut c, "slow", 0);
        let (l1, u1) = lease(&mut c, "f1", 0);
        let (l2, u2) = lease(&mut c, "f2", 0);
        // 4 s in: slow read 10 MiB (2.5 MiB/s), f1 and f2 30 (7.5 MiB/s).
        // Slow's rest takes 12 s (more than twice the 5.3 s a fresh copy
        // takes at the median rate), but the work left takes 46 s at 17.5
        // MiB/s: slow's unit is not the tail.
        read(&mut c, "slow", 10 * M);
        read(&mut c, "f1", 30 * M);
        read(&mut c, "f2", 30 * M);
        c.heartbeat("slow", &[lease_slow], 4_000);
        let (l, u) = lease(&mut c, "f2", 4_000);
        assert_ne!(u, slow_unit, "a copy now would gain nothing");
        assert_eq!(c.speculative, 0);
        // f1 and f2 do all the queued units but one while slow crawls.
        done(&mut c, "f1", l1, u1);
        done(&mut c, "f2", l2, u2);
        done(&mut c, "f2", l, u);
        while c.queue.len() > 2 {
            let (l, u) = lease(&mut c, "f2", 50_000);
            assert_ne!(u, slow_unit);
            done(&mut c, "f2", l, u);
        }
        // At 100 s f1 reads one of the last two at 7.5 MiB/s; slow has read
        // 11 MiB (0.11 MiB/s): its rest (~260 s) outlasts the work left
        // (~9 s at all rates together). f2 asks: it gets the copy.
        lease(&mut c, "f1", 96_000);
        read(&mut c, "f1", 30 * M);
        read(&mut c, "slow", M);
        c.heartbeat("slow", &[lease_slow], 100_000);
        let (_, got) = lease(&mut c, "f2", 100_000);
        assert_eq!(got, slow_unit, "now slow's unit is the tail");
        assert_eq!(c.speculative, 1);
    }

    /// A unit whose holder has told no bytes yet (a window fetched in one
    /// piece tells them at the end) is copied only once it has run twice what
    /// the whole unit takes at the median rate.
    #[test]
    fn a_unit_with_no_bytes_told_is_copied_only_after_twice_its_expected_time() {
        const M: u64 = 1 << 20;
        let mut c = LeaseTable::new(
            sized_units(&[1000 * M, 1000 * M, 1000 * M, 100 * M, 10 * M, 10 * M]),
            BTreeMap::new(),
            600_000,
            3,
            1,
        );
        for w in ["a", "b", "c", "d"] {
            c.register(w, WorkerInfo::default()).unwrap();
        }
        for w in ["b", "c", "d"] {
            lease(&mut c, w, 0);
        }
        let (_, silent) = lease(&mut c, "a", 0);
        assert_eq!(silent, 3);
        // b, c and d read 10 MiB/s; a's 100 MiB would take 10 s at that rate.
        for w in ["b", "c", "d"] {
            read(&mut c, w, 150 * M);
        }
        let (_, got) = lease(&mut c, "d", 15_000);
        assert_ne!(got, silent, "15 s is not yet twice 10 s");
        for w in ["b", "c", "d"] {
            read(&mut c, w, 100 * M);
        }
        let (_, got) = lease(&mut c, "c", 25_000);
        assert_eq!(got, silent, "25 s is");
    }
}
