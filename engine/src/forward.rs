//! A forward pass of a dense decoder-only transformer (Llama, Mistral, Qwen2,
//! Qwen3), one decoder layer at a time, in f32 on the CPU: what `fleetmerge
//! moe`'s `hidden` router modes need (the hidden state at the input of every
//! layer, as transformers' `output_hidden_states` gives it), with one layer's
//! weights in memory at a time, so that the base of a 70B MoE is run on a
//! laptop.
//!
//! Built from candle's pieces (`candle-core` tensors and matmul, `candle-nn`'s
//! `Linear`, `RmsNorm`, rotary embedding and softmax kernels) rather than its
//! model zoo: candle-transformers' Llama, Mistral and Qwen2 keep their layers
//! private, load every weight at once through a `VarBuilder` and return only
//! the logits or the final states, while we need each layer's input and must
//! read a layer's weights by byte range from any storage, run it over every
//! prompt and drop it before the next. What is written here is only the
//! wiring transformers' `modeling_{llama,mistral,qwen2,qwen3}.py` has: pre-norm
//! residual blocks, grouped-query attention (`repeat_kv`) with the causal
//! (and, where configured, sliding-window) mask, rotate-half RoPE with
//! `rope_theta` and the plain or `llama3` scaling, Qwen2's q/k/v biases and
//! Qwen3's per-head q/k RMSNorm, a SiLU-gated MLP. Other model types, RoPE
//! scalings, partial rotary factors and activations are refused naming the
//! key. Each sequence is run on its own (no padding, positions `0..len`).
//!
//! [`Arch`] reads config.json; [`Layer::load`] takes one layer's weights from
//! a caller's reader (name → f32 values) and checks their shapes;
//! [`Layer::forward`] runs one sequence `[len, hidden]` through it;
//! [`Layer::forward_unattended`] runs a token whose attention sees nothing
//! (all its keys masked: torch's SDPA gives a zero output), which is what a
//! left-padding token becomes in a padded batch.

use candle_core::{Device, Tensor};
use candle_nn::{Linear, Module, RmsNorm};
use serde_json::{Map, Value};

/// Why the forward pass cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// config.json lacks something, or asks for what is not supported.
    #[error("config.json: {0}")]
    Config(String),
    /// A weight is missing or has the wrong shape (or the reader failed).
    #[error("{0}")]
    Weights(String),
    #[error("forward pass: {0}")]
    Compute(#[from] candle_core::Error),
}

/// The model types run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Family {
    pub const ALL: [(&'static str, Family); 4] = [
        ("llama", Family::Llama),
        ("mistral", Family::Mistral),
        ("qwen2", Family::Qwen2),
        ("qwen3", Family::Qwen3),
    ];
}

/// What the forward pass needs of config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    pub family: Family,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    /// RoPE's inverse frequencies (`head_dim / 2`), scaling applied.
    pub inv_freq: Vec<f32>,
    /// Biases of q/k/v, of o, of the MLP projections.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3's per-head RMSNorm of queries and keys.
    pub qk_norm: bool,
    /// Each layer's sliding window, if it has one.
    pub sliding: Vec<Option<usize>>,
}

fn cfg_err(message: String) -> ForwardError {
    ForwardError::Config(message)
}

fn uint(c: &Map<String, Value>, key: &str) -> Result<Option<usize>, ForwardError> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| *n > 0)
            .map(|n| Some(n as usize))
            .ok_or_else(|| cfg_err(format!("`{key}` is {v}, not a positive whole number"))),
    }
}

fn need(c: &Map<String, Value>, key: &str) -> Result<usize, ForwardError> {
    uint(c, key)?.ok_or_else(|| cfg_err(format!("`{key}` is missing")))
}

fn float(c: &Map<String, Value>, key: &str, at: &str) -> Result<Option<f64>, ForwardError> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| cfg_err(format!("`{at}{key}` is {v}, not a number"))),
    }
}

