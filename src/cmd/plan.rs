//! `fleetmerge plan CONFIG`: a dry run. Compares the inputs (and shows the
//! LoRA adapter of each `model+adapter` input) and what a merge will read,
//! write and hold in memory, from the checkpoints' headers only. For a
//! mergekit-moe config: the output families considered and why each was
//! rejected, the bytes of each expert, the router mode and its cost.

use super::options::{self, PlanArgs};
use anyhow::Result;
use clap::Args;
use fleetmerge_engine::exec::human_bytes as bytes;
use std::path::PathBuf;

#[derive(Args)]
pub struct PlanCmdArgs {
    /// The mergekit YAML config.
    config: PathBuf,
    /// Where the output would go (changes only the writer's buffers in the
    /// memory estimate: object stores buffer upload parts).
    /// Also checks that it is no input's folder, as `run` does.
    #[arg(long)]
    out: Option<String>,
    #[command(flatten)]
    plan: PlanArgs,
    /// Compute threads the memory estimate assumes (default: every core here).
    #[arg(long)]
    threads: Option<usize>,
    /// Memory per worker slot, as `run --max-memory` / `worker --max-memory`.
    #[arg(long, value_parser = options::memory_size)]
    max_memory: Option<u64>,
    /// Print the plan as JSON (see the README for its fields).
    #[arg(long)]
    json: bool,
}

