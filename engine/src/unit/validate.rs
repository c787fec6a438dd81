//! [`WorkUnit::validate`]: a work unit arriving from another process is checked
//! the way a safetensors header is, before anything is read or written: every
//! name, dtype, shape, length, index and parameter that the executor would
//! otherwise trust. A unit the planner emits always passes; what fails is a unit
//! no planner would write (a bug, or a hostile coordinator).
//!
//! What this does not check, because it cannot be known from the unit alone:
//! that the inputs are what the unit says they are (the executor checks each
//! input reference against its file's own header), and `TensorRef::model`
//! (an index into the plan's model list, which a unit does not carry and nothing
//! downstream uses).
//!
//! An adapted input's LoRA factors are checked like inputs, and their shapes
//! against the input's: `A [r, in]` and `B [out, r]` for a weight `[out, in]`
//! (transposed: `A [r, out]`, `B [in, r]`).

use super::{
    LoraRef, OutputTensor, ParamValue, TensorOp, TensorRef, VocabAlignment, WorkUnit, PLAN_FORMAT,
};
use crate::dtype::DType;
use crate::methods::{self, BasePolicy, ParamKind, Scope};
use std::collections::HashSet;

/// Longest tensor name accepted (real ones are well under 200 bytes).
pub const MAX_NAME_LEN: usize = 1024;
/// Most dimensions a tensor may have.
pub const MAX_RANK: usize = 16;
/// Most output bytes one unit may write: 1 TiB (a shard is 5 GB by default; a
/// single tensor larger than the shard size gets a unit of its own).
pub const MAX_UNIT_BYTES: u64 = 1 << 40;

/// Why a work unit was refused: the unit, the tensor and the field concerned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid work unit {unit} ({file}): {place}{field}: {message}")]
pub struct UnitError {
    pub unit: usize,
    /// The unit's file name (quoted, shortened).
    pub file: String,
    /// `tensor NAME: ` (quoted, shortened), or empty for a unit-level field.
    pub place: String,
    /// The field, e.g. `inputs[2].len`.
    pub field: String,
    pub message: String,
}

/// A name from an untrusted unit, for a message: quoted, escaped, cut short.
fn quoted(s: &str) -> String {
    let mut out: String = s.chars().take(96).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    format!("{out:?}")
}