fn flag(c: &Map<String, Value>, key: &str) -> Result<bool, ForwardError> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(cfg_err(format!("`{key}` is {v}, not true or false"))),
    }
}

impl Arch {
    /// Reads a dense model's config.json (transformers' defaults where a key
    /// is absent).
    pub fn from_config(c: &Map<String, Value>) -> Result<Arch, ForwardError> {
        let model_type = c.get("model_type").and_then(Value::as_str).unwrap_or("");
        let family = Family::ALL
            .iter()
            .find(|(n, _)| *n == model_type)
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                cfg_err(format!(
                    "model_type {model_type:?}: the forward pass runs {} models only",
                    Family::ALL.map(|(n, _)| n).join(", ")
                ))
            })?;
        let hidden = need(c, "hidden_size")?;
        let heads = need(c, "num_attention_heads")?;
        let kv_heads = uint(c, "num_key_value_heads")?.unwrap_or(heads);
        if heads % kv_heads != 0 {
            return Err(cfg_err(format!(
                "`num_key_value_heads` {kv_heads} does not divide `num_attention_heads` {heads}"
            )));
        }
        let head_dim = match (family, uint(c, "head_dim")?) {
            (_, Some(d)) => d,
            (Family::Qwen3, None) => 128,
            (_, None) => hidden / heads,
        };
        let layers = need(c, "num_hidden_layers")?;
        let act = c
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(cfg_err(format!(
                "`hidden_act` {act:?}: only silu MLPs are run"
            )));
        }
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 => (true, false),
            Family::Mistral => (false, false),
            Family::Llama | Family::Qwen3 => {
                let b = flag(c, "attention_bias")?;
                (b, b)
            }
        };
        let mlp_bias = family == Family::Llama && flag(c, "mlp_bias")?;
        // Sliding windows: Mistral's on every layer (4096 when absent);
        // Qwen2/3's only with `use_sliding_window`, on the layers
        // `layer_types` (or `max_window_layers`) name.
        let window = match family {
            Family::Llama => None,
            Family::Mistral => match c.get("sliding_window") {
                None => Some(4096),
                Some(_) => uint(c, "sliding_window")?,
            },
            Family::Qwen2 | Family::Qwen3 => {
                if flag(c, "use_sliding_window")? {
                    match c.get("sliding_window") {
                        None => Some(4096),
                        Some(_) => uint(c, "sliding_window")?,
                    }
                } else {
                    None
                }
            }
        };
        let sliding = match (family, window) {
            (_, None) => vec![None; layers],
            (Family::Mistral, Some(w)) => vec![Some(w); layers],
            (_, Some(w)) => match c.get("layer_types").and_then(Value::as_array) {
                Some(types) => (0..layers)
                    .map(|i| {
                        (types.get(i).and_then(Value::as_str) == Some("sliding_attention"))
                            .then_some(w)
                    })
                    .collect(),
                None => {
                    let from = uint(c, "max_window_layers")?.unwrap_or(28);
                    (0..layers).map(|i| (i >= from).then_some(w)).collect()
                }
            },
        };
        Ok(Arch {
            family,
            hidden,
            intermediate: need(c, "intermediate_size")?,
            layers,
            heads,
            kv_heads,
            head_dim,
            eps: float(c, "rms_norm_eps", "")?.unwrap_or(1e-6),
            inv_freq: inv_freq(c, head_dim)?,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: family == Family::Qwen3,
            sliding,
        })
    }

    /// The weights of layer `l`: name and shape (row-major, as stored).
    pub fn layer_weights(&self, l: usize) -> Vec<(String, Vec<usize>)> {
        let p = format!("model.layers.{l}.");
        let (h, i, d) = (self.hidden, self.intermediate, self.head_dim);
        let (q, kv) = (self.heads * d, self.kv_heads * d);
        let mut w = vec![
            (format!("{p}input_layernorm.weight"), vec![h]),
            (format!("{p}post_attention_layernorm.weight"), vec![h]),
            (format!("{p}self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}mlp.down_proj.weight"), vec![h, i]),
        ];
        if self.qkv_bias {
            w.push((format!("{p}self_attn.q_proj.bias"), vec![q]));
            w.push((format!("{p}self_attn.k_proj.bias"), vec![kv]));
            w.push((format!("{p}self_attn.v_proj.bias"), vec![kv]));
        }
        if self.o_bias {
            w.push((format!("{p}self_attn.o_proj.bias"), vec![h]));
        }
        if self.mlp_bias {
            w.push((format!("{p}mlp.gate_proj.bias"), vec![i]));
            w.push((format!("{p}mlp.up_proj.bias"), vec![i]));
            w.push((format!("{p}mlp.down_proj.bias"), vec![h]));
        }
        if self.qk_norm {
            w.push((format!("{p}self_attn.q_norm.weight"), vec![d]));
            w.push((format!("{p}self_attn.k_norm.weight"), vec![d]));
        }
        w
    }

    /// cos and sin of positions `0..len` (`[len, head_dim / 2]`), f32 as
    /// transformers computes them (`position · inv_freq`, then cos / sin).
    pub fn rope(&self, len: usize) -> Result<(Tensor, Tensor), ForwardError> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in 0..len {
            for f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (len, half), &Device::Cpu)?,
            Tensor::from_vec(sin, (len, half), &Device::Cpu)?,
        ))
    }
}

