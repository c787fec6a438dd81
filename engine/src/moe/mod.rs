//! `fleetmerge moe`: a Mixture-of-Experts model built from dense models, as
//! mergekit-moe builds it. The config and its rules (`config`), the output
//! families with their tensor names and config.json (`family`), the routers
//! (`router`; the `hidden` modes, a forward pass of the base over the
//! prompts, in `hidden`), the model card (`card`), and the planner (`build`), whose
//! [`Plan`](crate::plan::Plan) is made of the same work units as a merge's —
//! expert MLPs copied by range, routers given as literal tensors — so that
//! `run`'s driver and the cluster build it unchanged.

pub mod build;
mod card;
pub mod config;
pub mod family;
mod hidden;
pub mod router;

pub use build::{plan, MoePlan, MoeReport};
pub use config::{is_moe_config, GateMode, MoeConfig};

use crate::config::ConfigError;
use crate::plan::PlanError;
use crate::storage::StorageError;

/// Why a MoE cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum MoeError {
    /// A problem tied to a place in the YAML.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Opening the models.
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A problem with the inputs that no single YAML key explains.
    #[error("{0}")]
    Inputs(String),
}
