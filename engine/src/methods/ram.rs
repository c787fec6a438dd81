//! `ram` and `ramplus_tl` (Reinforced Agent Merging, mergekit 0.1.5 `ram.py`):
//! an element changed (|δ| > epsilon) by exactly one model takes that model's
//! change; one changed by several takes their mean; `ramplus_tl` additionally
//! boosts each model's unique changes by `1 + r·clamp(shared/unique, 0, alpha)`,
//! counted over the tensor.

use super::chunked;
use super::{
    BasePolicy, MergeMethod, MethodError, MethodSpec, ParamDefault, ParamKind, ParamSpec,
    ParamValue, Scope,
};
use super::{MergeJob, OutputView};

pub struct Ram {
    spec: MethodSpec,
    plus: bool,
}

const fn shared(name: &'static str, default: f64) -> ParamSpec {
    ParamSpec {
        name,
        kind: ParamKind::Number {
            min: 0.0,
            max: f64::MAX,
        },
        scope: Scope::Shared,
        default: ParamDefault::Value(ParamValue::Number(default)),
    }
}

const fn spec(
    name: &'static str,
    pretty_name: &'static str,
    params: &'static [ParamSpec],
) -> MethodSpec {
    MethodSpec {
        name,
        pretty_name,
        reference_url: Some("https://arxiv.org/abs/2601.13572"),
        params,
        base: BasePolicy::Required,
        min_inputs: 1,
        max_inputs: None,
        min_non_base: 0,
        max_non_base: None,
    }
}

static RAM_PARAMS: [ParamSpec; 1] = [shared("epsilon", 1e-5)];
static PLUS_PARAMS: [ParamSpec; 3] = [
    shared("r", 0.1),
    shared("alpha", 0.2),
    shared("epsilon", 1e-5),
];

pub static RAM: Ram = Ram {
    spec: spec("ram", "Reinforced Agent Merging", &RAM_PARAMS),
    plus: false,
};

pub static RAMPLUS_TL: Ram = Ram {
    spec: spec(
        "ramplus_tl",
        "Reinforced Agent Merging Plus (Tensor-Local)",
        &PLUS_PARAMS,
    ),
    plus: true,
};

impl MergeMethod for Ram {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let Some(base) = job.base else {
            return Err(job.invalid(self.spec.name, "needs a base model"));
        };
        let others = job.non_base();
        let k = others.len();
        let eps = job.params.shared_f64("epsilon").unwrap_or(1e-5) as f32;
        let active = |x: &[&[f32]], e: usize, s: usize| (x[others[s]][e] - x[base][e]).abs() > eps;
        // ramplus_tl: per model, how many of its active elements are shared / unique.
        let mut boost = vec![1.0f32; k];
        if self.plus && k > 0 {
            let (shared, unique) = chunked::fold_exact(
                job,
                || (vec![0u64; k], vec![0u64; k]),
                |(sh, un), c, x| {
                    for e in 0..c.len {
                        let count = (0..k).filter(|&s| active(x, e, s)).count();
                        for s in (0..k).filter(|&s| active(x, e, s)) {
                            if count == 1 {
                                un[s] += 1;
                            } else {
                                sh[s] += 1;
                            }
                        }
                    }
                },
                |(mut a, mut b), (c, d)| {
                    a.iter_mut().zip(c).for_each(|(x, y)| *x += y);
                    b.iter_mut().zip(d).for_each(|(x, y)| *x += y);
                    (a, b)
                },
            );
            let r = job.params.shared_f64("r").unwrap_or(0.1) as f32;
            let alpha = job.params.shared_f64("alpha").unwrap_or(0.2) as f32;
            for s in 0..k {
                let rho = shared[s] as f32 / (unique[s] as f32).max(eps);
                boost[s] = 1.0 + r * rho.clamp(0.0, alpha);
            }
        }
        chunked::map(job, out, |_, x, y| {
            for (e, o) in y.iter_mut().enumerate() {
                let b = x[base][e];
                let count = (0..k).filter(|&s| active(x, e, s)).count();
                let mut merged = 0.0f32;
                for s in (0..k).filter(|&s| active(x, e, s)) {
                    let z = x[others[s]][e] - b;
                    merged += if count == 1 {
                        z * boost[s]
                    } else {
                        z / count as f32
                    };
                }
                *o = b + merged;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testing::*;

    #[test]
    fn ram_by_hand() {
        // base 0, eps 0.1: e0 only a changed → 1; e1 both → mean (2 + 4)/2 = 3;
        // e2 below epsilon everywhere → base; e3 only b → -1.
        let p = params(&[("epsilon", num(0.1))], &[&[], &[], &[]]);
        let out = run(
            &RAM,
            &[4],
            &[
                vec![1.0, 2.0, 0.05, 0.0],
                vec![0.0, 4.0, 0.0, -1.0],
                vec![0.0; 4],
            ],
            Some(2),
            &p,
        )
        .unwrap();
        assert_eq!(out, vec![1.0, 3.0, 0.0, -1.0]);
    }

    #[test]
    fn ramplus_boosts_unique_changes() {
        // a: unique at e0, shared at e1 → rho = 1/1 → clamp to alpha 0.2 → boost 1 + 0.5·0.2 = 1.1.
        let p = params(
            &[("epsilon", num(0.1)), ("r", num(0.5)), ("alpha", num(0.2))],
            &[&[], &[], &[]],
        );
        let out = run(
            &RAMPLUS_TL,
            &[2],
            &[vec![1.0, 2.0], vec![0.0, 4.0], vec![0.0; 2]],
            Some(2),
            &p,
        )
        .unwrap();
        assert!((out[0] - 1.1).abs() < 1e-6 && out[1] == 3.0, "{out:?}");
    }
}
