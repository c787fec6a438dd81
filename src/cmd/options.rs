//! The options several commands share, each defined and turned into what the
//! crates take in one place: the global ones (storage settings, log format)
//! and logging, planning (`--out-shard-size`, seed, crimes, FP8), the sizes
//! flags' parsers, compute threads and device, the files written around the
//! shards, the shared token, TLS on either side, the output location and the
//! async runtime.

use anyhow::{Context, Result};
use clap::Args;
use fleetmerge_coordinator::{AssembleOptions, TlsIdentity};
use fleetmerge_engine::config::MergeConfig;
use fleetmerge_engine::exec::{self, Device};
use fleetmerge_engine::plan::{self, Plan, PlanOptions};
use std::path::{Path, PathBuf};

/// Options every command takes.
#[derive(Args)]
pub struct Global {
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

impl Global {
    /// Applies them for this process: the log format (and whether progress
    /// is plain lines), then the storage settings of `--storage-config`.
    pub fn apply(&self) -> Result<()> {
        let _ = LOG_FORMAT.set(self.log_format);
        crate::progress::STRUCTURED.store(
            self.log_format == LogFormat::Json,
            std::sync::atomic::Ordering::Relaxed,
        );
        let Some(file) = &self.storage_config else {
            return Ok(());
        };
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the storage config {}", file.display()))?;
        let overrides =
            fleetmerge_engine::storage::overrides::parse(&file.to_string_lossy(), &text)?;
        fleetmerge_engine::storage::overrides::install(overrides).map_err(anyhow::Error::msg)
    }
}

/// How log lines look (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors on clusters).
    Json,
}

static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Logs to stderr at `info` (`warn` when quiet), or as `RUST_LOG` says.
pub fn init_logging(quiet: bool) {
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

/// `--max-memory` (of `run`, `worker` and `plan`): a size in bytes.
pub fn memory_size(text: &str) -> Result<u64, fleetmerge_engine::size::SizeError> {
    exec::memory::parse_memory(text)
}

/// `--out-shard-size`: a size in bytes.
pub fn shard_size(text: &str) -> Result<u64, fleetmerge_engine::size::SizeError> {
    plan::parse_size(text)
}

/// Options shared by everything that plans a merge.
#[derive(Args)]
pub struct PlanArgs {
    /// Bytes per output shard: 5B = 5x10^9 as mergekit; also 500M, 20MB, 2GiB (README: Sizes).
    #[arg(long, default_value = "5B", value_parser = shard_size)]
    pub out_shard_size: u64,
    /// Seed of the randomized methods (DARE, DELLA) and of `moe`'s random
    /// routers and noise.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub random_seed: u64,
    /// Merge models even when their `architectures` differ.
    #[arg(long)]
    pub allow_crimes: bool,
    /// Write the weights of FP8 (block-scaled) inputs back as FP8 E4M3 with
    /// fresh block scales, in the inputs' layout (quantization_config kept).
    #[arg(long)]
    pub keep_fp8: bool,
    /// Input bytes a work unit aims at: a shard whose inputs are larger is
    /// written by several units (README: Cluster mode); `auto` (default): a
    /// 64th of the merge's inputs, within 16 MiB..1 GiB.
    #[arg(long, default_value = "auto", value_parser = unit_size)]
    pub unit_size: UnitSize,
    /// MoE configs (`fleetmerge moe`): build even when every expert is the
    /// same model (mergekit-moe's flag of the same name).
    #[arg(long = "i-understand-this-is-not-useful-without-training")]
    pub allow_all_same: bool,
}

/// What a config file describes: a merge (`run`), or a Mixture of Experts
/// built from dense models (`moe`; it has a top-level `experts:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    Merge,
    Moe,
}

/// `--unit-size`: `auto` or a size.
#[derive(Debug, Clone, Copy)]
pub struct UnitSize(pub Option<u64>);

fn unit_size(text: &str) -> Result<UnitSize, String> {
    if text == "auto" {
        return Ok(UnitSize(None));
    }
    let n = plan::parse_size(text).map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("a unit size must be positive (or auto)".into());
    }
    Ok(UnitSize(Some(n)))
}

/// The seed used when `--random-seed` is not given, so that runs without one
/// are reproducible too.
const DEFAULT_SEED: u64 = 0;

impl PlanArgs {
    /// The planner's options (model paths relative to the current directory).
    pub fn options(&self) -> Result<PlanOptions> {
        Ok(PlanOptions {
            unit_size: self.unit_size.0,
            out_shard_size: self.out_shard_size,
            seed: self.random_seed,
            allow_crimes: self.allow_crimes,
            keep_fp8: self.keep_fp8,
            base_dir: std::env::current_dir().context("reading the current directory")?,
        })
    }

    /// Plans the merge or MoE build of the YAML config `config` (either kind:
    /// the coordinator takes both).
    pub fn plan(&self, config: &Path) -> Result<Plan> {
        self.plan_kind(config, None)
    }

