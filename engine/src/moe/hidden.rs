//! The `hidden`, `hidden_avg` and `hidden_last` routers, as mergekit-moe
//! 0.1.5's `get_gate_params` computes them (`moe/router.py`): the base model
//! is run over each expert's prompts and, for every layer, the hidden state
//! at that layer's input (transformers' `output_hidden_states[:-1]`: the
//! embeddings, then each layer's output but the last) is taken at the last
//! position (`hidden`, and its alias `hidden_last`) or averaged over the
//! positions (`hidden_avg`), averaged over the prompts, the negative prompts'
//! vector subtracted, and normalised per layer (`x / max(‖x‖, 1e-8)`).
//!
//! mergekit tokenizes all the positive (or negative) prompts of one expert
//! as one batch, padded on the left with the BOS token (else EOS), and runs
//! it through transformers with the padding masked. A real token never sees
//! a padding key, and RoPE only depends on the distance between positions,
//! so its states are those of the prompt run alone: we run each distinct
//! prompt on its own. A padding position sees no key at all, so its
//! attention output is zero (torch's SDPA) and its state is the padding
//! token's embedding carried through the MLP blocks only; `hidden_avg`
//! divides by the padded length and so counts those positions: we compute
//! that one trajectory and add it once per padding position, as mergekit's
//! batch has them.
//!
//! The forward pass (`crate::forward`) reads the base one decoder layer at a
//! time (by range, from any storage, LoRA adapters folded in as a merge reads
//! them), runs every prompt through it and drops it: memory is one layer in
//! f32 plus the prompts' activations. Only the layers whose output is some
//! layer's input are run (all but the last), and of the embedding only the
//! rows of the prompts' tokens are read. mergekit runs the base in bfloat16
//! (`torch_dtype=torch.bfloat16`); we run it in f32, from the stored values.

use super::config::Expert;
use super::router::{Gates, PromptIds};
use super::MoeError;
use crate::forward::{self, Arch, Layer};
use crate::methods::lora::{Factor, LoraFactors};
use crate::plan::inputs::InputModels;
use crate::storage::{self, Storage};
use crate::unit::TensorRef;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A tensor of the base as a merge reads it: its bytes by range, decoded to
/// f32, with its adapter's LoRA delta added.
struct Source {
    r: TensorRef,
    st: Arc<dyn Storage>,
    lora: Option<LoraFactors>,
}

impl Source {
    fn open(r: TensorRef, what: &str) -> Result<Source, MoeError> {
        if !r.dtype.is_float() {
            return Err(MoeError::Inputs(format!(
                "{what}: {} of the base is {}: the forward pass reads float weights",
                r.name, r.dtype
            )));
        }
        let st = storage::for_location(&r.location);
        let lora = match &r.lora {
            None => None,
            Some(l) => {
                let whole = |t: &TensorRef| st.read_range(&t.location, t.offset..t.offset + t.len);
                let (a, b) = (whole(&l.a)?, whole(&l.b)?);
                let factor = |t: &TensorRef, bytes| Factor {
                    dtype: t.dtype,
                    bytes,
                    shape: [
                        t.shape.first().copied().unwrap_or(0) as usize,
                        t.shape.get(1).copied().unwrap_or(1) as usize,
                    ],
                };
                Some(LoraFactors::decode(
                    &factor(&l.a, &a),
                    &factor(&l.b, &b),
                    l.scale,
                    l.transposed,
                ))
            }
        };
        Ok(Source { r, st, lora })
    }

    /// Elements `start..start + n` (of the flattened tensor), f32.
    fn read(&self, start: u64, n: usize) -> Result<Vec<f32>, MoeError> {
        let size = self.r.dtype.size() as u64;
        let at = self.r.offset + start * size;
        let raw = self
            .st
            .read_range(&self.r.location, at..at + n as u64 * size)?;
        let mut out = vec![0f32; n];
        crate::dtype::decode_f32(self.r.dtype, &raw, &mut out);
        if let Some(l) = &self.lora {
            l.delta().apply(start as usize, &mut out);
        }
        Ok(out)
    }

    fn shape(&self) -> Vec<usize> {
        self.r.shape.iter().map(|d| *d as usize).collect()
    }
}

