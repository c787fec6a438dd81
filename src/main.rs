//! The `fleetmerge` command line: a thin layer over the engine, coordinator and
//! worker crates. Every failure ends in one paragraph on stderr and exit code 1.

mod inspect;
mod progress;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use fleetmerge_coordinator::{
    run_embedded, serve, AssembleOptions, EmbeddedOptions, ProgressFn, ServeOptions, Snapshot,
    TlsIdentity,
};
use fleetmerge_engine::config::MergeConfig;
use fleetmerge_engine::exec::{self, human_bytes as bytes, Progress};
use fleetmerge_engine::plan::{self, PlanOptions};
use fleetmerge_engine::unit;
use fleetmerge_worker::remote::{run_remote, RemoteOptions};
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
    /// YAML file of per-bucket (or per-prefix) object-store settings: endpoints,
    /// credentials, regions (see the README, "Object storage").
    #[arg(long, global = true, env = "FLEETMERGE_STORAGE_CONFIG")]
    storage_config: Option<PathBuf>,
    /// Log format: text, or json (one object per line).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "FLEETMERGE_LOG_FORMAT"
    )]
    log_format: LogFormat,
}

/// Installs the storage settings of `--storage-config`.
fn storage_config(file: &Option<PathBuf>) -> Result<()> {
    let Some(file) = file else { return Ok(()) };
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the storage config {}", file.display()))?;
    let overrides = fleetmerge_engine::storage::overrides::parse(&file.to_string_lossy(), &text)?;
    fleetmerge_engine::storage::overrides::install(overrides).map_err(anyhow::Error::msg)
}

#[derive(Subcommand)]
enum Command {
    /// Merge on this machine: plan, compute every shard with all cores, write the model.
    Run(RunArgs),
    /// Coordinate a merge across workers on other machines (gRPC).
    Coordinator(CoordinatorArgs),
    /// Work for a coordinator: lease units, compute them, write their shards.
    Worker(WorkerArgs),
    /// Check that a merged model is whole: shards, headers, index, journal hashes.
    Verify(inspect::VerifyArgs),
    /// How far a merge is: from its output folder's journal (finished, running or
    /// interrupted), or live from a coordinator's address.
    Status(inspect::StatusArgs),
    /// Dry run: compare the inputs and show what a merge will read, write and
    /// hold in memory, from the checkpoints' headers only.
    Plan(inspect::PlanCmdArgs),
}

