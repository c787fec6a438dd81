//! The planner of `fleetmerge moe`: opens the base and the experts as a merge
//! opens its models, picks the output family, computes the routers, and lists
//! the output tensors — the base's non-MLP tensors and every expert's MLP
//! copied by range (method `moe_expert`: its `residual_scale` and
//! `noise_scale` applied on the way), routers and any synthesised zero biases
//! as literal tensors — grouped into the same shards and work units as a
//! merge's, so `run`'s driver and the cluster execute them unchanged.

use super::config::{Expert, GateMode, MoeConfig};
use super::family::{Family, PROJECTIONS};
use super::router::{self, Gates};
use super::MoeError;
use crate::config::ConfigError;
use crate::dtype::DType;
use crate::plan::inputs::{shard_units, InputModels, Mention};
use crate::plan::layout::Layout;
use crate::plan::{GeneratedFiles, OutputMeta, Plan, PlanOptions};
use crate::storage;
use crate::unit::{OutputTensor, ParamValue, TensorOp, TensorParams, TensorRef, PLAN_FORMAT};
use std::collections::BTreeMap;

/// The method name of a built MoE's units.
pub const METHOD: &str = "moe_expert";

/// What `fleetmerge plan` shows of a moe build besides its units.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MoeReport {
    /// Every family considered, in mergekit's order: `None` when it takes the
    /// config, else why not (or that `architecture:` left it out).
    pub families: Vec<(String, Option<String>)>,
    pub family: String,
    pub gate_mode: String,
    /// What computing the routers costs.
    pub router_cost: String,
    pub layers: u64,
    pub hidden: u64,
    pub experts: Vec<ExpertReport>,
    pub shared_experts: Vec<ExpertReport>,
    /// Bytes of the base's non-MLP tensors copied.
    pub base_bytes: u64,
    pub router_bytes: u64,
    pub dtype: Option<String>,
    /// mergekit's degenerate-router warning and others.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExpertReport {
    pub reference: String,
    /// Bytes of its MLP tensors read.
    pub bytes: u64,
    pub positive_prompts: usize,
    pub negative_prompts: usize,
}

/// A planned moe build.
#[derive(Debug, Clone)]
pub struct MoePlan {
    pub plan: Plan,
    pub report: MoeReport,
}

fn cfg_err(cfg: &MoeConfig, key: &str, span: crate::yaml::Span, message: String) -> MoeError {
    MoeError::Config(ConfigError {
        file: cfg.file.clone(),
        key_path: key.to_string(),
        span: Some(span),
        message,
    })
}

fn num(c: &serde_json::Map<String, serde_json::Value>, k: &str) -> Option<u64> {
    c.get(k).and_then(|v| v.as_u64())
}

fn model_type(c: &serde_json::Map<String, serde_json::Value>) -> String {
    c.get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("(none)")
        .to_string()
}

