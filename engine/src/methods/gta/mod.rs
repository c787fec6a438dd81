//! The generalized task arithmetic family (mergekit's
//! `generalized_task_arithmetic.py` and `sparsify.py`): task vectors
//! `δ_i = x_i − base` are sparsified, weighted, optionally sign-elected, summed,
//! optionally normalised by the (masked) weight sum, scaled by `lambda` and added
//! back to the base. The order is mergekit's: sparsify (with the L1-preserving
//! rescale) → weight → elect signs on the *weighted* deltas → masked sum → divide
//! by the masked weight sum → λ.
//!
//! Each member is a [`Gta`] registered with its sparsifier ([`sparsify`]: which
//! elements of each task vector survive) and its sign consensus
//! ([`consensus`]: how a chunk's weighted task vectors are combined); the
//! members a GPU computes describe themselves to it in [`device_op`].

mod consensus;
mod device_op;
mod sparsify;
#[cfg(test)]
mod tests;

use super::chunked::{self, CHUNK};
use super::device::DeviceOp;
use super::select;
use super::{
    BasePolicy, MergeMethod, MethodError, MethodSpec, ParamDefault, ParamKind, ParamProblem,
    ParamSpec, ParamValue, Scope, TensorParams,
};
use super::{MergeJob, OutputView};
use consensus::Combine;

/// How each task vector is thinned before merging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    None,
    /// Keep the `max(1, trunc(density·n))` largest magnitudes (TIES).
    Magnitude,
    /// Keep each element with probability `density` (DARE).
    Random,
    /// Drop the `gamma·n` largest and then the smallest magnitudes, keeping
    /// `trunc(density·n)` (Model Breadcrumbs).
    MagnitudeOutliers,
    /// Keep with a probability that grows with the magnitude's rank in its row,
    /// from `density − epsilon` to `density + epsilon` (DELLA).
    DellaMagprune,
}

/// How signs are elected per element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consensus {
    None,
    /// The sign of the sum of the weighted deltas (TIES); mergekit registers no
    /// method with its `count` variant.
    Sum,
}

pub struct Gta {
    spec: MethodSpec,
    sparsify: Sparsify,
    consensus: Consensus,
}

const fn number(
    name: &'static str,
    kind: ParamKind,
    scope: Scope,
    default: ParamDefault,
) -> ParamSpec {
    ParamSpec {
        name,
        kind,
        scope,
        default,
    }
}

const fn value(x: f64) -> ParamDefault {
    ParamDefault::Value(ParamValue::Number(x))
}

const NON_NEGATIVE: ParamKind = ParamKind::Number {
    min: 0.0,
    max: f64::MAX,
};

const fn common(normalize: bool, rescale: bool) -> [ParamSpec; 6] {
    [
        ParamSpec::shared_bool("int8_mask", false),
        ParamSpec::shared_bool("normalize", normalize),
        ParamSpec::shared_bool("rescale", rescale),
        number("lambda", ParamKind::ANY_NUMBER, Scope::Shared, value(1.0)),
        number(
            "weight",
            ParamKind::ANY_NUMBER,
            Scope::NonBase,
            ParamDefault::Required,
        ),
        number("density", ParamKind::FRACTION, Scope::NonBase, value(1.0)),
    ]
}

const fn with(base: [ParamSpec; 6], extra: ParamSpec) -> [ParamSpec; 7] {
    [base[0], base[1], base[2], base[3], base[4], base[5], extra]
}

const GAMMA: ParamSpec = number("gamma", ParamKind::FRACTION, Scope::NonBase, value(0.01));
const EPSILON: ParamSpec = number("epsilon", NON_NEGATIVE, Scope::NonBase, value(0.15));

const fn spec(
    name: &'static str,
    pretty_name: &'static str,
    url: &'static str,
    params: &'static [ParamSpec],
) -> MethodSpec {
    MethodSpec {
        name,
        pretty_name,
        reference_url: Some(url),
        params,
        base: BasePolicy::Required,
        min_inputs: 1,
        max_inputs: None,
        min_non_base: 0,
        max_non_base: None,
    }
}

static TASK_ARITHMETIC_PARAMS: [ParamSpec; 6] = common(false, false);
static TIES_PARAMS: [ParamSpec; 6] = common(true, false);
static DARE_PARAMS: [ParamSpec; 6] = common(false, true);
static BREADCRUMBS_PARAMS: [ParamSpec; 7] = with(common(false, false), GAMMA);
static DELLA_PARAMS: [ParamSpec; 7] = with(common(true, true), EPSILON);
static DELLA_LINEAR_PARAMS: [ParamSpec; 7] = with(common(false, true), EPSILON);

const DARE_URL: &str = "https://arxiv.org/abs/2311.03099";
const BREADCRUMBS_URL: &str = "https://arxiv.org/abs/2312.06795";
const DELLA_URL: &str = "https://arxiv.org/abs/2406.11617";

pub static TASK_ARITHMETIC: Gta = Gta {
    spec: spec(
        "task_arithmetic",
        "Task Arithmetic",
        "https://arxiv.org/abs/2212.04089",
        &TASK_ARITHMETIC_PARAMS,
    ),
    sparsify: Sparsify::None,
    consensus: Consensus::None,
};

pub static TIES: Gta = Gta {
    spec: spec(
        "ties",
        "TIES",
        "https://arxiv.org/abs/2306.01708",
        &TIES_PARAMS,
    ),
    sparsify: Sparsify::Magnitude,
    consensus: Consensus::Sum,
};

pub static DARE_LINEAR: Gta = Gta {
    spec: spec("dare_linear", "Linear DARE", DARE_URL, &DARE_PARAMS),
    sparsify: Sparsify::Random,
    consensus: Consensus::None,
};

