//! The contract travels: a unit written as the JSON bytes a gRPC lease carries
//! (`serde_json::to_vec` in the coordinator, `serde_json::from_slice` in the
//! worker) reads back as the same unit, and a valid unit stays valid. Checked
//! for arbitrary valid units and for every unit the planner writes for the
//! conformance cases.

use super::*;
use crate::methods::{self, BasePolicy, ParamKind, Scope};
use proptest::prelude::*;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The plan of the conformance case `case` (tests/fixtures/cases), in shards
/// of `shard` bytes.
pub(crate) fn plan_case(case: &str, shard: u64) -> crate::plan::Plan {
    let path = root()
        .join("tests/fixtures/cases")
        .join(case)
        .join("config.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    let cfg = crate::config::MergeConfig::parse("config.yaml", &yaml).unwrap();
    crate::plan::plan(
        &cfg,
        &crate::plan::PlanOptions {
            unit_size: None,
            out_shard_size: shard,
            seed: 7,
            allow_crimes: false,
            keep_fp8: false,
            base_dir: root().join("examples"),
        },
    )
    .unwrap()
}

/// The conformance cases that plan (the `err_*` ones are refused on purpose).
pub(crate) fn planned_cases() -> Vec<String> {
    let mut cases: Vec<String> = std::fs::read_dir(root().join("tests/fixtures/cases"))
        .unwrap()
        .map(|c| c.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|c| !c.starts_with("err_") && !c.ends_with(".json"))
        .collect();
    cases.sort();
    cases
}

/// What the lease carries, and what the worker reads from it.
fn over_the_wire(unit: &WorkUnit) -> WorkUnit {
    let bytes = serde_json::to_vec(unit).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn planned_units_cross_the_wire_unchanged() {
    let mut units = 0;
    for case in planned_cases() {
        for shard in [crate::plan::DEFAULT_SHARD_SIZE, 100_000] {
            for u in plan_case(&case, shard).units {
                let back = over_the_wire(&u);
                assert_eq!(back, u, "{case}, unit {}", u.id);
                back.validate().unwrap_or_else(|e| panic!("{case}: {e}"));
                units += 1;
            }
        }
    }
    assert!(units > 40, "{units} units");
}

#[test]
fn unit_outputs_cross_the_wire_unchanged() {
    let out = UnitOutput {
        offset: 0,
        chunks: Vec::new(),
        unit: 3,
        file_name: "model-00004-of-00009.safetensors".into(),
        size: u64::MAX,
        sha256: "ab".repeat(32),
        tensors: vec!["a".into(), "b\u{e9}\"\\".into()],
        non_finite: vec![NonFinite {
            tensor: "a".into(),
            nan: 1,
            inf: u64::MAX,
        }],
    };
    let bytes = serde_json::to_vec(&out).unwrap();
    assert_eq!(serde_json::from_slice::<UnitOutput>(&bytes).unwrap(), out);
    let clean = UnitOutput {
        non_finite: Vec::new(),
        ..out
    };
    let bytes = serde_json::to_vec(&clean).unwrap();
    assert!(!String::from_utf8_lossy(&bytes).contains("non_finite"));
    assert_eq!(serde_json::from_slice::<UnitOutput>(&bytes).unwrap(), clean);
}

static FLOATS: [DType; 4] = [DType::BF16, DType::F16, DType::F32, DType::F64];
static ANY: [DType; 10] = [
    DType::BOOL,
    DType::U8,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::U64,
    DType::BF16,
    DType::F32,
    DType::F8_E4M3,
    DType::F8_E5M2,
];

/// A name as it may appear in a checkpoint: plain, or with characters JSON
/// escapes (quotes, backslashes, control and non-ASCII characters).
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z_]{1,8}(\\.[a-z0-9_]{1,8}){0,4}",
        1 => "[\"\\\\\\x00-\\x1f\u{e9}\u{4e2d}\u{1f600}a-z.]{1,12}",
    ]
}