/// Plans the build of `cfg` (validated here with `allow_all_same`).
pub fn plan(
    cfg: &MoeConfig,
    opts: &PlanOptions,
    allow_all_same: bool,
) -> Result<MoePlan, MoeError> {
    cfg.validate(allow_all_same)?;
    let mut mentions: Vec<Mention> = vec![(
        cfg.base_model.value.clone(),
        "base_model".into(),
        cfg.base_model.span,
    )];
    for e in cfg.experts.iter().chain(&cfg.shared_experts) {
        mentions.push((
            e.source_model.value.clone(),
            format!("{}.source_model", e.key_path),
            e.source_model.span,
        ));
    }
    let models = InputModels::open(&cfg.file, &mentions, opts)?;
    let idx = |e: &Expert| models.index(&e.source_model.value).unwrap_or(0);
    let base = models.index(&cfg.base_model.value).unwrap_or(0);
    let base_cfg = models.config(base).clone();

    // The family.
    let types: Vec<String> = std::iter::once(base)
        .chain(cfg.experts.iter().chain(&cfg.shared_experts).map(idx))
        .map(|i| model_type(models.config(i)))
        .collect();
    let mut families = Vec::new();
    let mut chosen = None;
    for f in Family::ALL {
        let allowed = cfg
            .architecture
            .as_ref()
            .is_none_or(|a| f.name().to_lowercase().starts_with(&a.value.to_lowercase()));
        let verdict = if !allowed {
            Some(format!(
                "left out by `architecture: {}`",
                cfg.architecture.as_ref().map_or("", |a| a.value.as_str())
            ))
        } else {
            f.supports(cfg, &types).err()
        };
        if verdict.is_none() && chosen.is_none() {
            chosen = Some(f);
        }
        families.push((f.name().to_string(), verdict));
    }
    let all_names = Family::ALL.map(Family::name).join(", ");
    if let Some(a) = &cfg.architecture {
        if families
            .iter()
            .all(|(_, v)| v.as_deref().is_some_and(|v| v.starts_with("left out")))
        {
            return Err(cfg_err(
                cfg,
                "architecture",
                a.span,
                format!(
                    "No output architecture found that matches the given architecture: {} \
                     (supported: {all_names})",
                    a.value
                ),
            ));
        }
    }
    let Some(family) = chosen else {
        let why: Vec<String> = families
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.as_deref().unwrap_or("")))
            .collect();
        return Err(MoeError::Inputs(format!(
            "{}: No output architecture found that is compatible with the given models ({})",
            cfg.file,
            why.join("; ")
        )));
    };

    // Shapes.
    let base_ref = models.reference(base).to_string();
    let layers = num(&base_cfg, "num_hidden_layers").ok_or_else(|| {
        MoeError::Inputs(format!(
            "{base_ref} ({}): config.json has no num_hidden_layers",
            models.location(base)
        ))
    })?;
    let hidden = num(&base_cfg, "hidden_size").ok_or_else(|| {
        MoeError::Inputs(format!(
            "{base_ref} ({}): config.json has no hidden_size",
            models.location(base)
        ))
    })?;
    let dtype = match &cfg.dtype {
        Some(d) => Some(d.value),
        None => base_cfg
            .get("torch_dtype")
            .or_else(|| base_cfg.get("dtype"))
            .and_then(|v| v.as_str())
            .and_then(DType::from_torch_name)
            .filter(|d| d.is_float()),
    };
    let mlp_name = |l: u64, p: &str| format!("model.layers.{l}.mlp.{p}.weight");
    // Each expert's MLP, checked against the base's shapes.
    let expert_refs = |e: &Expert| -> Result<Vec<[TensorRef; 3]>, MoeError> {
        let m = idx(e);
        (0..layers)
            .map(|l| {
                let mut out = Vec::with_capacity(3);
                for p in PROJECTIONS {
                    let name = mlp_name(l, p);
                    let r = models.tensor_ref(m, &name).ok_or_else(|| {
                        cfg_err(
                            cfg,
                            &format!("{}.source_model", e.key_path),
                            e.source_model.span,
                            format!(
                                "'{}' ({}) has no tensor {name}: every expert needs the dense MLP \
                                 (gate_proj, up_proj, down_proj) of each of the base's {layers} \
                                 layers",
                                e.source_model.value,
                                models.location(m)
                            ),
                        )
                    })?;
                    if let Some(b) = models.location_of(base, &name) {
                        if b.info.shape != r.shape {
                            return Err(cfg_err(
                                cfg,
                                &format!("{}.source_model", e.key_path),
                                e.source_model.span,
                                format!(
                                    "{name} of '{}' is {:?}, but the base's is {:?}: experts \
                                     must have the base's MLP shapes",
                                    e.source_model.value, r.shape, b.info.shape
                                ),
                            ));
                        }
                    }
                    if !r.dtype.is_float() {
                        return Err(MoeError::Inputs(format!(
                            "{name} of '{}' is {}, not a float tensor",
                            e.source_model.value, r.dtype
                        )));
                    }
                    out.push(r);
                }
                let [g, u, d]: [TensorRef; 3] = out.try_into().expect("three projections");
                Ok([g, u, d])
            })
            .collect()
    };
    let experts: Vec<Vec<[TensorRef; 3]>> = cfg
        .experts
        .iter()
        .map(expert_refs)
        .collect::<Result<_, _>>()?;
    let shared: Vec<Vec<[TensorRef; 3]>> = match family.shared_tensor(0, "up_proj") {
        Some(_) => cfg
            .shared_experts
            .iter()
            .map(expert_refs)
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };

    // The routers.
    let gated: Vec<&Expert> = cfg
        .experts
        .iter()
        .chain(
            cfg.shared_gated()
                .then_some(&cfg.shared_experts)
                .into_iter()
                .flatten(),
        )
        .collect();
    let (gates, router_cost) = gates(cfg, opts, &models, base, &gated, layers, hidden)?;
    let mut warnings = Vec::new();
    if let Some(w) = router::degenerate_warning(&gates) {
        warnings.push(w);
    }
    if !cfg.experts.len().is_power_of_two() {
        warnings.push(format!(
            "Your model has {} experts, which is not a power of two. The model will not be \
             usable in llama.cpp.",
            cfg.experts.len()
        ));
    }

    // The output tensors.
    let out_dtype = |r: &TensorRef| dtype.unwrap_or(r.dtype);
    let copy = |r: TensorRef, e: Option<&Expert>, residual: bool, name: String| {
        let mut p = BTreeMap::new();
        if let Some(e) = e {
            if let Some(n) = e.noise_scale {
                p.insert("noise_scale".to_string(), ParamValue::Number(n));
            }
            if let (true, Some(s)) = (residual, e.residual_scale) {
                p.insert("scale".to_string(), ParamValue::Number(s));
            }
        }
        OutputTensor {
            name,
            dtype: out_dtype(&r),
            shape: r.shape.clone(),
            op: TensorOp::Merge,
            inputs: vec![r],
            base: None,
            params: TensorParams {
                shared: BTreeMap::new(),
                per_input: vec![p],
            },
            scales: Vec::new(),
            block: None,
            requant: None,
            vocab: None,
            packed: None,
        }
    };
    let router_dtype = dtype.unwrap_or(DType::F32);
    let literal = |name: String, shape: Vec<u64>, values: &[f32], dtype: DType| {
        let mut bytes = vec![0u8; values.len() * dtype.size()];
        crate::dtype::encode_f32(dtype, values, &mut bytes);
        OutputTensor {
            name,
            dtype,
            shape,
            op: TensorOp::Literal {
                hex: hex::encode(bytes),
            },
            inputs: Vec::new(),
            base: None,
            params: TensorParams::default(),
            scales: Vec::new(),
            block: None,
            requant: None,
            vocab: None,
            packed: None,
        }
    };
    let layout = Layout::infer(models.tensor_names(base));
    let base_tensor = |name: &str| -> Result<TensorRef, MoeError> {
        let r = models
            .tensor_ref(base, name)
            .ok_or_else(|| MoeError::Inputs(format!("{base_ref}: tensor {name} not found")))?;
        if !r.dtype.is_float() {
            return Err(MoeError::Inputs(format!(
                "{name} of the base '{base_ref}' is {}: only float tensors are copied into a MoE",
                r.dtype
            )));
        }
        Ok(r)
    };
    let keep = |name: &str| !name.contains(".mlp.") && !name.ends_with("rotary_emb.inv_freq");
    let mut tensors = Vec::new();
    let mut base_bytes = 0u64;
    for name in layout.pre.iter().filter(|n| keep(n)) {
        let r = base_tensor(name)?;
        base_bytes += r.len;
        tensors.push(copy(r, None, false, name.clone()));
    }
    let prefix = layout
        .layer_prefix
        .clone()
        .unwrap_or_else(|| "model.layers.".into());
    let n_experts = cfg.experts.len();
    let heads = num(&base_cfg, "num_attention_heads").unwrap_or(1).max(1);
    let kv_heads = num(&base_cfg, "num_key_value_heads").unwrap_or(heads);
    let head_dim = num(&base_cfg, "head_dim").unwrap_or(hidden / heads);
    for l in 0..layers {
        let suffixes = layout.layers.get(&l).cloned().unwrap_or_default();
        for s in suffixes.iter() {
            let name = format!("{prefix}{l}.{s}");
            if !keep(&name) {
                continue;
            }
            let r = base_tensor(&name)?;
            base_bytes += r.len;
            tensors.push(copy(r, None, false, name));
        }
        if family.needs_qkv_bias() {
            for (p, n) in [
                ("q_proj", heads),
                ("k_proj", kv_heads),
                ("v_proj", kv_heads),
            ] {
                let s = format!("self_attn.{p}.bias");
                if !suffixes.contains(&s) {
                    // mergekit: "qwen 2 moe wants attention bias, give it zeros".
                    let len = (n * head_dim) as usize;
                    let d = dtype.unwrap_or(DType::F32);
                    tensors.push(literal(
                        format!("{prefix}{l}.{s}"),
                        vec![len as u64],
                        &vec![0.0; len],
                        d,
                    ));
                }
            }
        }
        tensors.push(literal(
            family.router_tensor(l),
            vec![n_experts as u64, hidden],
            gates.layer(l as usize, 0..n_experts),
            router_dtype,
        ));
        if let Some(name) = family.shared_router_tensor(l) {
            if gates.experts > n_experts {
                tensors.push(literal(
                    name,
                    vec![1, hidden],
                    gates.layer(l as usize, n_experts..n_experts + 1),
                    router_dtype,
                ));
            }
        }
        for (e, (def, refs)) in cfg.experts.iter().zip(&experts).enumerate() {
            for (p, r) in PROJECTIONS.iter().zip(refs[l as usize].clone()) {
                let name = family.expert_tensor(l, e, p);
                tensors.push(copy(r, Some(def), *p == "down_proj", name));
            }
        }
        for (def, refs) in cfg.shared_experts.iter().zip(&shared) {
            for (p, r) in PROJECTIONS.iter().zip(refs[l as usize].clone()) {
                let name = family
                    .shared_tensor(l, p)
                    .expect("a family with shared experts");
                tensors.push(copy(r, Some(def), *p == "down_proj", name));
            }
        }
    }
    for name in layout.post.iter().filter(|n| keep(n)) {
        let r = base_tensor(name)?;
        base_bytes += r.len;
        tensors.push(copy(r, None, false, name.clone()));
    }
    let router_bytes: u64 = tensors
        .iter()
        .filter(|t| matches!(t.op, TensorOp::Literal { .. }))
        .map(OutputTensor::byte_len)
        .sum();
    let units = shard_units(tensors, opts, METHOD);

    let report_of = |e: &Expert, refs: &[[TensorRef; 3]]| ExpertReport {
        reference: e.source_model.value.to_string(),
        // An adapted expert also reads its LoRA factors.
        bytes: refs
            .iter()
            .flatten()
            .map(|r| r.len + r.lora.as_ref().map_or(0, |l| l.a.len + l.b.len))
            .sum(),
        positive_prompts: e.positive_prompts.as_ref().map_or(0, Vec::len),
        negative_prompts: e.negative_prompts.as_ref().map_or(0, Vec::len),
    };
    let report = MoeReport {
        families,
        family: family.name().to_string(),
        gate_mode: cfg.gate_mode.value.name().to_string(),
        router_cost,
        layers,
        hidden,
        experts: cfg
            .experts
            .iter()
            .zip(&experts)
            .map(|(e, r)| report_of(e, r))
            .collect(),
        shared_experts: cfg
            .shared_experts
            .iter()
            .zip(&shared)
            .map(|(e, r)| report_of(e, r))
            .collect(),
        base_bytes,
        router_bytes,
        dtype: dtype.map(|d| d.torch_name().to_string()),
        warnings,
    };
    let config_json = family.config_json(
        &base_cfg,
        n_experts,
        cfg.shared_experts.len(),
        cfg.experts_per_token.value,
        dtype,
    );
    let references: Vec<String> = (0..models.len())
        .map(|i| models.reference(i).to_string())
        .collect();
    let card = super::card::card(cfg, family, &report);
    let plan = Plan {
        format: PLAN_FORMAT,
        merge_method: METHOD.to_string(),
        models: models.planned(),
        units,
        output: OutputMeta {
            config_dir: models.location(base).to_string(),
            tokenizer_dir: models.location(base).to_string(),
            config_dtype: dtype,
            layers: None,
            chat_template: None,
            tokenizer_files: Vec::new(),
            vocab_size: None,
            dequantized: false,
            config_yaml: cfg.source.clone(),
            method_pretty: "mergekit-moe".to_string(),
            method_url: None,
            base_reference: Some(base_ref.clone()),
            references,
            generated: Some(GeneratedFiles {
                config_json: crate::output::to_pretty_json(&config_json),
                card,
                config_file: "mergekit_moe_config.yml".to_string(),
                tokenizer_config: tokenizer_config_with_pad(models.location(base))?,
            }),
        },
        vocabulary: None,
    };
    Ok(MoePlan { plan, report })
}