#[derive(Args)]
struct CoordinatorArgs {
    /// The mergekit YAML config.
    #[arg(long)]
    config: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Address to listen on, e.g. 0.0.0.0:7070.
    #[arg(long, default_value = "0.0.0.0:7070")]
    listen: std::net::SocketAddr,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 0.0.0.0:9090.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// File holding the shared token every worker must present (else FLEETMERGE_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Seconds without a heartbeat after which a unit goes to another worker.
    #[arg(long, default_value_t = 30.0)]
    lease_timeout: f64,
    /// Attempts per unit before the merge gives up.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// PEM certificate chain: serve gRPC over TLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(flatten)]
    plan: PlanArgs,
    /// Start over: discard the journal of an unfinished merge into OUT.
    #[arg(long)]
    restart: bool,
    /// Do not copy tokenizer files from the donor model.
    #[arg(long)]
    no_copy_tokenizer: bool,
    /// Do not write README.md and mergekit_config.yml.
    #[arg(long)]
    no_model_card: bool,
    /// Only warnings and errors.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
struct WorkerArgs {
    /// The coordinator, e.g. http://10.0.0.5:7070.
    #[arg(long)]
    coordinator: String,
    /// File holding the shared token (else FLEETMERGE_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// PEM certificate to trust for an https:// coordinator (a private CA or a
    /// self-signed certificate); public CAs are trusted without it.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Send the token over plain http:// to a coordinator on another machine
    /// (refused without this flag: whoever answers at that address gets the
    /// token; use https:// and --tls-ca instead).
    #[arg(long)]
    insecure: bool,
    /// Give up when the coordinator cannot be reached for this many seconds.
    #[arg(long, default_value_t = 600)]
    give_up_after: u64,
    /// Compute device: cpu, cuda or cuda:N (a build with the cuda feature;
    /// methods and tensors the GPU path does not take run on the CPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Units computed at the same time.
    #[arg(long, default_value_t = 1)]
    slots: usize,
    /// Memory this worker may use (e.g. 8G, 1.5GB, 512MiB), shared by its slots.
    #[arg(long, value_parser = exec::memory::parse_memory)]
    max_memory: Option<u64>,
    /// Name of this worker in the coordinator's logs (default: host name and pid).
    #[arg(long)]
    worker_id: Option<String>,
    /// Compute threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Read inputs and write shards only under this prefix (an absolute local
    /// path or an object-store URL; repeatable). Without it, the worker writes
    /// only into the first output folder the coordinator gives it and reads
    /// any input that is a tensor of a safetensors file's header.
    #[arg(long = "allow-path", value_name = "PREFIX")]
    allow_path: Vec<String>,
    /// Only warnings and errors.
    #[arg(long, short)]
    quiet: bool,
}

/// Options shared by everything that plans a merge.
#[derive(Args)]
pub(crate) struct PlanArgs {
    /// Bytes per output shard: 5B = 5x10^9 as mergekit; also 500M, 20MB, 2GiB (README: Sizes).
    #[arg(long, default_value = "5B", value_parser = plan::parse_size)]
    pub(crate) out_shard_size: u64,
    /// Seed of the randomized methods (DARE, DELLA).
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub(crate) random_seed: u64,
    /// Merge models even when their `architectures` differ.
    #[arg(long)]
    pub(crate) allow_crimes: bool,
    /// Write the weights of FP8 (block-scaled) inputs back as FP8 E4M3 with
    /// fresh block scales, in the inputs' layout (quantization_config kept).
    #[arg(long)]
    pub(crate) keep_fp8: bool,
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
    /// Compute device: cpu, cuda or cuda:N (a build with the cuda feature;
    /// methods and tensors the GPU path does not take run on the CPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Memory the merge may use (e.g. 8G, 1.5GB, 512MiB); the units computed at
    /// once share it, and each reads fewer tensors ahead to stay within it.
    #[arg(long, value_parser = exec::memory::parse_memory)]
    max_memory: Option<u64>,
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

/// How log lines look (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors on clusters).
    Json,
}

static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Logs to stderr at `info` (`warn` when quiet), or as `RUST_LOG` says.
fn init_logging(quiet: bool) {
    let default = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match LOG_FORMAT.get().copied().unwrap_or_default() {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

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

fn run(args: RunArgs) -> Result<()> {
    init_logging(args.quiet);
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .context("setting up the compute threads")?;
    }
    let started = Instant::now();
    let device = exec::Device::open(&args.device).map_err(anyhow::Error::msg)?;
    if !matches!(device, exec::Device::Cpu) {
        tracing::info!(device = %device.name(), "computing on the GPU");
    }
    let config = MergeConfig::load(&args.config)?;
    let base_dir = std::env::current_dir().context("reading the current directory")?;
    let plan = plan::plan(
        &config,
        &PlanOptions {
            out_shard_size: args.plan.out_shard_size,
            seed: args.plan.random_seed,
            allow_crimes: args.plan.allow_crimes,
            keep_fp8: args.plan.keep_fp8,
            base_dir,
        },
    )?;
    check_memory(&plan, &args)?;
    let out = prepare_output(&args.out)?;
    let counters = Counters::default();
    let mut display = progress::Display::new(args.quiet);
    let (units_total, input_total) = (
        plan.units.len(),
        plan.units.iter().map(|u| u.input_bytes()).sum::<u64>(),
    );
    let running = std::sync::atomic::AtomicBool::new(true);
    let summary = std::thread::scope(|s| {
        s.spawn(|| {
            while running.load(Ordering::Relaxed) {
                display.update(&counters.state(units_total, input_total));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            display.finish(&counters.state(units_total, input_total));
        });
        let r = run_embedded(
            &plan,
            &out,
            &EmbeddedOptions {
                workers: args.workers,
                max_memory: args.max_memory,
                assemble: AssembleOptions {
                    copy_tokenizer: !args.no_copy_tokenizer,
                    model_card: !args.no_model_card,
                },
                restart: args.restart,
                max_attempts: 3,
                device,
            },
            &counters,
        );
        running.store(false, Ordering::Relaxed);
        r
    })?;
    let non_finite: Vec<unit::NonFinite> = summary
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

/// Checks before anything is written that every unit fits in its share of
/// `--max-memory`, and logs the estimated peak.
fn check_memory(plan: &plan::Plan, args: &RunArgs) -> Result<()> {
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

/// The output location: an object-store URL as given, or a local directory
/// made absolute with symlinks resolved (so that remote workers get a full
/// path, and an output that is an input is recognised). Nothing is created
/// here: the merge claims the folder (`outdir::claim`) after checking it.
fn prepare_output(out: &std::path::Path) -> Result<String> {
    let text = out.to_string_lossy();
    if fleetmerge_engine::storage::is_url(&text) {
        return Ok(text.trim_end_matches('/').to_string());
    }
    let local = std::path::Path::new(text.strip_prefix("file://").unwrap_or(&text));
    if local.as_os_str().is_empty() {
        anyhow::bail!("the output folder is empty; name a folder");
    }
    Ok(fleetmerge_coordinator::outdir::resolve_local(local)
        .to_string_lossy()
        .into_owned())
}

/// The shared token: from a file, else FLEETMERGE_TOKEN, else none.
fn read_token(file: &Option<PathBuf>) -> Result<Option<String>> {
    let token = match file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the token file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("FLEETMERGE_TOKEN")
            .ok()
            .map(|t| t.trim().to_string()),
    };
    match token {
        Some(t) if t.is_empty() => anyhow::bail!("the token is empty"),
        t => Ok(t),
    }
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn coordinator(args: CoordinatorArgs) -> Result<()> {
    init_logging(args.quiet);
    let config = MergeConfig::load(&args.config)?;
    let base_dir = std::env::current_dir().context("reading the current directory")?;
    let plan = plan::plan(
        &config,
        &PlanOptions {
            out_shard_size: args.plan.out_shard_size,
            seed: args.plan.random_seed,
            allow_crimes: args.plan.allow_crimes,
            keep_fp8: args.plan.keep_fp8,
            base_dir,
        },
    )?;
    let out = prepare_output(&args.out)?;
    if !(args.lease_timeout.is_finite() && args.lease_timeout > 0.0) {
        anyhow::bail!("--lease-timeout must be a positive number of seconds");
    }
    let opts = ServeOptions {
        listen: args.listen,
        token: read_token(&args.token_file)?,
        lease_timeout: std::time::Duration::from_secs_f64(args.lease_timeout),
        max_attempts: args.max_attempts,
        assemble: AssembleOptions {
            copy_tokenizer: !args.no_copy_tokenizer,
            model_card: !args.no_model_card,
        },
        restart: args.restart,
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsIdentity {
                cert_pem: read_file(cert)?,
                key_pem: read_file(key)?,
            }),
            _ => None,
        },
        progress: None,
        metrics: args.metrics_listen,
    };
    let display = std::sync::Arc::new(std::sync::Mutex::new((
        progress::Display::new(args.quiet),
        progress::State::default(),
    )));
    let shown = display.clone();
    let opts = ServeOptions {
        progress: Some(ProgressFn(std::sync::Arc::new(move |s: &Snapshot| {
            let state = progress::State::from(s);
            if let Ok(mut d) = shown.lock() {
                d.0.update(&state);
                d.1 = state;
            }
        }))),
        ..opts
    };
    let units = plan.units.len();
    let result = runtime()?.block_on(serve(plan, out, opts));
    if let Ok(mut d) = display.lock() {
        let (display, state) = &mut *d;
        display.finish(state);
    }
    let summary = result?;
    if summary.resumed > 0 {
        eprintln!(
            "resumed: {} of {units} shards were finished by an earlier run and kept",
            summary.resumed
        );
    }
    if !args.quiet {
        eprintln!(
            "merged into {} ({} shards, {})",
            args.out.display(),
            units,
            bytes(summary.total_size as f64)
        );
    }
    Ok(())
}

fn worker(args: WorkerArgs) -> Result<()> {
    init_logging(args.quiet);
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .context("setting up the compute threads")?;
    }
    let device = exec::Device::open(&args.device).map_err(anyhow::Error::msg)?;
    let worker_id = args.worker_id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let opts = RemoteOptions {
        coordinator: args.coordinator,
        token: read_token(&args.token_file)?,
        worker_id,
        device,
        slots: args.slots.max(1),
        max_memory: args.max_memory,
        give_up_after: std::time::Duration::from_secs(args.give_up_after),
        tls_ca: args.tls_ca.as_deref().map(read_file).transpose()?,
        allow_paths: args.allow_path,
        insecure: args.insecure,
    };
    let done = runtime()?.block_on(run_remote(opts))?;
    if !args.quiet {
        eprintln!("worker finished: {done} units computed");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = LOG_FORMAT.set(cli.log_format);
    progress::STRUCTURED.store(
        cli.log_format == LogFormat::Json,
        std::sync::atomic::Ordering::Relaxed,
    );
    let result = storage_config(&cli.storage_config).and_then(|()| match cli.command {
        Command::Run(args) => run(args),
        Command::Coordinator(args) => coordinator(args),
        Command::Worker(args) => worker(args),
        Command::Verify(args) => inspect::verify(args),
        Command::Status(args) => inspect::status(args),
        Command::Plan(args) => inspect::plan(args),
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
