//! mergekit's YAML merge configuration: the schema (`schema`) read from the
//! node tree of [`crate::yaml`] (which keeps the line of every key), parameter
//! settings with gradients and filters (`params`), and the tokenizer settings
//! (`tokenizer`: `tokenizer_source` / `tokenizer:`). Everything a user can get
//! wrong here is reported with the key and its line.

mod params;
mod schema;
pub mod tokenizer;

pub use params::{Conditional, ParamSetting, Scalar, SettingError};
pub use schema::{
    InputModel, InputSlice, MergeConfig, ModelInputs, ModelPath, ModelRef, OutputSlice, Params,
};
pub use tokenizer::{TokenizerConfig, TokenizerSource};

use crate::yaml::{Span, YamlError};

/// A value with the position of the YAML node it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

impl<T> Spanned<T> {
    pub fn new(value: T, span: Span) -> Self {
        Spanned { value, span }
    }
}

impl<T> std::ops::Deref for Spanned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

/// An invalid configuration: what is wrong, with the key path and its place in the file.
///
/// Shown as `FILE: KEY_PATH (line L, column C): MESSAGE`; the key path and the
/// position are left out when unknown (e.g. the file could not be read).
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{file}{}{}: {message}",
    if key_path.is_empty() { String::new() } else { format!(": {key_path}") },
    span.map(|s| format!(" ({s})")).unwrap_or_default()
)]
pub struct ConfigError {
    /// The configuration file as the user named it.
    pub file: String,
    /// Dotted path of the offending key, e.g. `models[1].parameters.density`.
    pub key_path: String,
    pub span: Option<Span>,
    pub message: String,
}

impl From<YamlError> for ConfigError {
    fn from(e: YamlError) -> Self {
        ConfigError {
            file: e.file,
            key_path: e.key_path,
            span: e.span,
            message: e.message,
        }
    }
}
