//! The `fleetmerge` command line: a thin layer over the engine, coordinator and
//! worker crates. `cmd/` has a module per command, and `cmd/options.rs` the
//! options several share (storage settings, logging, planning, sizes, compute,
//! token and TLS, output location), each built in one place; `embedded.rs` is
//! the driver of `run` (the merge's lifecycle and lease table from the
//! coordinator crate, the worker crate's loop on in-process slots);
//! `progress.rs` the progress display; `hub.rs` the `download` command, the Hub
//! lines of `plan` and the commit pins of resumed merges. Every failure ends in one paragraph on
//! stderr and exit code 1.

mod cmd;
mod embedded;
mod hub;
mod progress;

use clap::{Parser, Subcommand};
use cmd::options::Global;
use std::process::ExitCode;

/// Merge large language model checkpoints with mergekit's YAML configs.
#[derive(Parser)]
#[command(name = "fleetmerge", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: Global,
}

#[derive(Subcommand)]
enum Command {
    /// Merge on this machine: plan, compute every shard with all cores, write the model.
    #[command(mut_arg("allow_all_same", |a| a.hide(true)))]
    Run(cmd::run::RunArgs),
    /// Build a Mixture of Experts from dense models (mergekit-moe's YAML: base_model,
    /// experts with prompts, gate_mode), on this machine; `coordinator` takes the
    /// same config.
    #[command(
        mut_arg("allow_crimes", |a| a.hide(true)),
        mut_arg("keep_fp8", |a| a.hide(true))
    )]
    Moe(cmd::moe::MoeArgs),
    /// Coordinate a merge across workers on other machines (gRPC).
    Coordinator(cmd::coordinator::CoordinatorArgs),
    /// Work for a coordinator: lease units, compute them, write their shards.
    Worker(cmd::worker::WorkerArgs),
    /// Check that a merged model is whole: shards, headers, index, journal hashes.
    Verify(cmd::verify::VerifyArgs),
    /// How far a merge is: from its output folder's journal (finished, running or
    /// interrupted), or live from a coordinator's address.
    Status(cmd::status::StatusArgs),
    /// Dry run: compare the inputs and show what a merge will read, write and
    /// hold in memory, from the checkpoints' headers only.
    Plan(cmd::plan::PlanCmdArgs),
    /// Fill the Hugging Face cache with the files a merge reads from the Hub
    /// (huggingface_hub's layout), for offline merges, transformers or mergekit.
    Download(hub::DownloadArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = cli.global.apply().and_then(|()| match cli.command {
        Command::Run(args) => cmd::run::run(args),
        Command::Moe(args) => cmd::moe::moe(args),
        Command::Coordinator(args) => cmd::coordinator::coordinator(args),
        Command::Worker(args) => cmd::worker::worker(args),
        Command::Verify(args) => cmd::verify::verify(args),
        Command::Status(args) => cmd::status::status(args),
        Command::Plan(args) => cmd::plan::plan(args),
        Command::Download(args) => hub::download(args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("error: {e}");
            for cause in e.chain().skip(1) {
                msg.push_str(&format!(": {cause}"));
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
