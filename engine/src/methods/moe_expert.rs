//! `moe_expert`: how `fleetmerge moe` writes an expert's MLP tensor (not a
//! merge method of a config: [`super::get_for_unit`] knows it, [`super::get`]
//! does not). One input, copied; with mergekit-moe's `noise_and_scale`: an
//! expert's `noise_scale` adds N(0, noise_scale²) noise to each element, then its
//! `residual_scale` (`scale`, on `down_proj` only) multiplies. The noise is
//! counter-based ([`super::rng`]): a function of (seed, tensor name, element),
//! so a build gives the same bits wherever and however often a unit runs
//! (mergekit draws `torch.randn_like`).

use super::chunked;
use super::rng::Stream;
use super::{
    BasePolicy, MergeJob, MergeMethod, MethodError, MethodSpec, OutputView, ParamDefault,
    ParamKind, ParamSpec, Scope,
};

pub struct MoeExpert;

static SPEC: MethodSpec = MethodSpec {
    name: "moe_expert",
    pretty_name: "MoE expert copy",
    reference_url: None,
    params: &[
        ParamSpec {
            name: "scale",
            kind: ParamKind::ANY_NUMBER,
            scope: Scope::Input,
            default: ParamDefault::Absent,
        },
        ParamSpec {
            name: "noise_scale",
            kind: ParamKind::ANY_NUMBER,
            scope: Scope::Input,
            default: ParamDefault::Absent,
        },
    ],
    base: BasePolicy::Ignored,
    min_inputs: 1,
    max_inputs: Some(1),
    min_non_base: 0,
    max_non_base: None,
};

/// A standard normal draw for element `index` (Box-Muller on two uniforms).
#[inline(always)]
pub fn normal(s: &Stream, index: u64) -> f32 {
    let u1 = s.uniform(index.wrapping_mul(2));
    let u2 = s.uniform(index.wrapping_mul(2).wrapping_add(1));
    // 1 - u1 is in (0, 1]: the logarithm is finite.
    let r = (-2.0 * (1.0 - u1 as f64).ln()).sqrt();
    (r * (std::f64::consts::TAU * u2 as f64).cos()) as f32
}

impl MergeMethod for MoeExpert {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let [input] = job.inputs.as_slice() else {
            return Err(job.invalid(
                "moe_expert",
                format!("expects exactly one input, got {}", job.inputs.len()),
            ));
        };
        let scale = job.params.input_f64(0, "scale");
        let noise = job.params.input_f64(0, "noise_scale");
        if scale.is_none()
            && noise.is_none()
            && input.dtype == out.dtype
            && input.scale.is_none()
            && input.lora.is_none()
        {
            chunked::copy(job, 0, out);
            return Ok(());
        }
        let stream = Stream::new(job.seed, job.name, 0);
        chunked::map(job, out, |c, xs, y| {
            for (i, (o, &x)) in y.iter_mut().zip(xs[0]).enumerate() {
                let mut v = x;
                if let Some(n) = noise {
                    // mergekit: tensor + randn_like(tensor) * noise_scale.
                    v += normal(&stream, (c.start + i) as u64) * n as f32;
                }
                if let Some(s) = scale {
                    v *= s as f32;
                }
                *o = v;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testing::*;
    use crate::unit::TensorParams;

    #[test]
    fn copies_scales_and_adds_seeded_noise() {
        let x: Vec<f32> = (0..4096).map(|i| i as f32 * 0.25 - 7.0).collect();
        let p = TensorParams {
            per_input: vec![Default::default()],
            ..Default::default()
        };
        assert_eq!(
            run(&MoeExpert, &[4096], std::slice::from_ref(&x), None, &p).unwrap(),
            x
        );
        let p = params(&[], &[&[("scale", num(0.5))]]);
        let y = run(&MoeExpert, &[4096], std::slice::from_ref(&x), None, &p).unwrap();
        assert!(y.iter().zip(&x).all(|(y, x)| *y == x * 0.5));
        let p = params(&[], &[&[("noise_scale", num(0.1))]]);
        let a = run(&MoeExpert, &[4096], std::slice::from_ref(&x), None, &p).unwrap();
        let b = run(&MoeExpert, &[4096], std::slice::from_ref(&x), None, &p).unwrap();
        assert_eq!(a, b, "the noise is a function of seed, name and element");
        let d: Vec<f64> = a.iter().zip(&x).map(|(a, x)| (a - x) as f64).collect();
        let mean = d.iter().sum::<f64>() / d.len() as f64;
        let sd = (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d.len() as f64).sqrt();
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((sd - 0.1).abs() < 0.01, "sd {sd}");
    }

    #[test]
    fn normal_draws_are_standard() {
        let s = Stream::new(3, "model.layers.0.mlp.experts.1.w1.weight", 0);
        let n = 200_000u64;
        let xs: Vec<f64> = (0..n).map(|i| normal(&s, i) as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        assert!(xs.iter().all(|x| x.is_finite()));
    }
}
