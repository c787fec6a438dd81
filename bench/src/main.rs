//! fleetmerge's benchmark. Without a command: generates the model sets
//! (models.rs), runs a linear and a TIES merge of each set with the
//! fleetmerge binary (and of the dense set with `base+lora` in place of the
//! first fine-tune), and prints wall time, input throughput, peak RSS, and the
//! ratio to a plain sequential read of the same input files measured in the
//! same run. `cluster`: the cluster benchmark on simulated nodes (cluster.rs:
//! workers in network namespaces with capped links, netns.rs; inputs and
//! shards on an S3-compatible server, s3.rs).
//!
//!     cargo build --release && cargo run --release -p fleetmerge-bench -- [--dir D] [--runs N]
//!     cargo run --release -p fleetmerge-bench -- cluster [--nodes 1,2,4,8] [--rate 100mbit]
//!
//! `coordinator-scale` serves a DeepSeek-V3-sized merge to simulated workers
//! and measures the coordinator (bench/src/scale.rs):
//!
//!     cargo run --release -p fleetmerge-bench -- coordinator-scale [--workers 64]

mod cluster;
mod models;
mod netns;
mod s3;
mod scale;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    local: Args,
}

#[derive(Subcommand)]
enum Command {
    /// The cluster benchmark: a coordinator and an S3 server on this host,
    /// each worker in a network namespace with a capped link (needs root).
    Cluster(Box<cluster::ClusterArgs>),
    /// (Run by `cluster` inside a node's namespace.) Plain parallel ranged
    /// GETs of objects, bytes discarded; prints the bytes read.
    #[command(hide = true)]
    Get(s3::GetArgs),
    /// The coordinator at DeepSeek-V3 scale with simulated workers (see
    /// bench/src/scale.rs); no merge is computed.
    CoordinatorScale(scale::ScaleArgs),
}

/// The local benchmark's options.
#[derive(clap::Args)]
struct Args {
    /// Where the models and outputs go (about 8 GB).
    #[arg(long, default_value = "/tmp/fleetmerge-bench")]
    dir: PathBuf,
    /// Runs per merge (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The fleetmerge binary.
    #[arg(long, default_value = "target/release/fleetmerge")]
    bin: PathBuf,
    /// Only these merges (dense-linear, dense-ties, dense-linear-lora,
    /// dense-ties-lora, moe-linear, moe-ties).
    #[arg(long)]
    only: Vec<String>,
    /// Compute device passed to `fleetmerge run` (cuda:0 needs a binary built
    /// with the cuda feature); also `--compare-cpu` to check its bytes.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// After each merge on --device, merge once more on the CPU and require
    /// byte-identical shards.
    #[arg(long)]
    compare_cpu: bool,
}

/// Runs `bin args`, returning (wall seconds, peak RSS bytes).
fn timed(bin: &Path, args: &[&str], cwd: &Path) -> Result<(f64, u64)> {
    let t = Instant::now();
    let child = std::process::Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; pointers are to live locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let wall = t.elapsed().as_secs_f64();
    if pid < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{} {:?} failed (status {status})", bin.display(), args);
    }
    Ok((wall, usage.ru_maxrss as u64 * 1024))
}

/// Reads every file in full, sequentially; returns (bytes, seconds).
fn plain_read(files: &[PathBuf]) -> Result<(u64, f64)> {
    let t = Instant::now();
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0;
    for f in files {
        let mut r = std::fs::File::open(f)?;
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok((total, t.elapsed().as_secs_f64()))
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Cluster(args)) => cluster::main(*args),
        Some(Command::Get(args)) => s3::get_main(args),
        Some(Command::CoordinatorScale(args)) => {
            let bin = std::fs::canonicalize(&args.bin).with_context(|| {
                format!("{} (run `cargo build --release` first)", args.bin.display())
            })?;
            std::fs::create_dir_all(&args.dir)?;
            let dir = std::fs::canonicalize(&args.dir)?;
            scale::run(&bin, &dir, &args)
        }
        None => local(cli.local),
    }
}

