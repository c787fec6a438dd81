//! The output vocabulary and each model's permutation into it (mergekit 0.1.5's
//! `build_tokenizer` and `build_union_tokenizer`), the default rows of
//! `PermutedVocabulary`, and the output tokenizer files.
//!
//! Where mergekit's order depends on Python's set and hash-map order (the
//! tokens other models add to a union), ours is fixed: models in the order the
//! caller lists them (the base first), each model's tokens by id.

use super::load::{self, ModelTokenizer};
use super::TokenizerError;
use crate::config::tokenizer::{TokenEmbedding, TokenRef, TokenizerConfig, TokenizerSource};
use crate::config::{ConfigError, ModelRef};
use crate::output::to_pretty_json;
use crate::unit::{Fill, RowFill, RowRun, VocabAlignment};
use crate::yaml::Span;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use tokenizers::{AddedToken, Tokenizer};

/// A model of the merge, as the vocabulary sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct VocabModel {
    pub reference: ModelRef,
    /// The model directory.
    pub location: String,
    /// Its `config.json` vocabulary size (see [`config_vocab_size`]): tokens
    /// with this id or more have no embedding row.
    pub vocab_size: Option<u64>,
}

/// `vocab_size` of a `config.json`, or its `text_config`'s (multimodal models).
pub fn config_vocab_size(config: &Map<String, Value>) -> Option<u64> {
    config
        .get("vocab_size")
        .and_then(Value::as_u64)
        .or_else(|| {
            config
                .get("text_config")
                .and_then(|t| t.get("vocab_size"))
                .and_then(Value::as_u64)
        })
}

/// What the vocabulary is built from.
pub struct VocabRequest<'a> {
    /// The config file, for messages about its keys.
    pub config_file: &'a str,
    pub settings: &'a TokenizerConfig,
    /// Every model of the merge (mergekit's referenced models).
    pub models: &'a [VocabModel],
    /// Index of `base_model` in `models`; without one the first model is the
    /// base of the vocabulary (mergekit takes an arbitrary one).
    pub base: Option<usize>,
    /// Where the tokenizer of `source: MODEL` is (it need not be merged).
    pub source_location: Option<&'a str>,
}

/// A token of the output that the base model's vocabulary does not have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddedEntry {
    pub token: String,
    pub id: u64,
    /// The model it comes from, or `tokenizer.tokens`.
    pub from: String,
    pub special: bool,
}

/// A token row that some input does not copy from itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fallback {
    pub token: String,
    pub id: u64,
    /// The inputs without the token (or forced to the override).
    pub lacking: Vec<String>,
    /// Where the row comes from, e.g. "the base model's row".
    pub rule: String,
}

/// What `plan` shows of the vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VocabSummary {
    /// `union`, `base (MODEL)` or the source model.
    pub source: String,
    /// Tokens of the output vocabulary.
    pub tokens: u64,
    /// Embedding rows (the tokens padded to `pad_to_multiple_of`).
    pub rows: u64,
    pub added: Vec<AddedEntry>,
    /// For the embeddings of all models together.
    pub fallbacks: Vec<Fallback>,
    pub warnings: Vec<String>,
}

/// Where a token override takes its row, resolved to model indices.
#[derive(Debug, Clone)]
enum RuleSource {
    /// The model's own row of the token.
    Model(usize),
    /// A given row of the model.
    Row(usize, u64),
    Zero,
}

#[derive(Debug, Clone)]
struct Rule {
    source: Option<RuleSource>,
    force: bool,
    token: String,
    key_path: String,
    span: Span,
}

/// Why a row falls back (for `plan`).
enum Reason {
    Override,
    OnlyModel,
    Base,
    Mean,
    NoModel,
}

/// The output vocabulary and every model's permutation into it.
pub struct Vocabulary {
    config_file: String,
    source: String,
    models: Vec<VocabModel>,
    /// Output tokens by id.
    tokens: Vec<String>,
    rows: u64,
    /// Per model: output id -> the model's row.
    perms: Vec<Vec<Option<u32>>>,
    /// Output id -> override.
    rules: BTreeMap<u32, Rule>,
    added: Vec<AddedEntry>,
    warnings: Vec<String>,
    output: Tokenizer,
    /// The output differs from `files_from`'s tokenizer.json.
    changed: bool,
    /// The tokenizer whose config, special tokens map and templates are kept.
    files_from: ModelTokenizer,
}

impl std::fmt::Debug for Vocabulary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vocabulary")
            .field("source", &self.source)
            .field("tokens", &self.tokens.len())
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

