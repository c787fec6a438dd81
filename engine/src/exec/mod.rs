//! Runs one work unit. Its tensors are taken in windows of consecutive tensors
//! (see [`read::windows`]); a window's inputs are loaded (local files mapped,
//! remote ranges fetched) while the window before it computes, the window's
//! tensors are computed in parallel into one reused output buffer, and a writer
//! thread streams finished buffers — header first, tensors in order — to storage
//! and hashes them, while the next window computes. The shard appears in storage
//! atomically when complete.
//!
//! Here: the executor's entry points ([`execute_unit_on`], [`compute_tensor`]),
//! its error ([`ExecError`]), what a unit produced ([`UnitOutput`]) and its
//! limits ([`ExecLimits`]). The pipeline's three stages (read, compute, write)
//! and the channels between them are in `pipeline/`; one tensor's computation
//! (copy, merge on the device or the CPU, FP8 re-quantization) in `tensor.rs`;
//! reading inputs in [`read`], streaming a tensor too large to hold in
//! [`stream`], a vocabulary tensor's rows (read by range, aligned whole or a
//! segment at a time) in `vocab.rs`, the device in `device.rs`, the memory
//! budget in [`memory`].

mod device;
mod finite;
mod guard;
mod inputs;
pub mod memory;
mod pipeline;
pub mod read;
pub mod stream;
mod tensor;
#[cfg(test)]
mod tests;
mod vocab;

pub use device::{Device, DeviceError};

use crate::gpu::GpuError;
use crate::methods::{self, MethodError};
use crate::storage::StorageError;
use crate::unit::{NonFinite, OutputTensor, UnitError, UnitOutput, WorkUnit, PLAN_FORMAT};

/// `tensor: N NaN, M Inf` for up to five tensors, and how many more.
pub fn describe_non_finite(list: &[NonFinite]) -> String {
    let mut parts: Vec<String> = list
        .iter()
        .take(5)
        .map(|t| format!("{}: {} NaN, {} Inf", t.tensor, t.nan, t.inf))
        .collect();
    if list.len() > 5 {
        parts.push(format!("and {} more tensors", list.len() - 5));
    }
    parts.join("; ")
}

/// Why a unit failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Method(#[from] MethodError),
    /// The unit is not one a planner would write (see [`WorkUnit::validate`]).
    #[error(transparent)]
    Invalid(#[from] UnitError),
    /// A panic in the pipeline: a bug, reported as the unit's error.
    #[error("internal error (a bug): {0}")]
    Internal(String),
    /// An input file that is not a usable checkpoint of its format (not one
    /// at all, or truncated or changed since the merge was planned).
    #[error("refusing to read {input} from {location}: not a usable {format} file: {message}")]
    UnusableInput {
        location: String,
        input: String,
        /// `safetensors` or `torch zip`.
        format: &'static str,
        message: String,
    },
    /// An input reference that is not exactly a tensor of its file's header.
    #[error("{tensor}: refusing to read input {input} from {location}: {message}")]
    InputMismatch {
        location: String,
        tensor: String,
        input: String,
        message: String,
    },
    #[error("work unit {unit} uses merge method '{method}', which this build does not know")]
    UnknownMethod { unit: usize, method: String },
    #[error("work unit {unit} has plan format {found}, this build reads format {expected}")]
    Format {
        unit: usize,
        found: u32,
        expected: u32,
    },
    #[error(
        "work unit {unit} ({file}) needs at least {needs} of memory ({detail}), more than the \
         {budget} it may use; raise --max-memory or run fewer units at once"
    )]
    OverBudget {
        unit: usize,
        file: String,
        /// The most demanding tensor and why, and what the memory goes to.
        detail: String,
        needs: String,
        budget: String,
    },
    /// The GPU failed (out of memory while other units ran, a driver error).
    #[error("computing on the GPU: {0}")]
    Gpu(#[from] GpuError),
    #[error("{tensor}: the merge produced {produced} of its {expected} bytes while streaming")]
    StreamIncomplete {
        tensor: String,
        produced: u64,
        expected: u64,
    },
    #[error(
        "{tensor}: the inputs hold different values ({models}), but a non-float tensor can only \
         be copied when every model has the same one"
    )]
    BuffersDiffer { tensor: String, models: String },
    /// A merged tensor that its packed output format cannot hold (NaN or
    /// infinite values).
    #[error("{tensor}: {message}; write a float `out_dtype` instead to keep such values")]
    Unencodable { tensor: String, message: String },
}

/// Progress callbacks: bytes read from inputs and bytes written so far.
pub trait Progress: Sync {
    fn read(&self, _bytes: u64) {}
    fn written(&self, _bytes: u64) {}
    /// A unit is done: computed now, or `resumed` (finished by an earlier run).
    /// `input_bytes` is what it reads.
    fn unit_done(&self, _input_bytes: u64, _resumed: bool) {}
    /// The unit's read stage has loaded its last window (a tensor streamed
    /// under the memory budget is read as it computes, after this): what is
    /// left is compute and writing. A worker that reads ahead takes its next
    /// unit now. Called at most once per unit, from the read stage's thread.
    fn inputs_read(&self) {}
    /// Whether the unit's result is no longer wanted (a worker's lease was
    /// revoked: another copy finished it). The read stage asks before each
    /// window and while remote bytes arrive, a streamed tensor before each
    /// segment; the unit then ends with [`StorageError::Cancelled`], having
    /// written nothing that counts (its output is never committed).
    fn cancelled(&self) -> bool {
        false
    }
}

