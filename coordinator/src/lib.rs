//! fleetmerge-coordinator: hands work units to workers and turns their shards
//! into a finished model. `scheduler` owns the queue of units and their leases;
//! `assemble` writes the files around the shards (config.json, tokenizer, model
//! card) and the index last, so an unfinished merge never looks finished;
//! `journal` records finished units in the output folder so a stopped merge
//! resumes where it was; `verify` checks a finished model against its index,
//! its headers and the journal.

pub mod assemble;
pub mod cluster;
pub mod journal;
pub mod metrics;
pub mod outdir;
pub mod scheduler;
pub mod service;
pub mod shardcheck;
pub mod verify;

pub use assemble::{AssembleError, AssembleOptions};
pub use scheduler::{run_embedded, EmbeddedOptions, RunError, RunSummary};
pub use service::{serve, ProgressFn, ServeOptions, Snapshot, TlsIdentity, WorkerSnapshot};