    /// Plans `config`, refusing a config of the other kind than `want`.
    pub fn plan_kind(&self, config: &Path, want: Option<ConfigKind>) -> Result<Plan> {
        let kind = match std::fs::read_to_string(config) {
            Ok(text) if fleetmerge_engine::moe::is_moe_config(&text) => ConfigKind::Moe,
            // Unreadable: the merge config's loader says why.
            _ => ConfigKind::Merge,
        };
        match (want, kind) {
            (Some(ConfigKind::Merge), ConfigKind::Moe) => anyhow::bail!(
                "{}: this is a mergekit-moe config (it has `experts:`); build it with \
                 `fleetmerge moe {} OUT`",
                config.display(),
                config.display()
            ),
            (Some(ConfigKind::Moe), ConfigKind::Merge) => anyhow::bail!(
                "{}: this is not a mergekit-moe config (it has no top-level `experts:`); merge \
                 it with `fleetmerge run {} OUT`",
                config.display(),
                config.display()
            ),
            _ => {}
        }
        if kind == ConfigKind::Moe {
            return Ok(self.plan_moe(config)?.plan);
        }
        if self.allow_all_same {
            anyhow::bail!(
                "{}: --i-understand-this-is-not-useful-without-training is for mergekit-moe \
                 configs (`fleetmerge moe`); this is a merge config",
                config.display()
            );
        }
        let config = MergeConfig::load(config)?;
        Ok(plan::plan(&config, &self.options()?)?)
    }

    /// Plans the MoE build of `config`, logging mergekit-moe's warnings.
    pub fn plan_moe(&self, config: &Path) -> Result<fleetmerge_engine::moe::MoePlan> {
        for (set, flag) in [
            (self.allow_crimes, "--allow-crimes"),
            (self.keep_fp8, "--keep-fp8"),
        ] {
            if set {
                anyhow::bail!(
                    "{}: {flag} is for merges (`fleetmerge run`); a MoE build copies each \
                     expert's tensors as they are and takes no such option",
                    config.display()
                );
            }
        }
        let config = fleetmerge_engine::moe::MoeConfig::load(config)?;
        let planned = fleetmerge_engine::moe::plan(&config, &self.options()?, self.allow_all_same)?;
        for w in &planned.report.warnings {
            tracing::warn!("{w}");
        }
        tracing::info!(
            family = %planned.report.family,
            gate_mode = %planned.report.gate_mode,
            "building a MoE: {} experts, routers: {}",
            planned.report.experts.len(),
            planned.report.router_cost
        );
        Ok(planned)
    }
}

/// The files written around the shards (`run` and `coordinator`).
#[derive(Args)]
pub struct AssembleArgs {
    /// Do not copy tokenizer files from the donor model.
    #[arg(long)]
    no_copy_tokenizer: bool,
    /// Do not write README.md and mergekit_config.yml.
    #[arg(long)]
    no_model_card: bool,
}

impl AssembleArgs {
    pub fn options(&self) -> AssembleOptions {
        AssembleOptions {
            copy_tokenizer: !self.no_copy_tokenizer,
            model_card: !self.no_model_card,
        }
    }
}

/// Sets the number of compute threads (`--threads`; default: every core).
pub fn compute_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .context("setting up the compute threads")?;
    }
    Ok(())
}

/// Opens the compute device of `--device`.
pub fn device(spec: &str) -> Result<Device> {
    Device::open(spec).map_err(anyhow::Error::msg)
}

/// How a client reaches a coordinator (`worker` and `status`).
#[derive(Args)]
pub struct ClientArgs {
    /// File holding the coordinator's shared token (else FLEETMERGE_TOKEN).
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
    pub insecure: bool,
}

impl ClientArgs {
    pub fn token(&self) -> Result<Option<String>> {
        read_token(&self.token_file)
    }

    /// The PEM certificate(s) of `--tls-ca`.
    pub fn tls_ca(&self) -> Result<Option<Vec<u8>>> {
        self.tls_ca.as_deref().map(read_file).transpose()
    }
}

/// The coordinator's TLS identity (`--tls-cert`, `--tls-key`).
#[derive(Args)]
pub struct ServerTlsArgs {
    /// PEM certificate chain: serve gRPC over TLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl ServerTlsArgs {
    pub fn identity(&self) -> Result<Option<TlsIdentity>> {
        Ok(match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsIdentity {
                cert_pem: read_file(cert)?,
                key_pem: read_file(key)?,
            }),
            _ => None,
        })
    }
}

/// The shared token: from a file, else FLEETMERGE_TOKEN, else none.
pub fn read_token(file: &Option<PathBuf>) -> Result<Option<String>> {
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

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The output location: an object-store URL as given, or a local directory
/// made absolute with symlinks resolved (so that remote workers get a full
/// path, and an output that is an input is recognised). Nothing is created
/// here: the merge claims the folder (`outdir::claim`) after checking it.
pub fn output_location(out: &Path) -> Result<String> {
    let text = out.to_string_lossy();
    if fleetmerge_engine::storage::is_url(&text) {
        return Ok(text.trim_end_matches('/').to_string());
    }
    let local = Path::new(text.strip_prefix("file://").unwrap_or(&text));
    if local.as_os_str().is_empty() {
        anyhow::bail!("the output folder is empty; name a folder");
    }
    Ok(fleetmerge_coordinator::outdir::resolve_local(local)
        .to_string_lossy()
        .into_owned())
}

/// The async runtime of the gRPC commands.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}