pub fn plan(args: PlanCmdArgs) -> Result<()> {
    use fleetmerge_engine::config::MergeConfig;
    use fleetmerge_engine::plan::{self, summary};
    options::init_logging(true);
    if std::fs::read_to_string(&args.config)
        .is_ok_and(|t| fleetmerge_engine::moe::is_moe_config(&t))
    {
        return plan_moe(args);
    }
    let config = MergeConfig::load(&args.config)?;
    let opts = args.plan.options()?;
    let models = plan::inspect_models(&config, &opts)?;
    let mismatches = summary::compare(&models, config.tokenizer.is_some());
    let planned = plan::plan(&config, &opts);
    let threads = args
        .threads
        .unwrap_or_else(rayon::current_num_threads)
        .max(1);
    let peak = planned.as_ref().ok().map(|p| {
        let out = args.out.as_deref().unwrap_or(".");
        fleetmerge_engine::exec::memory::peak(&p.units, out, args.max_memory, threads)
    });
    let overlap = match (&planned, &args.out) {
        (Ok(p), Some(out)) => {
            let out = if fleetmerge_engine::storage::is_url(out) {
                out.trim_end_matches('/').to_string()
            } else {
                fleetmerge_coordinator::outdir::resolve_local(std::path::Path::new(out))
                    .to_string_lossy()
                    .into_owned()
            };
            fleetmerge_coordinator::outdir::check_disjoint(p, &out).err()
        }
        _ => None,
    };
    let summary = planned
        .as_ref()
        .ok()
        .zip(peak.as_ref())
        .map(|(p, peak)| summary::summarize(p, &models, peak, threads));
    let error = match (&planned, peak.as_ref().and_then(|p| p.over_budget.as_ref())) {
        (Err(e), _) => Some(e.to_string()),
        (_, Some(e)) => Some(e.to_string()),
        _ => overlap.map(|e| e.to_string()),
    };
    if args.json {
        let v = serde_json::json!({
            "format": 1,
            "config": args.config,
            "models": models,
            "mismatches": mismatches,
            "plan": summary,
            "hub": crate::hub::inputs_json(planned.as_ref().ok()),
            "error": error,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_plan(&models, &mismatches, summary.as_ref(), args.max_memory);
        crate::hub::print_inputs(planned.as_ref().ok());
    }
    match error {
        Some(e) => anyhow::bail!(e),
        None => Ok(()),
    }
}

fn print_plan(
    models: &[fleetmerge_engine::plan::ModelFacts],
    mismatches: &[fleetmerge_engine::plan::summary::Mismatch],
    summary: Option<&fleetmerge_engine::plan::summary::Summary>,
    budget: Option<u64>,
) {
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    println!("inputs ({} models):", models.len());
    let width = models
        .iter()
        .map(|m| m.reference.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let fw = models
        .iter()
        .map(|m| m.format.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "  {:width$}  {:fw$}  {:24}  {:>6}  {:>7}  {:>6}  {:>7}  {:>9}  {:>10}",
        "model",
        "format",
        "architecture",
        "layers",
        "vocab",
        "hidden",
        "tensors",
        "params",
        "bytes"
    );
    for m in models {
        println!(
            "  {:width$}  {:fw$}  {:24}  {:>6}  {:>7}  {:>6}  {:>7}  {:>9}  {:>10}",
            m.reference,
            m.format,
            m.architectures.join(","),
            m.layers,
            opt(m.vocab_size),
            opt(m.hidden_size),
            m.tensors,
            count(m.parameters),
            bytes(m.bytes as f64)
        );
        if let Some(a) = &m.adapter {
            println!(
                "  {:width$}  + LoRA {} ({}): r {}, alpha {} (scale {}{}), {} tensors adapted \
                 ({}), {} replaced, {}",
                "",
                a.reference,
                a.location,
                a.rank,
                a.alpha,
                a.scale,
                if a.rslora { ", rsLoRA" } else { "" },
                a.adapted,
                a.modules.join(", "),
                a.replaced,
                bytes(a.bytes as f64)
            );
        }
    }
    if mismatches.is_empty() {
        let vocabulary = if summary.is_some_and(|s| s.vocabulary.is_some()) {
            "tensor shapes (vocabularies aligned to the output's, below)"
        } else {
            "vocabulary and tensor shapes"
        };
        println!("compatibility: same architecture, layers, {vocabulary}");
    } else {
        println!("compatibility: {} mismatch(es)", mismatches.len());
        for m in mismatches {
            println!("  - {}\n    fix: {}", m.what, m.fix);
        }
    }
    let Some(s) = summary else { return };
    println!(
        "plan: {}, {} output tensors ({} parameters) in {} work unit{} ({} shard{}{})",
        s.merge_method,
        s.output_tensors,
        count(s.parameters),
        s.work_units,
        if s.work_units == 1 { "" } else { "s" },
        s.shards,
        if s.shards == 1 { "" } else { "s" },
        if s.shards_in_parts == 0 {
            String::new()
        } else {
            format!(
                ", {} written in parts of about --unit-size input bytes",
                s.shards_in_parts
            )
        }
    );
    let reads: Vec<String> = s
        .read_per_model
        .iter()
        .map(|(m, b)| format!("{m} {}", bytes(*b as f64)))
        .collect();
    println!(
        "read: {} (total {})",
        reads.join(", "),
        bytes(s.read_total as f64)
    );
    println!("write: {}", bytes(s.write_total as f64));
    if let Some(u) = &s.largest_unit {
        println!(
            "largest unit: {} ({} tensors, reads {}, writes {})",
            u.file,
            u.tensors,
            bytes(u.read as f64),
            bytes(u.write as f64)
        );
    }
    println!(
        "peak memory per worker slot: about {} ({} threads{}; an upper bound)",
        bytes(s.peak_memory_per_slot as f64),
        s.threads,
        budget.map_or(String::new(), |b| {
            let fits = if s.peak_memory_per_slot <= b {
                "within"
            } else {
                "MORE than"
            };
            format!(", {fits} --max-memory {}", bytes(b as f64))
        })
    );
    if s.streamed_tensors > 0 {
        println!(
            "streamed: {} tensors larger than the budget allows whole are read a segment at a \
             time (methods with whole-tensor statistics read them once per pass)",
            s.streamed_tensors
        );
    }
    if let Some(v) = &s.vocabulary {
        print_vocabulary(v);
    }
    if s.warnings.is_empty() {
        println!("warnings: none");
    } else {
        println!("warnings:");
        for w in &s.warnings {
            println!("  - {w}");
        }
    }
}

/// The output vocabulary of a merge with a tokenizer setting: its size, the
/// tokens added and from where, the rows that fall back to a default (the
/// first 20 of each; `--json` has them all).
fn print_vocabulary(v: &fleetmerge_engine::tokenizer::VocabSummary) {
    const SHOWN: usize = 20;
    let more = |n: usize| {
        if n > SHOWN {
            println!("    ... and {} more (--json lists them all)", n - SHOWN);
        }
    };
    let padding = if v.rows > v.tokens {
        format!(
            ", {} embedding rows ({} padding rows)",
            v.rows,
            v.rows - v.tokens
        )
    } else {
        String::new()
    };
    println!("vocabulary: {} tokens from {}{padding}", v.tokens, v.source);
    if v.added.is_empty() {
        println!("  tokens added: none");
    } else {
        println!("  tokens added ({}):", v.added.len());
        for a in v.added.iter().take(SHOWN) {
            let special = if a.special { ", special" } else { "" };
            println!("    {:?} id {}{special}: from {}", a.token, a.id, a.from);
        }
        more(v.added.len());
    }
    if v.fallbacks.is_empty() {
        println!("  rows from a default: none (every model has every token)");
    } else {
        println!(
            "  rows from a default ({}: a model lacks the token or it is overridden):",
            v.fallbacks.len()
        );
        for f in v.fallbacks.iter().take(SHOWN) {
            println!(
                "    {:?} id {} (for {}): {}",
                f.token,
                f.id,
                f.lacking.join(", "),
                f.rule
            );
        }
        more(v.fallbacks.len());
    }
}

/// `1.23 B`, `456.7 M`, `12.3 K` parameters.
fn count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} K", n / 1e3)
    } else {
        format!("{n}")
    }
}

