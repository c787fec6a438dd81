//! `fleetmerge moe CONFIG OUT`: builds a Mixture of Experts from dense models
//! with mergekit-moe's YAML (see `fleetmerge_engine::moe`), on this machine with
//! `run`'s driver and options; `coordinator` takes the same config for a
//! cluster.

use super::options::ConfigKind;
use super::run::{self, RunArgs};
use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct MoeArgs {
    #[command(flatten)]
    run: RunArgs,
}

pub fn moe(args: MoeArgs) -> Result<()> {
    run::run_kind(args.run, ConfigKind::Moe)
}