fn shape(rank: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(1u64..6, rank)
}

/// A reference to `shape` of `dtype` at an arbitrary place.
fn tensor_ref(dtype: DType, shape: Vec<u64>) -> impl Strategy<Value = TensorRef> {
    let len = shape.iter().product::<u64>() * dtype.size() as u64;
    (0usize..8, name(), name(), 0..=u64::MAX - len).prop_map(move |(model, name, file, offset)| {
        TensorRef {
            model,
            name,
            location: format!("/models/{file}/model.safetensors"),
            offset,
            len,
            dtype,
            shape: shape.clone(),
            lora: None,
        }
    })
}

/// A parameter value of `kind`: fractions and whole numbers in its range, the
/// bounds included.
fn value(kind: ParamKind) -> BoxedStrategy<ParamValue> {
    match kind {
        ParamKind::Bool => any::<bool>().prop_map(ParamValue::Bool).boxed(),
        ParamKind::Number { min, max } => {
            let (lo, hi) = (min.max(-1e6), max.min(1e6));
            let (first, last) = (lo.ceil() as i64, hi.floor() as i64);
            let whole = if first <= last {
                (first..=last).prop_map(|i| i as f64).boxed()
            } else {
                Just(lo).boxed()
            };
            prop_oneof![
                (0.0..=1.0f64).prop_map(move |u| lo + u * (hi - lo)),
                whole,
                Just(lo),
                Just(hi),
            ]
            .prop_map(ParamValue::Number)
            .boxed()
        }
    }
}

/// Values for some of `method`'s parameters of the given scopes.
fn param_map(
    method: &'static dyn methods::MergeMethod,
    scopes: &'static [Scope],
) -> impl Strategy<Value = BTreeMap<String, ParamValue>> {
    let specs: Vec<_> = method
        .spec()
        .params
        .iter()
        .filter(|p| scopes.contains(&p.scope))
        .map(|p| prop::option::of(value(p.kind)).prop_map(move |v| (p.name, v)))
        .collect();
    specs.prop_map(|vs| {
        vs.into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v?)))
            .collect()
    })
}

/// Inputs (with the base's index) that fit `method`'s input contract.
fn input_count(
    method: &'static dyn methods::MergeMethod,
) -> impl Strategy<Value = (usize, Option<usize>)> {
    let spec = method.spec();
    let with_base: Vec<bool> = match spec.base {
        BasePolicy::Required => vec![true],
        BasePolicy::Ignored => vec![false],
        BasePolicy::Optional => vec![false, true],
    };
    let options: Vec<(usize, bool)> = with_base
        .into_iter()
        .flat_map(|b| {
            let lo = spec.min_inputs.max(spec.min_non_base + usize::from(b));
            let hi = spec
                .max_inputs
                .unwrap_or(lo + 3)
                .min(spec.max_non_base.map_or(lo + 3, |m| m + usize::from(b)));
            (lo..=hi).map(move |n| (n, b))
        })
        .collect();
    assert!(!options.is_empty(), "{} takes no input count", spec.name);
    prop::sample::select(options).prop_flat_map(|(n, b)| {
        let base = if b {
            (0..n).prop_map(Some).boxed()
        } else {
            Just(None).boxed()
        };
        (Just(n), base)
    })
}

/// How a tensor is produced, each way a planner writes one.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Merge,
    /// Some inputs block-scaled FP8, dequantized on read.
    Dequantized,
    /// Re-quantized to FP8: the weight, or its scales.
    Requantized {
        scales: bool,
    },
    Copy,
    /// Some inputs LoRA-adapted (`model+adapter` references).
    Adapted,
}

