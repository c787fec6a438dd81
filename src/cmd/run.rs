//! `fleetmerge run CONFIG OUT`: merges on this machine (the embedded driver,
//! [`crate::embedded`]) with a progress display, and says what it wrote.

use super::options::{self, AssembleArgs, PlanArgs};
use crate::embedded::{self, EmbeddedOptions};
use crate::progress;
use anyhow::Result;
use clap::Args;
use fleetmerge_engine::exec::{self, human_bytes as bytes, Progress};
use fleetmerge_engine::plan::Plan;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct RunArgs {
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
    /// Compute device: cpu, cuda or cuda:N (a build with the cuda feature;
    /// methods and tensors the GPU path does not take run on the CPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Memory the merge may use (e.g. 8G, 1.5GB, 512MiB); the units computed at
    /// once share it, and each reads fewer tensors ahead to stay within it.
    #[arg(long, value_parser = options::memory_size)]
    max_memory: Option<u64>,
    /// No progress output, only warnings and errors.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    assemble: AssembleArgs,
    /// Start over: discard the journal of an unfinished merge into OUT instead
    /// of resuming it.
    #[arg(long)]
    restart: bool,
}

/// What the progress display counts.
#[derive(Default)]
struct Counters {
    read: AtomicU64,
    written: AtomicU64,
    units: AtomicU64,
    resumed_input: AtomicU64,
}

impl Progress for Counters {
    fn read(&self, bytes: u64) {
        self.read.fetch_add(bytes, Ordering::Relaxed);
    }
    fn written(&self, bytes: u64) {
        self.written.fetch_add(bytes, Ordering::Relaxed);
    }
    fn unit_done(&self, input_bytes: u64, resumed: bool) {
        self.units.fetch_add(1, Ordering::Relaxed);
        if resumed {
            self.resumed_input.fetch_add(input_bytes, Ordering::Relaxed);
        }
    }
}

impl Counters {
    /// The progress of a merge of `units_total` units reading `input_total` bytes.
    fn state(&self, units_total: usize, input_total: u64) -> progress::State {
        progress::State {
            units_total,
            units_done: self.units.load(Ordering::Relaxed) as usize,
            input_done: self.read.load(Ordering::Relaxed)
                + self.resumed_input.load(Ordering::Relaxed),
            input_total,
            written: self.written.load(Ordering::Relaxed),
            ..Default::default()
        }
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    run_kind(args, options::ConfigKind::Merge)
}

/// `run`, or `moe` (the same driver; `kind` is the config kind it takes).
pub fn run_kind(args: RunArgs, kind: options::ConfigKind) -> Result<()> {
    options::init_logging(args.quiet);
    options::compute_threads(args.threads)?;
    let started = Instant::now();
    let device = options::device(&args.device)?;
    if !matches!(device, exec::Device::Cpu) {
        tracing::info!(device = %device.name(), "computing on the GPU");
    }
    crate::hub::pin_from_journal(&args.out, args.restart);
    let plan = args.plan.plan_kind(&args.config, Some(kind))?;
    check_memory(&plan, &args)?;
    let out = options::output_location(&args.out)?;
    let counters = Counters::default();
    let mut display = progress::Display::new(args.quiet);
    let (units_total, input_total) = (
        plan.units.len(),
        plan.units.iter().map(|u| u.input_bytes()).sum::<u64>(),
    );
    let running = AtomicBool::new(true);
    let summary = std::thread::scope(|s| {
        s.spawn(|| {
            while running.load(Ordering::Relaxed) {
                display.update(&counters.state(units_total, input_total));
                std::thread::sleep(Duration::from_millis(100));
            }
            display.finish(&counters.state(units_total, input_total));
        });
        let r = embedded::run(
            &plan,
            &out,
            &EmbeddedOptions {
                workers: args.workers,
                max_memory: args.max_memory,
                assemble: args.assemble.options(),
                restart: args.restart,
                max_attempts: 3,
                device,
            },
            &counters,
        );
        running.store(false, Ordering::Relaxed);
        r
    })?;
    let non_finite: Vec<fleetmerge_engine::unit::NonFinite> = summary
        .outputs
        .iter()
        .flat_map(|o| o.non_finite.iter().cloned())
        .collect();
    if !non_finite.is_empty() {
        // Printed even with --quiet: the model is written, but likely broken.
        eprintln!(
            "warning: {} tensor{} of the output hold NaN or infinite values ({}); check the \
             weights, lambda and the inputs",
            non_finite.len(),
            if non_finite.len() == 1 { "" } else { "s" },
            exec::describe_non_finite(&non_finite)
        );
    }
    if summary.resumed > 0 {
        eprintln!(
            "resumed: {} of {} units were finished by an earlier run and kept",
            summary.resumed,
            plan.units.len()
        );
    }
    if !args.quiet {
        let shards: std::collections::BTreeSet<&str> = summary
            .outputs
            .iter()
            .map(|o| o.file_name.as_str())
            .collect();
        let secs = started.elapsed().as_secs_f64();
        let read = counters.read.load(Ordering::Relaxed) as f64;
        eprintln!(
            "{} {} tensors into {} ({} shard{}, {}) in {:.2} s, reading {} ({}/s)",
            match kind {
                options::ConfigKind::Merge => "merged",
                options::ConfigKind::Moe => "built a MoE of",
            },
            plan.tensor_count(),
            args.out.display(),
            shards.len(),
            if shards.len() == 1 { "" } else { "s" },
            bytes(summary.total_size as f64),
            secs,
            bytes(read),
            bytes(read / secs.max(1e-9)),
        );
    }
    Ok(())
}

/// Checks before anything is written that every unit fits in its share of
/// `--max-memory`, and logs the estimated peak.
fn check_memory(plan: &Plan, args: &RunArgs) -> Result<()> {
    let workers = args.workers.clamp(1, plan.units.len().max(1));
    let budget = args.max_memory.map(|m| m / workers as u64);
    let out = args.out.to_string_lossy();
    let peak = exec::memory::peak(&plan.units, &out, budget, rayon::current_num_threads());
    if let Some(e) = peak.over_budget {
        return Err(e.into());
    }
    if let Some(unit) = peak.unit {
        tracing::info!(
            "estimated peak memory: {} per unit ({} at once; largest: {}, windows of {} MiB{}{})",
            bytes(peak.bytes as f64),
            workers,
            unit.file_name,
            peak.limits.window_bytes >> 20,
            if peak.limits.read_ahead {
                ", read ahead"
            } else {
                ""
            },
            match peak.streamed {
                0 => String::new(),
                n => format!("; {n} large tensors streamed in segments"),
            }
        );
    }
    Ok(())
}
