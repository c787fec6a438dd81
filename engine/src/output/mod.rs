//! The files of a merged model around its tensors: the safetensors shard layout
//! (`shard`), the index and shard names (`index`), `config.json`
//! (`model_config`), tokenizer files (`tokenizer`, `chat_templates`) and the
//! `README.md` model card (`card`).

mod card;
mod chat_templates;
mod index;
mod model_config;
mod shard;
mod tokenizer;

pub use card::{model_card, provenance, CardInput, Provenance};
pub use chat_templates::{builtin_chat_template, resolve_chat_template};
pub use index::{index_json, shard_file_names, INDEX_FILE};
pub use model_config::{output_config, to_pretty_json};
pub use shard::ShardLayout;
pub use tokenizer::copy_tokenizer;

use crate::storage::StorageError;

/// Why an output file could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("Invalid chat template: {template} (not a built-in name, and a literal template needs at least 20 characters and a '{{')")]
    InvalidChatTemplate { template: String },
    #[error("chat_template: auto must be resolved by the caller from the input models' templates")]
    AutoChatTemplate,
    #[error("{location}: tokenizer_config.json is invalid: {message}")]
    TokenizerConfig { location: String, message: String },
}
