//! A model directory: where each tensor lives (through the index or the single
//! file: `model.safetensors`, else PyTorch's `pytorch_model.bin`, as mergekit
//! and transformers prefer them), and its `config.json`.

use super::safetensors::{short, Entries, TensorInfo};
use super::{read_tensors, CheckpointError, Format};
use crate::storage::{Storage, StorageError};
use rayon::prelude::*;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";
const BIN_INDEX_FILE: &str = "pytorch_model.bin.index.json";
const BIN_SINGLE_FILE: &str = "pytorch_model.bin";
/// The index files a model directory may have, in the order they are looked for.
pub const INDEX_FILES: [&str; 2] = [INDEX_FILE, BIN_INDEX_FILE];
const CONFIG_FILE: &str = "config.json";

/// Where one tensor's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLocation {
    /// Full location of the shard.
    pub file: String,
    pub info: TensorInfo,
}

/// An opened model directory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The model directory, as given.
    pub location: String,
    /// `config.json`, key order kept.
    pub config: Map<String, Value>,
    pub tensors: BTreeMap<String, TensorLocation>,
    /// Shard locations, sorted.
    pub files: Vec<String>,
}

impl Checkpoint {
    /// Opens a model directory: `model.safetensors.index.json` (+ shards) or
    /// `model.safetensors`, else `pytorch_model.bin.index.json` (+ shards) or
    /// `pytorch_model.bin` (mergekit's order: safetensors first, an index
    /// before a single file), plus `config.json`. Each shard is read as its
    /// name says ([`Format::of`]).
    pub fn open(storage: &dyn Storage, location: &str) -> Result<Checkpoint, CheckpointError> {
        let mut found = None;
        for (index, single) in [(INDEX_FILE, SINGLE_FILE), (BIN_INDEX_FILE, BIN_SINGLE_FILE)] {
            let index = storage.join(location, index);
            if storage.exists(&index)? {
                found = Some(open_sharded(storage, location, &index)?);
                break;
            }
            let single = storage.join(location, single);
            if storage.exists(&single)? {
                let tensors = read_tensors(storage, &single)?
                    .into_iter()
                    .map(|(name, info)| {
                        let file = single.clone();
                        (name, TensorLocation { file, info })
                    })
                    .collect();
                found = Some((tensors, vec![single]));
                break;
            }
        }
        let Some((tensors, files)) = found else {
            return Err(describe_missing(storage, location)?);
        };
        let config = read_config(storage, location)?;
        Ok(Checkpoint {
            location: location.to_string(),
            config,
            tensors,
            files,
        })
    }

    /// The formats of its files: `safetensors`, `torch zip`, or both
    /// (`safetensors + torch zip`) when an index names shards of each.
    pub fn format(&self) -> String {
        let formats: BTreeSet<Format> = self.files.iter().map(|f| Format::of(f)).collect();
        let names: Vec<&str> = formats.into_iter().map(Format::name).collect();
        names.join(" + ")
    }

    /// Checks config.json's layer count against the tensors: a layer-count key
    /// that is not a whole number (-1, 6.5, [6]) or fewer layers than the
    /// tensors hold (`layers_in_tensors`, beyond DeepSeek's MTP layers that
    /// `num_nextn_predict_layers` counts) would give an output config that
    /// disagrees with its weights. The error names the file and key.
    pub fn check_layer_count(&self, layers_in_tensors: u64) -> Result<(), CheckpointError> {
        let file = format!("{}/config.json", self.location.trim_end_matches('/'));
        let keys = ["num_hidden_layers", "n_layer", "num_layers"];
        let nested = self
            .config
            .get("text_config")
            .and_then(|t| t.get("num_hidden_layers"));
        let present = keys
            .iter()
            .filter_map(|k| self.config.get(*k).map(|v| (k.to_string(), v)))
            .chain(nested.map(|v| ("text_config.num_hidden_layers".to_string(), v)));
        for (key, value) in present {
            if value.as_u64().is_none() {
                return Err(CheckpointError::LayerCountNotWhole {
                    file,
                    key,
                    value: value.to_string().chars().take(40).collect(),
                });
            }
        }
        if let Some((key, n)) = self.num_layers() {
            let extra = self
                .config
                .get("num_nextn_predict_layers")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            if layers_in_tensors > n.saturating_add(extra) {
                return Err(CheckpointError::LayerCountTooSmall {
                    file,
                    key,
                    count: n,
                    layers: layers_in_tensors,
                });
            }
        }
        Ok(())
    }

    /// Layer count from config.json: the first present of `num_hidden_layers`,
    /// `n_layer`, `num_layers`, `text_config.num_hidden_layers`, as (key, value).
    pub fn num_layers(&self) -> Option<(String, u64)> {
        for key in ["num_hidden_layers", "n_layer", "num_layers"] {
            if let Some(n) = self.config.get(key).and_then(Value::as_u64) {
                return Some((key.to_string(), n));
            }
        }
        self.config
            .get("text_config")
            .and_then(|t| t.get("num_hidden_layers"))
            .and_then(Value::as_u64)
            .map(|n| ("text_config.num_hidden_layers".to_string(), n))
    }
}

type Tensors = BTreeMap<String, TensorLocation>;

