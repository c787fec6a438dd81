//! Where a checkpoint's tensors sit in the model: before the layer stack
//! (embeddings), inside it (`<prefix><L>.<suffix>`), or after it (final norm,
//! output head). mergekit reads this from per-architecture JSON files; we infer it
//! from the tensor names, like mergekit's automatic inference does for unknown
//! architectures, so any decoder-only layout works without a definition file.

use std::collections::{BTreeMap, BTreeSet};

/// A checkpoint's tensor names, sorted into pre-stack, layers and post-stack.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layout {
    /// Prefix of layer tensors, e.g. `model.layers.`.
    pub layer_prefix: Option<String>,
    /// Per layer index, the suffixes present (`self_attn.q_proj.weight`, ...).
    pub layers: BTreeMap<u64, BTreeSet<String>>,
    /// Non-layer tensors before the stack (embeddings).
    pub pre: Vec<String>,
    /// Non-layer tensors after the stack (norms, output head, anything else).
    pub post: Vec<String>,
}

/// Splits `a.b.12.c.d` into (`a.b.`, 12, `c.d`) at the first all-digit segment.
fn split_layer(name: &str) -> Option<(&str, u64, &str)> {
    let mut start = 0;
    for seg in name.split('.') {
        let end = start + seg.len();
        if start > 0
            && !seg.is_empty()
            && seg.bytes().all(|b| b.is_ascii_digit())
            && end < name.len()
        {
            let index = seg.parse().ok()?;
            return Some((&name[..start], index, &name[end + 1..]));
        }
        start = end + 1;
    }
    None
}

/// Whether a non-layer tensor belongs before the stack (input embeddings).
fn is_pre(name: &str) -> bool {
    let last_two: Vec<&str> = name.rsplit('.').take(2).collect();
    let module = last_two.get(1).copied().unwrap_or("");
    (module.contains("embed") && !module.contains("embed_out"))
        || matches!(module, "wte" | "wpe" | "tok_embeddings" | "word_embeddings")
}

/// Output-head tensors that fall back to the input embedding when a checkpoint
/// ties them (mergekit's `tied_names`).
pub const TIED_HEADS: &[&str] = &["lm_head.weight", "embed_out.weight", "output.weight"];

impl Layout {
    pub fn infer<'a>(names: impl IntoIterator<Item = &'a String>) -> Layout {
        let names: Vec<&String> = names.into_iter().collect();
        // The layer stack is the prefix that carries the most tensors (a vision
        // tower's `.layers.N.` stays out of the language stack).
        let mut prefix_counts: BTreeMap<&str, usize> = BTreeMap::new();
        for n in &names {
            if let Some((prefix, _, _)) = split_layer(n) {
                *prefix_counts.entry(prefix).or_default() += 1;
            }
        }
        let layer_prefix = prefix_counts
            .iter()
            .max_by_key(|(p, c)| (**c, std::cmp::Reverse(**p)))
            .map(|(p, _)| p.to_string());
        let mut layout = Layout {
            layer_prefix: layer_prefix.clone(),
            ..Layout::default()
        };
        for n in names {
            match (split_layer(n), &layer_prefix) {
                (Some((prefix, index, suffix)), Some(lp)) if prefix == lp => {
                    layout
                        .layers
                        .entry(index)
                        .or_default()
                        .insert(suffix.to_string());
                }
                _ if is_pre(n) => layout.pre.push(n.clone()),
                _ => layout.post.push(n.clone()),
            }
        }
        layout.pre.sort();
        layout.post.sort();
        layout
    }

    /// Number of layers the tensors show (highest index + 1).
    pub fn layer_count(&self) -> u64 {
        self.layers.keys().next_back().map(|l| l + 1).unwrap_or(0)
    }

    /// Full name of a layer tensor.
    pub fn layer_tensor(&self, layer: u64, suffix: &str) -> String {
        format!(
            "{}{layer}.{suffix}",
            self.layer_prefix.as_deref().unwrap_or("")
        )
    }

    /// The input embedding a tied output head falls back to.
    pub fn tied_embedding(&self) -> Option<&str> {
        self.pre
            .iter()
            .find(|n| {
                [
                    "embed_tokens",
                    "wte",
                    "embed_in",
                    "tok_embeddings",
                    "word_embeddings",
                ]
                .iter()
                .any(|k| n.contains(k))
            })
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn llama_layout() {
        let n = names(&[
            "lm_head.weight",
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "model.layers.10.input_layernorm.weight",
            "model.norm.weight",
        ]);
        let l = Layout::infer(&n);
        assert_eq!(l.layer_prefix.as_deref(), Some("model.layers."));
        assert_eq!(l.pre, vec!["model.embed_tokens.weight"]);
        assert_eq!(l.post, vec!["lm_head.weight", "model.norm.weight"]);
        assert_eq!(l.layer_count(), 11);
        assert!(l.layers[&0].contains("self_attn.q_proj.weight"));
        assert_eq!(
            l.layer_tensor(3, "mlp.up_proj.weight"),
            "model.layers.3.mlp.up_proj.weight"
        );
        assert_eq!(l.tied_embedding(), Some("model.embed_tokens.weight"));
    }

    #[test]
    fn moe_expert_index_stays_in_the_suffix() {
        let n = names(&["model.layers.1.block_sparse_moe.experts.3.w1.weight"]);
        let l = Layout::infer(&n);
        assert!(l.layers[&1].contains("block_sparse_moe.experts.3.w1.weight"));
    }

    #[test]
    fn gpt2_and_neox_heads() {
        let n = names(&[
            "transformer.wte.weight",
            "transformer.h.0.attn.c_attn.weight",
            "transformer.ln_f.weight",
        ]);
        let l = Layout::infer(&n);
        assert_eq!(l.pre, vec!["transformer.wte.weight"]);
        assert_eq!(l.layer_prefix.as_deref(), Some("transformer.h."));
        let n = names(&[
            "gpt_neox.embed_in.weight",
            "embed_out.weight",
            "gpt_neox.layers.0.x.weight",
        ]);
        let l = Layout::infer(&n);
        assert_eq!(l.pre, vec!["gpt_neox.embed_in.weight"]);
        assert_eq!(l.post, vec!["embed_out.weight"]);
    }
}
