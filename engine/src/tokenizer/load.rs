//! Reading one model's tokenizer files (`tokenizer.json` through the
//! `tokenizers` crate, `tokenizer_config.json`, `special_tokens_map.json`, chat
//! template files), and mergekit's stripping of the tokens past a model's
//! embedding rows (`get_stripped_tokenizer`).

use super::TokenizerError;
use crate::storage::{self, Storage};
use serde_json::{Map, Value};
use std::collections::HashSet;
use tokenizers::Tokenizer;

/// Chat template files transformers reads beside `tokenizer_config.json`.
pub(crate) const TEMPLATE_FILES: &[&str] = &["chat_template.jinja", "chat_template.json"];

/// A model's tokenizer as read from its directory.
#[derive(Clone)]
pub(crate) struct ModelTokenizer {
    /// The model directory.
    pub location: String,
    pub tokenizer: Tokenizer,
    /// `tokenizer.json` as read (written back verbatim when nothing changes).
    pub json: String,
    /// `tokenizer_config.json`, if the model has one.
    pub config: Option<Map<String, Value>>,
    /// `special_tokens_map.json` as read.
    pub special_tokens_map: Option<String>,
    /// Chat template files as read (name, text).
    pub templates: Vec<(String, String)>,
}

impl ModelTokenizer {
    /// Every token with its id: the model vocabulary and the added tokens
    /// (transformers' `get_vocab()`), sorted by id, then by token.
    pub fn vocab_by_id(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self.tokenizer.get_vocab(true).into_iter().collect();
        v.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        v
    }

    /// The added tokens sorted by id (transformers' `added_tokens_decoder`).
    pub fn added_by_id(&self) -> Vec<(u32, tokenizers::AddedToken)> {
        let mut v: Vec<_> = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }
}

/// Reads the tokenizer of the model at `location`. `Ok(None)`: the model has no
/// tokenizer files at all. A tokenizer that exists only in a form the
/// `tokenizers` crate cannot read (`tokenizer.model` of sentencepiece, or
/// `vocab.json` + `merges.txt` of a slow tokenizer) is an error naming the file.
pub(crate) fn load(location: &str) -> Result<Option<ModelTokenizer>, TokenizerError> {
    let st = storage::for_location(location);
    let st = st.as_ref();
    let file = |name: &str| st.join(location, name);
    let json_file = file("tokenizer.json");
    if !st.exists(&json_file)? {
        for (other, what) in [
            ("tokenizer.model", "a sentencepiece model"),
            ("vocab.json", "a slow (Python) tokenizer's vocabulary"),
        ] {
            let path = file(other);
            if st.exists(&path)? {
                return Err(TokenizerError::File {
                    location: path,
                    message: format!(
                        "{what} without tokenizer.json: merging tokenizers needs tokenizer.json \
                         (load the tokenizer with transformers' AutoTokenizer and save_pretrained \
                         it to write one)"
                    ),
                });
            }
        }
        return Ok(None);
    }
    let json = read_text(st, &json_file)?;
    let tokenizer = parse_tokenizer(&json_file, &json)?;
    let config = match read_optional(st, &file("tokenizer_config.json"))? {
        None => None,
        Some(text) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => Some(map),
            Ok(_) => {
                return Err(TokenizerError::File {
                    location: file("tokenizer_config.json"),
                    message: "not a JSON object".into(),
                })
            }
            Err(e) => {
                return Err(TokenizerError::File {
                    location: file("tokenizer_config.json"),
                    message: format!("invalid JSON: {e}"),
                })
            }
        },
    };
    let special_tokens_map = read_optional(st, &file("special_tokens_map.json"))?;
    let mut templates = Vec::new();
    for name in TEMPLATE_FILES {
        if let Some(text) = read_optional(st, &file(name))? {
            templates.push((name.to_string(), text));
        }
    }
    Ok(Some(ModelTokenizer {
        location: location.to_string(),
        tokenizer,
        json,
        config,
        special_tokens_map,
        templates,
    }))
}

pub(crate) fn parse_tokenizer(location: &str, json: &str) -> Result<Tokenizer, TokenizerError> {
    json.parse::<Tokenizer>().map_err(|e| TokenizerError::File {
        location: location.to_string(),
        message: format!("cannot be read as a tokenizer: {e}"),
    })
}

fn read_text(st: &dyn Storage, path: &str) -> Result<String, TokenizerError> {
    String::from_utf8(st.read_all(path)?).map_err(|_| TokenizerError::File {
        location: path.to_string(),
        message: "not UTF-8 text".into(),
    })
}

fn read_optional(st: &dyn Storage, path: &str) -> Result<Option<String>, TokenizerError> {
    if !st.exists(path)? {
        return Ok(None);
    }
    read_text(st, path).map(Some)
}

/// The tokenizer without the tokens whose id is `vocab_size` or more (tokens
/// with no embedding row), as mergekit's `get_stripped_tokenizer` does: they
/// leave the model vocabulary, the added tokens and every BPE merge naming them.
/// Only BPE models can be stripped (mergekit's rule); the second value says
/// whether anything was removed.
pub(crate) fn strip(
    t: &ModelTokenizer,
    vocab_size: u64,
) -> Result<(Tokenizer, bool), TokenizerError> {
    let unused: HashSet<String> = t
        .tokenizer
        .get_vocab(true)
        .into_iter()
        .filter(|(_, id)| u64::from(*id) >= vocab_size)
        .map(|(tok, _)| tok)
        .collect();
    if unused.is_empty() {
        return Ok((t.tokenizer.clone(), false));
    }
    let location = format!("{}/tokenizer.json", t.location.trim_end_matches('/'));
    let fail = |message: String| TokenizerError::File {
        location: location.clone(),
        message,
    };
    let mut doc: Value = serde_json::from_str(&t.json).map_err(|e| fail(e.to_string()))?;
    let model = doc
        .get_mut("model")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| fail("no `model` object".into()))?;
    let kind = model
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("(none)");
    if kind != "BPE" {
        return Err(fail(format!(
            "{} tokens have ids past the model's {vocab_size} embedding rows and would have to \
             be removed, but the tokenizer's model is {kind}; like mergekit, only BPE \
             tokenizers can be stripped (use `tokenizer_source: MODEL` to take this tokenizer \
             as it is)",
            unused.len()
        )));
    }
    if let Some(vocab) = model.get_mut("vocab").and_then(Value::as_object_mut) {
        vocab.retain(|tok, _| !unused.contains(tok));
    }
    if let Some(merges) = model.get_mut("merges").and_then(Value::as_array_mut) {
        let mut kept = Vec::with_capacity(merges.len());
        for m in merges.drain(..) {
            let parts: Vec<&str> = match &m {
                Value::String(s) if s.matches(' ').count() == 1 => s.split(' ').collect(),
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                other => return Err(fail(format!("unexpected merge format: {other}"))),
            };
            if !parts.iter().any(|p| unused.contains(*p)) {
                kept.push(m);
            }
        }
        *merges = kept;
    }
    if let Some(added) = doc.get_mut("added_tokens").and_then(Value::as_array_mut) {
        added.retain(|e| {
            e.get("id")
                .and_then(Value::as_u64)
                .is_some_and(|id| id < vocab_size)
        });
    }
    let text = serde_json::to_string(&doc).map_err(|e| fail(e.to_string()))?;
    Ok((parse_tokenizer(&location, &text)?, true))
}
