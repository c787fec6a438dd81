//! `fleetmerge worker`: works for a coordinator (the worker crate's loop over
//! its gRPC unit source) until the merge is over or SIGTERM drains it.

use super::options::{self, ClientArgs};
use anyhow::Result;
use clap::Args;
use fleetmerge_worker::remote::{run_remote, RemoteOptions};

#[derive(Args)]
pub struct WorkerArgs {
    /// The coordinator, e.g. http://10.0.0.5:7070.
    #[arg(long)]
    coordinator: String,
    #[command(flatten)]
    client: ClientArgs,
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
    /// Do not lease the next unit while the current one computes and writes
    /// (by default a worker leases it once the current unit's inputs are
    /// read, so its link does not sit idle during a unit's tail; that is one
    /// unit more in flight, so there is no read-ahead under --max-memory).
    #[arg(long)]
    no_read_ahead: bool,
    /// Memory this worker may use (e.g. 8G, 1.5GB, 512MiB), shared by its slots.
    #[arg(long, value_parser = options::memory_size)]
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

pub fn worker(args: WorkerArgs) -> Result<()> {
    options::init_logging(args.quiet);
    options::compute_threads(args.threads)?;
    let device = options::device(&args.device)?;
    let worker_id = args.worker_id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let opts = RemoteOptions {
        coordinator: args.coordinator,
        token: args.client.token()?,
        worker_id,
        device,
        slots: args.slots.max(1),
        max_memory: args.max_memory,
        give_up_after: std::time::Duration::from_secs(args.give_up_after),
        tls_ca: args.client.tls_ca()?,
        allow_paths: args.allow_path,
        insecure: args.client.insecure,
        // Under --max-memory, the unit read ahead would halve each unit's share.
        read_ahead: !args.no_read_ahead && args.max_memory.is_none(),
    };
    let runtime = options::runtime()?;
    let done = run_remote(opts, runtime.handle())?;
    if !args.quiet {
        eprintln!("worker finished: {done} units computed");
    }
    Ok(())
}
