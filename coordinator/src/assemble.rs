//! The files of a merged model besides its shards: `config.json` (donor's,
//! patched, or a built model's as planned), tokenizer files, `README.md` model
//! card, `mergekit_config.yml` (`mergekit_moe_config.yml` for a built MoE), and
//! — last of all, once every shard exists — `model.safetensors.index.json`.

use fleetmerge_engine::checkpoint::CheckpointError;
use fleetmerge_engine::output::{self, CardInput, OutputError, Provenance};
use fleetmerge_engine::plan::Plan;
use fleetmerge_engine::storage::{self, StorageError};
use fleetmerge_engine::unit::UnitOutput;

/// What to write besides the tensors.
#[derive(Debug, Clone)]
pub struct AssembleOptions {
    pub copy_tokenizer: bool,
    pub model_card: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{location}: config.json is not a JSON object: {message}")]
    DonorConfig { location: String, message: String },
}

/// The last path component of the output location (the model card's title).
fn model_name(out_dir: &str) -> &str {
    out_dir
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("")
}

/// Writes config.json, tokenizer files, the model card and mergekit_config.yml.
pub fn write_side_files(
    plan: &Plan,
    out_dir: &str,
    opts: &AssembleOptions,
) -> Result<(), AssembleError> {
    let out = storage::for_location(out_dir);
    let meta = &plan.output;
    if let Some(g) = &meta.generated {
        // A built model (`fleetmerge moe`): its config.json as planned.
        out.put(&out.join(out_dir, "config.json"), g.config_json.as_bytes())?;
    } else {
        write_config(plan, out_dir)?;
    }
    write_tokenizer_and_config_yaml(plan, out_dir, opts)
}

/// config.json: the donor's, patched (dtype, layer count, vocabulary size,
/// quantization).
fn write_config(plan: &Plan, out_dir: &str) -> Result<(), AssembleError> {
    let out = storage::for_location(out_dir);
    let meta = &plan.output;
    let donor = storage::for_location(&meta.config_dir);
    let config_loc = donor.join(&meta.config_dir, "config.json");
    let donor_config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&donor.read_all(&config_loc)?).map_err(|e| {
            AssembleError::DonorConfig {
                location: config_loc.clone(),
                message: e.to_string(),
            }
        })?;
    let mut config = output::output_config(
        &donor_config,
        meta.config_dtype,
        meta.layers.as_ref().map(|(k, n)| (k.as_str(), *n)),
    );
    if let Some(n) = meta.vocab_size {
        set_vocab_size(&mut config, n);
    }
    if meta.dequantized {
        // The weights are no longer FP8: loaders must not look for scales.
        config.remove("quantization_config");
    }
    out.put(
        &out.join(out_dir, "config.json"),
        output::to_pretty_json(&config).as_bytes(),
    )?;
    Ok(())
}

/// The tokenizer files and the config YAML.
fn write_tokenizer_and_config_yaml(
    plan: &Plan,
    out_dir: &str,
    opts: &AssembleOptions,
) -> Result<(), AssembleError> {
    let out = storage::for_location(out_dir);
    let meta = &plan.output;
    if opts.copy_tokenizer && !meta.tokenizer_files.is_empty() {
        // The merged vocabulary's files (built by the plan).
        for (name, text) in &meta.tokenizer_files {
            out.put(&out.join(out_dir, name), text.as_bytes())?;
        }
    } else if opts.copy_tokenizer {
        let tok = storage::for_location(&meta.tokenizer_dir);
        let copied = output::copy_tokenizer(
            tok.as_ref(),
            out.as_ref(),
            &meta.tokenizer_dir,
            out_dir,
            meta.chat_template.as_deref(),
        )?;
        let patched = meta
            .generated
            .as_ref()
            .and_then(|g| g.tokenizer_config.as_ref());
        if let (Some(text), true) = (patched, copied.iter().any(|c| c == "tokenizer_config.json")) {
            out.put(&out.join(out_dir, "tokenizer_config.json"), text.as_bytes())?;
        }
        if copied.is_empty() {
            tracing::warn!(
                donor = %meta.tokenizer_dir,
                "no tokenizer files to copy (tokenizer_config.json with tokenizer.json or tokenizer.model); copy a tokenizer into the output yourself"
            );
        }
    }

    if opts.model_card {
        let name = meta
            .generated
            .as_ref()
            .map_or("mergekit_config.yml", |g| g.config_file.as_str());
        out.put(&out.join(out_dir, name), meta.config_yaml.as_bytes())?;
    }
    Ok(())
}