/// The base's embedding rows of tokens `ids` (f32, with the adapter's
/// delta), and the bytes read; `why` names the gate mode in messages.
pub(super) fn embedding_rows(
    models: &InputModels,
    base: usize,
    ids: &[u32],
    hidden: usize,
    why: &str,
) -> Result<(BTreeMap<u32, Vec<f32>>, u64), MoeError> {
    let embed = "model.embed_tokens.weight";
    let r = models.tensor_ref(base, embed).ok_or_else(|| {
        MoeError::Inputs(format!(
            "gate_mode {why} reads the base's {embed}, which '{}' ({}) does not have",
            models.reference(base),
            models.location(base)
        ))
    })?;
    let rows_n = r.shape.first().copied().unwrap_or(0);
    let row_len = r.shape.get(1).copied().unwrap_or(0) as usize;
    if row_len != hidden || r.shape.len() != 2 {
        return Err(MoeError::Inputs(format!(
            "{embed} of the base is {:?}, but hidden_size is {hidden}",
            r.shape
        )));
    }
    let src = Source::open(r, &format!("gate_mode {why}"))?;
    let mut rows = BTreeMap::new();
    for id in ids {
        if *id as u64 >= rows_n {
            return Err(MoeError::Inputs(format!(
                "a prompt has token id {id}, but the base's {embed} has {rows_n} rows"
            )));
        }
        rows.insert(*id, src.read(*id as u64 * row_len as u64, row_len)?);
    }
    let row_bytes = (row_len * src.r.dtype.size()) as u64;
    Ok((rows, ids.len() as u64 * row_bytes))
}

/// `12.3 MB`: powers of 1000, as the plan's other sizes.
fn human(n: u64) -> String {
    crate::size::human_bytes(n as f64)
}

/// What one run of the forward pass keeps per distinct prompt: per layer,
/// the input's last row and the sum of its rows.
struct States {
    last: Vec<Vec<f32>>,
    sum: Vec<Vec<f32>>,
}

