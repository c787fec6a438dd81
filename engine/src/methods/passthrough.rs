//! `passthrough`: copies its single input, optionally multiplied by `scale`
//! (frankenmerges built from `slices`). Without a scale and with an unchanged
//! dtype it copies the bytes, so the output is the input bit for bit.

use super::chunked;
use super::{
    BasePolicy, MergeMethod, MethodError, MethodSpec, ParamDefault, ParamKind, ParamSpec, Scope,
};
use super::{MergeJob, OutputView};

pub struct Passthrough;

static SPEC: MethodSpec = MethodSpec {
    name: "passthrough",
    pretty_name: "Passthrough",
    reference_url: None,
    params: &[ParamSpec {
        name: "scale",
        kind: ParamKind::ANY_NUMBER,
        scope: Scope::Input,
        default: ParamDefault::Absent,
    }],
    base: BasePolicy::Ignored,
    min_inputs: 1,
    max_inputs: Some(1),
    min_non_base: 0,
    max_non_base: None,
};

impl MergeMethod for Passthrough {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let [input] = job.inputs.as_slice() else {
            return Err(job.invalid(
                "passthrough",
                format!("expects exactly one input, got {}", job.inputs.len()),
            ));
        };
        let scale = job.params.input_f64(0, "scale");
        match scale {
            None if input.dtype == out.dtype
                && input.scale.is_none()
                && input.lora.is_none()
                && input.packed.is_none() =>
            {
                chunked::copy(job, 0, out)
            }
            _ => {
                let s = scale.unwrap_or(1.0) as f32;
                chunked::map(job, out, |_, xs, y| {
                    for (o, &x) in y.iter_mut().zip(xs[0]) {
                        *o = if scale.is_some() { x * s } else { x };
                    }
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::methods::testing::*;
    use crate::unit::TensorParams;

    #[test]
    fn copies_and_scales() {
        let p = TensorParams {
            per_input: vec![Default::default()],
            ..Default::default()
        };
        let x = vec![1.5f32, -2.0, f32::MIN_POSITIVE];
        assert_eq!(
            run(&Passthrough, &[3], std::slice::from_ref(&x), None, &p).unwrap(),
            x
        );
        let p = params(&[], &[&[("scale", num(0.5))]]);
        assert_eq!(
            run(&Passthrough, &[3], std::slice::from_ref(&x), None, &p).unwrap(),
            vec![0.75, -1.0, f32::MIN_POSITIVE * 0.5]
        );
    }

    #[test]
    fn converts_dtype_when_asked() {
        let p = TensorParams {
            per_input: vec![Default::default()],
            ..Default::default()
        };
        let x = vec![1.0f32 + 2f32.powi(-10)];
        let out = run_dtype(&Passthrough, &[1], &[x], None, &p, DType::F32, DType::BF16).unwrap();
        assert_eq!(out, vec![1.0]);
    }
}
