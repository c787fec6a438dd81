//! The planner's input models for other planners (`crate::moe`): models opened
//! from references as a merge opens them (local folders, object stores, Hub
//! ids, `model+adapter`), a [`TensorRef`] for one of their tensors (with its
//! LoRA factors, or an adapter's replacement), and output tensors grouped into
//! shards and units exactly as a merge's are.

use super::build::PlanOptions;
use super::models::{open_models, Model};
use super::{PlanError, PlannedModel};
use crate::checkpoint::{Adapted, TensorLocation};
use crate::config::{MergeConfig, ModelInputs, ModelRef, Params};
use crate::unit::{LoraRef, OutputTensor, TensorRef, WorkUnit};
use crate::yaml::Span;

/// A model reference to open: the reference, its key path in the config
/// (for messages) and where it is written.
pub type Mention = (ModelRef, String, Span);

/// Opened input models, in the order they were named (each once).
pub struct InputModels {
    models: Vec<Model>,
}

impl InputModels {
    /// Opens each model of `mentions` (headers and config.json only; a
    /// reference named twice is opened once). `file` names the config in
    /// messages.
    pub fn open(file: &str, mentions: &[Mention], opts: &PlanOptions) -> Result<Self, PlanError> {
        let mut unique: Vec<Mention> = Vec::new();
        for m in mentions {
            if !unique.iter().any(|u| u.0 == m.0) {
                unique.push(m.clone());
            }
        }
        // Only the file name of the config is used (in messages).
        let cfg = MergeConfig {
            file: file.to_string(),
            source: String::new(),
            merge_method: crate::config::Spanned::new(String::new(), Span::default()),
            base_model: None,
            inputs: ModelInputs::Models(Vec::new()),
            parameters: Params::default(),
            dtype: None,
            out_dtype: None,
            out_packed: None,
            tokenizer: None,
            chat_template: None,
        };
        Ok(InputModels {
            models: open_models(&cfg, opts, &unique)?,
        })
    }

    /// The index of a reference.
    pub fn index(&self, r: &ModelRef) -> Option<usize> {
        self.models.iter().position(|m| &m.reference == r)
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    pub fn reference(&self, i: usize) -> &ModelRef {
        &self.models[i].reference
    }

    /// Where model `i` was found (a folder or URL).
    pub fn location(&self, i: usize) -> &str {
        &self.models[i].location
    }

    /// Model `i`'s config.json.
    pub fn config(&self, i: usize) -> &serde_json::Map<String, serde_json::Value> {
        &self.models[i].checkpoint.config
    }

    /// Model `i`'s tensor names, sorted.
    pub fn tensor_names(&self, i: usize) -> impl Iterator<Item = &String> {
        self.models[i].checkpoint.tensors.keys()
    }

    /// Where model `i` keeps `name` (its own checkpoint, not its adapter).
    pub fn location_of(&self, i: usize, name: &str) -> Option<&TensorLocation> {
        self.models[i].checkpoint.tensors.get(name)
    }

    /// Bytes of model `i`'s tensors (its checkpoint's).
    pub fn bytes(&self, i: usize) -> u64 {
        self.models[i]
            .checkpoint
            .tensors
            .values()
            .map(|t| t.info.len)
            .sum()
    }

    /// The input `name` of model `i` as a merge reads it: with the LoRA
    /// factors of its adapter, or the adapter's replacement tensor; `None`
    /// when the model has no such tensor.
    pub fn tensor_ref(&self, i: usize, name: &str) -> Option<TensorRef> {
        let m = &self.models[i];
        let loc = m.checkpoint.tensors.get(name)?;
        let at = |name: &str, loc: &TensorLocation| TensorRef {
            model: i,
            name: name.to_string(),
            location: loc.file.clone(),
            offset: loc.info.offset,
            len: loc.info.len,
            dtype: loc.info.dtype,
            shape: loc.info.shape.clone(),
            lora: None,
        };
        let adapted = m.adapter.as_ref().and_then(|a| Some((a, a.map.get(name)?)));
        Some(match adapted {
            None => at(name, loc),
            Some((a, Adapted::Replaced { key })) => at(key, &a.adapter.tensors[key]),
            Some((
                a,
                Adapted::Lora {
                    a: ka,
                    b: kb,
                    scale,
                    transposed,
                    ..
                },
            )) => TensorRef {
                lora: Some(Box::new(LoraRef {
                    a: at(ka, &a.adapter.tensors[ka]),
                    b: at(kb, &a.adapter.tensors[kb]),
                    scale: *scale,
                    transposed: *transposed,
                })),
                ..at(name, loc)
            },
        })
    }

    /// The models as a plan lists them.
    pub fn planned(&self) -> Vec<PlannedModel> {
        self.models
            .iter()
            .map(|m| PlannedModel {
                reference: m.reference.to_string(),
                location: m.location.clone(),
                adapter: m.adapter.as_ref().map(|a| a.location.clone()),
            })
            .collect()
    }
}

/// Groups `tensors` (in output order) into shards of `opts.out_shard_size`
/// and the shards into work units of method `method`, as a merge's.
pub fn shard_units(tensors: Vec<OutputTensor>, opts: &PlanOptions, method: &str) -> Vec<WorkUnit> {
    super::shards::shard(tensors, opts, method)
}