/// Sets config.json's vocabulary size where the donor has it (top level, or
/// `text_config` of a multimodal model), else at the top level.
fn set_vocab_size(config: &mut serde_json::Map<String, serde_json::Value>, n: u64) {
    let nested = !config.contains_key("vocab_size")
        && config
            .get("text_config")
            .and_then(|t| t.get("vocab_size"))
            .is_some();
    if nested {
        if let Some(t) = config
            .get_mut("text_config")
            .and_then(serde_json::Value::as_object_mut)
        {
            t.insert("vocab_size".into(), n.into());
        }
    } else {
        config.insert("vocab_size".into(), n.into());
    }
}

/// Writes the README.md model card once every shard exists: mergekit's card
/// plus a provenance section with every shard's checksum.
fn write_card(
    plan: &Plan,
    out_dir: &str,
    outputs: &[UnitOutput],
    fingerprint: &str,
) -> Result<(), AssembleError> {
    let out = storage::for_location(out_dir);
    let meta = &plan.output;
    let mut card = match &meta.generated {
        Some(g) => g.card.clone(),
        None => output::model_card(&CardInput {
            name: model_name(out_dir),
            merge_method: &plan.merge_method,
            method_pretty: Some(&meta.method_pretty),
            method_url: meta.method_url.as_deref(),
            base_model: meta.base_reference.as_deref(),
            models: &meta.references,
            config_yaml: &meta.config_yaml,
            model_exists_locally: &|p: &str| std::path::Path::new(p).exists(),
        }),
    };
    let mut shards: Vec<(String, u64, String)> = outputs
        .iter()
        .map(|o| {
            // A part of a shard: its byte range, hashed on its own.
            let part = plan
                .units
                .iter()
                .any(|u| u.id == o.unit && u.part.is_some());
            let name = if part {
                format!(
                    "{} (bytes {}..{})",
                    o.file_name,
                    o.offset,
                    o.offset + o.size
                )
            } else {
                o.file_name.clone()
            };
            (name, o.size, o.sha256.clone())
        })
        .collect();
    shards.sort();
    // A model+adapter reference: the model's folder, then the adapter's (as
    // its own reference).
    let models: Vec<(String, String)> = plan
        .models
        .iter()
        .flat_map(|m| {
            let adapter = m.adapter.as_ref().map(|a| {
                let lora = m.reference.split_once('+').map_or("", |(_, l)| l);
                (lora.to_string(), a.clone())
            });
            std::iter::once((m.reference.clone(), m.location.clone())).chain(adapter)
        })
        .collect();
    card.push_str(&output::provenance(&Provenance {
        merge_method: &plan.merge_method,
        out_dtype: meta.config_dtype.map(|d| d.torch_name().to_string()),
        parameters: plan
            .units
            .iter()
            .flat_map(|u| u.tensors.iter().map(|t| t.numel()))
            .sum(),
        total_size: plan.total_size(),
        models: &models,
        fingerprint,
        shards: &shards,
    }));
    out.put(&out.join(out_dir, "README.md"), card.as_bytes())?;
    Ok(())
}

/// Removes the index of an earlier merge before new shards are written, so an
/// unfinished merge never looks finished.
pub fn remove_index(out_dir: &str) -> Result<(), AssembleError> {
    let out = storage::for_location(out_dir);
    out.delete(&out.join(out_dir, output::INDEX_FILE))?;
    Ok(())
}

/// Writes the model card (with every shard's checksum), then the index (for
/// sharded outputs): the marker of a complete model. (The shards of an earlier
/// merge into the same folder were removed before this one started, see
/// `Journal::open`.)
pub fn write_index(
    plan: &Plan,
    out_dir: &str,
    opts: &AssembleOptions,
    outputs: &[UnitOutput],
    fingerprint: &str,
) -> Result<(), AssembleError> {
    if opts.model_card {
        write_card(plan, out_dir, outputs, fingerprint)?;
    }
    let out = storage::for_location(out_dir);
    let index_location = out.join(out_dir, output::INDEX_FILE);
    if plan.units.len() > 1 {
        let index = output::index_json(plan.total_size(), &plan.weight_map());
        out.put(&index_location, index.as_bytes())?;
    } else {
        out.delete(&index_location)?;
    }
    Ok(())
}