/// The LoRA factors of a 2-D input of `shape`: any rank and dtype, straight
/// or transposed, any finite scale.
fn lora_ref(shape: Vec<u64>) -> impl Strategy<Value = LoraRef> {
    let (rows, cols) = (shape[0], shape[1]);
    (
        1u64..5,
        any::<bool>(),
        prop::sample::select(FLOATS.to_vec()),
        prop::sample::select(FLOATS.to_vec()),
        -1e3..1e3f64,
    )
        .prop_flat_map(move |(rank, transposed, da, db, scale)| {
            let (y, x) = if transposed {
                (cols, rows)
            } else {
                (rows, cols)
            };
            (tensor_ref(da, vec![rank, x]), tensor_ref(db, vec![y, rank])).prop_map(
                move |(a, b)| LoraRef {
                    a,
                    b,
                    scale,
                    transposed,
                },
            )
        })
}

fn tensor(
    method: &'static dyn methods::MergeMethod,
    index: usize,
) -> impl Strategy<Value = OutputTensor> {
    let kind = prop_oneof![
        4 => Just(Kind::Merge),
        1 => Just(Kind::Dequantized),
        1 => any::<bool>().prop_map(|scales| Kind::Requantized { scales }),
        1 => Just(Kind::Copy),
        1 => Just(Kind::Adapted),
    ];
    (
        kind,
        input_count(method),
        name(),
        shape(0..=3),
        shape(2..=2),
        1u64..5,
        1u64..5,
    )
        .prop_flat_map(move |(kind, (n, base), name, nd, mat, b0, b1)| {
            let name = format!("{index}.{name}");
            let block = [b0, b1];
            let scale_shape = move |s: &[u64]| vec![s[0].div_ceil(b0), s[1].div_ceil(b1)];
            // The output dtype and shape, and each input's.
            let (out_dtype, out_shape, in_shape, requant) = match kind {
                Kind::Merge => (
                    prop::sample::select(FLOATS.to_vec()).boxed(),
                    nd.clone(),
                    nd,
                    None,
                ),
                Kind::Dequantized | Kind::Adapted => (
                    prop::sample::select(FLOATS.to_vec()).boxed(),
                    mat.clone(),
                    mat,
                    None,
                ),
                Kind::Requantized { scales } => {
                    let rq = Requant {
                        block,
                        weight: name.clone(),
                        weight_shape: mat.clone(),
                        scales,
                    };
                    if scales {
                        (Just(DType::F32).boxed(), scale_shape(&mat), mat, Some(rq))
                    } else {
                        (Just(DType::F8_E4M3).boxed(), mat.clone(), mat, Some(rq))
                    }
                }
                Kind::Copy => (
                    prop::sample::select(ANY.to_vec()).boxed(),
                    nd.clone(),
                    nd,
                    None,
                ),
            };
            let scaled = matches!(kind, Kind::Dequantized | Kind::Requantized { .. });
            (out_dtype, prop::collection::vec(any::<bool>(), n)).prop_flat_map(
                move |(out_dtype, fp8)| {
                    // Which inputs are FP8 with block scales (at least one of
                    // a dequantized tensor's).
                    let fp8: Vec<bool> = match kind {
                        Kind::Dequantized => {
                            let mut f = fp8.clone();
                            f[0] = true;
                            f
                        }
                        Kind::Requantized { .. } => fp8.clone(),
                        _ => vec![false; n],
                    };
                    // Which inputs are adapted (at least the first of an
                    // adapted tensor's).
                    let adapted: Vec<bool> = match kind {
                        Kind::Adapted => {
                            let mut a = fp8.clone();
                            a[0] = true;
                            a
                        }
                        _ => vec![false; n],
                    };
                    let inputs: Vec<BoxedStrategy<(TensorRef, Option<TensorRef>)>> = fp8
                        .iter()
                        .zip(&adapted)
                        .map(|(&f, &adapt)| {
                            let s = in_shape.clone();
                            if adapt {
                                prop::sample::select(FLOATS.to_vec())
                                    .prop_flat_map({
                                        let s = s.clone();
                                        move |d| (tensor_ref(d, s.clone()), lora_ref(s.clone()))
                                    })
                                    .prop_map(|(mut r, l)| {
                                        r.lora = Some(Box::new(l));
                                        (r, None)
                                    })
                                    .boxed()
                            } else if matches!(kind, Kind::Copy) {
                                tensor_ref(out_dtype, s).prop_map(|r| (r, None)).boxed()
                            } else if f {
                                let scales = prop::sample::select(FLOATS.to_vec()).prop_flat_map({
                                    let ss = scale_shape(&s);
                                    move |d| tensor_ref(d, ss.clone())
                                });
                                (tensor_ref(DType::F8_E4M3, s), scales)
                                    .prop_map(|(r, sc)| (r, Some(sc)))
                                    .boxed()
                            } else {
                                prop::sample::select(FLOATS.to_vec())
                                    .prop_flat_map(move |d| tensor_ref(d, s.clone()))
                                    .prop_map(|r| (r, None))
                                    .boxed()
                            }
                        })
                        .collect();
                    let params = if matches!(kind, Kind::Copy) {
                        Just(TensorParams::default()).boxed()
                    } else {
                        let per_input: Vec<_> = (0..n)
                            .map(|i| {
                                let scopes: &'static [Scope] = if Some(i) == base {
                                    &[Scope::Input]
                                } else {
                                    &[Scope::Input, Scope::NonBase]
                                };
                                param_map(method, scopes)
                            })
                            .collect();
                        (param_map(method, &[Scope::Shared]), per_input)
                            .prop_map(|(shared, per_input)| TensorParams { shared, per_input })
                            .boxed()
                    };
                    let (name, out_shape, requant) =
                        (name.clone(), out_shape.clone(), requant.clone());
                    (inputs, params).prop_map(move |(inputs, params)| {
                        let (inputs, scales): (Vec<TensorRef>, Vec<Option<TensorRef>>) =
                            inputs.into_iter().unzip();
                        let has_scales = scaled && scales.iter().any(Option::is_some);
                        OutputTensor {
                            name: name.clone(),
                            dtype: out_dtype,
                            shape: out_shape.clone(),
                            op: if matches!(kind, Kind::Copy) {
                                TensorOp::CopyIdentical
                            } else {
                                TensorOp::Merge
                            },
                            inputs,
                            base: if matches!(kind, Kind::Copy) {
                                None
                            } else {
                                base
                            },
                            params,
                            scales: if has_scales { scales } else { Vec::new() },
                            block: has_scales.then_some(block),
                            requant: requant.clone(),
                            vocab: None,
                            packed: None,
                        }
                    })
                },
            )
        })
}

