//! Hugging Face Hub references on the command line: pinning a resumed merge's
//! Hub inputs to the commits its journal recorded, the `plan` lines that say
//! where each Hub input comes from, and `fleetmerge download CONFIG`, which
//! fills the HF cache with the files a merge reads, in huggingface_hub's
//! layout.

use anyhow::Result;
use clap::Args;
use fleetmerge_engine::exec::human_bytes as bytes;
use fleetmerge_engine::plan::Plan;
use fleetmerge_engine::storage::hub::{self, HubPath};
use fleetmerge_engine::storage::{self, Storage};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Before planning a merge into `out`: when `out` holds an unfinished merge,
/// its Hub inputs are pinned to the commits its journal recorded, so the
/// resumed merge reads the same bytes even if a branch moved since (planning
/// then warns that it moved). Nothing happens with `--restart`, or when the
/// earlier merge finished.
pub fn pin_from_journal(out: &Path, restart: bool) {
    if restart {
        return;
    }
    let text = out.to_string_lossy();
    let location = if storage::is_url(&text) {
        text.trim_end_matches('/').to_string()
    } else {
        fleetmerge_coordinator::outdir::resolve_local(Path::new(
            text.strip_prefix("file://").unwrap_or(&text),
        ))
        .to_string_lossy()
        .into_owned()
    };
    let store = storage::for_location(&location);
    let Ok(Some(records)) =
        fleetmerge_coordinator::journal::read_records(store.as_ref(), &location)
    else {
        return;
    };
    if records.finished {
        return;
    }
    for (reference, location) in folders(&records.plan) {
        let Ok(h) = hub::parse_location(&location) else {
            continue;
        };
        let (repo, rev) = match reference.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (reference.as_str(), hub::DEFAULT_REVISION),
        };
        if repo == h.repo {
            hub::pin(repo, rev, &h.commit);
        }
    }
}

/// The folders a plan reads, each with the reference that names it
/// (`path[@revision]`): every model's, and for a `model+adapter` reference
/// the model's and the adapter's, each under its own part of the reference.
fn folders(plan: &Plan) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for m in &plan.models {
        match (m.reference.split_once('+'), &m.adapter) {
            (Some((model, lora)), Some(adapter)) => {
                out.push((model.to_string(), m.location.clone()));
                out.push((lora.to_string(), adapter.clone()));
            }
            _ => out.push((m.reference.clone(), m.location.clone())),
        }
    }
    out
}

/// The files the plan reads (shards, adapters), by the Hub folder
/// (`hf://repo@commit`) that holds them.
fn files_per_folder(plan: &Plan) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in plan
        .units
        .iter()
        .flat_map(|u| u.tensors.iter().flat_map(|t| t.all_refs()))
    {
        if let Ok(h) = hub::parse_location(&r.location) {
            out.entry(hub::model_location(&h.repo, &h.commit))
                .or_default()
                .insert(r.location.clone());
        }
    }
    out
}

/// Where each Hub input of `plan` comes from: (reference, source); an
/// adapter is an input of its own, under its part of the reference.
pub fn inputs(plan: &Plan) -> Vec<(String, hub::InputSource)> {
    let files = files_per_folder(plan);
    folders(plan)
        .into_iter()
        .filter_map(|(reference, location)| {
            let f: Vec<String> = files
                .get(&location)
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            hub::describe(&location, &f).map(|s| (reference, s))
        })
        .collect()
}

/// `plan --json`'s `hub` list.
pub fn inputs_json(plan: Option<&Plan>) -> serde_json::Value {
    let list: Vec<serde_json::Value> = plan
        .map(inputs)
        .unwrap_or_default()
        .into_iter()
        .map(|(reference, s)| {
            serde_json::json!({
                "reference": reference,
                "repo": s.repo,
                "commit": s.commit,
                "files": s.files,
                "bytes": s.bytes,
                "cached_files": s.cached_files,
                "source": source_word(&s),
                "cache_dir": s.cache_dir,
                "endpoint": s.endpoint,
            })
        })
        .collect();
    serde_json::Value::Array(list)
}

fn source_word(s: &hub::InputSource) -> &'static str {
    if s.cached_files == s.files {
        "cache"
    } else if s.cached_files == 0 {
        "network"
    } else {
        "cache+network"
    }
}

/// `plan`'s lines about Hub inputs (nothing when there are none).
pub fn print_inputs(plan: Option<&Plan>) {
    let Some(plan) = plan else { return };
    let list = inputs(plan);
    if list.is_empty() {
        return;
    }
    let s = hub::settings();
    println!(
        "hub inputs ({}{}, cache {}):",
        s.endpoint,
        if s.offline { ", offline" } else { "" },
        s.cache.root.display()
    );
    let width = list.iter().map(|(r, _)| r.len()).max().unwrap_or(5);
    for (reference, i) in &list {
        let from = match source_word(i) {
            "cache" => "from the cache".to_string(),
            "network" => "by range from the Hub".to_string(),
            _ => format!(
                "{} of {} files from the cache, the rest by range from the Hub",
                i.cached_files, i.files
            ),
        };
        println!(
            "  {reference:width$}  commit {}  {} file{}, {}  {from}",
            i.commit,
            i.files,
            if i.files == 1 { "" } else { "s" },
            bytes(i.bytes as f64)
        );
    }
}

