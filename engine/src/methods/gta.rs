//! The generalized task arithmetic family (mergekit's
//! `generalized_task_arithmetic.py` and `sparsify.py`): task vectors
//! `δ_i = x_i − base` are sparsified, weighted, optionally sign-elected, summed,
//! optionally normalised by the (masked) weight sum, scaled by `lambda` and added
//! back to the base. The order is mergekit's: sparsify (with the L1-preserving
//! rescale) → weight → elect signs on the *weighted* deltas → masked sum → divide
//! by the masked weight sum → λ.

use super::kernel::{self, Chunk, MergeJob, OutputView, CHUNK};
use super::rng::Stream;
use super::select::{self, TieQuota, TopK};
use super::torch_sort;
use super::{
    BasePolicy, MergeMethod, MethodError, MethodSpec, ParamDefault, ParamKind, ParamProblem,
    ParamSpec, Scope,
};
use crate::unit::{ParamValue, TensorParams};

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

/// Which elements of one task vector survive sparsification.
enum Keep {
    All,
    Top(TopK),
    /// Breadcrumbs: among the `upper` largest but not among the `lower` largest.
    Band {
        upper: TopK,
        lower: TopK,
    },
    /// Exactly these elements (small tensors: torch's sort order replayed).
    Mask(Vec<bool>),
    Random {
        p: f32,
        rng: Stream,
    },
    Della {
        density: f32,
        epsilon: f32,
        rng: Stream,
    },
}

/// The per-input state the elementwise passes need.
struct TaskVector {
    input: usize,
    weight: f32,
    keep: Keep,
    /// L1-preserving rescale factor (1 when rescale is off).
    scale: f32,
}

/// `k` for a fraction of `n` elements, as mergekit's `int(density * n)`.
fn count(fraction: f64, n: u64) -> u64 {
    (fraction * n as f64) as u64
}

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

/// How many of `n` elements TIES keeps at `density`.
fn magnitude_k(density: f64, n: u64) -> u64 {
    if density >= 1.0 {
        n
    } else if density <= 0.0 {
        0
    } else {
        count(density, n).max(1)
    }
}

/// What a device kernel needs to run task_arithmetic, ties, dare_linear or
/// dare_ties on one tensor: the same parameters the CPU kernel resolves.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSetup {
    pub base: usize,
    pub streams: Vec<DeviceStream>,
    pub normalize: bool,
    pub rescale: bool,
    pub lambda: f32,
    /// TIES's sign election.
    pub sign_consensus: bool,
    /// Divisor of `normalize` without sign election.
    pub plain_divisor: f32,
}

/// One task vector: its input, weight and sparsification.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStream {
    pub input: usize,
    pub weight: f32,
    pub keep: DeviceKeep,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceKeep {
    All,
    /// The k largest magnitudes (ties from the highest index down).
    Top(u64),
    /// Each element with probability `p`, drawn from the stream `key`.
    Random {
        p: f32,
        key: u64,
    },
}

/// The [`DeviceSetup`] of `job` for the family member `method`; `None` for
/// the members with other sparsifiers (breadcrumbs, DELLA), or no base.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn device_setup(method: &str, job: &MergeJob) -> Option<DeviceSetup> {
    let gta = [&TASK_ARITHMETIC, &TIES, &DARE_LINEAR, &DARE_TIES]
        .into_iter()
        .find(|g| g.spec.name == method)?;
    let base = job.base?;
    let n = job.numel() as u64;
    let param =
        |i: usize, name: &str, default: f64| job.params.input_f64(i, name).unwrap_or(default);
    let streams: Vec<DeviceStream> = job
        .non_base()
        .into_iter()
        .map(|i| {
            let density = param(i, "density", 1.0);
            let keep = match gta.sparsify {
                Sparsify::Magnitude => match magnitude_k(density, n) {
                    k if k >= n => DeviceKeep::All,
                    k => DeviceKeep::Top(k),
                },
                Sparsify::Random if density < 1.0 => DeviceKeep::Random {
                    p: density as f32,
                    key: Stream::new(job.seed, job.name, i).key(),
                },
                _ => DeviceKeep::All,
            };
            DeviceStream {
                input: i,
                weight: param(i, "weight", 0.0) as f32,
                keep,
            }
        })
        .collect();
    Some(DeviceSetup {
        base,
        normalize: gta.flag(job, "normalize"),
        rescale: gta.rescales(job),
        lambda: lambda(job),
        sign_consensus: gta.consensus == Consensus::Sum,
        plain_divisor: plain_divisor(streams.iter().map(|s| s.weight)),
        streams,
    })
}

