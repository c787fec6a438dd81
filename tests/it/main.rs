//! The integration tests: the real `fleetmerge` binary (and real servers:
//! S3, GCS and Azure emulators, a fake Hugging Face Hub, coordinators and workers over
//! gRPC) driven from one test crate, a module per area, so they link once.
//! One test: `cargo test --release --test it safety::NAME`; one area:
//! `cargo test --release --test it hub::`. Fixtures are in tests/fixtures.
//! tests/memory.rs is apart: it measures children's peak RSS, which needs a
//! small parent process.

mod common;

mod azure;
mod bad_inputs;
mod chaos;
mod cluster;
mod conformance;
mod deploy;
mod fp8;
mod giant_plan;
mod hostile;
mod hostile_units;
mod hub;
mod inspect;
mod lora;
mod moe;
mod mxfp4;
mod object_storage;
mod resume;
mod safety;
mod transformers;