/// RoPE's inverse frequencies from `rope_parameters` (transformers 5) or
/// `rope_theta` and `rope_scaling` (earlier configs): the plain ones,
/// `1 / theta^(2i / dim)` in f32, or with `llama3` scaling.
fn inv_freq(c: &Map<String, Value>, head_dim: usize) -> Result<Vec<f32>, ForwardError> {
    let (params, at) = match c.get("rope_parameters") {
        Some(Value::Object(m)) => (Some(m), "rope_parameters."),
        Some(Value::Null) | None => match c.get("rope_scaling") {
            Some(Value::Object(m)) => (Some(m), "rope_scaling."),
            Some(Value::Null) | None => (None, ""),
            Some(v) => return Err(cfg_err(format!("`rope_scaling` is {v}, not a mapping"))),
        },
        Some(v) => return Err(cfg_err(format!("`rope_parameters` is {v}, not a mapping"))),
    };
    let empty = Map::new();
    let p = params.unwrap_or(&empty);
    let theta = match float(p, "rope_theta", at)? {
        Some(t) => t,
        None => float(c, "rope_theta", "")?.unwrap_or(10000.0),
    };
    for (m, at) in [(p, at), (c, "")] {
        if let Some(f) = float(m, "partial_rotary_factor", at)? {
            if f != 1.0 {
                return Err(cfg_err(format!(
                    "`{at}partial_rotary_factor` {f}: only a rotary embedding over the whole \
                     head is supported"
                )));
            }
        }
    }
    let kind_key = if p.contains_key("rope_type") {
        "rope_type"
    } else {
        "type"
    };
    let kind = match p.get(kind_key) {
        None | Some(Value::Null) => "default",
        Some(Value::String(s)) => s.as_str(),
        Some(v) => return Err(cfg_err(format!("`{at}{kind_key}` is {v}, not a name"))),
    };
    if head_dim % 2 != 0 {
        return Err(cfg_err(format!(
            "head dimension {head_dim} is odd: RoPE rotates pairs"
        )));
    }
    let dim = head_dim as f32;
    let plain: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / dim))
        .collect();
    match kind {
        "default" => Ok(plain),
        "llama3" => {
            let get = |k: &str| {
                float(p, k, at)?.ok_or_else(|| {
                    cfg_err(format!(
                        "`{at}{k}` is missing (rope type llama3 needs factor, low_freq_factor, \
                         high_freq_factor, original_max_position_embeddings)"
                    ))
                })
            };
            let factor = get("factor")? as f32;
            let low = get("low_freq_factor")? as f32;
            let high = get("high_freq_factor")? as f32;
            let old = get("original_max_position_embeddings")? as f32;
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            Ok(plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    if wavelen < high_wavelen || wavelen > low_wavelen {
                        scaled
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    }
                })
                .collect())
        }
        other => Err(cfg_err(format!(
            "`{at}{kind_key}` {other:?}: only the plain RoPE and the llama3 scaling are supported"
        ))),
    }
}