impl TaskVector {
    /// Fills `mask` with the survivors of this task vector within chunk `c`
    /// (`c` is row-aligned for DELLA).
    fn fill_mask(&self, c: Chunk, x: &[&[f32]], base: usize, row_len: usize, mask: &mut [bool]) {
        let delta = |e: usize| x[self.input][e] - x[base][e];
        match &self.keep {
            Keep::All => mask.fill(true),
            Keep::Mask(m) => mask.copy_from_slice(&m[c.start..c.start + c.len]),
            Keep::Top(t) => {
                let mut q = t.chunk_quota(c);
                for (e, m) in mask.iter_mut().enumerate() {
                    *m = t.keep(c.start + e, select::magnitude_key(delta(e)), &mut q);
                }
            }
            Keep::Band { upper, lower } => {
                let (mut qu, mut ql): (TieQuota, TieQuota) =
                    (upper.chunk_quota(c), lower.chunk_quota(c));
                for (e, m) in mask.iter_mut().enumerate() {
                    let key = select::magnitude_key(delta(e));
                    let up = upper.keep(c.start + e, key, &mut qu);
                    let low = lower.keep(c.start + e, key, &mut ql);
                    *m = up && !low;
                }
            }
            Keep::Random { p, rng } => {
                for (e, m) in mask.iter_mut().enumerate() {
                    *m = rng.keep((c.start + e) as u64, *p);
                }
            }
            Keep::Della {
                density,
                epsilon,
                rng,
            } => {
                let mut order: Vec<u32> = Vec::with_capacity(row_len);
                let mut keys: Vec<u32> = Vec::with_capacity(row_len);
                for r0 in (0..c.len).step_by(row_len.max(1)) {
                    let r1 = (r0 + row_len).min(c.len);
                    keys.clear();
                    keys.extend((r0..r1).map(|e| select::magnitude_key(delta(e))));
                    order.clear();
                    order.extend(0..keys.len() as u32);
                    // Ranks by ascending magnitude, ties by position.
                    order.sort_by_key(|&i| (keys[i as usize], i));
                    let n = keys.len();
                    for (rank, &i) in order.iter().enumerate() {
                        // mergekit's (rank − min)/(max − min); a row of one element
                        // is 0/0 there (an error): we take the middle.
                        let norm = if n > 1 {
                            rank as f32 / (n - 1) as f32
                        } else {
                            0.5
                        };
                        let p = (density - epsilon) + 2.0 * epsilon * norm;
                        let e = r0 + i as usize;
                        mask[e] = rng.keep((c.start + e) as u64, p);
                    }
                }
            }
        }
    }
}

