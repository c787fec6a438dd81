//! Reading a merge config's YAML tree: the context every error comes from
//! (the file name), mappings checked against the keys allowed in them, and the
//! top level (`merge_method`, exactly one of `models:` or `slices:`, and the
//! settings of `settings`).

use super::{MergeConfig, ModelInputs};
use crate::config::{ConfigError, Spanned};
use crate::yaml::{key_text, Node, Span};

const TOP_KEYS: &[&str] = &[
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "modules",
];

/// `parent.child`, or `child` at the top.
pub(super) fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

/// The entries of one mapping, already checked against the keys allowed there.
pub(super) struct Fields<'n> {
    pub(super) entries: &'n [(Node, Node)],
    pub(super) span: Span,
    pub(super) key_path: String,
}

impl<'n> Fields<'n> {
    /// The value of `key`, treating an explicit null like an absent key (as
    /// pydantic does for the optional fields).
    pub(super) fn get(&self, key: &str) -> Option<&'n Node> {
        self.entry(key).map(|(_, v)| v).filter(|v| !v.is_null())
    }

    pub(super) fn entry(&self, key: &str) -> Option<&'n (Node, Node)> {
        self.entries.iter().find(|(k, _)| k.as_str() == Some(key))
    }

    pub(super) fn path(&self, key: &str) -> String {
        join(&self.key_path, key)
    }
}

/// Reading context: the file name for every error.
pub(super) struct Reader<'f> {
    pub(super) file: &'f str,
}