/// One decoder layer's weights, in f32.
pub struct Layer {
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    gate: Linear,
    up: Linear,
    down: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
}

/// Reads one weight: its name to its shape (as stored) and f32 values.
pub type Reader<'a> = dyn FnMut(&str) -> Result<(Vec<usize>, Vec<f32>), String> + 'a;

impl Layer {
    /// Layer `l`'s weights from `read`, each checked against the shape
    /// config.json gives it.
    pub fn load(arch: &Arch, l: usize, read: &mut Reader) -> Result<Layer, ForwardError> {
        let mut weights = std::collections::HashMap::new();
        for (name, shape) in arch.layer_weights(l) {
            let (got, values) = read(&name).map_err(ForwardError::Weights)?;
            if got != shape {
                return Err(ForwardError::Weights(format!(
                    "{name} is {got:?}, but config.json makes it {shape:?}"
                )));
            }
            let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
            let short = name[format!("model.layers.{l}.").len()..].to_string();
            weights.insert(short, t);
        }
        let mut take = |n: &str| weights.remove(n);
        let eps = arch.eps;
        let norm = |t: Option<Tensor>| t.map(|w| RmsNorm::new(w, eps));
        let mut linear = |n: &str| {
            let w = take(&format!("{n}.weight")).expect("listed by layer_weights");
            Linear::new(w, take(&format!("{n}.bias")))
        };
        let (q, k, v, o) = (
            linear("self_attn.q_proj"),
            linear("self_attn.k_proj"),
            linear("self_attn.v_proj"),
            linear("self_attn.o_proj"),
        );
        let (gate, up, down) = (
            linear("mlp.gate_proj"),
            linear("mlp.up_proj"),
            linear("mlp.down_proj"),
        );
        Ok(Layer {
            input_norm: norm(take("input_layernorm.weight")).expect("listed"),
            post_norm: norm(take("post_attention_layernorm.weight")).expect("listed"),
            q,
            k,
            v,
            o,
            q_norm: norm(take("self_attn.q_norm.weight")),
            k_norm: norm(take("self_attn.k_norm.weight")),
            gate,
            up,
            down,
            heads: arch.heads,
            kv_heads: arch.kv_heads,
            head_dim: arch.head_dim,
            window: arch.sliding[l],
        })
    }

    /// `x + mlp(post_norm(x))`.
    fn mlp(&self, x: &Tensor) -> Result<Tensor, ForwardError> {
        let h = self.post_norm.forward(x)?;
        let g = self.gate.forward(&h)?.silu()?;
        let u = self.up.forward(&h)?;
        Ok((x + self.down.forward(&(g * u)?)?)?)
    }

