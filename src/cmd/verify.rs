//! `fleetmerge verify OUT`: checks that a merged model is whole
//! ([`fleetmerge_coordinator::verify`]) and prints what it found.

use super::options;
use anyhow::Result;
use clap::Args;
use fleetmerge_coordinator::verify;
use fleetmerge_engine::exec::human_bytes as bytes;
use std::path::PathBuf;

#[derive(Args)]
pub struct VerifyArgs {
    /// The merged model's folder (or object-store URL).
    out: PathBuf,
    /// Also read every float tensor and report NaN and infinite values.
    #[arg(long)]
    scan: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn verify(args: VerifyArgs) -> Result<()> {
    options::init_logging(true);
    let out = args.out.to_string_lossy();
    let out = out.trim_end_matches('/');
    let report = verify::verify(out, args.scan);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.ok() {
        let mut line = format!(
            "ok: {out}: {} shard{}, {} tensors, {}",
            report.shards,
            if report.shards == 1 { "" } else { "s" },
            report.tensors,
            bytes(report.bytes as f64)
        );
        if report.journal {
            line.push_str(&format!(
                "; sizes and sha256 of {} shard{} (or parts of shards) match the journal",
                report.hashed,
                if report.hashed == 1 { "" } else { "s" }
            ));
        } else {
            line.push_str("; no journal (.fleetmerge/) to compare hashes with");
        }
        if args.scan {
            line.push_str(&format!(
                "; {} float tensors scanned, no NaN or Inf",
                report.scanned
            ));
        }
        println!("{line}");
    } else {
        println!(
            "{out}: {} problem{}",
            report.problems.len(),
            if report.problems.len() == 1 { "" } else { "s" }
        );
        for p in &report.problems {
            println!("  {p}");
        }
    }
    if report.ok() {
        Ok(())
    } else {
        anyhow::bail!(
            "{out} did not verify ({} problem{})",
            report.problems.len(),
            if report.problems.len() == 1 { "" } else { "s" }
        )
    }
}