/// The local benchmark.
fn local(args: Args) -> Result<()> {
    let bin = std::fs::canonicalize(&args.bin)
        .with_context(|| format!("{} (run `cargo build --release` first)", args.bin.display()))?;
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::fs::canonicalize(&args.dir)?;
    models::generate_all(&dir)?;
    // (name, set, method, mergekit 0.1.5's time from the issue (none for the
    // LoRA merges: mergekit first writes the folded model to its cache), reads
    // the base, its first model is `base+lora`)
    let merges = [
        ("dense-linear", "dense", "linear", Some(11.7), false, false),
        ("dense-ties", "dense", "ties", Some(109.0), true, false),
        ("dense-linear-lora", "dense", "linear", None, false, true),
        ("dense-ties-lora", "dense", "ties", None, true, true),
        ("moe-linear", "moe", "linear", Some(16.4), false, false),
        ("moe-ties", "moe", "ties", Some(87.6), true, false),
    ];
    println!(
        "| merge | input | fleetmerge (median of {}) | input GB/s | peak RSS | plain read | merge / read | mergekit | speed-up |",
        args.runs
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (name, set, method, mergekit, with_base, lora) in merges {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == name) {
            continue;
        }
        let sdir = dir.join(set);
        let first = if lora { "base" } else { "ft-a" };
        let models: Vec<&str> = if with_base {
            vec![first, "ft-b", "ft-c", "base"]
        } else {
            vec![first, "ft-b", "ft-c"]
        };
        let yaml = models::merge_yaml(method, with_base, |m| {
            if lora && m == "ft-a" {
                "base+lora".to_string()
            } else {
                m.to_string()
            }
        });
        let cfg = sdir.join(format!("{name}.yaml"));
        std::fs::write(&cfg, yaml)?;
        let mut files: Vec<PathBuf> = models
            .iter()
            .map(|m| sdir.join(m).join(models::SHARD))
            .collect();
        if lora {
            files.push(sdir.join("lora").join("adapter_model.safetensors"));
        }
        plain_read(&files)?; // into the page cache
        let out = dir.join(format!("out-{name}"));
        let mut walls = Vec::new();
        let mut rss = 0;
        let mut reads = Vec::new();
        for _ in 0..args.runs {
            let (bytes, secs) = plain_read(&files)?;
            reads.push(bytes as f64 / secs);
            let _ = std::fs::remove_dir_all(&out);
            let (wall, peak) = timed(
                &bin,
                &[
                    "run",
                    cfg.to_str().unwrap(),
                    out.to_str().unwrap(),
                    "--quiet",
                    "--no-copy-tokenizer",
                    "--out-shard-size",
                    "2G",
                    "--device",
                    &args.device,
                ],
                &sdir,
            )?;
            walls.push(wall);
            rss = rss.max(peak);
        }
        if args.compare_cpu {
            let cpu = dir.join(format!("out-{name}-cpu"));
            let _ = std::fs::remove_dir_all(&cpu);
            timed(
                &bin,
                &[
                    "run",
                    cfg.to_str().unwrap(),
                    cpu.to_str().unwrap(),
                    "--quiet",
                    "--no-copy-tokenizer",
                    "--out-shard-size",
                    "2G",
                ],
                &sdir,
            )?;
            for entry in std::fs::read_dir(&cpu)? {
                let file = entry?.file_name();
                if file.to_string_lossy().ends_with(".safetensors")
                    && std::fs::read(cpu.join(&file))? != std::fs::read(out.join(&file))?
                {
                    bail!(
                        "{name}: {} differs between --device {} and the CPU",
                        file.to_string_lossy(),
                        args.device
                    );
                }
            }
            eprintln!(
                "{name}: shards identical on --device {} and the CPU",
                args.device
            );
            let _ = std::fs::remove_dir_all(&cpu);
        }
        let input: u64 = files
            .iter()
            .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        let wall = median(walls);
        let read_bps = median(reads);
        let read_secs = input as f64 / read_bps;
        let (mergekit, speedup) = match mergekit {
            Some(m) => (format!("{m} s"), format!("{:.1}x", m / wall)),
            None => ("-".to_string(), "-".to_string()),
        };
        println!(
            "| {name} | {:.2} GB | {wall:.2} s | {:.2} | {:.2} GB | {read_secs:.2} s ({:.1} GB/s) | {:.1}x | {mergekit} | {speedup} |",
            input as f64 / 1e9,
            input as f64 / 1e9 / wall,
            rss as f64 / 1e9,
            read_bps / 1e9,
            wall / read_secs,
        );
        let _ = std::fs::remove_dir_all(&out);
    }
    Ok(())
}
