//! Model references: mergekit's string form `PATH[@REVISION][+LORA[@REVISION]]`
//! and its mapping forms `{model: PATH, lora: LORA}` (each a string
//! `PATH[@REVISION]` or `{path, revision}`). `override_architecture` is refused.

use super::reader::{Fields, Reader};
use super::{ModelPath, ModelRef};
use crate::config::{ConfigError, Spanned};
use crate::yaml::{Node, NodeKind};

const MODEL_REF_KEYS: &[&str] = &["model", "lora", "override_architecture"];
const MODEL_PATH_KEYS: &[&str] = &["path", "revision"];

impl Reader<'_> {
    pub(super) fn optional_model(
        &self,
        f: &Fields,
        key: &str,
    ) -> Result<Option<Spanned<ModelRef>>, ConfigError> {
        f.get(key)
            .map(|n| self.model_ref(n, &f.path(key)))
            .transpose()
    }

    /// A model reference: `path[@revision]`, or mergekit's mapping form
    /// `{model: path[@revision]}` (also `{model: {path, revision}}`).
    pub(super) fn model_ref(
        &self,
        node: &Node,
        key_path: &str,
    ) -> Result<Spanned<ModelRef>, ConfigError> {
        let what = "a model path (a string such as `org/model` or `./models/x`)";
        let model = match &node.kind {
            NodeKind::Str(s) => self.parse_model_string(s, node, key_path)?,
            NodeKind::Map(_) => self.model_ref_mapping(node, key_path)?,
            _ => return Err(self.expected(key_path, node, what)),
        };
        Ok(Spanned::new(model, node.span))
    }

    /// mergekit's string grammar `MODEL[@REV][+LORA[@REV]]`.
    fn parse_model_string(
        &self,
        s: &str,
        node: &Node,
        key_path: &str,
    ) -> Result<ModelRef, ConfigError> {
        let parts: Vec<&str> = s.split('+').collect();
        match parts.as_slice() {
            [model] => self.model_path(model, node, key_path),
            [model, lora] => {
                if model.is_empty() || lora.is_empty() {
                    return Err(self.err(
                        key_path,
                        node.span,
                        format!("'{s}': write MODEL+ADAPTER, both non-empty"),
                    ));
                }
                let lora = self.model_path(lora, node, key_path)?;
                Ok(ModelRef {
                    lora: Some(ModelPath {
                        path: lora.path,
                        revision: lora.revision,
                    }),
                    ..self.model_path(model, node, key_path)?
                })
            }
            _ => Err(self.err(
                key_path,
                node.span,
                format!("cannot parse the model reference '{s}' (more than one '+')"),
            )),
        }
    }

    /// `path[@revision]` (mergekit's ModelPath string form).
    fn model_path(&self, s: &str, node: &Node, key_path: &str) -> Result<ModelRef, ConfigError> {
        let mut parts = s.split('@');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(path), None, _) => Ok(ModelRef::new(path, None)),
            (Some(path), Some(rev), None) => Ok(ModelRef::new(path, Some(rev.to_string()))),
            _ => Err(self.err(
                key_path,
                node.span,
                format!(
                    "invalid model path '{s}': more than one '@' (write PATH or PATH@REVISION)"
                ),
            )),
        }
    }

    fn model_ref_mapping(&self, node: &Node, key_path: &str) -> Result<ModelRef, ConfigError> {
        let f = self.fields(node, key_path, MODEL_REF_KEYS, "a model reference")?;
        if let Some(n) = f.get("override_architecture") {
            return Err(self.err(
                &f.path("override_architecture"),
                n.span,
                "`override_architecture` in a model reference is not supported yet",
            ));
        }
        let Some(model) = f.get("model") else {
            return Err(self.missing(&f, "model", "the model path"));
        };
        let mut reference = self.path_field(model, &f.path("model"))?;
        if let Some(node) = f.get("lora").filter(|n| !matches!(n.kind, NodeKind::Null)) {
            let lora = self.path_field(node, &f.path("lora"))?;
            if lora.path.is_empty() {
                return Err(self.err(&f.path("lora"), node.span, "empty adapter path"));
            }
            reference.lora = Some(ModelPath {
                path: lora.path,
                revision: lora.revision,
            });
        }
        Ok(reference)
    }

    /// The `model:` or `lora:` of the mapping form: `path[@revision]` or
    /// `{path, revision}` (mergekit's ModelPath; never split on '+').
    fn path_field(&self, node: &Node, key_path: &str) -> Result<ModelRef, ConfigError> {
        match &node.kind {
            NodeKind::Str(s) => self.model_path(s, node, key_path),
            NodeKind::Map(_) => self.model_path_mapping(node, key_path),
            _ => Err(self.expected(key_path, node, "a model path (a string)")),
        }
    }

    /// `{path: STR, revision: STR}`.
    fn model_path_mapping(&self, node: &Node, key_path: &str) -> Result<ModelRef, ConfigError> {
        let f = self.fields(node, key_path, MODEL_PATH_KEYS, "a model path")?;
        let Some(path) = f.get("path") else {
            return Err(self.missing(&f, "path", "the model path"));
        };
        let path = self.string(path, &f.path("path"))?.value;
        let revision = f
            .get("revision")
            .map(|n| self.string(n, &f.path("revision")))
            .transpose()?
            .map(|r| r.value);
        Ok(ModelRef::new(path, revision))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fails, mref, parse};
    use super::super::{ModelInputs, ModelPath, ModelRef};

    #[test]
    fn model_reference_forms() {
        let c = parse(
            "merge_method: linear\nmodels:\n  - model: org/m@v1.0\n  - model: {model: org/n}\n  \
             - model: {model: {path: ./p, revision: main}}\n",
        );
        let ModelInputs::Models(models) = &c.inputs else {
            panic!("models expected")
        };
        assert_eq!(models[0].model.value, mref("org/m", Some("v1.0")));
        assert_eq!(models[0].model.to_string(), "org/m@v1.0");
        assert_eq!(models[1].model.value, mref("org/n", None));
        assert_eq!(models[1].model.span.line, 4);
        assert_eq!(models[2].model.value, mref("./p", Some("main")));
        // mergekit's MODEL+LORA grammar, and the mapping form with `lora:`
        let c = parse(
            "merge_method: linear\nmodels:\n  - model: org/m@v1+org/l@r2\n  - model: ./m+./l\n  \
             - model: {model: org/m@v1, lora: org/l@r2}\n  \
             - model: {model: {path: ./m}, lora: {path: ./l, revision: x}}\n  \
             - model: {model: ./m, lora: null}\n",
        );
        let ModelInputs::Models(models) = &c.inputs else {
            panic!("models expected")
        };
        let with = |m: ModelRef, path: &str, rev: Option<&str>| ModelRef {
            lora: Some(ModelPath {
                path: path.into(),
                revision: rev.map(Into::into),
            }),
            ..m
        };
        assert_eq!(
            models[0].model.value,
            with(mref("org/m", Some("v1")), "org/l", Some("r2"))
        );
        assert_eq!(models[0].model.to_string(), "org/m@v1+org/l@r2");
        assert_eq!(models[1].model.value, with(mref("./m", None), "./l", None));
        assert_eq!(models[1].model.value.base(), mref("./m", None));
        // The two forms of one reference are one model.
        assert_eq!(models[2].model.value, models[0].model.value);
        assert_eq!(
            models[3].model.value,
            with(mref("./m", None), "./l", Some("x"))
        );
        assert_eq!(models[3].model.to_string(), "./m+./l@x");
        assert_eq!(models[4].model.value, mref("./m", None));
        assert_eq!(c.referenced_models().len(), 4);
        // equality by value: the same string names the same model
        let c = parse("merge_method: linear\nbase_model: x@r\nmodels:\n  - model: x@r\n  - model: {model: x@r}\n");
        assert_eq!(c.referenced_models().len(), 1);
    }

    #[test]
    fn model_reference_errors() {
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a+\n",
            "models[0].model",
            3,
        );
        assert!(m.contains("both non-empty"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a+l@1@2\n",
            "models[0].model",
            3,
        );
        assert!(m.contains("more than one '@'"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a@b@c\n",
            "models[0].model",
            3,
        );
        assert!(m.contains("more than one '@'"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a+b+c\n",
            "models[0].model",
            3,
        );
        assert!(m.contains("cannot parse"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model:\n      model: a\n      lora: 3\n",
            "models[0].model.lora",
            5,
        );
        assert!(m.contains("expected a model path"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model:\n      model: a\n      lora: ''\n",
            "models[0].model.lora",
            5,
        );
        assert!(m.contains("empty adapter path"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: {model: a, override_architecture: X}\n",
            "models[0].model.override_architecture",
            3,
        );
        assert!(m.contains("not supported yet"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: 12\n",
            "models[0].model",
            3,
        );
        assert!(m.contains("expected a model path"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: {path: a}\n",
            "models[0].model.path",
            3,
        );
        assert!(m.contains("unknown key 'path'"), "{m}");
    }
}