pub static DARE_TIES: Gta = Gta {
    spec: spec("dare_ties", "DARE TIES", DARE_URL, &DARE_PARAMS),
    sparsify: Sparsify::Random,
    consensus: Consensus::Sum,
};

pub static BREADCRUMBS: Gta = Gta {
    spec: spec(
        "breadcrumbs",
        "Model Breadcrumbs",
        BREADCRUMBS_URL,
        &BREADCRUMBS_PARAMS,
    ),
    sparsify: Sparsify::MagnitudeOutliers,
    consensus: Consensus::None,
};

pub static BREADCRUMBS_TIES: Gta = Gta {
    spec: spec(
        "breadcrumbs_ties",
        "Model Breadcrumbs with TIES",
        BREADCRUMBS_URL,
        &BREADCRUMBS_PARAMS,
    ),
    sparsify: Sparsify::MagnitudeOutliers,
    consensus: Consensus::Sum,
};

pub static DELLA: Gta = Gta {
    spec: spec("della", "DELLA", DELLA_URL, &DELLA_PARAMS),
    sparsify: Sparsify::DellaMagprune,
    consensus: Consensus::Sum,
};

pub static DELLA_LINEAR: Gta = Gta {
    spec: spec(
        "della_linear",
        "Linear DELLA",
        DELLA_URL,
        &DELLA_LINEAR_PARAMS,
    ),
    sparsify: Sparsify::DellaMagprune,
    consensus: Consensus::None,
};

/// `lambda`: the scale of the merged task vector.
fn lambda(job: &MergeJob) -> f32 {
    job.params.shared_f64("lambda").unwrap_or(1.0) as f32
}

/// What `normalize` divides by without sign election: the weights' sum (1
/// when it is zero).
fn plain_divisor(weights: impl Iterator<Item = f32>) -> f32 {
    let sum = weights.fold(0.0f32, |a, w| a + w);
    if sum.abs() < 1e-8 {
        1.0
    } else {
        sum
    }
}

impl Gta {
    /// A boolean parameter of `job`, or the method's default when the plan
    /// did not resolve it.
    fn flag(&self, job: &MergeJob, name: &str) -> bool {
        job.params.shared_bool(name).unwrap_or_else(|| {
            match self.spec.param(name).map(|p| p.default) {
                Some(ParamDefault::Value(v)) => v.as_bool(),
                _ => false,
            }
        })
    }

    /// Whether the sparsified task vectors are rescaled to their L1 norm.
    fn rescales(&self, job: &MergeJob) -> bool {
        self.flag(job, "rescale") && self.sparsify != Sparsify::None
    }

    fn chunk_size(&self, job: &MergeJob) -> usize {
        match self.sparsify {
            Sparsify::DellaMagprune => chunked::row_chunk(job.row_len()),
            _ => CHUNK,
        }
    }
}

impl MergeMethod for Gta {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }

    fn validate(&self, params: &TensorParams, base: Option<usize>) -> Result<(), ParamProblem> {
        if self.sparsify != Sparsify::DellaMagprune {
            return Ok(());
        }
        for (i, p) in params.per_input.iter().enumerate() {
            if Some(i) == base {
                continue;
            }
            let density = p.get("density").map(|v| v.as_f64()).unwrap_or(1.0);
            let epsilon = p.get("epsilon").map(|v| v.as_f64()).unwrap_or(0.15);
            // mergekit's own rule (checked only when pruning happens).
            if density > 0.0
                && density < 1.0
                && (density + epsilon >= 1.0 || density - epsilon <= 0.0)
            {
                return Err(ParamProblem {
                    params: vec!["epsilon", "density"],
                    input: Some(i),
                    message: format!(
                        "density ± epsilon must lie inside (0, 1), but density {density} with \
                         epsilon {epsilon} spans [{:.4}, {:.4}]; lower epsilon or move density \
                         away from 0 and 1",
                        density - epsilon,
                        density + epsilon
                    ),
                });
            }
        }
        Ok(())
    }

    fn working_memory(&self, numel: u64, inputs: usize) -> u64 {
        let streams = inputs.saturating_sub(1);
        match self.sparsify {
            Sparsify::Magnitude => select::working_memory(numel, streams),
            // One stream at a time, twice (the band's two edges).
            Sparsify::MagnitudeOutliers => {
                select::working_memory(numel, 1) + numel.min(select::EXACT_LIMIT as u64) * 9
            }
            Sparsify::None | Sparsify::Random | Sparsify::DellaMagprune => 0,
        }
    }

    fn device_op(&self, job: &MergeJob) -> Option<DeviceOp> {
        self.task_vector_op(job).map(DeviceOp::TaskVectors)
    }

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let Some(base) = job.base else {
            return Err(job.invalid(self.spec.name, "needs a base model"));
        };
        let tvs = self.task_vectors(job, base);
        let combine = Combine {
            consensus: self.consensus,
            normalize: self.flag(job, "normalize"),
            lambda: lambda(job),
            plain_divisor: plain_divisor(tvs.iter().map(|tv| tv.weight)),
        };
        let weights: Vec<f32> = tvs.iter().map(|tv| tv.weight).collect();
        let k = tvs.len();
        let row_len = job.row_len();
        chunked::map_sized(job, out, self.chunk_size(job), |c, x, y| {
            let len = c.len;
            chunked::with_buffers(k + 2, len, |bufs| {
                let (w, rest) = bufs.split_at_mut(k);
                let (sum, div) = rest.split_at_mut(1);
                for (tv, w) in tvs.iter().zip(w.iter_mut()) {
                    tv.weighted(c, x, base, row_len, &mut w[..len]);
                }
                combine.chunk(&weights, w, &mut sum[0], &mut div[0], x[base], y);
            })
        });
        Ok(())
    }
}
