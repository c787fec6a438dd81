//! fleetmerge-engine: everything both binaries share. The YAML config and its
//! parameter resolution (`config`), checkpoint headers (`checkpoint`), where bytes
//! live (`storage`), the planner that turns a config into self-contained work
//! units (`plan`), the merge methods (`methods`), the executor that runs one work
//! unit (`exec`), and the output files around the tensors (`output`).

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
pub mod unit;

pub use dtype::DType;
