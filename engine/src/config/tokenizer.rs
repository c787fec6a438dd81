//! `tokenizer_source:` and `tokenizer:`, mergekit 0.1.5's `TokenizerConfig`:
//! where the output vocabulary comes from (`union`, `base` or a model), rows
//! for single tokens (`tokens:`), and padding of the vocabulary
//! (`pad_to_multiple_of`). Read from the YAML nodes with every mistake
//! reported at its key and line; [`TokenizerConfig::check_models`] checks that
//! the models the overrides name are merged.

use super::schema::ModelRef;
use super::{ConfigError, Spanned};
use crate::yaml::Span;
use crate::yaml::{key_text, Node, NodeKind};

/// The tokenizer settings of a merge (either key).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerConfig {
    pub source: Spanned<TokenizerSource>,
    /// The key that gave the source: `tokenizer_source` or `tokenizer.source`
    /// (`tokenizer` when `source:` is left out and `union` is the default).
    pub source_key: String,
    /// `tokenizer.tokens`, in YAML order.
    pub tokens: Vec<TokenOverride>,
    /// `tokenizer.pad_to_multiple_of`: at least 1.
    pub pad_to_multiple_of: Option<Spanned<u64>>,
}

/// Where the output vocabulary comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// The base model's vocabulary plus every token of the other models.
    Union,
    /// The base model's vocabulary (tokens past its embedding rows dropped).
    Base,
    /// That model's tokenizer as it is (the model need not be merged).
    Model(ModelRef),
}

/// One entry of `tokenizer.tokens`: where the row of `token` comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOverride {
    pub token: String,
    /// e.g. `tokenizer.tokens.<|im_start|>`.
    pub key_path: String,
    /// Where the token's key is written.
    pub span: Span,
    /// None: the default rules choose the row (as when the token is not
    /// listed), but the token is still added to the vocabulary.
    pub source: Option<Spanned<TokenEmbedding>>,
    /// Use `source` even for the models that have the token.
    pub force: bool,
}

/// The row a token override takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEmbedding {
    /// That model's row of the same token.
    Model(ModelRef),
    /// A given row of a model (`kind: model_token`), by id or by token.
    ModelToken { model: ModelRef, token: TokenRef },
    /// Zeros (`kind: zero`).
    Zero,
}

/// A row of a model's embedding, by id or by its token in that model's tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRef {
    Id(u64),
    Text(String),
}

impl TokenEmbedding {
    /// The model the row comes from, if any.
    pub fn model(&self) -> Option<&ModelRef> {
        match self {
            TokenEmbedding::Model(m) | TokenEmbedding::ModelToken { model: m, .. } => Some(m),
            TokenEmbedding::Zero => None,
        }
    }
}

impl TokenOverride {
    /// The key path of the source's model (`...source` or `...source.model`).
    pub fn model_key_path(&self) -> String {
        match self.source.as_ref().map(|s| &s.value) {
            Some(TokenEmbedding::ModelToken { .. }) => format!("{}.source.model", self.key_path),
            _ => format!("{}.source", self.key_path),
        }
    }
}

impl TokenizerConfig {
    /// Every model an override takes rows from must be one of `merged` (the
    /// models of the merge): mergekit fails mid-merge otherwise.
    pub fn check_models(&self, file: &str, merged: &[&ModelRef]) -> Result<(), ConfigError> {
        for t in &self.tokens {
            let Some(source) = &t.source else { continue };
            let Some(model) = source.value.model() else {
                continue;
            };
            if !merged.contains(&model) {
                let names: Vec<String> = merged.iter().map(|m| m.to_string()).collect();
                return Err(ConfigError {
                    file: file.to_string(),
                    key_path: t.model_key_path(),
                    span: Some(source.span),
                    message: format!(
                        "'{model}' is not one of the models of this merge ({}); the row of \
                         token '{}' can only come from a merged model",
                        names.join(", "),
                        t.token
                    ),
                });
            }
        }
        Ok(())
    }
}

/// How the schema reads a model reference (`node`, its key path).
pub type ReadModelRef<'a> = dyn Fn(&Node, &str) -> Result<Spanned<ModelRef>, ConfigError> + 'a;