impl TaskVector {
    /// Writes this task vector's surviving, rescaled and weighted deltas for
    /// chunk `c` into `w` (zero where pruned): `(x − base)·scale·weight`.
    fn weighted(&self, c: Chunk, x: &[&[f32]], base: usize, row_len: usize, w: &mut [f32]) {
        let (xi, xb) = (&x[self.input][..c.len], &x[base][..c.len]);
        let (scale, weight) = (self.scale, self.weight);
        match &self.keep {
            Keep::All | Keep::Top(TopK::All) => {
                for ((o, &a), &b) in w.iter_mut().zip(xi).zip(xb) {
                    *o = (a - b) * scale * weight;
                }
            }
            Keep::Top(TopK::Nothing) => w.fill(0.0),
            Keep::Top(TopK::Threshold { key, quota }) => {
                let t = *key;
                for ((o, &a), &b) in w.iter_mut().zip(xi).zip(xb) {
                    let d = a - b;
                    *o = if select::magnitude_key(d) > t {
                        d * scale * weight
                    } else {
                        0.0
                    };
                }
                // Keys equal to the threshold: this chunk's share of the ties.
                let mut q = quota.get(c.index).copied().unwrap_or_default();
                if q.take > 0 {
                    for ((o, &a), &b) in w.iter_mut().zip(xi).zip(xb) {
                        let d = a - b;
                        if select::magnitude_key(d) == t {
                            if q.skip > 0 {
                                q.skip -= 1;
                            } else if q.take > 0 {
                                q.take -= 1;
                                *o = d * scale * weight;
                            } else {
                                break;
                            }
                        }
                    }
                }
            }
            _ => MASK.with(|m| {
                let mut mask = m.borrow_mut();
                mask.clear();
                mask.resize(c.len, false);
                self.fill_mask(c, x, base, row_len, &mut mask);
                for (((o, &a), &b), &m) in w.iter_mut().zip(xi).zip(xb).zip(mask.iter()) {
                    *o = if m { (a - b) * scale * weight } else { 0.0 };
                }
            }),
        }
    }
}

