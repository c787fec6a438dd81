//! `fleetmerge coordinator`: plans the merge and serves its units to workers
//! over gRPC ([`fleetmerge_coordinator::serve`]) with a progress display of
//! the merge and of every worker.

use super::options::{self, AssembleArgs, PlanArgs, ServerTlsArgs};
use crate::progress;
use anyhow::Result;
use clap::Args;
use fleetmerge_coordinator::{serve, ProgressFn, ServeOptions, Snapshot};
use fleetmerge_engine::exec::human_bytes as bytes;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Args)]
pub struct CoordinatorArgs {
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
    #[command(flatten)]
    tls: ServerTlsArgs,
    #[command(flatten)]
    plan: PlanArgs,
    /// Start over: discard the journal of an unfinished merge into OUT.
    #[arg(long)]
    restart: bool,
    #[command(flatten)]
    assemble: AssembleArgs,
    /// Only warnings and errors.
    #[arg(long, short)]
    quiet: bool,
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    options::init_logging(args.quiet);
    crate::hub::pin_from_journal(&args.out, args.restart);
    let plan = args.plan.plan(&args.config)?;
    let out = options::output_location(&args.out)?;
    if !(args.lease_timeout.is_finite() && args.lease_timeout > 0.0) {
        anyhow::bail!("--lease-timeout must be a positive number of seconds");
    }
    let token = options::read_token(&args.token_file)?;
    let tls = args.tls.identity()?;
    let display = Arc::new(Mutex::new((
        progress::Display::new(args.quiet),
        progress::State::default(),
    )));
    let shown = display.clone();
    let opts = ServeOptions {
        listen: args.listen,
        token,
        lease_timeout: std::time::Duration::from_secs_f64(args.lease_timeout),
        max_attempts: args.max_attempts,
        assemble: args.assemble.options(),
        restart: args.restart,
        tls,
        progress: Some(ProgressFn(Arc::new(move |s: &Snapshot| {
            let state = progress::State::from(s);
            if let Ok(mut d) = shown.lock() {
                d.0.update(&state);
                d.1 = state;
            }
        }))),
        metrics: args.metrics_listen,
    };
    let units = plan.units.len();
    let result = options::runtime()?.block_on(serve(plan, out, opts));
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