/// Whether `name` is a shard file name the planner writes: `model.safetensors`
/// or `model-NNNNN-of-NNNNN.safetensors` (at least five digits each, 1 <= N <= of).
pub fn is_shard_file_name(name: &str) -> bool {
    if name == "model.safetensors" {
        return true;
    }
    let Some(rest) = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let Some((i, n)) = rest.split_once("-of-") else {
        return false;
    };
    let number = |s: &str| {
        (s.len() >= 5 && s.len() <= 12 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    matches!((number(i), number(n)), (Some(i), Some(n)) if i >= 1 && i <= n)
}

/// Elements of `shape`, or `None` when the product overflows.
fn elements(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
}

/// Bytes of a `dtype` tensor of `shape`, or `None` on overflow.
fn byte_len(dtype: DType, shape: &[u64]) -> Option<u64> {
    elements(shape)?.checked_mul(dtype.size() as u64)
}

/// The shape of the block scales of a 2-D `shape` in `block`-sized blocks.
fn scale_shape(shape: &[u64], block: [u64; 2]) -> Option<Vec<u64>> {
    match shape {
        [rows, cols] if block[0] > 0 && block[1] > 0 => {
            Some(vec![rows.div_ceil(block[0]), cols.div_ceil(block[1])])
        }
        _ => None,
    }
}

struct Checker<'a> {
    unit: &'a WorkUnit,
}

impl Checker<'_> {
    fn err(&self, tensor: Option<&str>, field: &str, message: String) -> UnitError {
        UnitError {
            unit: self.unit.id,
            file: quoted(&self.unit.file_name),
            place: tensor
                .map(|t| format!("tensor {}: ", quoted(t)))
                .unwrap_or_default(),
            field: field.to_string(),
            message,
        }
    }

    // Field names are built only for an error (a unit has tens of thousands).
    fn name(
        &self,
        tensor: Option<&str>,
        field: impl Fn() -> String,
        name: &str,
    ) -> Result<(), UnitError> {
        if name.is_empty() {
            return Err(self.err(tensor, &field(), "empty name".into()));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(self.err(
                tensor,
                &field(),
                format!(
                    "name of {} bytes, longer than the limit of {MAX_NAME_LEN}",
                    name.len()
                ),
            ));
        }
        if name == "__metadata__" {
            return Err(self.err(
                tensor,
                &field(),
                "__metadata__ is the safetensors header's metadata key, not a tensor name".into(),
            ));
        }
        Ok(())
    }

    /// Rank, element count and byte length of a shape of `dtype`.
    fn shape(
        &self,
        tensor: &str,
        field: impl Fn() -> String,
        dtype: DType,
        shape: &[u64],
    ) -> Result<u64, UnitError> {
        if shape.len() > MAX_RANK {
            return Err(self.err(
                Some(tensor),
                &field(),
                format!("{} dimensions, more than {MAX_RANK}", shape.len()),
            ));
        }
        byte_len(dtype, shape).ok_or_else(|| {
            self.err(
                Some(tensor),
                &field(),
                format!("{shape:?} of {dtype} is too large to address (the size overflows)"),
            )
        })
    }

    /// One input (or scale) reference: name, shape, length, byte range.
    fn input(&self, t: &str, field: impl Fn() -> String, r: &TensorRef) -> Result<(), UnitError> {
        let field = |sub: &str| format!("{}.{sub}", field());
        self.name(Some(t), || field("name"), &r.name)?;
        if r.location.is_empty() {
            return Err(self.err(Some(t), &field("location"), "empty".into()));
        }
        let bytes = self.shape(t, || field("shape"), r.dtype, &r.shape)?;
        if r.len != bytes {
            return Err(self.err(
                Some(t),
                &field("len"),
                format!(
                    "{} bytes, but {:?} of {} is {bytes} bytes",
                    r.len, r.shape, r.dtype
                ),
            ));
        }
        if r.offset.checked_add(r.len).is_none() {
            return Err(self.err(
                Some(t),
                &field("offset"),
                format!("offset {} + len {} overflows", r.offset, r.len),
            ));
        }
        Ok(())
    }

    /// The LoRA factors of input `i` (`r`): float 2-D tensors whose shapes fit
    /// the input's, a finite scale, no adapter of their own.
    fn lora(&self, t: &str, i: usize, r: &TensorRef, l: &LoraRef) -> Result<(), UnitError> {
        let field = |sub: &str| format!("inputs[{i}].lora.{sub}");
        for (sub, f) in [("a", &l.a), ("b", &l.b)] {
            self.input(t, || field(sub), f)?;
            if f.lora.is_some() {
                return Err(self.err(
                    Some(t),
                    &field(sub),
                    "a LoRA factor has no adapter of its own".into(),
                ));
            }
            if !f.dtype.is_float() || f.shape.len() != 2 {
                return Err(self.err(
                    Some(t),
                    &field(sub),
                    format!(
                        "{} {:?}: LoRA factors are 2-D BF16, F16, F32 or F64",
                        f.dtype, f.shape
                    ),
                ));
            }
        }
        let [rows, cols] = r.shape[..] else {
            return Err(self.err(
                Some(t),
                &field("a"),
                format!(
                    "the input is {:?}: only 2-D weights are LoRA-adapted",
                    r.shape
                ),
            ));
        };
        // A [r, x], B [y, r]: (y, x) is the weight's (rows, cols), or
        // (cols, rows) when the delta is transposed.
        let (rank, x, y) = (l.a.shape[0], l.a.shape[1], l.b.shape[0]);
        let want = if l.transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        if rank == 0 || l.b.shape[1] != rank || (y, x) != want {
            return Err(self.err(
                Some(t),
                &field("b"),
                format!(
                    "A {:?} and B {:?} do not fit a {:?} weight{}: A is [r, {}] and B [{}, r]",
                    l.a.shape,
                    l.b.shape,
                    r.shape,
                    if l.transposed { " (transposed)" } else { "" },
                    want.1,
                    want.0
                ),
            ));
        }
        if !l.scale.is_finite() {
            return Err(self.err(
                Some(t),
                &field("scale"),
                format!("{} is not a finite number", l.scale),
            ));
        }
        Ok(())
    }

    fn tensor(
        &self,
        method: &dyn methods::MergeMethod,
        t: &OutputTensor,
    ) -> Result<u64, UnitError> {
        let name = t.name.as_str();
        let out_bytes = self.shape(name, || "shape".into(), t.dtype, &t.shape)?;
        if let TensorOp::Literal { hex } = &t.op {
            self.literal(t, hex, out_bytes)?;
            return Ok(out_bytes);
        }
        if t.inputs.is_empty() {
            return Err(self.err(Some(name), "inputs", "no inputs".into()));
        }
        for (i, r) in t.inputs.iter().enumerate() {
            self.input(name, || format!("inputs[{i}]"), r)?;
        }
        if let Some(b) = t.base {
            if b >= t.inputs.len() {
                return Err(self.err(
                    Some(name),
                    "base",
                    format!("index {b}, but the tensor has {} inputs", t.inputs.len()),
                ));
            }
        }
        let per_input = t.params.per_input.len();
        match t.op {
            TensorOp::CopyIdentical => {
                if t.vocab.is_some() {
                    return Err(self.err(
                        Some(name),
                        "vocab",
                        "a copied tensor is not re-indexed (vocabulary tensors are merged)".into(),
                    ));
                }
                for (i, r) in t.inputs.iter().enumerate() {
                    if r.dtype != t.dtype || r.shape != t.shape {
                        return Err(self.err(
                            Some(name),
                            &format!("inputs[{i}]"),
                            format!(
                                "{} {:?}, but a copied tensor keeps its input's dtype and shape \
                                 ({} {:?})",
                                r.dtype, r.shape, t.dtype, t.shape
                            ),
                        ));
                    }
                }
                if !t.scales.is_empty()
                    || t.block.is_some()
                    || t.requant.is_some()
                    || t.packed.is_some()
                {
                    return Err(self.err(
                        Some(name),
                        "op",
                        "a copied tensor has no block scales and is neither re-quantized nor \
                         packed"
                            .into(),
                    ));
                }
                if let Some(i) = t.inputs.iter().position(|r| r.lora.is_some()) {
                    return Err(self.err(
                        Some(name),
                        &format!("inputs[{i}].lora"),
                        "a copied tensor is not adapted (LoRA factors apply to merged weights)"
                            .into(),
                    ));
                }
                if per_input != 0 && per_input != t.inputs.len() {
                    return Err(self.err(
                        Some(name),
                        "params.per_input",
                        format!("{per_input} entries for {} inputs", t.inputs.len()),
                    ));
                }
            }
            TensorOp::Merge => self.merge(method, t)?,
            TensorOp::Literal { .. } => {}
        }
        Ok(out_bytes)
    }

    /// A tensor given by its bytes: nothing read, nothing merged, and exactly
    /// the tensor's bytes, in hex.
    fn literal(&self, t: &OutputTensor, hex: &str, out_bytes: u64) -> Result<(), UnitError> {
        let name = Some(t.name.as_str());
        if !t.inputs.is_empty() || !t.scales.is_empty() || t.base.is_some() {
            return Err(self.err(
                name,
                "inputs",
                "a literal tensor has no inputs, scales or base".into(),
            ));
        }
        if t.vocab.is_some() || t.requant.is_some() || t.block.is_some() {
            return Err(self.err(
                name,
                "op",
                "a literal tensor is neither re-indexed nor re-quantized".into(),
            ));
        }
        if !t.params.shared.is_empty() || !t.params.per_input.is_empty() {
            return Err(self.err(name, "params", "a literal tensor has no parameters".into()));
        }
        if hex.len() as u64 != out_bytes.saturating_mul(2) {
            return Err(self.err(
                name,
                "op.Literal.hex",
                format!(
                    "{} hex digits, but {} {:?} is {out_bytes} bytes",
                    hex.len(),
                    t.dtype,
                    t.shape
                ),
            ));
        }
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(self.err(name, "op.Literal.hex", "not hexadecimal digits".into()));
        }
        Ok(())
    }

    /// A vocabulary tensor's alignment: a merged, unquantized tensor whose
    /// rows are the alignment's, with runs and fills inside every input.
    fn vocab(&self, t: &OutputTensor, v: &VocabAlignment) -> Result<(), UnitError> {
        let name = t.name.as_str();
        if t.requant.is_some() || !t.scales.is_empty() || t.packed.is_some() {
            return Err(self.err(
                Some(name),
                "vocab",
                "a re-indexed vocabulary tensor is neither re-quantized, block-scaled nor packed"
                    .into(),
            ));
        }
        if t.shape.first() != Some(&v.rows) {
            return Err(self.err(
                Some(name),
                "vocab.rows",
                format!("{} rows, but the tensor's shape is {:?}", v.rows, t.shape),
            ));
        }
        let rows: Vec<u64> = t
            .inputs
            .iter()
            .map(|r| r.shape.first().copied().unwrap_or(0))
            .collect();
        v.validate(&rows)
            .map_err(|m| self.err(Some(name), "vocab", m))
    }

    fn merge(&self, method: &dyn methods::MergeMethod, t: &OutputTensor) -> Result<(), UnitError> {
        let name = t.name.as_str();
        let n = t.inputs.len();
        if let Some(p) = &t.packed {
            return self.packed(method, t, p);
        }
        // The shape every input has: the output's, or the re-quantized weight's.
        let merged_shape: &[u64] = match &t.requant {
            None => {
                if !t.dtype.is_float() {
                    return Err(self.err(
                        Some(name),
                        "dtype",
                        format!(
                            "{}: a merged tensor is written as BF16, F16, F32 or F64",
                            t.dtype
                        ),
                    ));
                }
                &t.shape
            }
            Some(rq) => {
                self.name(Some(name), || "requant.weight".into(), &rq.weight)?;
                self.shape(
                    name,
                    || "requant.weight_shape".into(),
                    DType::F32,
                    &rq.weight_shape,
                )?;
                let Some(scales) = scale_shape(&rq.weight_shape, rq.block) else {
                    return Err(self.err(
                        Some(name),
                        "requant",
                        format!(
                            "weight shape {:?} in blocks {:?}: re-quantized weights are 2-D \
                             with non-zero blocks",
                            rq.weight_shape, rq.block
                        ),
                    ));
                };
                let (want_dtype, want_shape) = if rq.scales {
                    (DType::F32, scales)
                } else {
                    (DType::F8_E4M3, rq.weight_shape.clone())
                };
                if t.dtype != want_dtype || t.shape != want_shape {
                    return Err(self.err(
                        Some(name),
                        "requant",
                        format!(
                            "output {} {:?}, but the {} of a {:?} weight in {:?} blocks are {} \
                             {:?}",
                            t.dtype,
                            t.shape,
                            if rq.scales { "scales" } else { "E4M3 values" },
                            rq.weight_shape,
                            rq.block,
                            want_dtype,
                            want_shape
                        ),
                    ));
                }
                &rq.weight_shape
            }
        };
        if let Some(v) = &t.vocab {
            self.vocab(t, v)?;
        }
        for (i, r) in t.inputs.iter().enumerate() {
            if !(r.dtype.is_float() || r.dtype.is_fp8()) {
                return Err(self.err(
                    Some(name),
                    &format!("inputs[{i}].dtype"),
                    format!("{}: merged inputs are floating-point", r.dtype),
                ));
            }
            if t.vocab.is_some() {
                // Rows checked with the alignment; the rest is the output's.
                if r.shape.len() != merged_shape.len() || r.shape[1..] != merged_shape[1..] {
                    return Err(self.err(
                        Some(name),
                        &format!("inputs[{i}].shape"),
                        format!(
                            "{:?}, but the re-indexed rows of the tensor are {:?}",
                            r.shape,
                            &merged_shape[1..]
                        ),
                    ));
                }
            } else if r.shape != merged_shape {
                return Err(self.err(
                    Some(name),
                    &format!("inputs[{i}].shape"),
                    format!("{:?}, but the tensor merges {merged_shape:?}", r.shape),
                ));
            }
        }
        for (i, r) in t.inputs.iter().enumerate() {
            if let Some(l) = &r.lora {
                self.lora(name, i, r, l)?;
            }
        }
        if !t.scales.is_empty() {
            if t.scales.len() != n {
                return Err(self.err(
                    Some(name),
                    "scales",
                    format!("{} entries for {n} inputs", t.scales.len()),
                ));
            }
            let Some(block) = t.block.filter(|b| b[0] > 0 && b[1] > 0) else {
                return Err(self.err(
                    Some(name),
                    "block",
                    format!(
                        "{:?}: block-scaled inputs need a non-zero block size",
                        t.block
                    ),
                ));
            };
            for (i, s) in t.scales.iter().enumerate() {
                let Some(s) = s else { continue };
                let field = format!("scales[{i}]");
                self.input(name, || field.clone(), s)?;
                let r = &t.inputs[i];
                let want = scale_shape(&r.shape, block).filter(|_| r.dtype.is_fp8());
                if want.as_ref() != Some(&s.shape) || !s.dtype.is_float() {
                    return Err(self.err(
                        Some(name),
                        &field,
                        format!(
                            "{} {:?}, but the block scales of a {} {:?} input in {block:?} \
                             blocks are {}",
                            s.dtype,
                            s.shape,
                            r.dtype,
                            r.shape,
                            match want {
                                Some(w) => format!("floats of shape {w:?}"),
                                None =>
                                    "not possible (only 2-D FP8 weights are block-scaled)".into(),
                            }
                        ),
                    ));
                }
            }
        }
        self.contract(method, t)
    }

    /// A tensor with packed inputs (see [`crate::unit::Packed`]): a float
    /// output of the decoded shape, or one half of a packed output; each
    /// input packed (U8 codes and scales whose decoded shape is the merge's)
    /// or a float tensor of the decoded shape; no FP8 block size, no
    /// re-quantization, no adapter.
    fn packed(
        &self,
        method: &dyn methods::MergeMethod,
        t: &OutputTensor,
        p: &crate::unit::Packed,
    ) -> Result<(), UnitError> {
        let name = t.name.as_str();
        let n = t.inputs.len();
        if t.requant.is_some() || t.block.is_some() || t.vocab.is_some() {
            return Err(self.err(
                Some(name),
                "packed",
                "a tensor with packed inputs has no FP8 block size, is not re-quantized and not \
                 re-indexed"
                    .into(),
            ));
        }
        let merged_shape: &[u64] = match &p.out {
            None => {
                if !t.dtype.is_float() {
                    return Err(self.err(
                        Some(name),
                        "dtype",
                        format!(
                            "{}: a merged tensor is written as BF16, F16, F32 or F64 (or packed)",
                            t.dtype
                        ),
                    ));
                }
                &t.shape
            }
            Some(po) => {
                self.name(Some(name), || "packed.out.merged".into(), &po.merged)?;
                self.shape(
                    name,
                    || "packed.out.merged_shape".into(),
                    DType::F32,
                    &po.merged_shape,
                )?;
                let Some(layout) = p.format.layout_for(&po.merged_shape) else {
                    return Err(self.err(
                        Some(name),
                        "packed.out.merged_shape",
                        format!(
                            "{:?}: {} holds [experts, columns, rows] tensors with columns in \
                             whole blocks of {}",
                            po.merged_shape,
                            p.format,
                            p.format.block_values()
                        ),
                    ));
                };
                let want = if po.scales {
                    layout.scales_shape()
                } else {
                    layout.blocks_shape()
                };
                if t.dtype != DType::U8 || t.shape != want {
                    return Err(self.err(
                        Some(name),
                        "packed.out",
                        format!(
                            "output {} {:?}, but the {} of a {:?} merge in {} are U8 {want:?}",
                            t.dtype,
                            t.shape,
                            if po.scales { "scales" } else { "codes" },
                            po.merged_shape,
                            p.format
                        ),
                    ));
                }
                &po.merged_shape
            }
        };
        if t.scales.len() != n || t.scales.iter().all(Option::is_none) {
            return Err(self.err(
                Some(name),
                "scales",
                format!(
                    "{} entries ({} set) for {n} inputs: every input has an entry, a packed \
                     one its scales, and at least one input is packed",
                    t.scales.len(),
                    t.scales.iter().flatten().count()
                ),
            ));
        }
        for (i, (r, s)) in t.inputs.iter().zip(&t.scales).enumerate() {
            if r.lora.is_some() {
                return Err(self.err(
                    Some(name),
                    &format!("inputs[{i}].lora"),
                    "a tensor with packed inputs is not adapted".into(),
                ));
            }
            let decoded = match s {
                None if r.dtype.is_float() => r.shape.clone(),
                None => {
                    return Err(self.err(
                        Some(name),
                        &format!("inputs[{i}].dtype"),
                        format!("{}: an input that is not packed is floating-point", r.dtype),
                    ))
                }
                Some(s) => {
                    let field = format!("scales[{i}]");
                    self.input(name, || field.clone(), s)?;
                    let layout = p.format.layout(&r.shape).filter(|_| r.dtype == DType::U8);
                    let Some(layout) = layout else {
                        return Err(self.err(
                            Some(name),
                            &format!("inputs[{i}]"),
                            format!(
                                "{} {:?}: {} codes are U8 [experts, rows, blocks, {}]",
                                r.dtype,
                                r.shape,
                                p.format,
                                p.format.block_bytes()
                            ),
                        ));
                    };
                    if s.dtype != DType::U8 || s.shape != layout.scales_shape() {
                        return Err(self.err(
                            Some(name),
                            &field,
                            format!(
                                "{} {:?}, but the scales of {} codes {:?} are U8 {:?}",
                                s.dtype,
                                s.shape,
                                p.format,
                                r.shape,
                                layout.scales_shape()
                            ),
                        ));
                    }
                    layout.decoded_shape()
                }
            };
            if decoded != merged_shape {
                return Err(self.err(
                    Some(name),
                    &format!("inputs[{i}].shape"),
                    format!(
                        "{:?} (decoded {decoded:?}), but the tensor merges {merged_shape:?}",
                        r.shape
                    ),
                ));
            }
        }
        self.contract(method, t)
    }

    /// The method's input contract and `t`'s parameters, as the planner
    /// checks them.
    fn contract(
        &self,
        method: &dyn methods::MergeMethod,
        t: &OutputTensor,
    ) -> Result<(), UnitError> {
        let name = t.name.as_str();
        let n = t.inputs.len();
        // The method's input contract and parameters, as the planner checks them.
        let spec = method.spec();
        let base_ok = match spec.base {
            BasePolicy::Required => t.base.is_some(),
            BasePolicy::Ignored => t.base.is_none(),
            BasePolicy::Optional => true,
        };
        if !base_ok {
            return Err(self.err(
                Some(name),
                "base",
                format!("{:?} does not fit merge method {}", t.base, spec.name),
            ));
        }
        let non_base = n - usize::from(t.base.is_some());
        if n < spec.min_inputs
            || spec.max_inputs.is_some_and(|m| n > m)
            || non_base < spec.min_non_base
            || spec.max_non_base.is_some_and(|m| non_base > m)
        {
            return Err(self.err(
                Some(name),
                "inputs",
                format!(
                    "{n} inputs ({non_base} besides the base) do not fit merge method {}",
                    spec.name
                ),
            ));
        }
        if t.params.per_input.len() != n {
            return Err(self.err(
                Some(name),
                "params.per_input",
                format!("{} entries for {n} inputs", t.params.per_input.len()),
            ));
        }
        let check = |field: &dyn Fn() -> String, key: &str, v: &ParamValue, shared: bool| {
            let p = spec
                .param(key)
                .filter(|p| (p.scope == Scope::Shared) == shared);
            let ok = match (p.map(|p| p.kind), v) {
                (None, _) => {
                    return Err(self.err(
                        Some(name),
                        &field(),
                        format!(
                            "not a {} parameter of {}",
                            if shared { "shared" } else { "per-model" },
                            spec.name
                        ),
                    ))
                }
                (Some(ParamKind::Bool), ParamValue::Bool(_)) => true,
                (Some(ParamKind::Number { min, max }), ParamValue::Number(x)) => {
                    x.is_finite() && *x >= min && *x <= max
                }
                _ => false,
            };
            if ok {
                Ok(())
            } else {
                Err(self.err(Some(name), &field(), format!("{v:?} is not a valid value")))
            }
        };
        for (k, v) in &t.params.shared {
            check(&|| format!("params.shared.{}", quoted(k)), k, v, true)?;
        }
        for (i, m) in t.params.per_input.iter().enumerate() {
            for (k, v) in m {
                check(
                    &|| format!("params.per_input[{i}].{}", quoted(k)),
                    k,
                    v,
                    false,
                )?;
            }
        }
        method
            .validate(&t.params, t.base)
            .map_err(|p| self.err(Some(name), "params", p.message))
    }
}

