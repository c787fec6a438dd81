//! fleetmerge-bench's shared parts: the synthetic DeepSeek-V3 checkpoints
//! ([`deepseek`]) that the planning test (tests/it/giant_plan.rs) and the
//! coordinator benchmark (`coordinator-scale`) both generate.

pub mod deepseek;
