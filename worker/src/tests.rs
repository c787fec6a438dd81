//! The worker loop against a unit source that records what it is told,
//! computing real units (the example TIES merge) into a temporary folder.

use super::*;
use fleetmerge_engine::config::MergeConfig;
use fleetmerge_engine::plan::{self, PlanOptions};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

/// The example TIES merge's units, in shards of about 200 kB.
fn units() -> Vec<WorkUnit> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = MergeConfig::load(&root.join("examples/ties.yaml")).unwrap();
    let opts = PlanOptions {
        unit_size: None,
        out_shard_size: 200_000,
        seed: 0,
        allow_crimes: false,
        base_dir: root,
        keep_fp8: false,
    };
    let units = plan::plan(&config, &opts).unwrap().units;
    assert!(units.len() >= 3, "{} units", units.len());
    units
}

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Lease(usize),
    Complete(u64),
    Fail {
        lease: u64,
        error: String,
        retryable: bool,
    },
    Heartbeat(Vec<u64>),
}

/// Hands out `units` one lease each (lease id = 100 + unit id), then says
/// the merge is over; records every call. `on_lease`, `on_complete` and
/// `heartbeats` let a test act at those points.
struct Recorder<'a> {
    units: Mutex<Vec<WorkUnit>>,
    out_dir: String,
    calls: Mutex<Vec<Call>>,
    on_lease: &'a (dyn Fn(&Recorder) + Sync),
    on_complete: &'a (dyn Fn(u64) + Sync),
    heartbeats: Option<Duration>,
}

impl<'a> Recorder<'a> {
    fn new(units: Vec<WorkUnit>, out_dir: &Path) -> Self {
        Recorder {
            units: Mutex::new(units.into_iter().rev().collect()),
            out_dir: out_dir.to_string_lossy().into_owned(),
            calls: Mutex::new(Vec::new()),
            on_lease: &|_| {},
            on_complete: &|_| {},
            heartbeats: None,
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn saw(&self, call: &Call) -> bool {
        self.calls.lock().unwrap().contains(call)
    }
}

impl UnitSource for Recorder<'_> {
    fn lease(&self, slot: usize) -> Result<Next, WorkerError> {
        self.calls.lock().unwrap().push(Call::Lease(slot));
        let unit = self.units.lock().unwrap().pop();
        (self.on_lease)(self);
        Ok(match unit {
            Some(unit) => Next::Unit(Lease {
                id: 100 + unit.id as u64,
                unit,
                out_dir: self.out_dir.clone(),
            }),
            None => Next::Done("no more units".into()),
        })
    }

    fn complete(
        &self,
        _slot: usize,
        lease: &Lease,
        output: UnitOutput,
        _progress_bytes: u64,
    ) -> Result<Completed, WorkerError> {
        assert_eq!(output.unit, lease.unit.id);
        (self.on_complete)(lease.id);
        self.calls.lock().unwrap().push(Call::Complete(lease.id));
        Ok(Completed::Accepted)
    }

    fn fail(&self, _slot: usize, lease: u64, failure: &UnitFailure) -> Result<(), WorkerError> {
        self.calls.lock().unwrap().push(Call::Fail {
            lease,
            error: failure.to_string(),
            retryable: failure.retryable(),
        });
        Ok(())
    }

    fn heartbeat_every(&self) -> Option<Duration> {
        self.heartbeats
    }

    fn heartbeat(&self, leases: &[u64], _progress_bytes: u64) -> Result<Heartbeat, WorkerError> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Heartbeat(leases.to_vec()));
        Ok(Heartbeat::default())
    }
}

fn options(slots: usize) -> LoopOptions {
    LoopOptions {
        slots,
        max_memory: None,
        device: Device::Cpu,
        paths: None,
        announce: false,
        read_ahead: false,
    }
}

/// A slot that panics (here while reporting a finished unit) fails the lease
/// it held as a bug of this worker, never as a refusal of the source, and
/// ends the worker with an internal error; the other slots take nothing new.
#[test]
fn a_panicking_slot_fails_its_lease_as_a_worker_bug() {
    let dir = tempfile::tempdir().unwrap();
    let units = units();
    let total = units.len();
    let mut source = Recorder::new(units, dir.path());
    source.on_complete = &|lease| {
        if lease == 100 {
            panic!("slot exploded");
        }
    };
    let stop = AtomicBool::new(false);
    let e = work(&source, &options(1), &stop, &exec::NoProgress).unwrap_err();
    assert!(matches!(e, WorkerError::Internal(_)), "{e}");
    let text = e.to_string();
    assert!(
        text.starts_with("internal error (a bug)") && text.contains("slot exploded"),
        "{text}"
    );
    assert!(!text.contains("refused"), "{text}");
    let calls = source.calls();
    let failed: Vec<&Call> = calls
        .iter()
        .filter(|c| matches!(c, Call::Fail { .. }))
        .collect();
    match failed.as_slice() {
        [Call::Fail {
            lease: 100,
            error,
            retryable: false,
        }] => {
            assert!(
                error.starts_with("internal error (a bug)")
                    && error.contains("unit 0")
                    && error.contains("slot exploded")
                    && !error.contains("refused"),
                "{error}"
            );
        }
        other => panic!("expected lease 100 to fail, got {other:?}"),
    }
    assert!(
        stop.load(Ordering::SeqCst),
        "the other slots were not stopped"
    );
    let leases = calls.iter().filter(|c| matches!(c, Call::Lease(_))).count();
    assert_eq!(leases, 1, "took new work after the panic ({total} units)");
}