fn open_sharded(
    storage: &dyn Storage,
    location: &str,
    index: &str,
) -> Result<(Tensors, Vec<String>), CheckpointError> {
    let weight_map = read_index(storage, index)?.weight_map;
    let shard_names: BTreeSet<&str> = weight_map.iter().map(|(_, s)| s.as_str()).collect();
    let shard_files: Vec<String> = shard_names
        .iter()
        .map(|s| storage.join(location, s))
        .collect();

    let headers = shard_files
        .par_iter()
        .map(|file| read_tensors(storage, file))
        .collect::<Result<Vec<_>, _>>()?;

    // Every tensor named by any shard header, to catch one stored twice.
    let mut found: HashMap<String, (usize, TensorInfo)> = HashMap::new();
    for (i, tensors) in headers.into_iter().enumerate() {
        for (name, info) in tensors {
            if let Some((j, _)) = found.get(&name) {
                return Err(CheckpointError::DuplicateTensor {
                    location: location.to_string(),
                    first: shard_files.get(*j).cloned().unwrap_or_default(),
                    second: shard_files.get(i).cloned().unwrap_or_default(),
                    tensor: name,
                });
            }
            found.insert(name, (i, info));
        }
    }

    let shard_index: HashMap<&str, usize> = shard_names
        .iter()
        .enumerate()
        .map(|(i, s)| (*s, i))
        .collect();
    let mut tensors = BTreeMap::new();
    for (name, shard) in &weight_map {
        let wanted = shard_index.get(shard.as_str()).copied();
        let info = match (found.remove(name), wanted) {
            (Some((i, info)), Some(w)) if i == w => info,
            _ => {
                return Err(CheckpointError::TensorNotInShard {
                    location: location.to_string(),
                    tensor: name.clone(),
                    shard: shard.clone(),
                })
            }
        };
        let file = shard_files
            .get(wanted.unwrap_or_default())
            .cloned()
            .unwrap_or_default();
        tensors.insert(name.clone(), TensorLocation { file, info });
    }
    // The index is authoritative: transformers loads only what it names.
    for (name, (i, _)) in found {
        tracing::warn!(
            tensor = %name,
            shard = %shard_files.get(i).map(String::as_str).unwrap_or_default(),
            "tensor is in a shard but not in the index's weight_map; ignoring it"
        );
    }
    Ok((tensors, shard_files))
}

/// The part of `model.safetensors.index.json` (or `pytorch_model.bin.index.json`) we use; the weight_map keeps its
/// entries in file order with duplicates, so a repeated tensor is reported.
#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: Option<Entries>,
    metadata: Option<Value>,
}

/// A parsed `model.safetensors.index.json` or `pytorch_model.bin.index.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// (tensor, shard file name) in file order; names are checked to be plain
    /// file names inside the model directory.
    pub weight_map: Vec<(String, String)>,
    /// `metadata.total_size`, when given.
    pub total_size: Option<u64>,
}

/// Reads and checks the index at `index`.
pub fn read_index(storage: &dyn Storage, index: &str) -> Result<Index, CheckpointError> {
    let bad = |message: String| CheckpointError::BadIndex {
        location: index.to_string(),
        message,
    };
    let bytes = storage.read_all(index)?;
    let file: IndexFile = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let Entries(entries) = file
        .weight_map
        .ok_or_else(|| bad("no weight_map".to_string()))?;
    let mut seen = BTreeSet::new();
    let weight_map = entries
        .into_iter()
        .map(|(name, shard)| match shard {
            Value::String(s) if seen.insert(name.clone()) => Ok((name, s)),
            Value::String(_) => Err(bad(format!("weight_map names tensor {name} twice"))),
            other => Err(bad(format!(
                "weight_map entry {name} is {}, not a file name",
                short(&other)
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (_, shard) in &weight_map {
        // Shard names come from the file; anything path-like could escape the directory.
        if shard.is_empty() || shard.contains('/') || shard.contains('\\') || shard.contains("..") {
            return Err(CheckpointError::BadShardName {
                location: index.to_string(),
                shard: shard.clone(),
            });
        }
    }
    let total_size = file
        .metadata
        .as_ref()
        .and_then(|m| m.get("total_size"))
        .and_then(Value::as_u64);
    Ok(Index {
        weight_map,
        total_size,
    })
}

fn read_config(
    storage: &dyn Storage,
    location: &str,
) -> Result<Map<String, Value>, CheckpointError> {
    let file = storage.join(location, CONFIG_FILE);
    let bytes = match storage.read_all(&file) {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => {
            return Err(CheckpointError::ConfigMissing { location: file })
        }
        Err(e) => return Err(e.into()),
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(CheckpointError::ConfigInvalid {
            location: file,
            message: format!("expected a JSON object, found {}", short(&other)),
        }),
        Err(e) => Err(CheckpointError::ConfigInvalid {
            location: file,
            message: e.to_string(),
        }),
    }
}

/// The error for a directory without a checkpoint, saying what is there
/// instead so the user knows what to do.
fn describe_missing(
    storage: &dyn Storage,
    location: &str,
) -> Result<CheckpointError, CheckpointError> {
    let names = storage.list(location)?;
    if names.is_empty() && !storage.exists(location)? {
        return Ok(CheckpointError::ModelNotFound {
            location: location.to_string(),
        });
    }
    let found = if let Some(other) = names.iter().find(|n| n.ends_with(".safetensors")) {
        format!("found {other} but neither {SINGLE_FILE} nor {INDEX_FILE}")
    } else if let Some(other) = names.iter().find(|n| n.ends_with(".bin")) {
        format!("found {other} but neither {BIN_SINGLE_FILE} nor {BIN_INDEX_FILE}")
    } else if let Some(other) = names
        .iter()
        .find(|n| n.ends_with(".pt") || n.ends_with(".pth") || n.ends_with(".gguf"))
    {
        format!("{other} is not supported; convert the checkpoint to safetensors")
    } else if names.is_empty() {
        "the directory is empty".to_string()
    } else {
        let mut listed: Vec<&str> = names.iter().take(10).map(String::as_str).collect();
        if names.len() > 10 {
            listed.push("...");
        }
        format!("found only {}", listed.join(", "))
    };
    Ok(CheckpointError::NoCheckpoint {
        location: location.to_string(),
        found,
    })
}
