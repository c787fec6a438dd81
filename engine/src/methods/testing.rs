//! Helpers for method unit tests (and the GPU path's): run a method on small
//! f32 tensors, build parameters.

use super::chunked::CHUNK;
use super::{MergeJob, MergeMethod, MethodError, OutputView, Segments, TensorParams, TensorView};
use crate::dtype::{decode_f32, encode_f32, DType};
use std::ops::Range;

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Runs `method` on f32 inputs and returns the f32 output.
pub fn run(
    method: &dyn MergeMethod,
    shape: &[u64],
    inputs: &[Vec<f32>],
    base: Option<usize>,
    params: &TensorParams,
) -> Result<Vec<f32>, MethodError> {
    run_dtype(method, shape, inputs, base, params, DType::F32, DType::F32)
}

/// Runs `method` on f32 inputs with a given seed.
pub fn run_seeded(
    method: &dyn MergeMethod,
    shape: &[u64],
    inputs: &[Vec<f32>],
    base: Option<usize>,
    params: &TensorParams,
    seed: u64,
) -> Vec<f32> {
    run_full(
        method,
        shape,
        inputs,
        base,
        params,
        DType::F32,
        DType::F32,
        seed,
    )
    .expect("method runs")
}

/// Runs `method` with inputs stored as `in_dtype` and output as `out_dtype`.
pub fn run_dtype(
    method: &dyn MergeMethod,
    shape: &[u64],
    inputs: &[Vec<f32>],
    base: Option<usize>,
    params: &TensorParams,
    in_dtype: DType,
    out_dtype: DType,
) -> Result<Vec<f32>, MethodError> {
    run_full(method, shape, inputs, base, params, in_dtype, out_dtype, 42)
}

#[allow(clippy::too_many_arguments)]
fn run_full(
    method: &dyn MergeMethod,
    shape: &[u64],
    inputs: &[Vec<f32>],
    base: Option<usize>,
    params: &TensorParams,
    in_dtype: DType,
    out_dtype: DType,
    seed: u64,
) -> Result<Vec<f32>, MethodError> {
    let bytes = run_bytes(
        method, shape, inputs, base, params, in_dtype, out_dtype, seed, None,
    )?;
    let mut res = vec![0f32; bytes.len() / out_dtype.size()];
    decode_f32(out_dtype, &bytes, &mut res);
    Ok(res)
}

/// `inputs` stored as `dtype`.
pub fn encode(inputs: &[Vec<f32>], dtype: DType) -> Vec<Vec<u8>> {
    inputs
        .iter()
        .map(|v| {
            let mut b = vec![0u8; v.len() * dtype.size()];
            encode_f32(dtype, v, &mut b);
            b
        })
        .collect()
}

/// An in-memory [`Segments`] source: serves ranges of the inputs' bytes
/// and collects what is emitted.
pub struct MemorySegments<'a> {
    pub elements: usize,
    pub inputs: Vec<(&'a [u8], usize)>,
    pub emitted: std::sync::Mutex<Vec<u8>>,
}

impl Segments for MemorySegments<'_> {
    fn elements(&self) -> usize {
        self.elements
    }
    fn with_inputs(&self, range: Range<usize>, f: &mut dyn FnMut(&[&[u8]])) {
        let parts: Vec<&[u8]> = self
            .inputs
            .iter()
            .map(|&(b, size)| &b[range.start * size..range.end * size])
            .collect();
        f(&parts)
    }
    fn emit(&self, bytes: &[u8]) {
        self.emitted.lock().unwrap().extend_from_slice(bytes);
    }
}

/// Runs `method` and returns the output bytes; with `segment` set, the
/// tensor is streamed in segments of that many elements, through an output
/// buffer of one segment.
#[allow(clippy::too_many_arguments)]
pub fn run_bytes(
    method: &dyn MergeMethod,
    shape: &[u64],
    inputs: &[Vec<f32>],
    base: Option<usize>,
    params: &TensorParams,
    in_dtype: DType,
    out_dtype: DType,
    seed: u64,
    segment: Option<usize>,
) -> Result<Vec<u8>, MethodError> {
    let encoded = encode(inputs, in_dtype);
    let source = segment.map(|elements| MemorySegments {
        elements,
        inputs: encoded.iter().map(|b| (&b[..], in_dtype.size())).collect(),
        emitted: Default::default(),
    });
    let job = MergeJob {
        name: "model.layers.0.mlp.up_proj.weight",
        shape,
        inputs: encoded
            .iter()
            .map(|b| TensorView {
                dtype: in_dtype,
                bytes: if segment.is_some() { &[] } else { b },
                scale: None,
                lora: None,
                packed: None,
            })
            .collect(),
        base,
        params,
        seed,
        stream: source.as_ref().map(|s| s as &dyn Segments),
    };
    let n = job.numel();
    let len = match segment {
        Some(e) => e.max(CHUNK).min(n.max(1)),
        None => n,
    };
    let mut bytes = vec![0u8; len * out_dtype.size()];
    let mut out = OutputView {
        dtype: out_dtype,
        bytes: &mut bytes,
    };
    method.merge(&job, &mut out)?;
    drop(job);
    Ok(match source {
        Some(s) => s.emitted.into_inner().unwrap(),
        None => bytes,
    })
}

pub fn params(
    shared: &[(&str, crate::unit::ParamValue)],
    per_input: &[&[(&str, crate::unit::ParamValue)]],
) -> TensorParams {
    TensorParams {
        shared: shared.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        per_input: per_input
            .iter()
            .map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect())
            .collect(),
    }
}

pub fn num(x: f64) -> crate::unit::ParamValue {
    crate::unit::ParamValue::Number(x)
}

pub fn flag(b: bool) -> crate::unit::ParamValue {
    crate::unit::ParamValue::Bool(b)
}