/// The gates of `gated` for gate mode `mode` (`hidden`, `hidden_avg`,
/// `hidden_last`) from the prompts' token ids, and what computing them cost.
/// `pad` is the token mergekit pads with (BOS, else EOS), needed by
/// `hidden_avg` when one expert's prompts differ in length.
#[allow(clippy::too_many_arguments)]
pub(super) fn gates(
    mode: &str,
    models: &InputModels,
    base: usize,
    gated: &[&Expert],
    prompts: &PromptIds,
    pad: Option<u32>,
    layers: usize,
    hidden: usize,
) -> Result<(Gates, String), MoeError> {
    let average = mode == "hidden_avg";
    let base_ref = models.reference(base).to_string();
    let loc = models.location(base).to_string();
    let arch = Arch::from_config(models.config(base)).map_err(|e| {
        MoeError::Inputs(format!(
            "gate_mode {mode} runs the base model '{base_ref}' ({loc}) over the prompts: {e}"
        ))
    })?;
    if arch.hidden != hidden || arch.layers != layers {
        return Err(MoeError::Inputs(format!(
            "{base_ref}: config.json's hidden_size/num_hidden_layers disagree"
        )));
    }
    // The distinct prompts, each run once.
    let mut seqs: Vec<&Vec<u32>> = Vec::new();
    let mut index: BTreeMap<&Vec<u32>, usize> = BTreeMap::new();
    for (e, (pos, neg)) in gated.iter().zip(prompts) {
        for (p, text) in pos
            .iter()
            .zip(e.positive_prompts.iter().flatten())
            .chain(neg.iter().zip(e.negative_prompts.iter().flatten()))
        {
            if p.is_empty() {
                return Err(MoeError::Inputs(format!(
                    "{}: the prompt {text:?} has no tokens (and the base's tokenizer has no BOS \
                     token to put before it): gate_mode {mode} runs the base over each prompt",
                    e.key_path
                )));
            }
            if !index.contains_key(p) {
                index.insert(p, seqs.len());
                seqs.push(p);
            }
        }
    }
    // Padding: needed by hidden_avg for groups of unequal lengths.
    let group_pads = |g: &Vec<Vec<u32>>| {
        let max = g.iter().map(Vec::len).max().unwrap_or(0);
        g.iter().any(|p| p.len() < max)
    };
    let needs_pad = average
        && prompts
            .iter()
            .any(|(pos, neg)| group_pads(pos) || group_pads(neg));
    let pad = match (needs_pad, pad) {
        (false, _) => None,
        (true, Some(p)) => Some(p),
        (true, None) => {
            return Err(MoeError::Inputs(format!(
                "gate_mode hidden_avg averages over a batch padded with the base's BOS (or EOS) \
                 token, as mergekit, and the tokenizer of '{base_ref}' ({loc}) has neither"
            )))
        }
    };
    let mut ids: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
    ids.extend(pad);
    ids.sort_unstable();
    ids.dedup();
    let (rows, embed_bytes) = embedding_rows(models, base, &ids, hidden, mode)?;
    let cpu = Device::Cpu;
    let embed = |s: &[u32]| -> Result<Tensor, MoeError> {
        let v: Vec<f32> = s.iter().flat_map(|id| rows[id].iter().copied()).collect();
        Tensor::from_vec(v, (s.len(), hidden), &cpu).map_err(forward_err)
    };
    let mut x: Vec<Tensor> = seqs.iter().map(|s| embed(s)).collect::<Result<_, _>>()?;
    let mut pad_x = pad.map(|p| embed(&[p])).transpose()?;
    let longest = seqs.iter().map(|s| s.len()).max().unwrap_or(1);
    let (cos, sin) = arch.rope(longest).map_err(forward_err)?;

    let mut states: Vec<States> = (0..seqs.len())
        .map(|_| States {
            last: Vec::with_capacity(layers),
            sum: Vec::with_capacity(layers),
        })
        .collect();
    let mut pad_states: Vec<Vec<f32>> = Vec::new();
    let mut weight_bytes = 0u64;
    let mut layer_f32 = 0u64;
    let mut largest_raw = 0u64;
    for l in 0..layers {
        for (s, xs) in states.iter_mut().zip(&x) {
            let (last, sum) = forward::last_and_sum(xs).map_err(forward_err)?;
            s.last.push(last);
            s.sum.push(sum);
        }
        if let Some(p) = &pad_x {
            pad_states.push(forward::last_and_sum(p).map_err(forward_err)?.0);
        }
        if l + 1 == layers {
            break; // the last layer's output is no layer's input
        }
        let mut read = |name: &str| -> Result<(Vec<usize>, Vec<f32>), String> {
            let r = models
                .tensor_ref(base, name)
                .ok_or_else(|| format!("the base '{base_ref}' ({loc}) has no tensor {name}"))?;
            weight_bytes += r.len;
            largest_raw = largest_raw.max(r.len);
            let src = Source::open(r, &format!("gate_mode {mode}")).map_err(|e| e.to_string())?;
            let shape = src.shape();
            let v = src
                .read(0, shape.iter().product())
                .map_err(|e| format!("{name} of the base: {e}"))?;
            Ok((shape, v))
        };
        let layer = Layer::load(&arch, l, &mut read)
            .map_err(|e| MoeError::Inputs(format!("gate_mode {mode}: {e}")))?;
        layer_f32 = layer_f32.max(
            arch.layer_weights(l)
                .iter()
                .map(|(_, s)| 4 * s.iter().product::<usize>() as u64)
                .sum(),
        );
        x = x
            .iter()
            .map(|xs| layer.forward(xs, &cos, &sin))
            .collect::<Result<_, _>>()
            .map_err(forward_err)?;
        pad_x = pad_x
            .map(|p| layer.forward_unattended(&p))
            .transpose()
            .map_err(forward_err)?;
    }

    // mergekit's reduction, per expert and layer.
    let group = |g: &Vec<Vec<u32>>, l: usize| -> Vec<f32> {
        let max = g.iter().map(Vec::len).max().unwrap_or(0);
        let mut total = vec![0f32; hidden];
        for p in g {
            let s = &states[index[p]];
            let v: Vec<f32> = if average {
                let pads = (max - p.len()) as f32;
                s.sum[l]
                    .iter()
                    .enumerate()
                    .map(|(c, v)| {
                        let padded = if pads > 0.0 {
                            v + pads * pad_states[l][c]
                        } else {
                            *v
                        };
                        padded / max as f32
                    })
                    .collect()
            } else {
                s.last[l].clone()
            };
            for (t, v) in total.iter_mut().zip(&v) {
                *t += v;
            }
        }
        let n = g.len().max(1) as f32;
        total.iter().map(|t| t / n).collect()
    };
    let experts = prompts.len();
    let mut values = vec![0f32; layers * experts * hidden];
    for (e, (pos, neg)) in prompts.iter().enumerate() {
        for l in 0..layers {
            let mut v = group(pos, l);
            if !neg.is_empty() {
                for (a, b) in v.iter_mut().zip(group(neg, l)) {
                    *a -= b;
                }
            }
            super::router::normalize(&mut v);
            let at = (l * experts + e) * hidden;
            values[at..at + hidden].copy_from_slice(&v);
        }
    }

    let tokens: usize = seqs.iter().map(|s| s.len()).sum();
    let activations = 4 * (hidden * (2 * tokens + 2)) as u64;
    let per_seq = |t: usize| {
        4 * (t * (arch.heads + 2 * arch.kv_heads) * arch.head_dim
            + 2 * arch.heads * t * t
            + 3 * t * arch.intermediate
            + 2 * t * hidden) as u64
    };
    let peak = layer_f32 + largest_raw + activations + per_seq(longest);
    let run = layers.saturating_sub(1);
    Ok((
        Gates {
            layers,
            experts,
            hidden,
            values,
        },
        format!(
            "a forward pass of the base over {} distinct prompts ({tokens} tokens{}) through \
             {run} of its {layers} layers, one at a time ({run} layers × {tokens} prompt \
             tokens): {} of the base read ({} of embedding rows), f32 on the CPU, peak about {} \
             (one layer in f32 and the activations)",
            seqs.len(),
            if pad.is_some() {
                ", and the padding token's trajectory"
            } else {
                ""
            },
            human(weight_bytes + embed_bytes),
            human(embed_bytes),
            human(peak),
        ),
    ))
}

fn forward_err(e: impl Into<forward::ForwardError>) -> MoeError {
    MoeError::Inputs(format!("gate_mode hidden: {}", e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(812), "812 B");
        assert_eq!(human(405_504), "405.50 KB");
        assert_eq!(human(3_710_000_000), "3.71 GB");
    }
}