/// `plan` of a mergekit-moe config.
fn plan_moe(args: PlanCmdArgs) -> Result<()> {
    use fleetmerge_engine::plan::summary;
    let planned = args.plan.plan_moe(&args.config)?;
    let threads = args
        .threads
        .unwrap_or_else(rayon::current_num_threads)
        .max(1);
    let out = args.out.as_deref().unwrap_or(".");
    let peak =
        fleetmerge_engine::exec::memory::peak(&planned.plan.units, out, args.max_memory, threads);
    let mut s = summary::summarize(&planned.plan, &[], &peak, threads);
    // Every tensor of a built model comes from one model: not worth a warning.
    s.warnings
        .retain(|w| !w.contains("come from one model only"));
    let r = &planned.report;
    if args.json {
        let v = serde_json::json!({
            "format": 1,
            "config": args.config,
            "moe": r,
            "plan": s,
            "error": peak.over_budget.as_ref().map(|e| e.to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("output families (mergekit-moe's order; the first that fits is built):");
        for (name, why) in &r.families {
            match why {
                None if *name == r.family => println!("  {name}: chosen"),
                None => println!("  {name}: would fit"),
                Some(why) => println!("  {name}: rejected: {why}"),
            }
        }
        println!(
            "model: {} layers, hidden {}, {} experts{}; dtype {}",
            r.layers,
            r.hidden,
            r.experts.len(),
            match r.shared_experts.len() {
                0 => String::new(),
                n => format!(" + {n} shared"),
            },
            r.dtype.as_deref().unwrap_or("as the inputs")
        );
        println!(
            "  base (attention, norms, embeddings): {}",
            bytes(r.base_bytes as f64)
        );
        for (i, e) in r.experts.iter().enumerate() {
            println!(
                "  expert {i}: {} ({} of MLPs; {} positive, {} negative prompts)",
                e.reference,
                bytes(e.bytes as f64),
                e.positive_prompts,
                e.negative_prompts
            );
        }
        for (i, e) in r.shared_experts.iter().enumerate() {
            println!(
                "  shared expert {i}: {} ({} of MLPs)",
                e.reference,
                bytes(e.bytes as f64)
            );
        }
        println!(
            "routers: gate_mode {}: {}; {} written",
            r.gate_mode,
            r.router_cost,
            bytes(r.router_bytes as f64)
        );
        println!(
            "plan: {} output tensors ({} parameters) in {} work unit{} ({} shard{}); read {}, \
             write {}",
            s.output_tensors,
            count(s.parameters),
            s.work_units,
            if s.work_units == 1 { "" } else { "s" },
            s.shards,
            if s.shards == 1 { "" } else { "s" },
            bytes(s.read_total as f64),
            bytes(s.write_total as f64)
        );
        println!(
            "peak memory per worker slot: about {} ({} threads; an upper bound)",
            bytes(s.peak_memory_per_slot as f64),
            s.threads
        );
        let warnings: Vec<&String> = r.warnings.iter().chain(&s.warnings).collect();
        if warnings.is_empty() {
            println!("warnings: none");
        } else {
            println!("warnings:");
            for w in warnings {
                println!("  - {w}");
            }
        }
    }
    match peak.over_budget {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
