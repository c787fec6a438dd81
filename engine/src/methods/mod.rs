//! Merge methods. Each method is one file: a unit struct implementing
//! [`MergeMethod`] (its parameter spec and its CPU merge) plus one line in
//! [`registry`]. A method is handed a [`MergeJob`] (see `job.rs`: the input
//! tensors' bytes, parameters, seed) and reads its inputs as f32 chunks through
//! the helpers of [`chunked`], never as whole f32 copies, so memory stays
//! bounded by a few chunks per thread.

mod arcee_fusion;
pub mod chunked;
pub mod device;
mod gta;
mod job;
mod karcher;
mod linear;
pub mod lora;
mod model_stock;
pub mod moe_expert;
mod multislerp;
mod nearswap;
mod nuslerp;
mod passthrough;
mod ram;
pub mod rng;
mod sce;
mod select;
mod slerp;
#[cfg(test)]
pub(crate) mod testing;
mod torch_sort;
mod torch_topk;

use crate::dtype::DType;
use crate::unit::{ParamValue, TensorParams};

pub use job::{BlockScale, Chunk, MergeJob, OutputView, Segments, TensorView};

/// The type of a parameter, with the range a number must lie in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamKind {
    Bool,
    /// A finite number in `[min, max]`.
    Number {
        min: f64,
        max: f64,
    },
}

impl ParamKind {
    pub const ANY_NUMBER: ParamKind = ParamKind::Number {
        min: f64::MIN,
        max: f64::MAX,
    };
    pub const FRACTION: ParamKind = ParamKind::Number { min: 0.0, max: 1.0 };
}

/// Which inputs a parameter is resolved for (mergekit 0.1.5's `ParameterScope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One value per output tensor, looked up without a model.
    Shared,
    /// One value per input, the base model included.
    Input,
    /// One value per input other than the base model.
    NonBase,
}

/// What a parameter defaults to when no level of the config sets it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamDefault {
    Required,
    /// Optional with no value (e.g. passthrough's `scale`).
    Absent,
    Value(ParamValue),
}

#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: ParamKind,
    pub scope: Scope,
    pub default: ParamDefault,
}

impl ParamSpec {
    pub const fn shared_bool(name: &'static str, default: bool) -> Self {
        ParamSpec {
            name,
            kind: ParamKind::Bool,
            scope: Scope::Shared,
            default: ParamDefault::Value(ParamValue::Bool(default)),
        }
    }
}

/// How a method relates to `base_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasePolicy {
    /// The base is just another input when present (linear, karcher, passthrough).
    Ignored,
    Optional,
    Required,
}

/// Everything the planner needs to know about a method without running it.
#[derive(Debug)]
pub struct MethodSpec {
    pub name: &'static str,
    /// Name and link printed in the model card, as mergekit prints them.
    pub pretty_name: &'static str,
    pub reference_url: Option<&'static str>,
    pub params: &'static [ParamSpec],
    pub base: BasePolicy,
    /// Bounds on the number of inputs (base included).
    pub min_inputs: usize,
    pub max_inputs: Option<usize>,
    /// Bounds on the number of non-base inputs.
    pub min_non_base: usize,
    pub max_non_base: Option<usize>,
}

impl MethodSpec {
    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }
}

/// A parameter value that is well-typed but unusable, found before any work starts.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamProblem {
    /// The parameters involved (the first one is where the message points).
    pub params: Vec<&'static str>,
    /// The input concerned, when the problem is with one input's value.
    pub input: Option<usize>,
    pub message: String,
}

/// A failure while computing a tensor.
#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    #[error("{method}: {message}")]
    Invalid {
        method: &'static str,
        message: String,
    },
}

/// A merge method: its spec, its checks, its CPU merge, and what a compute
/// device can compute of it.
pub trait MergeMethod: Send + Sync {
    fn spec(&self) -> &MethodSpec;

    /// Checks the resolved parameters of one tensor beyond their types and ranges
    /// (called by the planner, so errors surface before any work starts).
    fn validate(&self, _params: &TensorParams, _base: Option<usize>) -> Result<(), ParamProblem> {
        Ok(())
    }

    /// Computes the output tensor. `out` has the output dtype and shape of `job`.
    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError>;

    /// How a compute device computes `job` with the bytes of
    /// [`merge`](MergeMethod::merge), when it can; `None` (the default): only
    /// the CPU does. See [`device`].
    fn device_op(&self, _job: &MergeJob) -> Option<device::DeviceOp> {
        None
    }

    /// Bytes one [`merge`](MergeMethod::merge) of a tensor of `numel` elements
    /// from `inputs` inputs may hold beyond the per-thread chunk scratch (e.g.
    /// candidates of a top-k threshold): an upper bound, for memory estimates.
    fn working_memory(&self, _numel: u64, _inputs: usize) -> u64 {
        0
    }
}

/// Every method, by its mergekit name.
pub fn registry() -> &'static [&'static dyn MergeMethod] {
    static REGISTRY: &[&dyn MergeMethod] = &[
        &linear::Linear,
        &slerp::Slerp,
        &passthrough::Passthrough,
        &gta::TASK_ARITHMETIC,
        &gta::TIES,
        &gta::DARE_LINEAR,
        &gta::DARE_TIES,
        &gta::BREADCRUMBS,
        &gta::BREADCRUMBS_TIES,
        &gta::DELLA,
        &gta::DELLA_LINEAR,
        &sce::Sce,
        &ram::RAM,
        &ram::RAMPLUS_TL,
        &nuslerp::NuSlerp,
        &multislerp::MultiSlerp,
        &karcher::Karcher,
        &model_stock::ModelStock,
        &nearswap::NearSwap,
        &arcee_fusion::ArceeFusion,
    ];
    REGISTRY
}

/// The method registered under `name`.
pub fn get(name: &str) -> Option<&'static dyn MergeMethod> {
    registry().iter().copied().find(|m| m.spec().name == name)
}

/// The method a work unit names: a registered one, or one that only planners
/// other than a merge config's use (`moe_expert`, see [`moe_expert`]).
pub fn get_for_unit(name: &str) -> Option<&'static dyn MergeMethod> {
    get(name).or_else(|| {
        static INTERNAL: &[&dyn MergeMethod] = &[&moe_expert::MoeExpert];
        INTERNAL.iter().copied().find(|m| m.spec().name == name)
    })
}

/// Names of all registered methods, for error messages.
pub fn names() -> Vec<&'static str> {
    registry().iter().map(|m| m.spec().name).collect()
}

/// The dtype merge kernels compute in (f32 for every float input); kept here so
/// the CUDA path and the plan agree on one definition.
pub const COMPUTE_DTYPE: DType = DType::F32;