    /// One sequence `x` (`[len, hidden]`, positions `0..len`) through the
    /// layer; `cos`/`sin` from [`Arch::rope`] for at least `len` positions.
    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, ForwardError> {
        let (t, _) = x.dims2()?;
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let h = self.input_norm.forward(x)?;
        // [len, n·d] → [1, n, len, d], per-head norms before RoPE (Qwen3).
        let heads = |y: Tensor, n: usize, norm: &Option<RmsNorm>| -> candle_core::Result<Tensor> {
            let y = y.reshape((1, t, n, d))?;
            let y = match norm {
                Some(nm) => nm.forward(&y)?,
                None => y,
            };
            y.transpose(1, 2)?.contiguous()
        };
        let q = heads(self.q.forward(&h)?, nh, &self.q_norm)?;
        let k = heads(self.k.forward(&h)?, nkv, &self.k_norm)?;
        let v = heads(self.v.forward(&h)?, nkv, &None)?;
        let (cos, sin) = (cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?);
        let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
        // repeat_kv: query head i reads key/value head i / (nh / nkv).
        let rep = |y: Tensor| -> candle_core::Result<Tensor> {
            if nh == nkv {
                return Ok(y);
            }
            y.unsqueeze(2)?
                .expand((1, nkv, nh / nkv, t, d))?
                .reshape((1, nh, t, d))
        };
        let (k, v) = (rep(k)?, rep(v)?);
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = scores.broadcast_add(&self.mask(t)?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let o = probs.matmul(&v)?.transpose(1, 2)?.reshape((t, nh * d))?;
        let x = (x + self.o.forward(&o)?)?;
        self.mlp(&x)
    }

    /// A token whose attention has no key to see (transformers' SDPA gives
    /// it a zero output): `x + o_proj(0)`, then the MLP block.
    pub fn forward_unattended(&self, x: &Tensor) -> Result<Tensor, ForwardError> {
        let (t, _) = x.dims2()?;
        let zero = Tensor::zeros((t, self.heads * self.head_dim), x.dtype(), x.device())?;
        let x = (x + self.o.forward(&zero)?)?;
        self.mlp(&x)
    }

    /// The additive causal mask `[len, len]` (0 or -inf), with the sliding
    /// window (a query sees the keys less than `window` behind it).
    fn mask(&self, t: usize) -> Result<Tensor, ForwardError> {
        let m: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..t).map(move |j| {
                    let seen = j <= i && self.window.is_none_or(|w| i - j < w);
                    if seen {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        Ok(Tensor::from_vec(m, (t, t), &Device::Cpu)?)
    }
}

/// The rows of a `[len, hidden]` sequence: (the last row, the sum of the rows
/// in order), f32.
pub fn last_and_sum(x: &Tensor) -> Result<(Vec<f32>, Vec<f32>), ForwardError> {
    let (t, h) = x.dims2()?;
    let rows: Vec<Vec<f32>> = x.to_vec2()?;
    let mut sum = vec![0f32; h];
    for r in &rows {
        for (s, v) in sum.iter_mut().zip(r) {
            *s += *v;
        }
    }
    let last = rows
        .get(t.wrapping_sub(1))
        .cloned()
        .unwrap_or_else(|| vec![0.0; h]);
    Ok((last, sum))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Map<String, Value> {
        let base = r#"{"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2,
            "num_key_value_heads": 1, "num_hidden_layers": 2, "intermediate_size": 12,
            "rms_norm_eps": 1e-5"#;
        serde_json::from_str(&format!("{base}{extra}}}")).unwrap()
    }

    #[test]
    fn config_defaults_and_refusals() {
        let a = Arch::from_config(&cfg("")).unwrap();
        assert_eq!((a.head_dim, a.kv_heads, a.family), (4, 1, Family::Llama));
        assert_eq!(a.inv_freq, vec![1.0, 0.01]);
        assert!(!a.qkv_bias && !a.qk_norm && a.sliding == vec![None, None]);
        let q2 = Arch::from_config(&cfg(r#", "model_type": "qwen2""#)).unwrap();
        assert!(q2.qkv_bias && !q2.o_bias);
        let q3 = Arch::from_config(&cfg(r#", "model_type": "qwen3", "head_dim": 4"#)).unwrap();
        assert!(q3.qk_norm);
        let m = Arch::from_config(&cfg(r#", "model_type": "mistral""#)).unwrap();
        assert_eq!(m.sliding, vec![Some(4096), Some(4096)]);
        let m = Arch::from_config(&cfg(
            r#", "model_type": "qwen2", "use_sliding_window": true, "sliding_window": 3,
            "max_window_layers": 1"#,
        ))
        .unwrap();
        assert_eq!(m.sliding, vec![None, Some(3)]);
        let cases = [
            (r#", "model_type": "gemma2""#, "model_type \"gemma2\""),
            (r#", "hidden_act": "gelu""#, "`hidden_act` \"gelu\""),
            (
                r#", "rope_scaling": {"type": "yarn", "factor": 4.0}"#,
                "`rope_scaling.type` \"yarn\": only the plain RoPE and the llama3 scaling",
            ),
            (
                r#", "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0}"#,
                "`rope_parameters.rope_type` \"linear\"",
            ),
            (
                r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
                "`rope_scaling.low_freq_factor` is missing",
            ),
            (
                r#", "partial_rotary_factor": 0.5"#,
                "`partial_rotary_factor` 0.5",
            ),
            (r#", "num_key_value_heads": 3"#, "does not divide"),
        ];
        for (extra, want) in cases {
            let e = Arch::from_config(&cfg(extra)).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
            assert!(e.starts_with("config.json: "), "{e}");
        }
    }

    #[test]
    fn llama3_scaling_as_transformers() {
        // Llama 3.1's scaling on a 128-dim head: the high frequencies stay,
        // the low ones are divided by the factor, the middle ones blend.
        let c = cfg(
            r#", "head_dim": 128, "rope_theta": 500000.0, "rope_scaling": {"rope_type":
            "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}"#,
        );
        let a = Arch::from_config(&c).unwrap();
        let plain = Arch::from_config(&cfg(r#", "head_dim": 128, "rope_theta": 500000.0"#))
            .unwrap()
            .inv_freq;
        assert_eq!(a.inv_freq[0], plain[0]);
        assert_eq!(a.inv_freq[63], plain[63] / 8.0);
        // wavelen between 2048 and 8192: smoothed, between f/8 and f.
        let i = (0..64)
            .find(|&i| {
                let w = 2.0 * std::f32::consts::PI / plain[i];
                w > 2048.0 && w < 8192.0
            })
            .unwrap();
        assert!(a.inv_freq[i] < plain[i] && a.inv_freq[i] > plain[i] / 8.0);
    }

    /// A reference layer in plain loops (f64) against candle's.
    #[test]
    fn a_layer_matches_a_plain_loop_reference() {
        let arch = Arch::from_config(&cfg(r#", "model_type": "qwen3", "head_dim": 4"#)).unwrap();
        let mut seed = 1u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.8
        };
        let mut weights = std::collections::HashMap::new();
        for (n, s) in arch.layer_weights(0) {
            let len: usize = s.iter().product();
            let v: Vec<f32> = (0..len)
                .map(|_| {
                    if n.contains("norm") {
                        1.0 + rnd()
                    } else {
                        rnd()
                    }
                })
                .collect();
            weights.insert(n, (s, v));
        }
        let w = weights.clone();
        let mut read = |n: &str| w.get(n).cloned().ok_or_else(|| format!("no {n}"));
        let layer = Layer::load(&arch, 0, &mut read).unwrap();
        let t = 3;
        let x: Vec<f32> = (0..t * 8).map(|_| rnd()).collect();
        let xt = Tensor::from_vec(x.clone(), (t, 8), &Device::Cpu).unwrap();
        let (cos, sin) = arch.rope(t).unwrap();
        let got: Vec<Vec<f32>> = layer.forward(&xt, &cos, &sin).unwrap().to_vec2().unwrap();

        let g = |n: &str| &weights[&format!("model.layers.0.{n}")].1;
        let rms = |v: &[f64], w: &[f32]| -> Vec<f64> {
            let ms = v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64;
            let r = 1.0 / (ms + 1e-5).sqrt();
            v.iter().zip(w).map(|(x, w)| x * r * *w as f64).collect()
        };
        let mv = |w: &[f32], v: &[f64], rows: usize| -> Vec<f64> {
            let cols = v.len();
            (0..rows)
                .map(|r| (0..cols).map(|c| w[r * cols + c] as f64 * v[c]).sum())
                .collect()
        };
        let rope = |v: &mut [f64], p: usize| {
            for i in 0..2 {
                let a = p as f64 * arch.inv_freq[i] as f64;
                let (x1, x2) = (v[i], v[i + 2]);
                v[i] = x1 * a.cos() - x2 * a.sin();
                v[i + 2] = x2 * a.cos() + x1 * a.sin();
            }
        };
        let xs: Vec<Vec<f64>> = (0..t)
            .map(|i| x[i * 8..i * 8 + 8].iter().map(|v| *v as f64).collect())
            .collect();
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (p, xi) in xs.iter().enumerate() {
            let h = rms(xi, g("input_layernorm.weight"));
            let q = mv(g("self_attn.q_proj.weight"), &h, 8);
            let k = mv(g("self_attn.k_proj.weight"), &h, 4);
            let mut qh: Vec<Vec<f64>> = (0..2)
                .map(|hd| rms(&q[hd * 4..hd * 4 + 4], g("self_attn.q_norm.weight")))
                .collect();
            let mut kh = rms(&k, g("self_attn.k_norm.weight"));
            for q in &mut qh {
                rope(q, p);
            }
            rope(&mut kh, p);
            qs.push(qh);
            ks.push(kh);
            vs.push(mv(g("self_attn.v_proj.weight"), &h, 4));
        }
        for i in 0..t {
            let mut o = vec![0f64; 8];
            for hd in 0..2 {
                let s: Vec<f64> = (0..=i)
                    .map(|j| (0..4).map(|c| qs[i][hd][c] * ks[j][c]).sum::<f64>() / 2.0)
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, e) in e.iter().enumerate() {
                    for c in 0..4 {
                        o[hd * 4 + c] += e / z * vs[j][c];
                    }
                }
            }
            let a = mv(g("self_attn.o_proj.weight"), &o, 8);
            let r: Vec<f64> = xs[i].iter().zip(&a).map(|(x, a)| x + a).collect();
            let h = rms(&r, g("post_attention_layernorm.weight"));
            let gt = mv(g("mlp.gate_proj.weight"), &h, 12);
            let up = mv(g("mlp.up_proj.weight"), &h, 12);
            let act: Vec<f64> = gt
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = mv(g("mlp.down_proj.weight"), &act, 8);
            for c in 0..8 {
                let want = r[c] + d[c];
                assert!(
                    (got[i][c] as f64 - want).abs() < 1e-5,
                    "row {i} col {c}: {} vs {want}",
                    got[i][c]
                );
            }
        }
        // A wrong shape is named.
        let mut bad = |n: &str| {
            let (s, v) = weights[n].clone();
            Ok(if n.ends_with("k_proj.weight") {
                (vec![s[1], s[0]], v)
            } else {
                (s, v)
            })
        };
        let e = Layer::load(&arch, 0, &mut bad).err().unwrap().to_string();
        assert!(
            e.contains("model.layers.0.self_attn.k_proj.weight is [8, 4]"),
            "{e}"
        );
    }

    #[test]
    fn sliding_window_masks_old_keys() {
        let arch =
            Arch::from_config(&cfg(r#", "model_type": "mistral", "sliding_window": 2"#)).unwrap();
        let mut read = |n: &str| {
            let s = arch
                .layer_weights(0)
                .into_iter()
                .find(|(m, _)| m == n)
                .unwrap()
                .1;
            let len = s.iter().product();
            Ok((s, vec![0.1f32; len]))
        };
        let layer = Layer::load(&arch, 0, &mut read).unwrap();
        let m: Vec<Vec<f32>> = layer.mask(3).unwrap().to_vec2().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            m,
            vec![
                vec![0.0, inf, inf],
                vec![0.0, 0.0, inf],
                vec![inf, 0.0, 0.0]
            ]
        );
    }
}
