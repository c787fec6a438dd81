//! The `fleetmerge` command line: a thin layer over the engine, coordinator and
//! worker crates. Every failure ends in one paragraph on stderr and exit code 1.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use fleetmerge_coordinator::{run_embedded, AssembleOptions, EmbeddedOptions};
use fleetmerge_engine::config::MergeConfig;
use fleetmerge_engine::exec::Progress;
use fleetmerge_engine::plan::{self, PlanOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Merge large language model checkpoints with mergekit's YAML configs.
#[derive(Parser)]
#[command(name = "fleetmerge", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge on this machine: plan, compute every shard with all cores, write the model.
    Run(RunArgs),
}

/// Options shared by everything that plans a merge.
#[derive(Args)]
struct PlanArgs {
    /// Bytes per output shard, with K/M/B suffixes (10^3/10^6/10^9), as mergekit.
    #[arg(long, default_value = "5B", value_parser = plan::parse_size)]
    out_shard_size: u64,
    /// Seed of the randomized methods (DARE, DELLA).
    #[arg(long, default_value_t = DEFAULT_SEED)]
    random_seed: u64,
    /// Merge models even when their `architectures` differ.
    #[arg(long)]
    allow_crimes: bool,
}

#[derive(Args)]
struct RunArgs {
    /// The mergekit YAML config.
    config: PathBuf,
    /// Output directory.
    out: PathBuf,
    #[command(flatten)]
    plan: PlanArgs,
    /// Compute threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Work units (output shards) computed at the same time.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// No progress output, only warnings and errors.
    #[arg(long, short)]
    quiet: bool,
    /// Do not copy tokenizer files from the donor model.
    #[arg(long)]
    no_copy_tokenizer: bool,
    /// Do not write README.md and mergekit_config.yml.
    #[arg(long)]
    no_model_card: bool,
    /// Start over: discard the journal of an unfinished merge into OUT instead
    /// of resuming it.
    #[arg(long)]
    restart: bool,
}

/// The seed used when `--random-seed` is not given, so that runs without one
/// are reproducible too.
const DEFAULT_SEED: u64 = 0;

fn init_logging(quiet: bool) {
    let default = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

#[derive(Default)]
struct Counters {
    read: AtomicU64,
    written: AtomicU64,
}

impl Progress for Counters {
    fn read(&self, bytes: u64) {
        self.read.fetch_add(bytes, Ordering::Relaxed);
    }
    fn written(&self, bytes: u64) {
        self.written.fetch_add(bytes, Ordering::Relaxed);
    }
}

fn run(args: RunArgs) -> Result<()> {
    init_logging(args.quiet);
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .context("setting up the compute threads")?;
    }
    let started = Instant::now();
    let config = MergeConfig::load(&args.config)?;
    let base_dir = std::env::current_dir().context("reading the current directory")?;
    let plan = plan::plan(
        &config,
        &PlanOptions {
            out_shard_size: args.plan.out_shard_size,
            seed: args.plan.random_seed,
            allow_crimes: args.plan.allow_crimes,
            base_dir,
        },
    )?;
    let out = args.out.to_string_lossy().into_owned();
    prepare_output(&args.out)?;
    let counters = Counters::default();
    let summary = run_embedded(
        &plan,
        &out,
        &EmbeddedOptions {
            workers: args.workers,
            assemble: AssembleOptions {
                copy_tokenizer: !args.no_copy_tokenizer,
                model_card: !args.no_model_card,
            },
            restart: args.restart,
        },
        &counters,
    )?;
    if summary.resumed > 0 {
        eprintln!(
            "resumed: {} of {} shards were finished by an earlier run and kept",
            summary.resumed,
            plan.units.len()
        );
    }
    if !args.quiet {
        let secs = started.elapsed().as_secs_f64();
        let read = counters.read.load(Ordering::Relaxed) as f64;
        eprintln!(
            "merged {} tensors into {} ({} shard{}, {}) in {:.2} s, reading {} ({}/s)",
            plan.tensor_count(),
            args.out.display(),
            summary.outputs.len(),
            if summary.outputs.len() == 1 { "" } else { "s" },
            bytes(summary.total_size as f64),
            secs,
            bytes(read),
            bytes(read / secs.max(1e-9)),
        );
    }
    Ok(())
}

/// A byte count for people: `812 KB`, `3.71 GB`.
fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// Creates the output directory.
fn prepare_output(out: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
    };
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