impl WorkUnit {
    /// Checks everything about the unit that can be checked without reading its
    /// inputs (see the module documentation of `unit::validate`). Every worker
    /// runs this before it reads or writes anything.
    pub fn validate(&self) -> Result<(), UnitError> {
        let c = Checker { unit: self };
        if self.format != PLAN_FORMAT {
            return Err(c.err(
                None,
                "format",
                format!(
                    "plan format {}, this build reads format {PLAN_FORMAT}",
                    self.format
                ),
            ));
        }
        if !is_shard_file_name(&self.file_name) {
            return Err(c.err(
                None,
                "file_name",
                "a shard is written as model.safetensors or model-NNNNN-of-NNNNN.safetensors \
                 inside the output folder"
                    .into(),
            ));
        }
        let method = methods::get_for_unit(&self.merge_method).ok_or_else(|| {
            c.err(
                None,
                "merge_method",
                format!(
                    "{} is not a merge method this build knows",
                    quoted(&self.merge_method)
                ),
            )
        })?;
        let mut names = HashSet::with_capacity(self.tensors.len());
        let mut total = 0u64;
        for t in &self.tensors {
            c.name(Some(&t.name), || "name".into(), &t.name)?;
            if !names.insert(t.name.as_str()) {
                return Err(c.err(
                    Some(&t.name),
                    "name",
                    "two output tensors have this name".into(),
                ));
            }
            let bytes = c.tensor(method, t)?;
            total = total.saturating_add(bytes);
            if total > MAX_UNIT_BYTES {
                return Err(c.err(
                    Some(&t.name),
                    "shape",
                    format!("the unit's output exceeds {MAX_UNIT_BYTES} bytes"),
                ));
            }
        }
        if let Some(p) = &self.part {
            c.part(p, total)?;
        }
        Ok(())
    }
}

