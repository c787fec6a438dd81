//! Tokenizer merging, as mergekit 0.1.5 does it (`mergekit/tokenizer/`) for
//! `tokenizer_source:` / `tokenizer:`: the output vocabulary (`union`, `base`
//! or a model's tokenizer, plus `tokens:`), each input's permutation into it,
//! the rows an input lacks (token overrides, the only model with the token, the
//! base's row, else the mean; zeros with a warning), padding to
//! `pad_to_multiple_of`, and the output tokenizer files.
//!
//! - `load`: one model's tokenizer files (`tokenizer.json` through the
//!   `tokenizers` crate) and mergekit's stripping of tokens past a model's rows.
//! - `build`: the output vocabulary and permutations ([`Vocabulary`]), built
//!   once from the tokenizer files and `config.json` vocabulary sizes; the
//!   per-tensor [`VocabAlignment`]s, what `plan` shows ([`VocabSummary`]), and
//!   the output tokenizer files.
//!
//! The re-indexing of one vocabulary tensor ([`VocabAlignment`]: plain data,
//! its validation and the row fills over f32 rows) lives in [`crate::unit`],
//! since it travels in a work unit; it is re-exported here.

mod build;
mod load;
#[cfg(test)]
mod tests;

pub use crate::unit::{fill_row, padding_row, Fill, RowFill, RowMean, RowRun, VocabAlignment};
pub use build::{
    build_vocabulary, config_vocab_size, AddedEntry, Fallback, VocabModel, VocabRequest,
    VocabSummary, Vocabulary,
};

use crate::config::ConfigError;
use crate::storage::StorageError;

/// Why the output vocabulary cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A key of the merge config (a token override, the source).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A tokenizer file that cannot be used.
    #[error("{location}: {message}")]
    File { location: String, message: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The inputs do not fit together (e.g. a token id past a model's rows).
    #[error("{0}")]
    Inputs(String),
}
