//! The model card (README.md) of a built MoE: the family, the base, and every
//! expert with its prompts (mergekit-moe writes none); the provenance section
//! (checksums) is appended when the shards exist, as for a merge.

use super::build::MoeReport;
use super::config::{Expert, MoeConfig};
use super::family::Family;

fn prompts(out: &mut String, what: &str, p: &Option<Vec<String>>) {
    let Some(p) = p.as_ref().filter(|p| !p.is_empty()) else {
        return;
    };
    out.push_str(&format!("  - {what}:\n"));
    for x in p {
        out.push_str(&format!("    - {}\n", serde_json::Value::String(x.clone())));
    }
}

fn expert(out: &mut String, i: usize, e: &Expert) {
    out.push_str(&format!("* expert {i}: `{}`\n", e.source_model.value));
    prompts(out, "positive prompts", &e.positive_prompts);
    prompts(out, "negative prompts", &e.negative_prompts);
    if let Some(s) = e.noise_scale {
        out.push_str(&format!("  - noise_scale: {s}\n"));
    }
    if let Some(s) = e.residual_scale {
        out.push_str(&format!("  - residual_scale: {s}\n"));
    }
}

/// The card's text before its provenance section.
pub fn card(cfg: &MoeConfig, family: Family, report: &MoeReport) -> String {
    let mut out = String::new();
    out.push_str("---\nbase_model:\n");
    out.push_str(&format!("- {}\n", cfg.base_model.value));
    for e in cfg.experts.iter().chain(&cfg.shared_experts) {
        if e.source_model.value != cfg.base_model.value {
            out.push_str(&format!("- {}\n", e.source_model.value));
        }
    }
    out.push_str("library_name: transformers\ntags:\n- mergekit\n- moe\n- merge\n---\n");
    out.push_str(&format!(
        "# A Mixture of Experts\n\nBuilt from dense models with [mergekit](https://github.com/arcee-ai/mergekit)'s \
         `mergekit-moe` configuration format.\n\n## Details\n\n* output family: {} ({} layers, \
         hidden size {})\n* base model (attention, norms, embeddings): `{}`\n* experts per token: {}\n\
         * router initialisation: `{}`\n\n### Experts\n\n",
        family.name(),
        report.layers,
        report.hidden,
        cfg.base_model.value,
        cfg.experts_per_token.value,
        report.gate_mode,
    ));
    for (i, e) in cfg.experts.iter().enumerate() {
        expert(&mut out, i, e);
    }
    if !cfg.shared_experts.is_empty() {
        out.push_str("\n### Shared experts\n\n");
        for (i, e) in cfg.shared_experts.iter().enumerate() {
            expert(&mut out, i, e);
        }
    }
    out.push_str(&format!(
        "\n### Configuration\n\nThe YAML used (also in `mergekit_moe_config.yml`):\n\n```yaml\n{}\n```\n",
        cfg.source.trim_end()
    ));
    out
}