/// The gate vectors of `gated` (experts, then the gated shared experts), and
/// what computing them costs.
fn gates(
    cfg: &MoeConfig,
    opts: &PlanOptions,
    models: &InputModels,
    base: usize,
    gated: &[&Expert],
    layers: u64,
    hidden: u64,
) -> Result<(Gates, String), MoeError> {
    let (l, h, n) = (layers as usize, hidden as usize, gated.len());
    let mode = cfg.gate_mode.value;
    if mode.is_random() {
        let g = router::random(mode, opts.seed, l, n, h);
        return Ok((
            g,
            format!(
                "{} values drawn from seed {} (no model read)",
                l * n * h,
                opts.seed
            ),
        ));
    }
    // The prompts, tokenized with the base's tokenizer.
    let loc = models.location(base);
    let st = storage::for_location(loc);
    let tok_loc = st.join(loc, "tokenizer.json");
    let bytes = st.read_all(&tok_loc).map_err(|e| {
        MoeError::Inputs(format!(
            "gate_mode {} tokenizes the prompts with the base's tokenizer.json: {e}",
            mode.name()
        ))
    })?;
    let tokenizer = tokenizers::Tokenizer::from_bytes(&bytes)
        .map_err(|e| MoeError::Inputs(format!("{tok_loc}: not a tokenizer.json: {e}")))?;
    let bos = special_token(st.as_ref(), loc, "bos_token")?;
    let ids = router::tokenize(&tokenizer, &bos, gated).map_err(MoeError::Inputs)?;
    if mode != GateMode::CheapEmbed {
        // mergekit pads with the BOS token, else the EOS token.
        let eos = special_token(st.as_ref(), loc, "eos_token")?;
        let pad = [bos, eos]
            .iter()
            .filter(|t| !t.is_empty())
            .find_map(|t| tokenizer.token_to_id(t));
        // Problems of the base (its config.json, its weights) at `base_model`.
        return super::hidden::gates(mode.name(), models, base, gated, &ids, pad, l, h).map_err(
            |e| match e {
                MoeError::Inputs(m) => cfg_err(cfg, "base_model", cfg.base_model.span, m),
                other => other,
            },
        );
    }
    // cheap_embed: the embedding rows of the tokens.
    let mut wanted: Vec<u32> = ids
        .iter()
        .flat_map(|(p, n)| p.iter().chain(n).flatten().copied())
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let (rows, read) = super::hidden::embedding_rows(models, base, &wanted, h, mode.name())?;
    let tokens: usize = ids
        .iter()
        .map(|(p, n)| p.iter().chain(n).map(Vec::len).sum::<usize>())
        .sum();
    let g = router::cheap_embed(&ids, &rows, l, h);
    Ok((
        g,
        format!(
            "{tokens} prompt tokens; {} embedding rows read ({read} bytes) from the base",
            wanted.len(),
        ),
    ))
}