/// A tensor with packed (MXFP4) inputs: at least the first input packed
/// (codes and scales), the others packed or float tensors of the decoded
/// shape; written as a float tensor, or as one half (codes or scales) of a
/// packed one.
fn packed_tensor(
    method: &'static dyn methods::MergeMethod,
    index: usize,
) -> impl Strategy<Value = OutputTensor> {
    use crate::dtype::packed::BlockFormat;
    (
        input_count(method),
        name(),
        1u64..3,
        1u64..4,
        1u64..3,
        prop_oneof![Just(None), any::<bool>().prop_map(Some)],
    )
        .prop_flat_map(move |((n, base), name, e, r, g, out)| {
            let name = format!("{index}.{name}");
            let layout = BlockFormat::Mxfp4.layout(&[e, r, g, 16]).unwrap();
            let decoded = layout.decoded_shape();
            let inputs: Vec<BoxedStrategy<(TensorRef, Option<TensorRef>)>> = (0..n)
                .map(|i| {
                    let packed = (
                        tensor_ref(DType::U8, layout.blocks_shape()),
                        tensor_ref(DType::U8, layout.scales_shape()),
                    )
                        .prop_map(|(b, s)| (b, Some(s)));
                    let float = prop::sample::select(FLOATS.to_vec()).prop_flat_map({
                        let d = decoded.clone();
                        move |dt| tensor_ref(dt, d.clone()).prop_map(|r| (r, None))
                    });
                    if i == 0 {
                        packed.boxed()
                    } else {
                        prop_oneof![packed, float].boxed()
                    }
                })
                .collect();
            let per_input: Vec<_> = (0..n)
                .map(|i| {
                    let scopes: &'static [Scope] = if Some(i) == base {
                        &[Scope::Input]
                    } else {
                        &[Scope::Input, Scope::NonBase]
                    };
                    param_map(method, scopes)
                })
                .collect();
            let params = (param_map(method, &[Scope::Shared]), per_input)
                .prop_map(|(shared, per_input)| TensorParams { shared, per_input });
            let out_dtype = prop::sample::select(FLOATS.to_vec());
            (inputs, params, out_dtype).prop_map(move |(inputs, params, out_dtype)| {
                let (inputs, scales): (Vec<TensorRef>, Vec<Option<TensorRef>>) =
                    inputs.into_iter().unzip();
                let (tensor_name, dtype, shape, out) = match out {
                    None => (name.clone(), out_dtype, decoded.clone(), None),
                    Some(scales) => (
                        format!("{name}{}", if scales { "_scales" } else { "_blocks" }),
                        DType::U8,
                        if scales {
                            layout.scales_shape()
                        } else {
                            layout.blocks_shape()
                        },
                        Some(PackedOut {
                            merged: name.clone(),
                            merged_shape: decoded.clone(),
                            scales,
                        }),
                    ),
                };
                OutputTensor {
                    name: tensor_name,
                    dtype,
                    shape,
                    op: TensorOp::Merge,
                    inputs,
                    base,
                    params,
                    scales,
                    block: None,
                    requant: None,
                    vocab: None,
                    packed: Some(Packed {
                        format: BlockFormat::Mxfp4,
                        out,
                    }),
                }
            })
        })
}