/// Builds the output vocabulary from the models' tokenizer files, as mergekit
/// 0.1.5 does: the base tokenizer stripped of tokens past its rows; `base`,
/// `union` (the base's vocabulary, then every other model's tokens below its
/// vocabulary size: regular tokens, then added tokens with their flags) or a
/// model's tokenizer as it is; then the tokens of `tokens:` it lacks.
pub fn build_vocabulary(req: &VocabRequest) -> Result<Vocabulary, TokenizerError> {
    let models = req.models;
    if models.is_empty() {
        return Err(TokenizerError::Inputs(
            "no models to build a vocabulary from".into(),
        ));
    }
    let base = req.base.unwrap_or(0);
    let settings = req.settings;
    let refs: Vec<&ModelRef> = models.iter().map(|m| &m.reference).collect();
    settings.check_models(req.config_file, &refs)?;
    let index_of = |r: &ModelRef| models.iter().position(|m| &m.reference == r);

    let loaded: Vec<Option<ModelTokenizer>> = models
        .par_iter()
        .map(|m| load::load(&m.location))
        .collect::<Result<_, _>>()?;
    let mut warnings = Vec::new();
    let Some(base_tok) = &loaded[base] else {
        return Err(TokenizerError::File {
            location: format!(
                "{}/tokenizer.json",
                models[base].location.trim_end_matches('/')
            ),
            message: format!(
                "not found: the base model {} has no tokenizer, and the output vocabulary \
                 starts from it",
                models[base].reference
            ),
        });
    };
    for (m, t) in models.iter().zip(&loaded) {
        if t.is_none() {
            warnings.push(format!(
                "{} has no tokenizer files; its vocabulary is taken to be the base model's \
                 (as mergekit does)",
                m.reference
            ));
        }
    }
    let base_size = models[base]
        .vocab_size
        .unwrap_or(base_tok.tokenizer.get_vocab_size(true) as u64);
    let (stripped, was_stripped) = load::strip(base_tok, base_size)?;
    let base_vocab = stripped.get_vocab(true);

    // Each model's vocabulary as the permutations see it: the stripped base,
    // the model's own, or the base's for a model without tokenizer.
    let vocabs: Vec<HashMap<String, u32>> = loaded
        .iter()
        .enumerate()
        .map(|(i, t)| match t {
            _ if i == base => base_vocab.clone(),
            Some(t) => t.tokenizer.get_vocab(true),
            None => base_vocab.clone(),
        })
        .collect();

    let (mut output, mut changed, files_from, source) = match &settings.source.value {
        TokenizerSource::Model(r) => {
            let location = req.source_location.ok_or_else(|| {
                TokenizerError::Inputs(format!("no location for the tokenizer source {r}"))
            })?;
            let t = match index_of(r).and_then(|i| loaded[i].clone()) {
                Some(t) => t,
                None => load::load(location)?.ok_or_else(|| TokenizerError::File {
                    location: format!("{}/tokenizer.json", location.trim_end_matches('/')),
                    message: format!(
                        "not found: {} is the tokenizer source ({}) but has no tokenizer",
                        r, settings.source_key
                    ),
                })?,
            };
            (t.tokenizer.clone(), false, t, r.to_string())
        }
        TokenizerSource::Base => (
            stripped.clone(),
            was_stripped,
            base_tok.clone(),
            format!("base ({})", models[base].reference),
        ),
        TokenizerSource::Union => {
            let mut order = vec![base];
            order.extend((0..models.len()).filter(|&i| i != base));
            let (t, grew) = union(&stripped, &order, models, &loaded, &mut warnings)?;
            (
                t,
                was_stripped || grew,
                base_tok.clone(),
                "union".to_string(),
            )
        }
    };

    // `tokens:` entries the vocabulary lacks, appended in YAML order.
    let mut existing: HashSet<String> = output.get_vocab(true).into_keys().collect();
    let mut appended: HashSet<&str> = HashSet::new();
    for t in &settings.tokens {
        if existing.insert(t.token.clone()) {
            appended.insert(&t.token);
            output
                .add_tokens([AddedToken::from(t.token.clone(), false)])
                .map_err(|e| TokenizerError::Inputs(format!("adding token '{}': {e}", t.token)))?;
            changed = true;
        }
    }

    let vocab_out = output.get_vocab(true);
    let count = vocab_out.len();
    let mut tokens = vec![None; count];
    for (tok, &id) in &vocab_out {
        match tokens.get_mut(id as usize) {
            Some(slot) => *slot = Some(tok.clone()),
            None => {
                return Err(TokenizerError::File {
                    location: format!(
                        "{}/tokenizer.json",
                        files_from.location.trim_end_matches('/')
                    ),
                    message: format!(
                        "the ids of the output vocabulary are not contiguous: '{tok}' has id \
                         {id} but there are {count} tokens"
                    ),
                })
            }
        }
    }
    let tokens: Vec<String> = tokens.into_iter().map(Option::unwrap_or_default).collect();
    let rows = match &settings.pad_to_multiple_of {
        Some(p) => (count as u64).div_ceil(p.value) * p.value,
        None => count as u64,
    };

    let perms: Vec<Vec<Option<u32>>> = models
        .iter()
        .zip(&vocabs)
        .map(|(m, vocab)| {
            let size = m.vocab_size.unwrap_or(vocab.len() as u64);
            tokens
                .iter()
                .map(|t| vocab.get(t).copied().filter(|&id| u64::from(id) < size))
                .collect()
        })
        .collect();

    // Token overrides, resolved to model indices and rows.
    let mut rules = BTreeMap::new();
    for t in &settings.tokens {
        let id = vocab_out[&t.token];
        let err = |message: String| {
            TokenizerError::Config(ConfigError {
                file: req.config_file.to_string(),
                key_path: t.model_key_path(),
                span: Some(t.source.as_ref().map_or(t.span, |s| s.span)),
                message,
            })
        };
        let source = match t.source.as_ref().map(|s| &s.value) {
            None => None,
            Some(TokenEmbedding::Zero) => Some(RuleSource::Zero),
            Some(TokenEmbedding::Model(r)) => Some(RuleSource::Model(
                index_of(r).expect("check_models found it"),
            )),
            Some(TokenEmbedding::ModelToken { model, token }) => {
                let m = index_of(model).expect("check_models found it");
                let row = match token {
                    TokenRef::Id(id) => *id,
                    TokenRef::Text(text) => {
                        if loaded[m].is_none() {
                            return Err(err(format!(
                                "{model} has no tokenizer, so its token '{text}' cannot be found"
                            )));
                        }
                        match vocabs[m].get(text) {
                            Some(&id) => u64::from(id),
                            None => {
                                return Err(err(format!(
                                    "token '{text}' is not in the vocabulary of {model}"
                                )))
                            }
                        }
                    }
                };
                if let Some(size) = models[m].vocab_size.filter(|&s| row >= s) {
                    return Err(err(format!(
                        "token id {row} is out of range for {model}, whose vocabulary has \
                         {size} rows"
                    )));
                }
                Some(RuleSource::Row(m, row))
            }
        };
        rules.insert(
            id,
            Rule {
                source,
                force: t.force,
                token: t.token.clone(),
                key_path: t.model_key_path(),
                span: t.source.as_ref().map_or(t.span, |s| s.span),
            },
        );
    }

    // Tokens the base does not have, and where they come from.
    let decoder = output.get_added_tokens_decoder();
    let mut order = vec![base];
    order.extend((0..models.len()).filter(|&i| i != base));
    let added = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| !base_vocab.contains_key(*t))
        .map(|(id, t)| {
            let from = order
                .iter()
                .find(|&&m| perms[m][id].is_some())
                .map(|&m| models[m].reference.to_string())
                .unwrap_or_else(|| {
                    if appended.contains(t.as_str()) {
                        "tokenizer.tokens".to_string()
                    } else {
                        source.clone()
                    }
                });
            AddedEntry {
                token: t.clone(),
                id: id as u64,
                from,
                special: decoder.get(&(id as u32)).is_some_and(|a| a.special),
            }
        })
        .collect();

    Ok(Vocabulary {
        config_file: req.config_file.to_string(),
        source,
        models: models.to_vec(),
        tokens,
        rows,
        perms,
        rules,
        added,
        warnings,
        output,
        changed,
        files_from,
    })
}

