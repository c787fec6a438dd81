//! fleetmerge-coordinator: hands work units to workers and turns their shards
//! into a finished model. It knows nothing of how units are computed (that is
//! the worker crate's loop; the binary wires the two together).
//!
//! - `merge`: the life of one merge into one output folder (claim, side files,
//!   completions checked and journaled, index last, final marker), shared by
//!   the embedded driver of `fleetmerge run` and the cluster service;
//! - `lease_table`: which unit is pending, leased to whom, being checked, done
//!   or failed (pure bookkeeping behind the merge's lock);
//! - `service`: the gRPC coordinator of cluster mode (and `metrics`, its
//!   Prometheus endpoint);
//! - `shardcheck`: what a shard must pass before it counts;
//! - `journal`: finished units recorded in the output folder, so a stopped
//!   merge resumes where it was; `outdir`: who may write an output folder;
//! - `assemble`: the files around the shards (config.json, tokenizer, model
//!   card) and the index last, so an unfinished merge never looks finished;
//! - `verify`: checks a finished model against its index, headers and journal.

pub mod assemble;
pub mod journal;
pub mod lease_table;
pub mod merge;
pub mod metrics;
pub mod outdir;
pub mod service;
pub mod shardcheck;
pub mod verify;

pub use assemble::{AssembleError, AssembleOptions};
pub use merge::{CompleteError, Merge, MergeOptions, Opened, Report, RunError, RunSummary};
pub use service::{
    now_ms, serve, ProgressFn, ServeError, ServeOptions, Snapshot, TlsIdentity, WorkerSnapshot,
};