/// A special token's string in the base's `tokenizer_config.json` (`key`:
/// `bos_token` or `eos_token`, a string or an added-token mapping), or empty
/// (mergekit: `tokenizer.bos_token or ""`).
fn special_token(st: &dyn storage::Storage, loc: &str, key: &str) -> Result<String, MoeError> {
    let at = st.join(loc, "tokenizer_config.json");
    if !st.exists(&at)? {
        return Ok(String::new());
    }
    let v: serde_json::Value = serde_json::from_slice(&st.read_all(&at)?)
        .map_err(|e| MoeError::Inputs(format!("{at}: not JSON: {e}")))?;
    Ok(match v.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(m)) => m
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    })
}

/// The base's `tokenizer_config.json` with mergekit-moe's pad token: the BOS
/// token, else the EOS token (`tokenizer.pad_token_id = bos_token_id`, then
/// `pad_token = eos_token` when there is no BOS); `None` when the base has no
/// such file or neither token.
fn tokenizer_config_with_pad(loc: &str) -> Result<Option<String>, MoeError> {
    let st = storage::for_location(loc);
    let at = st.join(loc, "tokenizer_config.json");
    if !st.exists(&at)? {
        return Ok(None);
    }
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&st.read_all(&at)?)
            .map_err(|e| MoeError::Inputs(format!("{at}: not a JSON object: {e}")))?;
    let pad = ["bos_token", "eos_token"]
        .iter()
        .find_map(|k| v.get(*k).filter(|t| !t.is_null()).cloned());
    let Some(pad) = pad else {
        return Ok(None);
    };
    v.insert("pad_token".to_string(), pad);
    Ok(Some(crate::output::to_pretty_json(&v)))
}