/// mergekit's `build_union_tokenizer`: a copy of the (stripped) base, then the
/// regular tokens of every model (ids below its vocabulary size) that the base
/// lacks, as plain added tokens, then every model's added tokens below its
/// vocabulary size with their flags (the first definition of a token wins).
/// Returns the tokenizer and whether anything was added.
fn union(
    base: &Tokenizer,
    order: &[usize],
    models: &[VocabModel],
    loaded: &[Option<ModelTokenizer>],
    warnings: &mut Vec<String>,
) -> Result<(Tokenizer, bool), TokenizerError> {
    let mut regular: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut added: Vec<AddedToken> = Vec::new();
    let mut added_index: HashMap<String, usize> = HashMap::new();
    let mut warned: HashSet<String> = HashSet::new();
    for &m in order {
        let Some(t) = &loaded[m] else { continue };
        // The base takes part as stripped.
        let (vocab, decoder) = if m == order[0] {
            let mut v: Vec<(String, u32)> = base.get_vocab(true).into_iter().collect();
            v.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
            let mut d: Vec<(u32, AddedToken)> =
                base.get_added_tokens_decoder().into_iter().collect();
            d.sort_by_key(|(id, _)| *id);
            (v, d)
        } else {
            (t.vocab_by_id(), t.added_by_id())
        };
        let size = models[m]
            .vocab_size
            .unwrap_or(t.tokenizer.get_vocab_size(false) as u64);
        for (tok, id) in vocab {
            if u64::from(id) < size && seen.insert(tok.clone()) {
                regular.push(tok);
            }
        }
        for (id, info) in decoder {
            if u64::from(id) >= size {
                continue;
            }
            match added_index.get(&info.content) {
                Some(&i) => {
                    if added[i] != info && warned.insert(info.content.clone()) {
                        warnings.push(format!(
                            "token '{}' is added with different settings by {}; the first \
                             definition is kept",
                            info.content, models[m].reference
                        ));
                    }
                }
                None => {
                    added_index.insert(info.content.clone(), added.len());
                    added.push(info);
                }
            }
        }
    }
    let mut out = base.clone();
    let before = out.get_vocab_size(true);
    let base_vocab = base.get_vocab(true);
    let plain: Vec<AddedToken> = regular
        .into_iter()
        .filter(|t| !added_index.contains_key(t) && !base_vocab.contains_key(t))
        .map(|t| AddedToken::from(t, false))
        .collect();
    let fail = |e| TokenizerError::Inputs(format!("adding tokens to the union vocabulary: {e}"));
    out.add_tokens(plain).map_err(fail)?;
    out.add_tokens(added).map_err(fail)?;
    let grew = out.get_vocab_size(true) != before
        || out.get_added_tokens_decoder() != base.get_added_tokens_decoder();
    Ok((out, grew))
}