thread_local! {
    /// Per-thread survivor mask for the sparsifiers that decide element by element.
    static MASK: std::cell::RefCell<Vec<bool>> = const { std::cell::RefCell::new(Vec::new()) };
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
            Sparsify::DellaMagprune => kernel::row_chunk(job.row_len()),
            _ => CHUNK,
        }
    }

    fn task_vectors(&self, job: &MergeJob, base: usize) -> Vec<TaskVector> {
        let others = job.non_base();
        let n = job.numel() as u64;
        let param =
            |i: usize, name: &str, default: f64| job.params.input_f64(i, name).unwrap_or(default);
        let magnitude_keys = |s: usize, x: &[&[f32]], out: &mut [u32]| {
            for ((o, &v), &b) in out.iter_mut().zip(x[others[s]]).zip(x[base]) {
                *o = select::magnitude_key(v - b);
            }
        };
        let keeps: Vec<Keep> = match self.sparsify {
            Sparsify::None => others.iter().map(|_| Keep::All).collect(),
            Sparsify::Magnitude => {
                let ks: Vec<u64> = others
                    .iter()
                    .map(|&i| magnitude_k(param(i, "density", 1.0), n))
                    .collect();
                select::top_k(job, &ks, magnitude_keys)
                    .into_iter()
                    .map(Keep::Top)
                    .collect()
            }
            Sparsify::MagnitudeOutliers => others
                .iter()
                .enumerate()
                .map(|(s, &i)| {
                    let d = param(i, "density", 1.0);
                    if d >= 1.0 {
                        return Keep::All;
                    }
                    let keep = count(d, n);
                    let top = count(param(i, "gamma", 0.01), n);
                    let bot = n.saturating_sub(keep + top);
                    if job.numel() <= select::EXACT_LIMIT {
                        // Sorted ascending positions [bot, bot + keep), in torch's order.
                        let keys: Vec<u32> = kernel::reduce(job, |c, x| {
                            let mut buf = vec![0u32; c.len];
                            magnitude_keys(s, x, &mut buf);
                            buf
                        })
                        .concat();
                        let order = torch_sort::argsort_ascending(&keys);
                        let mut mask = vec![false; job.numel()];
                        for &e in &order[bot as usize..(bot + keep) as usize] {
                            mask[e as usize] = true;
                        }
                        Keep::Mask(mask)
                    } else {
                        let single = |k: u64| -> TopK {
                            select::top_k(job, &[k], |_, x, out| magnitude_keys(s, x, out))
                                .pop()
                                .unwrap_or(TopK::Nothing)
                        };
                        Keep::Band {
                            upper: single(n - bot),
                            lower: single(n - bot - keep),
                        }
                    }
                })
                .collect(),
            Sparsify::Random => others
                .iter()
                .map(|&i| {
                    let d = param(i, "density", 1.0);
                    if d >= 1.0 {
                        Keep::All
                    } else {
                        Keep::Random {
                            p: d as f32,
                            rng: Stream::new(job.seed, job.name, i),
                        }
                    }
                })
                .collect(),
            Sparsify::DellaMagprune => others
                .iter()
                .map(|&i| {
                    let d = param(i, "density", 1.0);
                    if d >= 1.0 {
                        Keep::All
                    } else if d <= 0.0 {
                        Keep::Top(TopK::Nothing)
                    } else {
                        Keep::Della {
                            density: d as f32,
                            epsilon: param(i, "epsilon", 0.15) as f32,
                            rng: Stream::new(job.seed, job.name, i),
                        }
                    }
                })
                .collect(),
        };
        let mut tvs: Vec<TaskVector> = others
            .iter()
            .zip(keeps)
            .map(|(&input, keep)| TaskVector {
                input,
                weight: param(input, "weight", 0.0) as f32,
                keep,
                scale: 1.0,
            })
            .collect();
        if self.rescales(job) {
            let row_len = job.row_len();
            let parts = kernel::reduce_sized(job, self.chunk_size(job), |c, x| {
                let mut mask = vec![false; c.len];
                tvs.iter()
                    .map(|tv| {
                        tv.fill_mask(c, x, base, row_len, &mut mask);
                        let (mut before, mut after) = (0.0f64, 0.0f64);
                        for (e, &m) in mask.iter().enumerate() {
                            let d = (x[tv.input][e] - x[base][e]).abs() as f64;
                            before += d;
                            if m {
                                after += d;
                            }
                        }
                        [before, after]
                    })
                    .collect::<Vec<_>>()
            });
            for (s, tv) in tvs.iter_mut().enumerate() {
                let (mut before, mut after) = (0.0f64, 0.0f64);
                for p in &parts {
                    before += p[s][0];
                    after += p[s][1];
                }
                // mergekit: rescale only when both norms are at least 1e-7.
                if before >= 1e-7 && after >= 1e-7 {
                    tv.scale = (before / after) as f32;
                }
            }
        }
        tvs
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

    fn merge(&self, job: &MergeJob, out: &mut OutputView) -> Result<(), MethodError> {
        let Some(base) = job.base else {
            return Err(job.invalid(self.spec.name, "needs a base model"));
        };
        let tvs = self.task_vectors(job, base);
        let normalize = self.flag(job, "normalize");
        let lambda = lambda(job);
        let plain_divisor = plain_divisor(tvs.iter().map(|tv| tv.weight));
        let consensus = self.consensus;
        let k = tvs.len();
        let row_len = job.row_len();
        kernel::map_sized(job, out, self.chunk_size(job), |c, x, y| {
            let len = c.len;
            kernel::with_buffers(k + 2, len, |bufs| {
                let (w, rest) = bufs.split_at_mut(k);
                let (sum, div) = rest.split_at_mut(1);
                let (sum, div) = (&mut sum[0][..len], &mut div[0][..len]);
                for (tv, w) in tvs.iter().zip(w.iter_mut()) {
                    tv.weighted(c, x, base, row_len, &mut w[..len]);
                }
                // Stream-major sums: the same additions, in the same (model) order,
                // as an element-by-element fold, but in loops the compiler vectorizes.
                sum.fill(0.0);
                for w in w.iter() {
                    for (a, &v) in sum.iter_mut().zip(&w[..len]) {
                        *a += v;
                    }
                }
                let b = &x[base][..len];
                match consensus {
                    Consensus::None => {
                        for ((o, &m), &b) in y.iter_mut().zip(sum.iter()).zip(b) {
                            let mut m = if normalize { m / plain_divisor } else { m };
                            if lambda != 1.0 {
                                m *= lambda;
                            }
                            *o = b + m;
                        }
                    }
                    Consensus::Sum => {
                        y.fill(0.0);
                        div.fill(0.0);
                        for (tv, w) in tvs.iter().zip(w.iter()) {
                            let weight = tv.weight;
                            for (((o, d), &v), &total) in y
                                .iter_mut()
                                .zip(div.iter_mut())
                                .zip(&w[..len])
                                .zip(sum.iter())
                            {
                                // Zeros have sign 0 and never match the elected sign.
                                // Adding +0.0 leaves the running sums as they were
                                // (they start at +0.0 and never become -0.0).
                                // (`&`, not `&&`: branch-free, so the loop vectorizes.)
                                let agree = (v != 0.0) & ((v > 0.0) == (total >= 0.0));
                                *o += if agree { v } else { 0.0 };
                                *d += if agree { weight } else { 0.0 };
                            }
                        }
                        for ((o, &d), &b) in y.iter_mut().zip(div.iter()).zip(b) {
                            let divisor = if d == 0.0 { 1.0 } else { d };
                            let mut m = if normalize { *o / divisor } else { *o };
                            if lambda != 1.0 {
                                m *= lambda;
                            }
                            *o = b + m;
                        }
                    }
                }
            })
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::methods::kernel::testing::*;
    use crate::unit::TensorParams;

    fn ties(
        inputs: &[Vec<f32>],
        per: &[&[(&str, ParamValue)]],
        shared: &[(&str, ParamValue)],
    ) -> Vec<f32> {
        let n = inputs[0].len() as u64;
        let p = params(shared, per);
        run(&TIES, &[n], inputs, Some(inputs.len() - 1), &p).unwrap()
    }

    #[test]
    fn ties_by_hand() {
        // base 0; deltas a = [1, -2, 3, 0.5], b = [-1, -1, 1, 0] with weights 1 and 0.5,
        // density 1 (no pruning). Weighted: a' = [1, -2, 3, 0.5], b' = [-0.5, -0.5, 0.5, 0].
        // Signs of sums: [+, -, +, +]. Element 0: only a agrees → 1/1 = 1.
        // Element 1: both → (-2 - 0.5)/(1 + 0.5) = -5/3. Element 2: (3 + 0.5)/1.5 = 7/3.
        // Element 3: b's zero never votes → 0.5/1.
        let out = ties(
            &[
                vec![1.0, -2.0, 3.0, 0.5],
                vec![-1.0, -1.0, 1.0, 0.0],
                vec![0.0; 4],
            ],
            &[
                &[("weight", num(1.0)), ("density", num(1.0))],
                &[("weight", num(0.5)), ("density", num(1.0))],
                &[],
            ],
            &[],
        );
        assert_eq!(out, vec![1.0, -2.5f32 / 1.5, 3.5f32 / 1.5, 0.5]);
    }

    #[test]
    fn weights_scale_before_the_election() {
        // a = +1 (weight 0.1), b = -0.5 (weight 1): unweighted sum is +0.5, but the
        // weighted sum (0.1 - 0.5) is negative, so b wins: -0.5*1/1 = -0.5.
        let out = ties(
            &[vec![1.0], vec![-0.5], vec![0.0]],
            &[&[("weight", num(0.1))], &[("weight", num(1.0))], &[]],
            &[],
        );
        assert_eq!(out, vec![-0.5]);
    }

    #[test]
    fn magnitude_pruning_keeps_top_density() {
        // density 0.5 of 4 elements → the 2 largest |delta| of each model.
        let out = ties(
            &[vec![0.1, -0.4, 0.3, 0.2], vec![0.0; 4]],
            &[&[("weight", num(1.0)), ("density", num(0.5))], &[]],
            &[],
        );
        assert_eq!(out, vec![0.0, -0.4, 0.3, 0.0]);
    }

    #[test]
    fn zero_deltas_never_vote_and_agreeing_values_survive() {
        // Element where all deltas are zero stays at base; a single non-zero that
        // agrees with the (its own) sign is kept whole.
        let base = vec![0.25f32, 0.5];
        let a = vec![0.25f32, 0.75];
        let b = vec![0.25f32, 0.5];
        let out = ties(
            &[a, b, base],
            &[&[("weight", num(1.0))], &[("weight", num(1.0))], &[]],
            &[],
        );
        assert_eq!(out, vec![0.25, 0.75]);
    }

    #[test]
    fn single_model_density_one_is_bit_exact() {
        let base: Vec<f32> = (0..3000).map(|i| ((i as f32) * 0.1).sin() * 0.02).collect();
        let ft: Vec<f32> = base
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if i % 3 == 0 {
                    b
                } else {
                    b + ((i as f32) * 0.7).cos() * 0.004
                }
            })
            .collect();
        for dt in [DType::BF16, DType::F32] {
            let round = |v: &Vec<f32>| -> Vec<f32> {
                let mut bytes = vec![0u8; v.len() * dt.size()];
                crate::dtype::encode_f32(dt, v, &mut bytes);
                let mut r = vec![0f32; v.len()];
                crate::dtype::decode_f32(dt, &bytes, &mut r);
                r
            };
            let (b, x) = (round(&base), round(&ft));
            let p = params(&[], &[&[("weight", num(1.0)), ("density", num(1.0))], &[]]);
            let out = run_dtype(&TIES, &[3000], &[x.clone(), b], Some(1), &p, dt, dt).unwrap();
            assert_eq!(out, x, "{dt}");
        }
    }

    #[test]
    fn task_arithmetic_by_hand() {
        let p = params(
            &[],
            &[&[("weight", num(1.0))], &[("weight", num(-0.5))], &[]],
        );
        let out = run(
            &TASK_ARITHMETIC,
            &[2],
            &[vec![2.0, 1.0], vec![3.0, 1.0], vec![1.0, 1.0]],
            Some(2),
            &p,
        )
        .unwrap();
        // 1 + (1·1 + (-0.5)·2) = 1, 1 + 0 = 1
        assert_eq!(out, vec![1.0, 1.0]);
        let p = TensorParams {
            shared: [("lambda".to_string(), num(2.0))].into(),
            ..params(&[], &[&[("weight", num(0.5))], &[]])
        };
        let out = run(&TASK_ARITHMETIC, &[1], &[vec![3.0], vec![1.0]], Some(1), &p).unwrap();
        assert_eq!(out, vec![3.0]); // 1 + 2·(0.5·2)
    }

    fn gta(
        method: &Gta,
        shape: &[u64],
        inputs: &[Vec<f32>],
        per: &[&[(&str, ParamValue)]],
        shared: &[(&str, ParamValue)],
    ) -> Vec<f32> {
        let mut sh: Vec<(&str, ParamValue)> = vec![
            ("normalize", flag(false)),
            ("rescale", flag(false)),
            ("lambda", num(1.0)),
        ];
        sh.extend_from_slice(shared);
        let p = params(&sh, per);
        run(method, shape, inputs, Some(inputs.len() - 1), &p).unwrap()
    }

    #[test]
    fn breadcrumbs_drops_the_largest_and_the_smallest() {
        // n = 10, density 0.5, gamma 0.1: keep 5, drop the top 1 and the bottom 4.
        let a: Vec<f32> = (1..=10).map(|v| v as f32).collect();
        let out = gta(
            &BREADCRUMBS,
            &[10],
            &[a, vec![0.0; 10]],
            &[
                &[
                    ("weight", num(1.0)),
                    ("density", num(0.5)),
                    ("gamma", num(0.1)),
                ],
                &[],
            ],
            &[],
        );
        assert_eq!(out, vec![0.0, 0.0, 0.0, 0.0, 5.0, 6.0, 7.0, 8.0, 9.0, 0.0]);
    }

    #[test]
    fn dare_keeps_density_and_preserves_the_l1_norm() {
        let n = 100_000usize;
        let a: Vec<f32> = (0..n).map(|i| 0.001 + (i % 97) as f32 * 1e-4).collect();
        let out = gta(
            &DARE_LINEAR,
            &[n as u64],
            &[a.clone(), vec![0.0; n]],
            &[&[("weight", num(1.0)), ("density", num(0.3))], &[]],
            &[("rescale", flag(true))],
        );
        let kept = out.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.3).abs() < 0.01, "kept {kept}");
        let l1 = |v: &[f32]| v.iter().map(|x| x.abs() as f64).sum::<f64>();
        assert!((l1(&out) / l1(&a) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn random_masks_do_not_depend_on_threads_and_follow_the_seed() {
        let n = 3 * CHUNK + 17;
        let a: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        let p = params(
            &[
                ("normalize", flag(false)),
                ("rescale", flag(true)),
                ("lambda", num(1.0)),
            ],
            &[&[("weight", num(1.0)), ("density", num(0.5))], &[]],
        );
        let go = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                run(
                    &DARE_TIES,
                    &[n as u64],
                    &[a.clone(), vec![0.0; n]],
                    Some(1),
                    &p,
                )
                .unwrap()
            })
        };
        let one = go(1);
        assert_eq!(one, go(4));
        let other_seed = crate::methods::kernel::testing::run_seeded(
            &DARE_TIES,
            &[n as u64],
            &[a.clone(), vec![0.0; n]],
            Some(1),
            &p,
            43,
        );
        assert_ne!(one, other_seed);
    }

    #[test]
    fn della_keep_probability_follows_the_magnitude_rank() {
        // 4000 rows of 10: magnitudes 1..=10 in each row; density 0.5, epsilon 0.4:
        // rank r keeps with p = 0.1 + 0.8·r/9.
        let rows = 4000usize;
        let a: Vec<f32> = (0..rows * 10).map(|i| (i % 10 + 1) as f32).collect();
        let run_eps = |eps: f64| {
            gta(
                &DELLA_LINEAR,
                &[rows as u64, 10],
                &[a.clone(), vec![0.0; rows * 10]],
                &[
                    &[
                        ("weight", num(1.0)),
                        ("density", num(0.5)),
                        ("epsilon", num(eps)),
                    ],
                    &[],
                ],
                &[],
            )
        };
        let out = run_eps(0.4);
        for r in 0..10 {
            let kept =
                (0..rows).filter(|row| out[row * 10 + r] != 0.0).count() as f64 / rows as f64;
            let want = 0.1 + 0.8 * r as f64 / 9.0;
            assert!(
                (kept - want).abs() < 0.03,
                "rank {r}: kept {kept}, want {want}"
            );
        }
        assert_ne!(out, run_eps(0.1), "epsilon must change the output");
        // Without epsilon every rank keeps with probability density.
        let flat = run_eps(0.0);
        let low = (0..rows).filter(|row| flat[row * 10] != 0.0).count() as f64 / rows as f64;
        assert!((low - 0.5).abs() < 0.03);
    }

    #[test]
    fn della_rejects_density_plus_minus_epsilon_outside_the_unit_interval() {
        let p = params(
            &[],
            &[
                &[
                    ("weight", num(1.0)),
                    ("density", num(0.8)),
                    ("epsilon", num(0.3)),
                ],
                &[],
            ],
        );
        let problem = DELLA.validate(&p, Some(1)).unwrap_err();
        assert_eq!(problem.params, vec!["epsilon", "density"]);
        assert!(problem.message.contains("density") && problem.message.contains("epsilon"));
        let ok = params(
            &[],
            &[
                &[
                    ("weight", num(1.0)),
                    ("density", num(0.6)),
                    ("epsilon", num(0.3)),
                ],
                &[],
            ],
        );
        assert!(DELLA.validate(&ok, Some(1)).is_ok());
    }
}