/// A unit a planner could write: any method, shard name, seed and id, and
/// tensors of every kind; only the method's own parameter rules (e.g. DELLA's
/// density ± epsilon) are met by filtering.
fn valid_unit() -> impl Strategy<Value = WorkUnit> {
    (
        0..methods::registry().len(),
        any::<usize>(),
        any::<u64>(),
        prop_oneof![Just(None), (1u64..200_000, 0u64..200_000).prop_map(Some)],
    )
        .prop_flat_map(|(method, id, seed, shard)| {
            let method = methods::registry()[method];
            let file_name = match shard {
                None => "model.safetensors".to_string(),
                Some((i, extra)) => format!("model-{i:05}-of-{:05}.safetensors", i + extra),
            };
            let tensors = (0usize..5)
                .prop_flat_map(move |n| {
                    (0..n)
                        .map(|i| prop_oneof![6 => tensor(method, i).boxed(), 1 => packed_tensor(method, i).boxed()])
                        .collect::<Vec<_>>()
                });
            tensors.prop_map(move |tensors| WorkUnit {
                part: None,
                format: PLAN_FORMAT,
                id,
                file_name: file_name.clone(),
                merge_method: method.spec().name.to_string(),
                seed,
                tensors,
            })
        })
        .prop_filter("the method's own parameter rules", |u| {
            let m = methods::get(&u.merge_method).unwrap();
            u.tensors
                .iter()
                .filter(|t| t.op == TensorOp::Merge)
                .all(|t| m.validate(&t.params, t.base).is_ok())
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn valid_units_cross_the_wire_unchanged(unit in valid_unit()) {
        unit.validate().map_err(|e| TestCaseError::fail(format!("generated: {e}")))?;
        let bytes = serde_json::to_vec(&unit).unwrap();
        let back: WorkUnit = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(&back, &unit);
        prop_assert!(back.validate().is_ok());
        // The bytes are a function of the unit: a second trip writes them again.
        prop_assert_eq!(serde_json::to_vec(&back).unwrap(), bytes);
    }
}