impl Reader<'_> {
    pub(super) fn err(
        &self,
        key_path: &str,
        span: Span,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            key_path: key_path.to_string(),
            span: Some(span),
            message: message.into(),
        }
    }

    pub(super) fn expected(&self, key_path: &str, node: &Node, what: &str) -> ConfigError {
        self.err(
            key_path,
            node.span,
            format!("expected {what}, got {}", node.describe()),
        )
    }

    /// Checks that `node` is a mapping whose keys are all in `allowed`.
    pub(super) fn fields<'n>(
        &self,
        node: &'n Node,
        key_path: &str,
        allowed: &[&str],
        what: &str,
    ) -> Result<Fields<'n>, ConfigError> {
        let Some(entries) = node.as_map() else {
            return Err(self.expected(key_path, node, what));
        };
        for (k, _) in entries {
            match k.as_str() {
                Some(name) if allowed.contains(&name) => {}
                _ => return Err(self.unknown_key(key_path, k, allowed)),
            }
        }
        Ok(Fields {
            entries,
            span: node.span,
            key_path: key_path.to_string(),
        })
    }

    /// mergekit ignores unknown keys silently; here a typo is an error.
    fn unknown_key(&self, key_path: &str, key: &Node, allowed: &[&str]) -> ConfigError {
        let name = key_text(key);
        let hint = if key_path.is_empty() && name == "random_seed" {
            "; mergekit ignores random_seed in YAML; pass --random-seed on the command line"
                .to_string()
        } else {
            String::new()
        };
        self.err(
            &join(key_path, &name),
            key.span,
            format!(
                "unknown key '{name}' (allowed here: {}){hint}",
                allowed.join(", ")
            ),
        )
    }

    pub(super) fn missing(&self, fields: &Fields, key: &str, what: &str) -> ConfigError {
        self.err(
            &fields.path(key),
            fields.span,
            format!("missing required key `{key}` ({what})"),
        )
    }

    pub(super) fn config(&self, root: &Node, source: &str) -> Result<MergeConfig, ConfigError> {
        let top = self.fields(
            root,
            "",
            TOP_KEYS,
            "a mapping of settings (merge_method, models or slices, ...) at the top level",
        )?;
        if let Some((k, _)) = top.entry("modules") {
            return Err(self.err(
                "modules",
                k.span,
                "multi-module configs (`modules:`) are not supported yet; use `models:` or `slices:`",
            ));
        }
        let merge_method = match top.get("merge_method") {
            Some(n) => self.string(n, "merge_method")?,
            None => return Err(self.missing(&top, "merge_method", "e.g. `merge_method: linear`")),
        };
        let base_model = self.optional_model(&top, "base_model")?;
        let inputs = self.inputs(&top)?;
        let tokenizer = self.tokenizer_settings(&top, base_model.as_ref(), &inputs)?;
        let packed = self.out_packed(&top)?;
        Ok(MergeConfig {
            file: self.file.to_string(),
            source: source.to_string(),
            merge_method,
            base_model,
            inputs,
            parameters: self.params(top.get("parameters"), "parameters")?,
            dtype: self.dtype(&top, "dtype")?,
            out_dtype: match packed {
                Some(_) => None,
                None => self.dtype(&top, "out_dtype")?,
            },
            out_packed: packed,
            tokenizer,
            chat_template: top
                .get("chat_template")
                .map(|n| self.string(n, "chat_template"))
                .transpose()?,
        })
    }

    pub(super) fn string(
        &self,
        node: &Node,
        key_path: &str,
    ) -> Result<Spanned<String>, ConfigError> {
        match node.as_str() {
            Some(s) => Ok(Spanned::new(s.to_string(), node.span)),
            None => Err(self.expected(key_path, node, "a string")),
        }
    }

    /// Exactly one non-empty `models:` or `slices:`; like mergekit, an empty
    /// list counts as absent.
    fn inputs(&self, top: &Fields) -> Result<ModelInputs, ConfigError> {
        let models = match top.get("models") {
            Some(n) => self.models(n)?,
            None => Vec::new(),
        };
        let slices = match top.get("slices") {
            Some(n) => self.slices(n)?,
            None => Vec::new(),
        };
        let exactly_one = "Exactly one of 'models', 'slices', or 'modules' must be present";
        match (models.is_empty(), slices.is_empty()) {
            (false, true) => Ok(ModelInputs::Models(models)),
            (true, false) => Ok(ModelInputs::Slices(slices)),
            (false, false) => {
                let span = top.entry("slices").map_or(top.span, |(k, _)| k.span);
                Err(self.err(
                    "slices",
                    span,
                    format!("{exactly_one} (this config has both `models` and `slices`)"),
                ))
            }
            (true, true) => Err(self.err(
                "",
                top.span,
                format!(
                    "{exactly_one} (this config has no non-empty `models:` or `slices:` list \
                     naming the models to merge)"
                ),
            )),
        }
    }

    pub(super) fn list<'n>(
        &self,
        node: &'n Node,
        key_path: &str,
        what: &str,
    ) -> Result<&'n [Node], ConfigError> {
        node.as_seq()
            .ok_or_else(|| self.expected(key_path, node, what))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fails, parse};

    #[test]
    fn top_level_errors() {
        let m = fails("models:\n  - model: a\n", "merge_method", 1);
        assert!(m.contains("missing required key `merge_method`"), "{m}");
        let m = fails(
            "merge_method: 3\nmodels:\n  - model: a\n",
            "merge_method",
            1,
        );
        assert!(m.contains("expected a string, got the number 3"), "{m}");
        let m = fails("merge_method: linear\n", "", 1);
        assert!(
            m.contains("Exactly one of 'models', 'slices', or 'modules' must be present"),
            "{m}"
        );
        let m = fails("merge_method: linear\nmodels: []\n", "", 1);
        assert!(m.contains("Exactly one of"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 1]}\n",
            "slices",
            4,
        );
        assert!(m.contains("Exactly one of") && m.contains("both"), "{m}");
        let m = fails(
            "merge_method: linear\nmodules:\n  text: {models: [{model: a}]}\n",
            "modules",
            2,
        );
        assert_eq!(
            m,
            "multi-module configs (`modules:`) are not supported yet; use `models:` or `slices:`"
        );
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\nrandom_seed: 3\n",
            "random_seed",
            4,
        );
        assert!(
            m.contains(
                "mergekit ignores random_seed in YAML; pass --random-seed on the command line"
            ),
            "{m}"
        );
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\nmerge_methd: x\n",
            "merge_methd",
            4,
        );
        assert!(
            m.contains("unknown key 'merge_methd'")
                && m.contains("merge_method, base_model, models"),
            "{m}"
        );
        let m = fails("- a\n- b\n", "", 1);
        assert!(m.contains("expected a mapping"), "{m}");
        let m = fails("merge_method: linear\nmodels: a\n", "models", 2);
        assert!(m.contains("expected a list of models"), "{m}");
        // an empty `models:` next to `slices:` counts as absent, as in mergekit
        parse("merge_method: passthrough\nmodels: []\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 1]}\n");
    }

    #[test]
    fn yaml_errors_pass_through() {
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\n  - model: a\n    model: b\n",
            "models[1]",
            5,
        );
        assert!(m.contains("duplicate key 'model'"), "{m}");
    }
}