/// A panic while a unit computes (here in a progress callback on the
/// executor's threads) is that unit's failure, final and saying it is a
/// bug; the slot goes on with the next unit.
#[test]
fn a_panic_while_computing_is_that_units_failure_and_the_loop_goes_on() {
    struct Explodes(AtomicUsize);
    impl Progress for Explodes {
        fn read(&self, _bytes: u64) {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("progress exploded");
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let units = units();
    let total = units.len();
    let source = Recorder::new(units, dir.path());
    let stop = AtomicBool::new(false);
    let done = work(&source, &options(1), &stop, &Explodes(AtomicUsize::new(0))).unwrap();
    assert_eq!(done, total - 1);
    let calls = source.calls();
    match calls.iter().find(|c| matches!(c, Call::Fail { .. })) {
        Some(Call::Fail {
            lease: 100,
            error,
            retryable: false,
        }) => assert!(
            error.starts_with("internal error (a bug)") && error.contains("progress exploded"),
            "{error}"
        ),
        other => panic!("expected lease 100 to fail, got {other:?}"),
    }
    assert!(!source.saw(&Call::Complete(100)));
    assert!(source.saw(&Call::Complete(101)));
}

/// Once the stop flag is set (SIGTERM) the unit running finishes and is
/// reported, and no slot takes another.
#[test]
fn a_stopped_worker_finishes_its_units_and_takes_no_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(false);
    let stop_ref = &stop;
    let mut source = Recorder::new(units(), dir.path());
    let on_lease = move |_: &Recorder| stop_ref.store(true, Ordering::SeqCst);
    source.on_lease = &on_lease;
    let done = work(&source, &options(2), &stop, &exec::NoProgress).unwrap();
    let calls = source.calls();
    let leased = calls.iter().filter(|c| matches!(c, Call::Lease(_))).count();
    let completed = calls
        .iter()
        .filter(|c| matches!(c, Call::Complete(_)))
        .count();
    assert!((1..=2).contains(&leased), "{calls:?}");
    assert_eq!((done, completed), (leased, leased), "{calls:?}");
}

/// Heartbeats carry the leases being computed.
#[test]
fn heartbeats_carry_the_leases_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let mut units = units();
    units.truncate(1);
    let mut source = Recorder::new(units, dir.path());
    source.heartbeats = Some(Duration::from_millis(5));
    // The unit is held open until a heartbeat named its lease.
    struct Waits<'a>(&'a Recorder<'a>);
    impl Progress for Waits<'_> {
        fn read(&self, _bytes: u64) {
            let until = Instant::now() + Duration::from_secs(10);
            while !self.0.saw(&Call::Heartbeat(vec![100])) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    let stop = AtomicBool::new(false);
    let done = work(&source, &options(1), &stop, &Waits(&source)).unwrap();
    assert_eq!(done, 1);
    assert!(
        source.saw(&Call::Heartbeat(vec![100])),
        "{:?}",
        source.calls()
    );
}

/// With read-ahead, the next unit is leased while the current one is still
/// being written (its inputs read), and every unit is still done once.
#[test]
fn read_ahead_leases_the_next_unit_during_a_units_tail() {
    let dir = tempfile::tempdir().unwrap();
    let units = units();
    let n = units.len();
    let source = Recorder::new(units, dir.path());
    // The first unit's writes wait until a second lease was asked for.
    struct Tail<'a>(&'a Recorder<'a>);
    impl Progress for Tail<'_> {
        fn written(&self, _bytes: u64) {
            let until = Instant::now() + Duration::from_secs(10);
            let leases = || {
                let calls = self.0.calls();
                let done = calls.iter().any(|c| matches!(c, Call::Complete(_)));
                (
                    done,
                    calls.iter().filter(|c| matches!(c, Call::Lease(_))).count(),
                )
            };
            while leases() == (false, 1) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    let stop = AtomicBool::new(false);
    let opts = LoopOptions {
        read_ahead: true,
        ..options(1)
    };
    let done = work(&source, &opts, &stop, &Tail(&source)).unwrap();
    assert_eq!(done, n);
    let calls = source.calls();
    let first_complete = calls
        .iter()
        .position(|c| matches!(c, Call::Complete(_)))
        .unwrap();
    let leases_before = calls[..first_complete]
        .iter()
        .filter(|c| matches!(c, Call::Lease(_)))
        .count();
    assert_eq!(leases_before, 2, "{calls:?}");
    let completed: BTreeSet<u64> = calls
        .iter()
        .filter_map(|c| match c {
            Call::Complete(l) => Some(*l),
            _ => None,
        })
        .collect();
    assert_eq!(completed.len(), n, "{calls:?}");
}
