//! fleetmerge-engine: everything both binaries share. The YAML config and its
//! parameter resolution (`config`), checkpoint headers (`checkpoint`), where bytes
//! live (`storage`), the planner that turns a config into self-contained work
//! units (`plan`), the merge methods (`methods`), the executor that runs one work
//! unit (`exec`), the output files around the tensors (`output`), and tokenizer
//! merging: the output vocabulary and each input's rows in it (`tokenizer`).

pub mod checkpoint;
pub mod config;
pub mod dtype;
pub mod exec;
#[cfg(any(feature = "cuda", test))]
pub mod gpu;
pub mod methods;
pub mod output;
pub mod plan;
pub mod size;
pub mod storage;
pub mod tokenizer;

pub use dtype::DType;
