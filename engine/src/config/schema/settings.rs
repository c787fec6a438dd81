//! The settings around the models: `parameters:` mappings (their names are
//! checked by the planner, which knows the method), `dtype` and `out_dtype`
//! (mergekit's names), and the tokenizer (`tokenizer_source:` or
//! `tokenizer: {source}`).

use super::reader::{join, Fields, Reader};
use super::{Params, TokenizerSource};
use crate::config::{ConfigError, ParamSetting, Spanned};
use crate::dtype::DType;
use crate::yaml::{key_text, Node, NodeKind};

const TOKENIZER_KEYS: &[&str] = &["source", "tokens", "pad_to_multiple_of"];
/// mergekit's `dtype_from_name` vocabulary (after stripping `torch.`).
const MERGEKIT_DTYPES: &[&str] = &["bfloat16", "float16", "float32", "float64", "int64"];

impl Reader<'_> {
    /// A `parameters:` mapping (absent or null: empty). Names are not checked
    /// here (the planner knows the method); only the shapes of the values.
    pub(super) fn params(
        &self,
        node: Option<&Node>,
        key_path: &str,
    ) -> Result<Params, ConfigError> {
        let mut params = Params {
            entries: Vec::new(),
            key_path: key_path.to_string(),
        };
        let Some(node) = node else { return Ok(params) };
        let Some(entries) = node.as_map() else {
            return Err(self.expected(key_path, node, "a mapping of parameter names to values"));
        };
        for (k, v) in entries {
            let Some(name) = k.as_str() else {
                let path = join(key_path, &key_text(k));
                return Err(self.expected(&path, k, "a parameter name (a string)"));
            };
            let setting =
                ParamSetting::from_node(v, &join(key_path, name)).map_err(|e| ConfigError {
                    file: self.file.to_string(),
                    ..e
                })?;
            params
                .entries
                .push((Spanned::new(name.to_string(), k.span), setting));
        }
        Ok(params)
    }

    pub(super) fn dtype(
        &self,
        top: &Fields,
        key: &str,
    ) -> Result<Option<Spanned<DType>>, ConfigError> {
        let Some(node) = top.get(key) else {
            return Ok(None);
        };
        let name = self.string(node, key)?;
        let bare = name.strip_prefix("torch.").unwrap_or(&name);
        // Only mergekit's names (a config fleetmerge accepts must also run in
        // mergekit), and for `out_dtype` FP8: re-quantized FP8 weights, which
        // mergekit cannot write (nor read).
        let fp8 = key == "out_dtype" && matches!(bare, "fp8" | "float8_e4m3fn");
        if bare == "int64" {
            // In mergekit's list, but merged weights are floats: mergekit would
            // truncate every weight to an integer; we refuse before any work.
            return Err(self.err(
                key,
                node.span,
                "int64 is not a float dtype: merged weights are written as bfloat16, \
                 float16, float32 or float64",
            ));
        }
        let dtype = if fp8 {
            Some(DType::F8_E4M3)
        } else {
            MERGEKIT_DTYPES
                .contains(&bare)
                .then(|| DType::from_torch_name(bare))
                .flatten()
        };
        match dtype {
            Some(d) => Ok(Some(Spanned::new(d, node.span))),
            None => Err(self.err(
                key,
                node.span,
                format!(
                    "unknown dtype '{}' (use one of bfloat16, float16, float32, float64{})",
                    name.value,
                    if key == "out_dtype" {
                        "; fp8 for FP8 weights re-quantized with block scales"
                    } else {
                        ""
                    }
                ),
            )),
        }
    }

    /// `tokenizer_source:` or the `tokenizer:` mapping (mutually exclusive).
    pub(super) fn tokenizer_settings(
        &self,
        top: &Fields,
    ) -> Result<Option<Spanned<TokenizerSource>>, ConfigError> {
        let legacy = top.get("tokenizer_source");
        let modern = top.get("tokenizer");
        if let (Some(_), Some(t)) = (legacy, modern) {
            let span = top.entry("tokenizer").map_or(t.span, |(k, _)| k.span);
            return Err(self.err(
                "tokenizer",
                span,
                "Cannot specify both tokenizer_source and tokenizer",
            ));
        }
        if let Some(n) = legacy {
            return self.tokenizer_source(n, "tokenizer_source").map(Some);
        }
        modern.map(|n| self.tokenizer_mapping(n)).transpose()
    }

    /// `base`, `union` (not supported) or a model reference.
    fn tokenizer_source(
        &self,
        node: &Node,
        key_path: &str,
    ) -> Result<Spanned<TokenizerSource>, ConfigError> {
        let source = match node.as_str() {
            Some("base") => TokenizerSource::Base,
            Some("union") => {
                return Err(self.err(
                    key_path,
                    node.span,
                    "union is not supported yet; use base or a model path",
                ))
            }
            _ => match &node.kind {
                NodeKind::Str(_) | NodeKind::Map(_) => {
                    TokenizerSource::Model(self.model_ref(node, key_path)?.value)
                }
                _ => return Err(self.expected(key_path, node, "`base` or a model path")),
            },
        };
        Ok(Spanned::new(source, node.span))
    }

    /// `tokenizer: {source: base|MODEL}`; the rest of mergekit's tokenizer
    /// building is not implemented.
    fn tokenizer_mapping(&self, node: &Node) -> Result<Spanned<TokenizerSource>, ConfigError> {
        let f = self.fields(
            node,
            "tokenizer",
            TOKENIZER_KEYS,
            "a mapping with `source:`",
        )?;
        for unsupported in ["tokens", "pad_to_multiple_of"] {
            if let Some(n) = f.get(unsupported) {
                return Err(self.err(
                    &f.path(unsupported),
                    n.span,
                    format!("`tokenizer.{unsupported}` is not supported yet"),
                ));
            }
        }
        match f.get("source") {
            Some(n) => self.tokenizer_source(n, &f.path("source")),
            // mergekit's default source is `union`.
            None => Err(self.err(
                "tokenizer.source",
                f.span,
                "without `source`, mergekit builds a union tokenizer, which is not supported \
                 yet; set `source: base` or a model path",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fails, mref, parse};
    use super::super::{MergeConfig, TokenizerSource};
    use crate::dtype::DType;

    #[test]
    fn dtypes() {
        let base = "merge_method: linear\nmodels:\n  - model: a\n";
        let c = parse(&format!(
            "{base}dtype: torch.bfloat16\nout_dtype: float16\n"
        ));
        assert_eq!(c.dtype.map(|d| d.value), Some(DType::BF16));
        assert_eq!(c.out_dtype.map(|d| d.value), Some(DType::F16));
        assert_eq!(
            parse(&format!("{base}dtype: float64\n"))
                .dtype
                .map(|d| d.value),
            Some(DType::F64)
        );
        // FP8 only as out_dtype (re-quantized FP8 weights).
        for name in ["fp8", "float8_e4m3fn", "torch.float8_e4m3fn"] {
            let c = parse(&format!("{base}out_dtype: {name}\n"));
            assert_eq!(c.out_dtype.map(|d| d.value), Some(DType::F8_E4M3));
        }
        let m = fails(&format!("{base}dtype: fp8\n"), "dtype", 4);
        assert!(m.contains("unknown dtype 'fp8'"), "{m}");
        let m = fails(&format!("{base}out_dtype: float8_e5m2\n"), "out_dtype", 4);
        assert!(m.contains("fp8 for FP8 weights"), "{m}");
        let m = fails(&format!("{base}dtype: float8\n"), "dtype", 4);
        assert!(
            m.contains("unknown dtype 'float8' (use one of bfloat16, float16, float32, float64)"),
            "{m}"
        );
        // not a mergekit name, although fleetmerge knows what it means
        fails(&format!("{base}out_dtype: bf16\n"), "out_dtype", 4);
        // mergekit's list has int64; merged weights are floats (it used to
        // panic in the encoder and hang `run`).
        for key in ["dtype", "out_dtype"] {
            for name in ["int64", "torch.int64"] {
                let m = fails(&format!("{base}{key}: {name}\n"), key, 4);
                assert!(m.contains("int64 is not a float dtype"), "{m}");
            }
        }
        let m = fails(&format!("{base}dtype: 16\n"), "dtype", 4);
        assert!(m.contains("expected a string"), "{m}");
        assert!(parse(&format!("{base}dtype:\n")).dtype.is_none());
    }

    #[test]
    fn tokenizer_settings() {
        let base = "merge_method: linear\nmodels:\n  - model: a\n";
        let c = parse(&format!("{base}tokenizer_source: base\n"));
        assert_eq!(
            c.tokenizer_source.map(|t| t.value),
            Some(TokenizerSource::Base)
        );
        let c = parse(&format!("{base}tokenizer_source: org/tok\n"));
        assert_eq!(
            c.tokenizer_source.map(|t| t.value),
            Some(TokenizerSource::Model(mref("org/tok", None)))
        );
        let c = parse(&format!("{base}tokenizer:\n  source: base\n"));
        let t = c.tokenizer_source.expect("tokenizer source set");
        assert_eq!(t.value, TokenizerSource::Base);
        assert_eq!(t.span.line, 5);
        let c = parse(&format!("{base}tokenizer: {{source: ./m}}\n"));
        assert_eq!(
            c.tokenizer_source.map(|t| t.value),
            Some(TokenizerSource::Model(mref("./m", None)))
        );
        let m = fails(
            &format!("{base}tokenizer_source: union\n"),
            "tokenizer_source",
            4,
        );
        assert_eq!(m, "union is not supported yet; use base or a model path");
        let m = fails(
            &format!("{base}tokenizer: {{source: union}}\n"),
            "tokenizer.source",
            4,
        );
        assert!(m.contains("union is not supported yet"), "{m}");
        let m = fails(
            &format!("{base}tokenizer:\n  pad_to_multiple_of: 64\n  source: base\n"),
            "tokenizer.pad_to_multiple_of",
            5,
        );
        assert!(m.contains("not supported yet"), "{m}");
        let m = fails(
            &format!("{base}tokenizer:\n  source: base\n  tokens:\n    x: {{source: a}}\n"),
            "tokenizer.tokens",
            7,
        );
        assert!(m.contains("not supported yet"), "{m}");
        let m = fails(&format!("{base}tokenizer: {{}}\n"), "tokenizer.source", 4);
        assert!(m.contains("union"), "{m}");
        let m = fails(
            &format!("{base}tokenizer_source: base\ntokenizer:\n  source: base\n"),
            "tokenizer",
            5,
        );
        assert_eq!(m, "Cannot specify both tokenizer_source and tokenizer");
        let m = fails(
            &format!("{base}tokenizer_source: [a]\n"),
            "tokenizer_source",
            4,
        );
        assert!(m.contains("expected `base` or a model path"), "{m}");
    }

    #[test]
    fn chat_template() {
        let base = "merge_method: linear\nmodels:\n  - model: a\n";
        let c = parse(&format!("{base}chat_template: chatml\n"));
        assert_eq!(c.chat_template.map(|t| t.value), Some("chatml".to_string()));
        let m = fails(&format!("{base}chat_template: [x]\n"), "chat_template", 4);
        assert!(m.contains("expected a string, got a list"), "{m}");
    }

    #[test]
    fn parameter_errors_carry_file_and_path() {
        let e = MergeConfig::parse("cfg.yml", "merge_method: linear\nmodels:\n  - model: a\nparameters:\n  w: {filter: 1, value: 2}\n")
            .unwrap_err();
        assert_eq!(e.file, "cfg.yml");
        assert_eq!(e.key_path, "parameters.w.filter");
        assert_eq!(e.span.map(|s| s.line), Some(5));
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\nparameters:\n  1: 2\n",
            "parameters.1",
            5,
        );
        assert!(m.contains("parameter name"), "{m}");
    }
}