impl Vocabulary {
    /// Tokens of the output vocabulary.
    pub fn len(&self) -> u64 {
        self.tokens.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Embedding rows of the output (the tokens padded).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Output tokens by id.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// Model `model`'s row for each output token (None: it lacks the token).
    pub fn permutation(&self, model: usize) -> &[Option<u32>] {
        &self.perms[model]
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The re-indexing of a vocabulary tensor whose inputs are the models
    /// `inputs` (indices into the request's models, in the tensor's input
    /// order) with `input_rows` rows each. `base`: the merge's base model, whose
    /// row a token takes when several (not all) inputs have it.
    pub fn alignment(
        &self,
        inputs: &[usize],
        base: Option<usize>,
        input_rows: &[u64],
    ) -> Result<VocabAlignment, TokenizerError> {
        assert_eq!(inputs.len(), input_rows.len());
        for (&m, &rows) in inputs.iter().zip(input_rows) {
            let over = self.perms[m]
                .iter()
                .enumerate()
                .find(|(_, p)| p.is_some_and(|r| u64::from(r) >= rows));
            if let Some((id, Some(r))) = over {
                return Err(TokenizerError::Inputs(format!(
                    "{}: its tokenizer gives '{}' the id {r}, but its embedding has {rows} rows \
                     (config.json's vocab_size does not match the tensor)",
                    self.models[m].reference, self.tokens[id]
                )));
            }
        }
        let (fills, _) = self.fills(inputs, base, Some(input_rows))?;
        let forced: HashSet<u32> = self
            .rules
            .iter()
            .filter(|(_, r)| r.force)
            .map(|(&id, _)| id)
            .collect();
        let runs = inputs
            .iter()
            .map(|&m| {
                let mut runs: Vec<RowRun> = Vec::new();
                for (id, p) in self.perms[m].iter().enumerate() {
                    let Some(src) = p.filter(|_| !forced.contains(&(id as u32))) else {
                        continue;
                    };
                    let (out, src) = (id as u64, u64::from(src));
                    match runs.last_mut() {
                        Some(r) if r.out + r.len == out && r.src + r.len == src => r.len += 1,
                        _ => runs.push(RowRun { out, src, len: 1 }),
                    }
                }
                runs
            })
            .collect();
        Ok(VocabAlignment {
            rows: self.rows,
            tokens: self.len(),
            runs,
            fills,
        })
    }

    /// The default rows for a tensor of `inputs` (mergekit's
    /// `assign_embedding_sources` and `compute_default_embedding`): rows some
    /// input lacks or that are forced. With `input_rows`, override rows are
    /// checked against them.
    fn fills(
        &self,
        inputs: &[usize],
        base: Option<usize>,
        input_rows: Option<&[u64]>,
    ) -> Result<(Vec<RowFill>, Vec<Reason>), TokenizerError> {
        let position = |m: usize| inputs.iter().position(|&i| i == m);
        let mut fills = Vec::new();
        let mut reasons = Vec::new();
        for id in 0..self.tokens.len() {
            let present: Vec<usize> = (0..inputs.len())
                .filter(|&k| self.perms[inputs[k]][id].is_some())
                .collect();
            let rule = self.rules.get(&(id as u32));
            let forced = rule.is_some_and(|r| r.force);
            if !forced && present.len() == inputs.len() {
                continue;
            }
            let row_of = |k: usize| u64::from(self.perms[inputs[k]][id].expect("present"));
            let (fill, reason) = match rule.and_then(|r| r.source.as_ref().map(|s| (r, s))) {
                Some((rule, source)) => (
                    self.override_fill(rule, source, id, &position, input_rows)?,
                    Reason::Override,
                ),
                None => match present.as_slice() {
                    [] => (Fill::Zero, Reason::NoModel),
                    [k] => (
                        Fill::Row {
                            input: *k,
                            row: row_of(*k),
                        },
                        Reason::OnlyModel,
                    ),
                    _ => match base.and_then(position).filter(|k| present.contains(k)) {
                        Some(k) => (
                            Fill::Row {
                                input: k,
                                row: row_of(k),
                            },
                            Reason::Base,
                        ),
                        None => (
                            Fill::Mean(present.iter().map(|&k| (k, row_of(k))).collect()),
                            Reason::Mean,
                        ),
                    },
                },
            };
            fills.push(RowFill {
                row: id as u64,
                fill,
            });
            reasons.push(reason);
        }
        Ok((fills, reasons))
    }

    fn override_fill(
        &self,
        rule: &Rule,
        source: &RuleSource,
        id: usize,
        position: &dyn Fn(usize) -> Option<usize>,
        input_rows: Option<&[u64]>,
    ) -> Result<Fill, TokenizerError> {
        let err = |message: String| {
            TokenizerError::Config(ConfigError {
                file: self.config_file.clone(),
                key_path: rule.key_path.clone(),
                span: Some(rule.span),
                message,
            })
        };
        let input = |m: usize| {
            position(m).ok_or_else(|| {
                err(format!(
                    "the row of '{}' comes from {}, which is not an input of this tensor",
                    rule.token, self.models[m].reference
                ))
            })
        };
        Ok(match *source {
            RuleSource::Zero => Fill::Zero,
            RuleSource::Model(m) => {
                let k = input(m)?;
                let Some(row) = self.perms[m][id] else {
                    return Err(err(format!(
                        "'{}' is not in the vocabulary of {} (give its row with \
                         `{{kind: model_token, model: ..., token: ...}}`)",
                        rule.token, self.models[m].reference
                    )));
                };
                Fill::Row {
                    input: k,
                    row: u64::from(row),
                }
            }
            RuleSource::Row(m, row) => {
                let k = input(m)?;
                if let Some(rows) = input_rows.map(|r| r[k]).filter(|&n| row >= n) {
                    return Err(err(format!(
                        "token id {row} is out of range for {}, whose embedding has {rows} rows",
                        self.models[m].reference
                    )));
                }
                Fill::Row { input: k, row }
            }
        })
    }

    /// What `plan` shows: sizes, the tokens added and from where, and the rows
    /// that fall back to a default when every model is an input (`base`: the
    /// merge's base model).
    pub fn summary(&self, base: Option<usize>) -> Result<VocabSummary, TokenizerError> {
        let inputs: Vec<usize> = (0..self.models.len()).collect();
        let (fills, reasons) = self.fills(&inputs, base, None)?;
        let name = |k: usize| self.models[k].reference.to_string();
        let fallbacks = fills
            .iter()
            .zip(reasons)
            .map(|(f, reason)| {
                let id = f.row as usize;
                let forced = self.rules.get(&(id as u32)).is_some_and(|r| r.force);
                let lacking = inputs
                    .iter()
                    .filter(|&&m| forced || self.perms[m][id].is_none())
                    .map(|&m| name(m))
                    .collect();
                let rule = match (reason, &f.fill) {
                    (Reason::Override, Fill::Zero) => "zeros (tokenizer.tokens)".to_string(),
                    (Reason::Override, Fill::Row { input, row }) => {
                        format!("row {row} of {} (tokenizer.tokens)", name(*input))
                    }
                    (Reason::OnlyModel, Fill::Row { input, .. }) => {
                        format!("the row of {}, the only model with it", name(*input))
                    }
                    (Reason::Base, _) => "the base model's row".to_string(),
                    (Reason::Mean, Fill::Mean(rows)) => format!(
                        "the mean of {}",
                        rows.iter()
                            .map(|(k, _)| name(*k))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    (Reason::NoModel, _) => "zeros: no model has it".to_string(),
                    _ => "a default".to_string(),
                };
                Fallback {
                    token: self.tokens[id].clone(),
                    id: id as u64,
                    lacking,
                    rule,
                }
            })
            .collect();
        let mut warnings = self.warnings.clone();
        for f in &fills {
            if matches!(f.fill, Fill::Zero) && !self.rules.contains_key(&(f.row as u32)) {
                warnings.push(format!(
                    "token '{}' is in no model: its embedding rows are zeros",
                    self.tokens[f.row as usize]
                ));
            }
        }
        Ok(VocabSummary {
            source: self.source.clone(),
            tokens: self.len(),
            rows: self.rows,
            added: self.added.clone(),
            fallbacks,
            warnings,
        })
    }

    /// The output tokenizer files (name, text): `tokenizer.json` (the source's
    /// bytes when the vocabulary is unchanged, else written by the `tokenizers`
    /// crate), `tokenizer_config.json` (the source's, with
    /// `added_tokens_decoder` for the output and `chat_template` when given),
    /// `special_tokens_map.json`, and the source's chat template files when no
    /// template is given. `chat_template` is the template text.
    pub fn output_files(
        &self,
        chat_template: Option<&str>,
    ) -> Result<Vec<(String, String)>, TokenizerError> {
        let from = &self.files_from;
        let json = if self.changed {
            self.output.to_string(true).map_err(|e| {
                TokenizerError::Inputs(format!("cannot write the output tokenizer.json: {e}"))
            })?
        } else {
            from.json.clone()
        };
        let mut decoder: Vec<(u32, AddedToken)> =
            self.output.get_added_tokens_decoder().into_iter().collect();
        decoder.sort_by_key(|(id, _)| *id);
        let decoder: Map<String, Value> = decoder
            .into_iter()
            .map(|(id, t)| {
                let mut e = Map::new();
                e.insert("content".into(), t.content.into());
                e.insert("lstrip".into(), t.lstrip.into());
                e.insert("normalized".into(), t.normalized.into());
                e.insert("rstrip".into(), t.rstrip.into());
                e.insert("single_word".into(), t.single_word.into());
                e.insert("special".into(), t.special.into());
                (id.to_string(), Value::Object(e))
            })
            .collect();
        // transformers writes added_tokens_decoder first; keep the other keys' order.
        let mut config = Map::new();
        config.insert("added_tokens_decoder".into(), Value::Object(decoder));
        match &from.config {
            Some(c) => {
                for (k, v) in c {
                    if k != "added_tokens_decoder" {
                        config.insert(k.clone(), v.clone());
                    }
                }
            }
            None => {
                config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
            }
        }
        if let Some(t) = chat_template {
            config.insert("chat_template".into(), t.into());
        }
        let special = match &from.special_tokens_map {
            Some(text) => text.clone(),
            None => {
                let keys = [
                    "bos_token",
                    "eos_token",
                    "unk_token",
                    "sep_token",
                    "pad_token",
                    "cls_token",
                    "mask_token",
                    "additional_special_tokens",
                ];
                let map: Map<String, Value> = keys
                    .iter()
                    .filter_map(|&k| {
                        config
                            .get(k)
                            .filter(|v| !v.is_null())
                            .map(|v| (k.to_string(), v.clone()))
                    })
                    .collect();
                to_pretty_json(&map)
            }
        };
        let mut files = vec![
            ("tokenizer.json".to_string(), json),
            ("tokenizer_config.json".to_string(), to_pretty_json(&config)),
            ("special_tokens_map.json".to_string(), special),
        ];
        if chat_template.is_none() {
            files.extend(from.templates.iter().cloned());
        }
        Ok(files)
    }
}
