//! `models:` (whole models, each with its parameters) and `slices:` (sources
//! with layer ranges `[START, END)`, a slice's own base model and parameters).

use super::reader::Reader;
use super::{InputModel, InputSlice, OutputSlice};
use crate::config::{ConfigError, Scalar, Spanned};
use crate::yaml::{Node, NodeKind};

const MODEL_KEYS: &[&str] = &["model", "parameters"];
const SLICE_KEYS: &[&str] = &["sources", "base_model", "parameters", "residual_weight"];
const SOURCE_KEYS: &[&str] = &["model", "layer_range", "parameters"];

impl Reader<'_> {
    pub(super) fn models(&self, node: &Node) -> Result<Vec<InputModel>, ConfigError> {
        let items = self.list(node, "models", "a list of models (`- model: PATH`)")?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| self.input_model(item, &format!("models[{i}]")))
            .collect()
    }

    fn input_model(&self, node: &Node, key_path: &str) -> Result<InputModel, ConfigError> {
        let what = "a mapping like `- model: PATH` (with optional `parameters:`)";
        let f = self.fields(node, key_path, MODEL_KEYS, what)?;
        let model = match f.get("model") {
            Some(n) => self.model_ref(n, &f.path("model"))?,
            None => return Err(self.missing(&f, "model", "the model path")),
        };
        Ok(InputModel {
            model,
            parameters: self.params(f.get("parameters"), &f.path("parameters"))?,
            key_path: key_path.to_string(),
        })
    }

    pub(super) fn slices(&self, node: &Node) -> Result<Vec<OutputSlice>, ConfigError> {
        let items = self.list(node, "slices", "a list of slices (`- sources: [...]`)")?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| self.output_slice(item, &format!("slices[{i}]")))
            .collect()
    }

    fn output_slice(&self, node: &Node, key_path: &str) -> Result<OutputSlice, ConfigError> {
        let f = self.fields(
            node,
            key_path,
            SLICE_KEYS,
            "a slice mapping with `sources:`",
        )?;
        let Some(sources_node) = f.get("sources") else {
            return Err(self.missing(&f, "sources", "the list of input layer ranges"));
        };
        let sources_path = f.path("sources");
        let items = self.list(
            sources_node,
            &sources_path,
            "a list of sources (`- model: PATH`)",
        )?;
        if items.is_empty() {
            return Err(self.err(
                &sources_path,
                sources_node.span,
                "a slice needs at least one source",
            ));
        }
        let sources = items
            .iter()
            .enumerate()
            .map(|(i, item)| self.input_slice(item, &format!("{sources_path}[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        // Accepted and never used, exactly like mergekit; only its type is checked.
        if let Some(rw) = f.get("residual_weight") {
            let number = Scalar::from_node(rw).map(|s| s.to_number());
            if !matches!(number, Some(Ok(_))) {
                return Err(self.expected(&f.path("residual_weight"), rw, "a number"));
            }
        }
        Ok(OutputSlice {
            sources,
            base_model: self.optional_model(&f, "base_model")?,
            parameters: self.params(f.get("parameters"), &f.path("parameters"))?,
            key_path: key_path.to_string(),
            span: node.span,
        })
    }

    fn input_slice(&self, node: &Node, key_path: &str) -> Result<InputSlice, ConfigError> {
        let what = "a mapping like `- model: PATH` with `layer_range: [START, END]`";
        let f = self.fields(node, key_path, SOURCE_KEYS, what)?;
        let model = match f.get("model") {
            Some(n) => self.model_ref(n, &f.path("model"))?,
            None => return Err(self.missing(&f, "model", "the model path")),
        };
        let layer_range = match f.get("layer_range") {
            Some(n) => self.layer_range(n, &f.path("layer_range"))?,
            None => return Err(self.missing(&f, "layer_range", "`[START, END]`, END exclusive")),
        };
        Ok(InputSlice {
            model,
            layer_range,
            parameters: self.params(f.get("parameters"), &f.path("parameters"))?,
            key_path: key_path.to_string(),
        })
    }

    /// `[start, end)`: two non-negative integers with start < end.
    fn layer_range(&self, node: &Node, key_path: &str) -> Result<Spanned<(u64, u64)>, ConfigError> {
        let what = "a layer range `[START, END]` (END exclusive)";
        let items = self.list(node, key_path, what)?;
        let [start, end] = items else {
            return Err(self.err(
                key_path,
                node.span,
                format!("expected {what}: exactly two numbers, got {}", items.len()),
            ));
        };
        let start = self.layer_index(start, &format!("{key_path}[0]"))?;
        let end = self.layer_index(end, &format!("{key_path}[1]"))?;
        if start >= end {
            return Err(self.err(
                key_path,
                node.span,
                format!(
                    "the layer range [{start}, {end}] is empty: START must be less than END \
                     (END is exclusive, so [0, 4] means layers 0 to 3)"
                ),
            ));
        }
        Ok(Spanned::new((start, end), node.span))
    }

    /// A non-negative integer; an integral float such as `4.0` passes, as in
    /// pydantic's lax mode.
    fn layer_index(&self, node: &Node, key_path: &str) -> Result<u64, ConfigError> {
        let value = match node.kind {
            NodeKind::Int(i) => u64::try_from(i).ok(),
            NodeKind::Float(x) if x.fract() == 0.0 && (0.0..9.0e15).contains(&x) => Some(x as u64),
            _ => None,
        };
        value.ok_or_else(|| {
            self.expected(
                key_path,
                node,
                "a non-negative whole number (a layer index)",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fails, mref, parse, KARCHER, SLERP_GRADIENT, TIES};
    use super::super::ModelInputs;
    use crate::dtype::DType;
    use crate::yaml::Span;

    #[test]
    fn slerp_gradient_structure() {
        let c = parse(SLERP_GRADIENT);
        assert_eq!(c.merge_method.value, "slerp");
        assert_eq!(c.merge_method.span, Span { line: 7, col: 15 });
        assert_eq!(
            c.base_model.as_ref().map(|b| b.value.clone()),
            Some(mref("./models/llama-ft-a", None))
        );
        assert_eq!(c.dtype.as_ref().map(|d| d.value), Some(DType::F32));
        assert_eq!(c.out_dtype.as_ref().map(|d| d.value), Some(DType::BF16));
        let ModelInputs::Slices(slices) = &c.inputs else {
            panic!("slices expected")
        };
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].key_path, "slices[0]");
        assert_eq!(slices[0].span.line, 2);
        let src = &slices[0].sources[1];
        assert_eq!(src.key_path, "slices[0].sources[1]");
        assert_eq!(src.layer_range.value, (0, 6));
        assert_eq!(src.layer_range.span.line, 6);
        assert_eq!(src.parameters.key_path, "slices[0].sources[1].parameters");
        let t = c.parameters.get("t").expect("t is set");
        assert_eq!(t.span.line, 11);
        let at = |name: &str, x: f64| t.evaluate_number(name, x).ok().flatten();
        assert!(at("model.layers.2.self_attn.q_proj.weight", 0.6)
            .is_some_and(|v| (v - 0.46).abs() < 1e-12));
        assert!(
            at("model.layers.2.mlp.up_proj.weight", 0.6).is_some_and(|v| (v - 0.54).abs() < 1e-12)
        );
        assert_eq!(at("model.norm.weight", 0.0), Some(0.5));
        assert_eq!(c.parameters.key_path, "parameters");
    }

    #[test]
    fn models_structure() {
        let c = parse(TIES);
        let ModelInputs::Models(models) = &c.inputs else {
            panic!("models expected")
        };
        assert_eq!(models.len(), 3);
        assert_eq!(models[1].key_path, "models[1]");
        assert_eq!(models[1].model.span.line, 4);
        assert_eq!(models[1].parameters.key_path, "models[1].parameters");
        let names: Vec<&str> = models[1]
            .parameters
            .entries
            .iter()
            .map(|(k, _)| k.value.as_str())
            .collect();
        assert_eq!(names, ["weight", "density"]);
        assert_eq!(
            models[1]
                .parameters
                .get("density")
                .map(|d| d.evaluate_number("x", 0.0)),
            Some(Ok(Some(0.7)))
        );
        assert!(models[1].parameters.get("gamma").is_none());
        assert!(!models[1].parameters.is_empty());
        assert!(parse(KARCHER).parameters.get("tol").is_some());
    }

    #[test]
    fn models_entry_errors() {
        let m = fails("merge_method: linear\nmodels:\n  - a\n", "models[0]", 3);
        assert!(m.contains("expected a mapping like `- model: PATH`"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\n  - parameters: {weight: 1}\n",
            "models[1].model",
            4,
        );
        assert!(m.contains("missing required key `model`"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\n    weight: 1\n",
            "models[0].weight",
            4,
        );
        assert!(
            m.contains("unknown key 'weight' (allowed here: model, parameters)"),
            "{m}"
        );
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\n    parameters: [1]\n",
            "models[0].parameters",
            4,
        );
        assert!(m.contains("expected a mapping of parameter names"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n    parameters:\n      weight: [0.5, {value: 1}]\n",
            "models[1].parameters.weight[1]",
            6,
        );
        assert!(m.contains("all numbers"), "{m}");
        let m = fails(
            "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight:\n",
            "models[0].parameters.weight",
            5,
        );
        assert!(m.contains("got nothing"), "{m}");
    }

    #[test]
    fn slice_errors() {
        let head = "merge_method: passthrough\nslices:\n";
        let m = fails(
            &format!("{head}  - base_model: a\n"),
            "slices[0].sources",
            3,
        );
        assert!(m.contains("missing required key `sources`"), "{m}");
        let m = fails(&format!("{head}  - sources: []\n"), "slices[0].sources", 3);
        assert!(m.contains("at least one source"), "{m}");
        let m = fails(
            &format!("{head}  - sources:\n      - model: a\n"),
            "slices[0].sources[0].layer_range",
            4,
        );
        assert!(m.contains("missing required key `layer_range`"), "{m}");
        let m = fails(
            &format!("{head}  - sources:\n      - model: a\n        layer_range: [4, 2]\n"),
            "slices[0].sources[0].layer_range",
            5,
        );
        assert!(m.contains("START must be less than END"), "{m}");
        let m = fails(
            &format!("{head}  - sources:\n      - model: a\n        layer_range: [0, 2, 4]\n"),
            "slices[0].sources[0].layer_range",
            5,
        );
        assert!(m.contains("exactly two"), "{m}");
        let m = fails(
            &format!("{head}  - sources:\n      - model: a\n        layer_range: [-1, 2]\n"),
            "slices[0].sources[0].layer_range[0]",
            5,
        );
        assert!(m.contains("non-negative whole number"), "{m}");
        let m = fails(
            &format!("{head}  - sources:\n      - model: a\n        layer_range: [0, x]\n"),
            "slices[0].sources[0].layer_range[1]",
            5,
        );
        assert!(m.contains("got the string 'x'"), "{m}");
        let m = fails(
            &format!("{head}  - sources:\n      - {{model: a, layer_range: [0, 2], weight: 1}}\n"),
            "slices[0].sources[0].weight",
            4,
        );
        assert!(
            m.contains("allowed here: model, layer_range, parameters"),
            "{m}"
        );
        let m = fails(
            &format!("{head}  - sources:\n      - {{model: a, layer_range: [0, 2]}}\n    residual_weight: big\n"),
            "slices[0].residual_weight",
            5,
        );
        assert!(m.contains("expected a number"), "{m}");
        let m = fails(&format!("{head}  - sorces: []\n"), "slices[0].sorces", 3);
        assert!(
            m.contains("allowed here: sources, base_model, parameters, residual_weight"),
            "{m}"
        );
        // residual_weight is accepted (and ignored); layer indices may be written 4.0
        let c = parse(&format!(
            "{head}  - sources:\n      - {{model: a, layer_range: [0, 4.0]}}\n    residual_weight: 0.5\n    base_model: b\n"
        ));
        let ModelInputs::Slices(s) = &c.inputs else {
            panic!("slices expected")
        };
        assert_eq!(s[0].sources[0].layer_range.value, (0, 4));
        assert_eq!(
            s[0].base_model.as_ref().map(|b| b.value.clone()),
            Some(mref("b", None))
        );
    }
}