/// `fleetmerge download CONFIG`.
#[derive(Args)]
pub struct DownloadArgs {
    /// The mergekit YAML config whose Hub models to fetch.
    config: std::path::PathBuf,
    #[command(flatten)]
    plan: crate::cmd::options::PlanArgs,
    /// Only warnings and errors.
    #[arg(long, short)]
    quiet: bool,
}

/// Files besides the shards that a merge, transformers or mergekit read: the
/// model's config and index (safetensors' or pytorch_model.bin's), the
/// tokenizer files a merge copies, and an adapter's config.
fn side_files() -> impl Iterator<Item = &'static str> {
    ["config.json", fleetmerge_engine::checkpoint::ADAPTER_CONFIG]
        .into_iter()
        .chain(fleetmerge_engine::checkpoint::INDEX_FILES)
        .chain(fleetmerge_engine::output::TOKENIZER_FILES.iter().copied())
}

/// Fills the HF cache with what the merge of `CONFIG` reads from the Hub: the
/// shards its plan reads, config.json, the index and the tokenizer files, the
/// adapters' config and weights, as
/// huggingface_hub lays them out (blobs written under `.incomplete` and
/// renamed when whole and checked, relative symlinks in `snapshots/`, then
/// `refs/`). Files already cached are kept. No `trees/` listing is written,
/// since it would claim files that were not fetched.
pub fn download(args: DownloadArgs) -> Result<()> {
    crate::cmd::options::init_logging(args.quiet);
    let s = hub::settings();
    if s.offline {
        anyhow::bail!("HF_HUB_OFFLINE is set: `download` needs the Hub");
    }
    let plan = args.plan.plan(&args.config)?;
    let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut dirs: Vec<(String, String)> = folders(&plan);
    dirs.push((String::new(), plan.output.tokenizer_dir.clone()));
    let st = hub::HubStorage;
    for (_, dir) in &dirs {
        if !hub::is_hub_location(dir) {
            continue;
        }
        let set = wanted.entry(dir.clone()).or_default();
        for name in side_files() {
            let f = st.join(dir, name);
            if st.exists(&f)? {
                set.insert(f);
            }
        }
    }
    for (dir, files) in files_per_folder(&plan) {
        wanted.entry(dir).or_default().extend(files);
    }
    if wanted.is_empty() {
        eprintln!("nothing to download: the config names no Hugging Face Hub model");
        return Ok(());
    }
    let (mut fetched, mut kept, mut total) = (0usize, 0usize, 0u64);
    for (dir, files) in &wanted {
        for f in files {
            let hp = hub::parse_location(f).map_err(anyhow::Error::msg)?;
            if let hub::cache::Lookup::Found(_) = s.cache.lookup(&hp.repo, &hp.commit, &hp.path) {
                kept += 1;
                continue;
            }
            total += fetch(&hp)?;
            fetched += 1;
        }
        // refs/{revision} for every reference to this commit.
        for (reference, location) in &dirs {
            if location == dir && !reference.is_empty() {
                let h = hub::parse_location(dir).map_err(anyhow::Error::msg)?;
                let rev = reference
                    .split_once('@')
                    .map_or(hub::DEFAULT_REVISION, |(_, rev)| rev);
                s.cache
                    .write_ref(&h.repo, rev, &h.commit)
                    .map_err(anyhow::Error::msg)?;
            }
        }
        if !args.quiet {
            let h = hub::parse_location(dir).map_err(anyhow::Error::msg)?;
            eprintln!(
                "{} at commit {}: {}",
                h.repo,
                h.commit,
                s.cache.snapshot_dir(&h.repo, &h.commit).display()
            );
        }
    }
    if !args.quiet {
        eprintln!(
            "downloaded {fetched} file{} ({}) into {}; {kept} already cached",
            if fetched == 1 { "" } else { "s" },
            bytes(total as f64),
            s.cache.root.display()
        );
    }
    Ok(())
}

/// Writes one file into the cache, checking an LFS file's sha256 against the
/// blob id the Hub gave.
fn fetch(hp: &HubPath) -> Result<u64> {
    use sha2::Digest;
    struct Hashing<W> {
        out: W,
        hash: sha2::Sha256,
    }
    impl<W: std::io::Write> std::io::Write for Hashing<W> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let n = self.out.write(b)?;
            self.hash.update(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.out.flush()
        }
    }
    let s = hub::settings();
    let tree = hub::client::tree_entry(&hp.repo, &hp.commit, &hp.path)?;
    let mut size = 0;
    s.cache
        .store(&hp.repo, &hp.commit, &hp.path, &tree.etag, |partial| {
            let file = std::fs::File::create(partial)
                .map_err(|e| format!("{}: {e}", partial.display()))?;
            let mut w = Hashing {
                out: std::io::BufWriter::new(file),
                hash: sha2::Sha256::new(),
            };
            let (n, _) = hub::client::download(hp, &mut w).map_err(|e| e.to_string())?;
            std::io::Write::flush(&mut w).map_err(|e| format!("{}: {e}", partial.display()))?;
            let sha = hex::encode(w.hash.finalize());
            if tree.etag.len() == 64 && sha != tree.etag {
                return Err(format!(
                    "{}: downloaded {n} bytes with sha256 {sha}, the Hub says {}",
                    hp.location(),
                    tree.etag
                ));
            }
            size = n;
            Ok(())
        })
        .map_err(anyhow::Error::msg)?;
    Ok(size)
}