/// No progress reporting.
pub struct NoProgress;
impl Progress for NoProgress {}

/// How much a unit may hold in memory at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecLimits {
    /// Input bytes of one window of tensors computed together (a tensor larger
    /// than this is a window by itself).
    pub window_bytes: u64,
    /// Load the next window while this one computes (doubles the inputs held).
    pub read_ahead: bool,
    /// Stream a tensor whose inputs exceed `window_bytes` in segments of about
    /// that many input bytes instead of reading it whole (see [`stream`]).
    pub stream: bool,
}

impl Default for ExecLimits {
    fn default() -> Self {
        ExecLimits {
            window_bytes: read::WINDOW_BYTES,
            read_ahead: true,
            stream: false,
        }
    }
}

impl ExecLimits {
    /// Whether `t` is streamed under these limits: when its window bytes
    /// ([`read::tensor_bytes`]: what it reads, or a vocabulary tensor's
    /// aligned inputs) exceed the window. A re-quantized FP8 output needs its
    /// whole merged weight for the block scales, so it never is; nor is a
    /// tensor with packed (MXFP4) inputs, whose decoded (transposed) elements
    /// each read anywhere in their codes.
    pub fn streams(&self, t: &OutputTensor) -> bool {
        self.stream
            && t.requant.is_none()
            && t.packed.is_none()
            && read::tensor_bytes(t) > self.window_bytes
    }

    /// The limits that keep `unit` within `budget` bytes (the defaults when
    /// there is no budget).
    pub fn for_unit(
        unit: &WorkUnit,
        out_dir: &str,
        budget: Option<u64>,
    ) -> Result<Self, ExecError> {
        let Some(budget) = budget else {
            return Ok(ExecLimits::default());
        };
        memory::limits_within(unit, out_dir, budget, rayon::current_num_threads())
            .map_err(|e| e.error(unit, budget))
    }
}

/// A byte count for people (see [`crate::size::human_bytes`]).
pub use crate::size::human_bytes;

/// Executes `unit`, writing its shard into `out_dir`.
pub fn execute_unit(
    unit: &WorkUnit,
    out_dir: &str,
    progress: &dyn Progress,
) -> Result<UnitOutput, ExecError> {
    execute_unit_with(unit, out_dir, progress, &ExecLimits::default())
}

/// [`execute_unit`] within `limits`.
pub fn execute_unit_with(
    unit: &WorkUnit,
    out_dir: &str,
    progress: &dyn Progress,
    limits: &ExecLimits,
) -> Result<UnitOutput, ExecError> {
    execute_unit_on(unit, out_dir, progress, limits, &Device::Cpu)
}

/// [`execute_unit_with`] computing on `device`. The unit is validated
/// ([`WorkUnit::validate`]) and its inputs checked against their files' headers
/// before anything is written; a panic anywhere in the pipeline is returned as
/// [`ExecError::Internal`].
pub fn execute_unit_on(
    unit: &WorkUnit,
    out_dir: &str,
    progress: &dyn Progress,
    limits: &ExecLimits,
    device: &Device,
) -> Result<UnitOutput, ExecError> {
    guard::catch(|| {
        unit.validate()?;
        pipeline::run_unit(unit, out_dir, progress, limits, device)
    })
}

/// Computes tensor `index` of `unit` alone, on the CPU, and returns its bytes:
/// what the unit's shard holds for it. A tensor's merge depends only on the
/// tensor (name, shape, inputs, parameters) and the unit's seed, not on the
/// other tensors of the unit, so this is how a coordinator spot-checks a
/// worker's shard without recomputing the whole unit.
pub fn compute_tensor(unit: &WorkUnit, index: usize) -> Result<Vec<u8>, ExecError> {
    let method = unit_method(unit)?;
    let Some(tensors) = unit.tensors.get(index..index + 1) else {
        return Ok(Vec::new());
    };
    let maps = read::Maps::open(tensors)?;
    let loaded = read::load(tensors, &maps, &|_| true)?;
    let views = loaded.views(tensors, &maps)?;
    let mut out = vec![0u8; tensors[0].byte_len() as usize];
    tensor::compute_loaded(unit, method, &tensors[0], &views[0], &mut out, &Device::Cpu)?;
    Ok(out)
}

/// The method of a unit this build can execute: its plan format must be this
/// build's and its method known.
fn unit_method(unit: &WorkUnit) -> Result<&'static dyn methods::MergeMethod, ExecError> {
    if unit.format != PLAN_FORMAT {
        return Err(ExecError::Format {
            unit: unit.id,
            found: unit.format,
            expected: PLAN_FORMAT,
        });
    }
    methods::get_for_unit(&unit.merge_method).ok_or_else(|| ExecError::UnknownMethod {
        unit: unit.id,
        method: unit.merge_method.clone(),
    })
}
