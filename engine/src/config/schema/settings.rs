//! The settings around the models: `parameters:` mappings (their names are
//! checked by the planner, which knows the method), `dtype` and `out_dtype`
//! (mergekit's names), and the tokenizer (`tokenizer_source:` or
//! `tokenizer:`, read by [`crate::config::tokenizer`]).

use super::reader::{join, Fields, Reader};
use super::{ModelInputs, ModelRef, Params};
use crate::config::tokenizer::{self, TokenizerConfig};
use crate::config::{ConfigError, ParamSetting, Spanned};
use crate::dtype::packed::BlockFormat;
use crate::dtype::DType;
use crate::yaml::{key_text, Node};

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

    /// `out_dtype: mxfp4` (packed inputs written packed again; a name
    /// mergekit does not know, as it cannot read MXFP4 experts).
    pub(super) fn out_packed(
        &self,
        top: &Fields,
    ) -> Result<Option<Spanned<BlockFormat>>, ConfigError> {
        let Some(node) = top.get("out_dtype") else {
            return Ok(None);
        };
        let name = self.string(node, "out_dtype")?;
        Ok(match name.value.as_str() {
            "mxfp4" => Some(Spanned::new(BlockFormat::Mxfp4, node.span)),
            _ => None,
        })
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
                        "; fp8 for FP8 weights re-quantized with block scales; mxfp4 for MXFP4 \
                         (gpt-oss) experts written packed again"
                    } else {
                        ""
                    }
                ),
            )),
        }
    }

    /// `tokenizer_source:` or the `tokenizer:` mapping (mutually exclusive),
    /// read by [`crate::config::tokenizer::parse`]; the models its token
    /// overrides take rows from must be merged ones.
    pub(super) fn tokenizer_settings(
        &self,
        top: &Fields,
        base_model: Option<&Spanned<ModelRef>>,
        inputs: &ModelInputs,
    ) -> Result<Option<TokenizerConfig>, ConfigError> {
        let model_ref = |node: &Node, key_path: &str| self.model_ref(node, key_path);
        let Some(t) = tokenizer::parse(
            self.file,
            top.entry("tokenizer_source"),
            top.entry("tokenizer"),
            &model_ref,
        )?
        else {
            return Ok(None);
        };
        let mut merged: Vec<&ModelRef> = base_model.map(|b| &b.value).into_iter().collect();
        match inputs {
            ModelInputs::Models(models) => merged.extend(models.iter().map(|m| &m.model.value)),
            ModelInputs::Slices(slices) => {
                for s in slices {
                    merged.extend(s.base_model.as_ref().map(|b| &b.value));
                    merged.extend(s.sources.iter().map(|src| &src.model.value));
                }
            }
        }
        t.check_models(self.file, &merged)?;
        Ok(Some(t))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fails, mref, parse};
    use super::super::MergeConfig;
    use crate::config::TokenizerSource;
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
        // MXFP4 only as out_dtype (packed experts written packed again).
        let c = parse(&format!("{base}dtype: float32\nout_dtype: mxfp4\n"));
        assert_eq!(c.out_dtype, None);
        assert_eq!(
            c.out_packed.map(|d| d.value),
            Some(crate::dtype::packed::BlockFormat::Mxfp4)
        );
        assert_eq!(c.dtype.map(|d| d.value), Some(DType::F32));
        let m = fails(&format!("{base}dtype: mxfp4\n"), "dtype", 4);
        assert!(m.contains("unknown dtype 'mxfp4'"), "{m}");
        let m = fails(&format!("{base}out_dtype: mxfp8\n"), "out_dtype", 4);
        assert!(m.contains("mxfp4 for MXFP4"), "{m}");
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
        let base = "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n";
        let source = |yaml: &str| {
            parse(yaml)
                .tokenizer
                .map(|t| (t.source.value, t.source_key))
        };
        assert_eq!(
            source(&format!("{base}tokenizer_source: base\n")),
            Some((TokenizerSource::Base, "tokenizer_source".to_string()))
        );
        assert_eq!(
            source(&format!("{base}tokenizer_source: union\n")),
            Some((TokenizerSource::Union, "tokenizer_source".to_string()))
        );
        assert_eq!(
            source(&format!("{base}tokenizer_source: org/tok\n")).map(|s| s.0),
            Some(TokenizerSource::Model(mref("org/tok", None)))
        );
        let c = parse(&format!(
            "{base}tokenizer:\n  source: base\n  pad_to_multiple_of: 8\n  tokens:\n    x: {{source: b}}\n"
        ));
        let t = c.tokenizer.expect("tokenizer settings");
        assert_eq!(t.source.value, TokenizerSource::Base);
        assert_eq!(t.source.span.line, 6);
        assert_eq!(t.pad_to_multiple_of.map(|p| p.value), Some(8));
        assert_eq!(t.tokens.len(), 1);
        assert!(parse(&format!("{base}tokenizer_source:\n"))
            .tokenizer
            .is_none());
        // An override's model must be merged (a slice source counts).
        let m = fails(
            &format!("{base}tokenizer:\n  tokens:\n    x: {{source: c}}\n"),
            "tokenizer.tokens.x.source",
            7,
        );
        assert!(
            m.contains("'c' is not one of the models of this merge"),
            "{m}"
        );
        let slices = "merge_method: passthrough\nslices:\n  - sources:\n      - model: s\n        layer_range: [0, 2]\n";
        assert!(parse(&format!(
            "{slices}tokenizer:\n  tokens:\n    x: {{source: s}}\n"
        ))
        .tokenizer
        .is_some());
        let m = fails(
            &format!("{base}tokenizer_source: base\ntokenizer:\n  source: base\n"),
            "tokenizer",
            6,
        );
        assert_eq!(m, "Cannot specify both tokenizer_source and tokenizer");
        fails(
            &format!("{base}tokenizer_source: [a]\n"),
            "tokenizer_source",
            5,
        );
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