const TOKENIZER_KEYS: &[&str] = &["source", "tokens", "pad_to_multiple_of"];
const TOKEN_KEYS: &[&str] = &["source", "force"];
const MODEL_TOKEN_KEYS: &[&str] = &["kind", "model", "token_id", "token"];
const ZERO_KEYS: &[&str] = &["kind"];

/// Parses the values of the top-level keys `tokenizer_source` and `tokenizer`
/// (each `(key node, value node)`, an explicit null counting as absent).
/// `model_ref` reads a model reference as everywhere else in the config.
pub fn parse(
    file: &str,
    legacy: Option<&(Node, Node)>,
    modern: Option<&(Node, Node)>,
    model_ref: &ReadModelRef,
) -> Result<Option<TokenizerConfig>, ConfigError> {
    let r = Reader { file, model_ref };
    let legacy = legacy.filter(|(_, v)| !v.is_null());
    let modern = modern.filter(|(_, v)| !v.is_null());
    match (legacy, modern) {
        (Some(_), Some((k, _))) => Err(r.err(
            "tokenizer",
            k.span,
            "Cannot specify both tokenizer_source and tokenizer",
        )),
        (Some((_, v)), None) => Ok(Some(TokenizerConfig {
            source: r.source(v, "tokenizer_source")?,
            source_key: "tokenizer_source".into(),
            tokens: Vec::new(),
            pad_to_multiple_of: None,
        })),
        (None, Some((_, v))) => r.mapping(v).map(Some),
        (None, None) => Ok(None),
    }
}

struct Reader<'a> {
    file: &'a str,
    model_ref: &'a ReadModelRef<'a>,
}