/// Most tensors a shard written in parts may list (`part.shard_tensors`).
const MAX_SHARD_TENSORS: usize = 1 << 20;
/// Longest multipart upload id accepted.
const MAX_UPLOAD_ID: usize = 1024;

impl Checker<'_> {
    /// A part's place in its shard agrees with its tensors: its length is
    /// their bytes (and the shard's header, for the first part), it lies
    /// within the shard, and its upload chunks within the store's limits.
    fn part(&self, p: &crate::unit::UnitPart, own: u64) -> Result<(), UnitError> {
        let err = |field: &str, m: String| Err(self.err(None, field, m));
        if p.count < 2 || p.index >= p.count {
            return err("part", format!("part {} of {}", p.index, p.count));
        }
        if !(crate::unit::MIN_CHUNK..=MAX_UNIT_BYTES).contains(&p.chunk) {
            return err("part.chunk", format!("upload chunks of {} bytes", p.chunk));
        }
        let chunks = crate::unit::upload_chunks(p.len, p.chunk).len() as u64;
        if u64::from(p.first_chunk) + chunks > crate::unit::MAX_CHUNKS {
            return err(
                "part.first_chunk",
                format!("an upload of more than {} chunks", crate::unit::MAX_CHUNKS),
            );
        }
        if let Some(u) = &p.upload {
            // Empty on Azure (a blob's blocks need no upload id).
            if u.len() > MAX_UPLOAD_ID || u.chars().any(char::is_control) {
                return err("part.upload", "not an upload id".into());
            }
        }
        let header = if p.index == 0 {
            if p.offset != 0 || p.shard_tensors.len() > MAX_SHARD_TENSORS {
                return err(
                    "part.shard_tensors",
                    "the first part starts the shard and lists its tensors".into(),
                );
            }
            let mut names = HashSet::with_capacity(p.shard_tensors.len());
            for (name, _, _) in &p.shard_tensors {
                self.name(None, || "part.shard_tensors".into(), name)?;
                if !names.insert(name.as_str()) {
                    return err("part.shard_tensors", "two tensors have one name".into());
                }
            }
            let prefix = self
                .unit
                .tensors
                .iter()
                .zip(&p.shard_tensors)
                .all(|(t, (n, d, s))| &t.name == n && t.dtype == *d && &t.shape == s);
            if !prefix || p.shard_tensors.len() < self.unit.tensors.len() {
                return err(
                    "part.shard_tensors",
                    "the first part's tensors must begin the shard's list".into(),
                );
            }
            let layout = crate::unit::shard_layout(&p.shard_tensors);
            if layout.file_size != p.shard_size {
                return err(
                    "part.shard_size",
                    format!(
                        "{} bytes, its tensors make {}",
                        p.shard_size, layout.file_size
                    ),
                );
            }
            layout.header.len() as u64
        } else {
            if !p.shard_tensors.is_empty() || p.offset < 8 {
                return err(
                    "part.offset",
                    "a later part starts after the header and lists no shard tensors".into(),
                );
            }
            0
        };
        if p.len != own.saturating_add(header)
            || p.offset.saturating_add(p.len) > p.shard_size
            || p.shard_size > MAX_UNIT_BYTES.saturating_mul(crate::unit::MAX_CHUNKS)
        {
            return err(
                "part.len",
                format!(
                    "bytes {}..+{} of a {}-byte shard, for {own} bytes of tensors",
                    p.offset, p.len, p.shard_size
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::DEFAULT_SHARD_SIZE;
    use crate::unit::tests::{plan_case, planned_cases};
    use crate::unit::TensorParams;

    /// Every unit the planner writes for the conformance cases passes (one
    /// shard, and many small ones).
    #[test]
    fn planned_units_are_valid() {
        let mut checked = 0;
        for case in planned_cases() {
            for shard in [DEFAULT_SHARD_SIZE, 100_000] {
                for u in plan_case(&case, shard).units {
                    u.validate().unwrap_or_else(|e| panic!("{case}: {e}"));
                    checked += 1;
                }
            }
        }
        assert!(checked > 40, "{checked} units");
    }

    fn ties_unit() -> WorkUnit {
        plan_case("ties", DEFAULT_SHARD_SIZE).units.remove(0)
    }

    /// One mutation per rule: the error names the tensor and the field.
    #[test]
    fn each_rule_refuses_with_the_tensor_and_field() {
        type Mutation = fn(&mut WorkUnit);
        let cases: Vec<(&str, &str, Mutation)> = vec![
            ("format", "plan format 2", |u| u.format = 2),
            ("file_name", "file_name", |u| {
                u.file_name = "../x.safetensors".into()
            }),
            ("file_name", "file_name", |u| {
                u.file_name = "/etc/model.safetensors".into()
            }),
            ("file_name", "file_name", |u| {
                u.file_name = "model-00002-of-00001.safetensors".into()
            }),
            ("method", "merge_method", |u| u.merge_method = "nope".into()),
            ("empty name", "name: empty", |u| u.tensors[0].name.clear()),
            ("long name", "longer than", |u| {
                u.tensors[0].name = "x".repeat(2000)
            }),
            ("metadata", "__metadata__", |u| {
                u.tensors[1].name = "__metadata__".into()
            }),
            ("duplicate", "two output tensors", |u| {
                u.tensors[1].name = u.tensors[0].name.clone()
            }),
            ("rank", "dimensions", |u| u.tensors[0].shape = vec![1; 17]),
            ("overflow", "overflows", |u| {
                u.tensors[0].shape = vec![1 << 32, 1 << 32]
            }),
            ("out dtype", "dtype: I64", |u| {
                u.tensors[0].dtype = DType::I64
            }),
            ("copy dtype", "keeps its input", |u| {
                u.tensors[0].op = TensorOp::CopyIdentical;
                u.tensors[0].dtype = DType::F32;
            }),
            ("no inputs", "no inputs", |u| u.tensors[0].inputs.clear()),
            ("input len", "inputs[1].len", |u| {
                u.tensors[0].inputs[1].len -= 2
            }),
            ("input dtype", "inputs[0].len", |u| {
                u.tensors[0].inputs[0].dtype = DType::F32
            }),
            ("input int", "inputs[0].dtype", |u| {
                let r = &mut u.tensors[0].inputs[0];
                r.dtype = DType::I16;
            }),
            ("input shape", "inputs[2].shape", |u| {
                let r = &mut u.tensors[0].inputs[2];
                r.shape = vec![r.len / 2];
            }),
            ("input range", "offset", |u| {
                u.tensors[0].inputs[0].offset = u64::MAX - 1
            }),
            ("input name", "inputs[0].name", |u| {
                u.tensors[0].inputs[0].name.clear()
            }),
            ("base", "index 9", |u| u.tensors[0].base = Some(9)),
            ("base policy", "does not fit", |u| u.tensors[0].base = None),
            ("per_input", "params.per_input", |u| {
                u.tensors[0].params.per_input.pop();
            }),
            ("param name", "not a per-model parameter", |u| {
                u.tensors[0].params.per_input[0].insert("lambda".into(), ParamValue::Number(1.0));
            }),
            ("param value", "not a valid value", |u| {
                u.tensors[0].params.per_input[0]
                    .insert("density".into(), ParamValue::Number(f64::NAN));
            }),
            ("param kind", "not a valid value", |u| {
                u.tensors[0]
                    .params
                    .shared
                    .insert("normalize".into(), ParamValue::Number(1.0));
            }),
            ("scales", "scales", |u| u.tensors[0].scales = vec![None]),
            ("requant", "requant", |u| {
                u.tensors[0].requant = Some(crate::unit::Requant {
                    block: [128, 128],
                    weight: u.tensors[0].name.clone(),
                    weight_shape: u.tensors[0].shape.clone(),
                    scales: true,
                })
            }),
            ("total", "exceeds", |u| {
                // Consistent, but 2 TiB.
                let t = &mut u.tensors[0];
                t.shape = vec![1 << 40];
                for r in &mut t.inputs {
                    r.shape = vec![1 << 40];
                    r.len = 2 << 40;
                }
            }),
        ];
        let base = ties_unit();
        base.validate().unwrap();
        for (what, expect, mutate) in cases {
            let mut u = base.clone();
            mutate(&mut u);
            let e = u.validate().expect_err(what).to_string();
            assert!(e.contains(expect), "{what}: {e}");
            assert!(e.starts_with("invalid work unit 0 "), "{what}: {e}");
            if !matches!(what, "format" | "file_name" | "method") {
                assert!(e.contains("tensor \""), "{what}: names the tensor: {e}");
            }
        }
    }

    /// The rules of tensors with packed (MXFP4) inputs, one mutation each, on
    /// a planned gpt-oss unit: the error names the tensor and the field.
    #[test]
    fn packed_rules_refuse_with_the_tensor_and_field() {
        use crate::unit::PackedOut;
        type Mutation = fn(&mut OutputTensor);
        let cases: Vec<(&str, &str, Mutation)> = vec![
            ("scales shape", "scales[1]", |t| {
                let s = t.scales[1].as_mut().unwrap();
                s.shape = vec![s.len];
            }),
            ("scales dtype", "scales[0]", |t| {
                let s = t.scales[0].as_mut().unwrap();
                s.dtype = DType::I8;
            }),
            ("codes shape", "inputs[0]", |t| {
                let r = &mut t.inputs[0];
                r.shape = vec![r.len / 8, 8];
            }),
            ("decoded shape", "inputs[0].shape", |t| t.shape[1] += 1),
            ("no scales", "scales", |t| t.scales.truncate(1)),
            ("none packed", "at least one input is packed", |t| {
                for s in &mut t.scales {
                    *s = None;
                }
            }),
            ("fp8 block", "no FP8 block size", |t| {
                t.block = Some([128, 128])
            }),
            ("copied", "neither re-quantized nor packed", |t| {
                t.op = TensorOp::CopyIdentical;
                t.dtype = DType::U8;
                t.shape = t.inputs[0].shape.clone();
            }),
            ("adapted", "inputs[0].lora", |t| {
                let a = t.inputs[0].clone();
                t.inputs[0].lora = Some(Box::new(crate::unit::LoraRef {
                    a: a.clone(),
                    b: a,
                    scale: 1.0,
                    transposed: false,
                }));
            }),
            ("packed dtype", "packed.out", |t| {
                let p = t.packed.as_mut().unwrap();
                p.out = Some(PackedOut {
                    merged: t.name.clone(),
                    merged_shape: t.shape.clone(),
                    scales: false,
                });
            }),
            ("merged shape", "packed.out.merged_shape", |t| {
                let p = t.packed.as_mut().unwrap();
                p.out = Some(PackedOut {
                    merged: t.name.clone(),
                    merged_shape: vec![t.shape[0], 33, t.shape[2]],
                    scales: true,
                });
                t.dtype = DType::U8;
            }),
            ("float out", "dtype", |t| t.dtype = DType::U8),
        ];
        let base = plan_case("gptoss_ties", DEFAULT_SHARD_SIZE).units.remove(0);
        base.validate().unwrap();
        let i = base
            .tensors
            .iter()
            .position(|t| t.packed.is_some())
            .expect("a packed tensor");
        for (what, expect, mutate) in cases {
            let mut u = base.clone();
            mutate(&mut u.tensors[i]);
            let e = u.validate().expect_err(what).to_string();
            assert!(e.contains(expect), "{what}: {e}");
            assert!(
                e.contains(&format!("tensor \"{}\"", base.tensors[i].name)),
                "{what}: {e}"
            );
        }
    }

    /// A vocabulary tensor's alignment is checked against the tensor and its
    /// inputs: inputs keep their own row counts, every other rule still holds.
    #[test]
    fn vocab_alignments_are_checked() {
        use crate::unit::{Fill, RowFill, RowRun, VocabAlignment};
        let mut base = ties_unit();
        let i = base
            .tensors
            .iter()
            .position(|t| t.shape.len() == 2)
            .expect("a 2-D tensor");
        base.tensors.swap(0, i);
        let t = &mut base.tensors[0];
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let width = t.inputs[0].len / rows;
        // Input 0 loses its last row (filled from input 1); output has one
        // padding row more.
        t.inputs[0].shape = vec![rows - 1, cols];
        t.inputs[0].len -= width;
        t.shape = vec![rows + 1, cols];
        let n = t.inputs.len();
        let mut runs = vec![
            vec![RowRun {
                out: 0,
                src: 0,
                len: rows
            }];
            n
        ];
        runs[0] = vec![RowRun {
            out: 0,
            src: 0,
            len: rows - 1,
        }];
        t.vocab = Some(VocabAlignment {
            rows: rows + 1,
            tokens: rows,
            runs,
            fills: vec![RowFill {
                row: rows - 1,
                fill: Fill::Row {
                    input: 1,
                    row: rows - 1,
                },
            }],
        });
        base.validate().unwrap();
        type Mutation = fn(&mut WorkUnit);
        let cases: Vec<(&str, &str, Mutation)> = vec![
            ("rows", "vocab.rows", |u| {
                u.tensors[0].vocab.as_mut().unwrap().rows += 1
            }),
            ("run past input", "vocab", |u| {
                u.tensors[0].vocab.as_mut().unwrap().runs[0][0].len += 1
            }),
            ("hole", "neither copied nor filled", |u| {
                u.tensors[0].vocab.as_mut().unwrap().fills.clear()
            }),
            ("fill source", "which has", |u| {
                u.tensors[0].vocab.as_mut().unwrap().fills[0].fill = Fill::Row {
                    input: 0,
                    row: 1 << 40,
                }
            }),
            ("row maps", "row maps", |u| {
                u.tensors[0].vocab.as_mut().unwrap().runs.pop();
            }),
            ("columns", "inputs[1].shape", |u| {
                let r = &mut u.tensors[0].inputs[1];
                r.shape[1] /= 2;
                r.shape[0] *= 2;
            }),
            ("copy", "re-indexed", |u| {
                u.tensors[0].op = TensorOp::CopyIdentical;
            }),
        ];
        for (what, expect, mutate) in cases {
            let mut u = base.clone();
            mutate(&mut u);
            let e = u.validate().expect_err(what).to_string();
            assert!(e.contains(expect), "{what}: {e}");
            assert!(e.contains("tensor \""), "{what}: names the tensor: {e}");
        }
    }

    /// An adapted input's LoRA factors are checked like inputs, and their
    /// shapes against the input's.
    #[test]
    fn lora_factors_are_checked() {
        use crate::unit::LoraRef;
        let mut base = ties_unit();
        let i = base
            .tensors
            .iter()
            .position(|t| t.shape.len() == 2 && t.shape[0] != t.shape[1])
            .expect("a 2-D tensor that is not square");
        base.tensors.swap(0, i);
        let t = &mut base.tensors[0];
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let factor = |name: &str, shape: Vec<u64>| TensorRef {
            model: 0,
            name: name.into(),
            location: "/adapters/a/adapter_model.safetensors".into(),
            offset: 8,
            len: shape.iter().product::<u64>() * 4,
            dtype: DType::F32,
            shape,
            lora: None,
        };
        t.inputs[1].lora = Some(Box::new(LoraRef {
            a: factor("a", vec![4, cols]),
            b: factor("b", vec![rows, 4]),
            scale: 2.0,
            transposed: false,
        }));
        base.validate().unwrap();
        // Transposed, the factors swap their roles.
        let mut turned = base.clone();
        let l = turned.tensors[0].inputs[1].lora.as_mut().unwrap();
        l.transposed = true;
        l.a = factor("a", vec![4, rows]);
        l.b = factor("b", vec![cols, 4]);
        turned.validate().unwrap();
        type Mutation = fn(&mut WorkUnit);
        let cases: Vec<(&str, &str, Mutation)> = vec![
            ("rank", "inputs[1].lora.b", |u| {
                let l = u.tensors[0].inputs[1].lora.as_mut().unwrap();
                l.b.shape[1] = 5;
                l.b.len = l.b.shape.iter().product::<u64>() * 4;
            }),
            ("columns", "do not fit", |u| {
                let l = u.tensors[0].inputs[1].lora.as_mut().unwrap();
                l.a.shape[1] += 1;
                l.a.len += 16;
            }),
            ("transposed", "(transposed)", |u| {
                u.tensors[0].inputs[1].lora.as_mut().unwrap().transposed = true;
            }),
            ("rank 0", "do not fit", |u| {
                let l = u.tensors[0].inputs[1].lora.as_mut().unwrap();
                l.a.shape[0] = 0;
                l.a.len = 0;
                l.b.shape[1] = 0;
                l.b.len = 0;
            }),
            ("len", "inputs[1].lora.a.len", |u| {
                u.tensors[0].inputs[1].lora.as_mut().unwrap().a.len += 4;
            }),
            ("dtype", "LoRA factors are 2-D", |u| {
                let l = u.tensors[0].inputs[1].lora.as_mut().unwrap();
                l.a.dtype = DType::I32;
            }),
            ("rank 3", "LoRA factors are 2-D", |u| {
                let l = u.tensors[0].inputs[1].lora.as_mut().unwrap();
                l.a.shape.push(1);
            }),
            ("scale", "not a finite number", |u| {
                u.tensors[0].inputs[1].lora.as_mut().unwrap().scale = f64::INFINITY;
            }),
            ("nested", "no adapter of its own", |u| {
                let l = u.tensors[0].inputs[1].lora.as_mut().unwrap();
                l.a.lora = Some(l.clone());
            }),
            ("location", "inputs[1].lora.b.location", |u| {
                u.tensors[0].inputs[1]
                    .lora
                    .as_mut()
                    .unwrap()
                    .b
                    .location
                    .clear();
            }),
            ("1-D input", "only 2-D weights", |u| {
                let t = &mut u.tensors[0];
                t.shape = vec![t.numel()];
                for r in &mut t.inputs {
                    r.shape = vec![r.shape.iter().product()];
                }
            }),
            ("copy", "not adapted", |u| {
                let t = &mut u.tensors[0];
                t.op = TensorOp::CopyIdentical;
                t.dtype = t.inputs[0].dtype;
                t.base = None;
                t.params = Default::default();
            }),
        ];
        for (what, expect, mutate) in cases {
            let mut u = base.clone();
            mutate(&mut u);
            let e = u.validate().expect_err(what).to_string();
            assert!(e.contains(expect), "{what}: {e}");
            assert!(e.contains("tensor \""), "{what}: names the tensor: {e}");
        }
    }

    /// A literal tensor (a built MoE's router): exactly its bytes in hex, and
    /// nothing read, merged or re-indexed.
    #[test]
    fn literal_tensors() {
        let literal = |u: &mut WorkUnit| {
            let t = &mut u.tensors[0];
            t.inputs.clear();
            t.base = None;
            t.params = TensorParams::default();
            t.dtype = DType::BF16;
            t.shape = vec![2, 3];
            t.op = TensorOp::Literal {
                hex: "00".repeat(12),
            };
        };
        let mut u = ties_unit();
        literal(&mut u);
        u.validate().expect("a literal of 12 bytes");
        type Mutation = fn(&mut WorkUnit);
        let cases: Vec<(&str, Mutation)> = vec![
            ("hex digits, but", |u| {
                u.tensors[0].op = TensorOp::Literal {
                    hex: "00".repeat(11),
                }
            }),
            ("not hexadecimal", |u| {
                u.tensors[0].op = TensorOp::Literal {
                    hex: "zz".repeat(12),
                }
            }),
            ("has no inputs", |u| {
                let r = ties_unit().tensors[0].inputs[0].clone();
                u.tensors[0].inputs.push(r);
            }),
            ("no parameters", |u| {
                u.tensors[0]
                    .params
                    .shared
                    .insert("weight".into(), ParamValue::Number(1.0));
            }),
        ];
        for (expect, mutate) in cases {
            let mut u = ties_unit();
            literal(&mut u);
            mutate(&mut u);
            let e = u.validate().expect_err(expect).to_string();
            assert!(e.contains(expect), "{expect}: {e}");
        }
        // The internal method of built MoEs is a unit's method, not a config's.
        let mut u = ties_unit();
        literal(&mut u);
        u.merge_method = "moe_expert".into();
        let t = u.tensors.remove(1);
        u.tensors.truncate(1);
        let mut copy = t.clone();
        copy.inputs.truncate(1);
        copy.base = None;
        copy.params = TensorParams {
            shared: Default::default(),
            per_input: vec![Default::default()],
        };
        u.tensors.push(copy);
        u.validate().expect("moe_expert units");
        assert!(methods::get("moe_expert").is_none());
    }

    #[test]
    fn shard_names() {
        for ok in [
            "model.safetensors",
            "model-00001-of-00004.safetensors",
            "model-00004-of-00004.safetensors",
            "model-123456-of-200000.safetensors",
        ] {
            assert!(is_shard_file_name(ok), "{ok}");
        }
        for bad in [
            "",
            "x.safetensors",
            "model-0001-of-00004.safetensors",
            "model-00000-of-00004.safetensors",
            "model-00001-of-00004.safetensors/..",
            "sub/model.safetensors",
            "model-00001-of-0000a.safetensors",
            ".model.safetensors",
        ] {
            assert!(!is_shard_file_name(bad), "{bad}");
        }
    }
}