impl Reader<'_> {
    fn err(&self, key_path: &str, span: Span, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            key_path: key_path.to_string(),
            span: Some(span),
            message: message.into(),
        }
    }

    fn expected(&self, key_path: &str, node: &Node, what: &str) -> ConfigError {
        self.err(
            key_path,
            node.span,
            format!("expected {what}, got {}", node.describe()),
        )
    }

    /// The entries of a mapping whose keys are all in `allowed`.
    fn fields<'n>(
        &self,
        node: &'n Node,
        key_path: &str,
        allowed: &[&str],
        what: &str,
    ) -> Result<&'n [(Node, Node)], ConfigError> {
        let Some(entries) = node.as_map() else {
            return Err(self.expected(key_path, node, what));
        };
        for (k, _) in entries {
            match k.as_str() {
                Some(name) if allowed.contains(&name) => {}
                _ => {
                    let name = key_text(k);
                    return Err(self.err(
                        &join(key_path, &name),
                        k.span,
                        format!(
                            "unknown key '{name}' (allowed here: {})",
                            allowed.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(entries)
    }

    /// `union`, `base` or a model reference.
    fn source(&self, node: &Node, key_path: &str) -> Result<Spanned<TokenizerSource>, ConfigError> {
        let source = match (node.as_str(), &node.kind) {
            (Some("union"), _) => TokenizerSource::Union,
            (Some("base"), _) => TokenizerSource::Base,
            (_, NodeKind::Str(_) | NodeKind::Map(_)) => {
                TokenizerSource::Model((self.model_ref)(node, key_path)?.value)
            }
            _ => {
                return Err(self.expected(key_path, node, "`union`, `base` or a model path"));
            }
        };
        Ok(Spanned::new(source, node.span))
    }

    /// `tokenizer: {source, tokens, pad_to_multiple_of}`.
    fn mapping(&self, node: &Node) -> Result<TokenizerConfig, ConfigError> {
        let what = "a mapping with `source:` (union, base or a model), `tokens:`, \
                    `pad_to_multiple_of:`";
        let entries = self.fields(node, "tokenizer", TOKENIZER_KEYS, what)?;
        let get = |key: &str| {
            entries
                .iter()
                .find(|(k, v)| k.as_str() == Some(key) && !v.is_null())
        };
        // mergekit's default source is `union`.
        let (source, source_key) = match get("source") {
            Some((_, v)) => (self.source(v, "tokenizer.source")?, "tokenizer.source"),
            None => (Spanned::new(TokenizerSource::Union, node.span), "tokenizer"),
        };
        let tokens = match get("tokens") {
            Some((_, v)) => self.tokens(v)?,
            None => Vec::new(),
        };
        let pad_to_multiple_of = match get("pad_to_multiple_of") {
            Some((_, v)) => Some(self.multiple(v)?),
            None => None,
        };
        Ok(TokenizerConfig {
            source,
            source_key: source_key.into(),
            tokens,
            pad_to_multiple_of,
        })
    }

    fn multiple(&self, node: &Node) -> Result<Spanned<u64>, ConfigError> {
        let key = "tokenizer.pad_to_multiple_of";
        match node.kind {
            NodeKind::Int(n) if n >= 1 => Ok(Spanned::new(n as u64, node.span)),
            NodeKind::Int(n) => Err(self.err(
                key,
                node.span,
                format!("must be a positive number of rows, got {n}"),
            )),
            _ => Err(self.expected(key, node, "a whole number of rows (e.g. 64)")),
        }
    }

    /// `tokens: {TOKEN: {source, force}, ...}`.
    fn tokens(&self, node: &Node) -> Result<Vec<TokenOverride>, ConfigError> {
        let Some(entries) = node.as_map() else {
            return Err(self.expected(
                "tokenizer.tokens",
                node,
                "a mapping from token strings to `{source: ..., force: ...}`",
            ));
        };
        entries
            .iter()
            .map(|(k, v)| {
                let Some(token) = k.as_str() else {
                    return Err(self.err(
                        &format!("tokenizer.tokens.{}", key_text(k)),
                        k.span,
                        format!(
                            "a token must be a string; write '{}' in quotes",
                            key_text(k)
                        ),
                    ));
                };
                self.token(token, k.span, v)
            })
            .collect()
    }

    fn token(&self, token: &str, span: Span, node: &Node) -> Result<TokenOverride, ConfigError> {
        let key_path = format!("tokenizer.tokens.{token}");
        if token.is_empty() {
            return Err(self.err(&key_path, span, "a token cannot be the empty string"));
        }
        let entries = self.fields(
            node,
            &key_path,
            TOKEN_KEYS,
            "a mapping with `source:` (a model, `{kind: model_token, ...}` or `{kind: zero}`) \
             and optional `force:`",
        )?;
        let get = |key: &str| {
            entries
                .iter()
                .find(|(k, v)| k.as_str() == Some(key) && !v.is_null())
        };
        let source = get("source")
            .map(|(_, v)| self.embedding(v, &join(&key_path, "source")))
            .transpose()?;
        let force = match get("force") {
            None => false,
            Some((_, v)) => match v.kind {
                NodeKind::Bool(b) => b,
                _ => return Err(self.expected(&join(&key_path, "force"), v, "true or false")),
            },
        };
        if force && source.is_none() {
            let (k, _) = get("force").expect("force was read");
            return Err(self.err(
                &join(&key_path, "force"),
                k.span,
                "`force: true` needs a `source:` to take the row from",
            ));
        }
        Ok(TokenOverride {
            token: token.to_string(),
            key_path,
            span,
            source,
            force,
        })
    }

    /// A model reference, `{kind: model_token, model, token_id | token}` or `{kind: zero}`.
    fn embedding(
        &self,
        node: &Node,
        key_path: &str,
    ) -> Result<Spanned<TokenEmbedding>, ConfigError> {
        let kind = node.as_map().and_then(|entries| {
            entries
                .iter()
                .find(|(k, _)| k.as_str() == Some("kind"))
                .map(|(_, v)| v)
        });
        let value = match kind {
            None => match node.kind {
                NodeKind::Str(_) | NodeKind::Map(_) => {
                    TokenEmbedding::Model((self.model_ref)(node, key_path)?.value)
                }
                _ => {
                    return Err(self.expected(
                        key_path,
                        node,
                        "a model path, `{kind: model_token, model: ..., token: ...}` or \
                         `{kind: zero}`",
                    ))
                }
            },
            Some(k) => match k.as_str() {
                Some("zero") => {
                    self.fields(node, key_path, ZERO_KEYS, "`{kind: zero}`")?;
                    TokenEmbedding::Zero
                }
                Some("model_token") => self.model_token(node, key_path)?,
                _ => {
                    return Err(self.expected(
                        &join(key_path, "kind"),
                        k,
                        "`model_token` or `zero`",
                    ))
                }
            },
        };
        Ok(Spanned::new(value, node.span))
    }

    fn model_token(&self, node: &Node, key_path: &str) -> Result<TokenEmbedding, ConfigError> {
        let entries = self.fields(
            node,
            key_path,
            MODEL_TOKEN_KEYS,
            "`{kind: model_token, model: ..., token_id: N}` or `{..., token: STR}`",
        )?;
        let get = |key: &str| {
            entries
                .iter()
                .find(|(k, v)| k.as_str() == Some(key) && !v.is_null())
        };
        let Some((_, model)) = get("model") else {
            return Err(self.err(
                &join(key_path, "model"),
                node.span,
                "missing required key `model` (the model whose row is taken)",
            ));
        };
        let model = (self.model_ref)(model, &join(key_path, "model"))?.value;
        let token = match (get("token_id"), get("token")) {
            (Some(_), Some((k, _))) => {
                return Err(self.err(
                    &join(key_path, "token"),
                    k.span,
                    "only one of token_id or token may be specified",
                ))
            }
            (None, None) => {
                return Err(self.err(key_path, node.span, "token_id or token must be specified"))
            }
            (Some((_, v)), None) => match v.kind {
                NodeKind::Int(n) if n >= 0 => TokenRef::Id(n as u64),
                _ => {
                    return Err(self.expected(
                        &join(key_path, "token_id"),
                        v,
                        "a token id (a whole number from 0)",
                    ))
                }
            },
            (None, Some((_, v))) => match v.as_str() {
                Some(s) => TokenRef::Text(s.to_string()),
                None => {
                    return Err(self.expected(
                        &join(key_path, "token"),
                        v,
                        "a token string (in quotes if it looks like a number)",
                    ))
                }
            },
        };
        Ok(TokenEmbedding::ModelToken { model, token })
    }
}

fn join(parent: &str, child: &str) -> String {
    format!("{parent}.{child}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Model references as plain `path[@revision]` strings (the schema's reader
    /// does the full grammar).
    fn model_ref(node: &Node, key_path: &str) -> Result<Spanned<ModelRef>, ConfigError> {
        match node.as_str() {
            Some(s) => {
                let mut parts = s.splitn(2, '@');
                Ok(Spanned::new(
                    ModelRef::new(
                        parts.next().unwrap_or_default(),
                        parts.next().map(str::to_string),
                    ),
                    node.span,
                ))
            }
            None => Err(ConfigError {
                file: "t.yaml".into(),
                key_path: key_path.into(),
                span: Some(node.span),
                message: "not a model".into(),
            }),
        }
    }

    fn read(yaml: &str) -> Result<Option<TokenizerConfig>, ConfigError> {
        let root = Node::parse("t.yaml", yaml).unwrap();
        let entries = root.as_map().unwrap();
        let find = |key: &str| entries.iter().find(|(k, _)| k.as_str() == Some(key));
        parse(
            "t.yaml",
            find("tokenizer_source"),
            find("tokenizer"),
            &model_ref,
        )
    }

    fn ok(yaml: &str) -> TokenizerConfig {
        read(yaml).unwrap().expect("tokenizer settings")
    }

    /// Expects an error at `key_path` on `line`; returns the message.
    fn fails(yaml: &str, key_path: &str, line: usize) -> String {
        let e = read(yaml).expect_err("expected an error");
        assert_eq!(e.key_path, key_path, "{e}");
        assert_eq!(e.span.map(|s| s.line), Some(line), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("t.yaml: {key_path} (line {line}, ")),
            "{e}"
        );
        e.message
    }

    fn mref(path: &str) -> ModelRef {
        ModelRef::new(path, None)
    }

    #[test]
    fn sources() {
        assert_eq!(read("a: 1\n").unwrap(), None);
        assert_eq!(read("tokenizer_source:\n").unwrap(), None);
        let c = ok("x: 1\ntokenizer_source: union\n");
        assert_eq!(c.source.value, TokenizerSource::Union);
        assert_eq!(c.source.span.line, 2);
        assert_eq!(c.source_key, "tokenizer_source");
        assert_eq!(
            ok("tokenizer_source: base\n").source.value,
            TokenizerSource::Base
        );
        assert_eq!(
            ok("tokenizer_source: org/tok@v2\n").source.value,
            TokenizerSource::Model(ModelRef::new("org/tok", Some("v2".into())))
        );
        let c = ok("tokenizer:\n  source: ./m\n  pad_to_multiple_of: 64\n");
        assert_eq!(c.source.value, TokenizerSource::Model(mref("./m")));
        assert_eq!(c.source_key, "tokenizer.source");
        assert_eq!(
            c.pad_to_multiple_of.map(|p| (p.value, p.span.line)),
            Some((64, 3))
        );
        // mergekit's default source
        let c = ok("tokenizer:\n  pad_to_multiple_of: 8\n");
        assert_eq!(c.source.value, TokenizerSource::Union);
        assert_eq!(c.source_key, "tokenizer");
        let c = ok("tokenizer: {}\n");
        assert_eq!(c.source.value, TokenizerSource::Union);
        assert!(c.tokens.is_empty() && c.pad_to_multiple_of.is_none());
    }

    #[test]
    fn both_keys_are_an_error_at_the_second() {
        let m = fails(
            "tokenizer_source: base\ntokenizer:\n  source: union\n",
            "tokenizer",
            2,
        );
        assert_eq!(m, "Cannot specify both tokenizer_source and tokenizer");
    }

    #[test]
    fn token_overrides() {
        let c = ok(concat!(
            "tokenizer:\n",
            "  source: union\n",
            "  tokens:\n",
            "    _tok_10:\n",
            "      source: ./models/tok-chatml\n",
            "      force: true\n",
            "    \"<|new|>\":\n",
            "      source:\n",
            "        kind: model_token\n",
            "        model: ./models/tok-chatml\n",
            "        token: \"<|im_end|>\"\n",
            "    \"<pad>\": {source: {kind: model_token, model: a, token_id: 7}}\n",
            "    \"<z>\": {source: {kind: zero}}\n",
            "    plain: {}\n",
        ));
        let t = &c.tokens;
        assert_eq!(t.len(), 5);
        assert_eq!(
            (t[0].token.as_str(), t[0].force, t[0].span.line),
            ("_tok_10", true, 4)
        );
        assert_eq!(
            t[0].source.as_ref().map(|s| &s.value),
            Some(&TokenEmbedding::Model(mref("./models/tok-chatml")))
        );
        assert_eq!(t[1].key_path, "tokenizer.tokens.<|new|>");
        assert_eq!(
            t[1].source.as_ref().map(|s| (&s.value, s.span.line)),
            Some((
                &TokenEmbedding::ModelToken {
                    model: mref("./models/tok-chatml"),
                    token: TokenRef::Text("<|im_end|>".into())
                },
                9
            ))
        );
        assert_eq!(
            t[1].model_key_path(),
            "tokenizer.tokens.<|new|>.source.model"
        );
        assert_eq!(
            t[2].source.as_ref().map(|s| &s.value),
            Some(&TokenEmbedding::ModelToken {
                model: mref("a"),
                token: TokenRef::Id(7)
            })
        );
        assert_eq!(
            t[3].source.as_ref().map(|s| &s.value),
            Some(&TokenEmbedding::Zero)
        );
        assert!(t[4].source.is_none() && !t[4].force);
        assert_eq!(t[4].model_key_path(), "tokenizer.tokens.plain.source");
    }

    #[test]
    fn mistakes_name_key_and_line() {
        let head = "tokenizer:\n  tokens:\n";
        let m = fails(
            &format!(
                "{head}    x: {{source: {{kind: model_token, model: a, token_id: 1, token: y}}}}\n"
            ),
            "tokenizer.tokens.x.source.token",
            3,
        );
        assert_eq!(m, "only one of token_id or token may be specified");
        let m = fails(
            &format!("{head}    x: {{source: {{kind: model_token, model: a}}}}\n"),
            "tokenizer.tokens.x.source",
            3,
        );
        assert_eq!(m, "token_id or token must be specified");
        let m = fails(
            &format!("{head}    x: {{source: {{kind: model_token, token: y}}}}\n"),
            "tokenizer.tokens.x.source.model",
            3,
        );
        assert!(m.contains("missing required key `model`"), "{m}");
        let m = fails(
            &format!("{head}    x: {{source: {{kind: model_token, model: a, token_id: -1}}}}\n"),
            "tokenizer.tokens.x.source.token_id",
            3,
        );
        assert!(m.contains("a token id"), "{m}");
        let m = fails(
            &format!("{head}    x: {{source: {{kind: copy}}}}\n"),
            "tokenizer.tokens.x.source.kind",
            3,
        );
        assert!(m.contains("`model_token` or `zero`"), "{m}");
        let m = fails(
            &format!("{head}    x: {{source: {{kind: zero, model: a}}}}\n"),
            "tokenizer.tokens.x.source.model",
            3,
        );
        assert!(m.contains("unknown key 'model'"), "{m}");
        let m = fails(
            &format!("{head}    x: {{force: true}}\n"),
            "tokenizer.tokens.x.force",
            3,
        );
        assert!(m.contains("needs a `source:`"), "{m}");
        let m = fails(
            &format!("{head}    x: {{source: a, force: yes please}}\n"),
            "tokenizer.tokens.x.force",
            3,
        );
        assert!(m.contains("true or false"), "{m}");
        let m = fails(
            &format!("{head}    x: {{sauce: a}}\n"),
            "tokenizer.tokens.x.sauce",
            3,
        );
        assert!(
            m.contains("unknown key 'sauce' (allowed here: source, force)"),
            "{m}"
        );
        let m = fails(
            &format!("{head}    7: {{source: a}}\n"),
            "tokenizer.tokens.7",
            3,
        );
        assert!(m.contains("must be a string"), "{m}");
        let m = fails(&format!("{head}    x: a\n"), "tokenizer.tokens.x", 3);
        assert!(m.contains("expected a mapping"), "{m}");
        let m = fails(&format!("{head}    - x\n"), "tokenizer.tokens", 3);
        assert!(m.contains("expected a mapping"), "{m}");
        let m = fails(
            "tokenizer:\n  pad_to_multiple_of: 0\n",
            "tokenizer.pad_to_multiple_of",
            2,
        );
        assert!(m.contains("positive"), "{m}");
        let m = fails(
            "tokenizer:\n  pad_to_multiple_of: 6.5\n",
            "tokenizer.pad_to_multiple_of",
            2,
        );
        assert!(m.contains("whole number"), "{m}");
        let m = fails("tokenizer:\n  vocab: 3\n", "tokenizer.vocab", 2);
        assert!(m.contains("unknown key 'vocab'"), "{m}");
        let m = fails("tokenizer_source: 3\n", "tokenizer_source", 1);
        assert!(m.contains("`union`, `base` or a model path"), "{m}");
        let m = fails("tokenizer: base\n", "tokenizer", 1);
        assert!(m.contains("expected a mapping with `source:`"), "{m}");
    }

    #[test]
    fn override_models_must_be_merged() {
        let c = ok(concat!(
            "tokenizer:\n",
            "  tokens:\n",
            "    a: {source: m1}\n",
            "    b: {source: {kind: zero}}\n",
            "    c:\n",
            "      source: {kind: model_token, model: m3, token_id: 0}\n",
        ));
        let (m1, m2, m3) = (mref("m1"), mref("m2"), mref("m3"));
        assert!(c.check_models("t.yaml", &[&m1, &m3]).is_ok());
        let e = c.check_models("t.yaml", &[&m1, &m2]).unwrap_err();
        assert_eq!(e.key_path, "tokenizer.tokens.c.source.model");
        assert_eq!(e.span.map(|s| s.line), Some(6));
        assert!(
            e.message
                .starts_with("'m3' is not one of the models of this merge (m1, m2)"),
            "{e}"
        );
        let e = c.check_models("t.yaml", &[&m3]).unwrap_err();
        assert_eq!(
            (e.key_path.as_str(), e.span.map(|s| s.line)),
            ("tokenizer.tokens.a.source", Some(3))
        );
    }
}
