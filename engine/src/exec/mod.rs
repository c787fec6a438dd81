//! Runs one work unit: reads each output tensor's inputs by byte range (the next
//! tensor's reads overlap the current tensor's compute), computes it with the
//! unit's merge method, and streams the shard — header first, tensors in order —
//! to storage, where it appears atomically when complete.

pub mod read;

use crate::methods::{self, MergeJob, MethodError, OutputView, TensorView};
use crate::output::ShardLayout;
use crate::plan::{OutputTensor, TensorOp, WorkUnit, PLAN_FORMAT};
use crate::storage::{self, StorageError};
use sha2::{Digest, Sha256};
use std::sync::mpsc;

/// What a finished unit produced.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UnitOutput {
    pub unit: usize,
    pub file_name: String,
    pub size: u64,
    pub sha256: String,
    pub tensors: Vec<String>,
}

/// Why a unit failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Method(#[from] MethodError),
    #[error("work unit {unit} uses merge method '{method}', which this build does not know")]
    UnknownMethod { unit: usize, method: String },
    #[error("work unit {unit} has plan format {found}, this build reads format {expected}")]
    Format {
        unit: usize,
        found: u32,
        expected: u32,
    },
    #[error(
        "{tensor}: the inputs hold different values ({models}), but a non-float tensor can only \
         be copied when every model has the same one"
    )]
    BuffersDiffer { tensor: String, models: String },
}

/// Progress callbacks: bytes read from inputs and bytes written so far.
pub trait Progress: Sync {
    fn read(&self, _bytes: u64) {}
    fn written(&self, _bytes: u64) {}
}

/// No progress reporting.
pub struct NoProgress;
impl Progress for NoProgress {}

type Inputs = Result<read::Inputs, StorageError>;

/// Executes `unit`, writing its shard into `out_dir`.
pub fn execute_unit(
    unit: &WorkUnit,
    out_dir: &str,
    progress: &dyn Progress,
) -> Result<UnitOutput, ExecError> {
    if unit.format != PLAN_FORMAT {
        return Err(ExecError::Format {
            unit: unit.id,
            found: unit.format,
            expected: PLAN_FORMAT,
        });
    }
    let method = methods::get(&unit.merge_method).ok_or_else(|| ExecError::UnknownMethod {
        unit: unit.id,
        method: unit.merge_method.clone(),
    })?;
    let layout = ShardLayout::new(
        &unit
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
            .collect::<Vec<_>>(),
    );
    let out_store = storage::for_location(out_dir);
    let location = out_store.join(out_dir, &unit.file_name);
    let mut writer = out_store.create(&location)?;
    let mut hasher = Sha256::new();
    writer.write_all(&layout.header)?;
    hasher.update(&layout.header);
    let mut size = layout.header.len() as u64;
    let mut out = Vec::new();

    std::thread::scope(|scope| -> Result<(), ExecError> {
        // Reads run one tensor ahead of compute, bounded so memory stays at a
        // couple of tensors' inputs.
        let (tx, rx) = mpsc::sync_channel::<Inputs>(1);
        let tensors = &unit.tensors;
        scope.spawn(move || {
            for batch in read::batches(tensors) {
                match read::read_batch(&tensors[batch]) {
                    Ok(all) => {
                        for inputs in all {
                            if tx.send(Ok(inputs)).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        for t in &unit.tensors {
            let inputs = rx
                .recv()
                .map_err(|_| StorageError::io(&location, "input reader stopped"))??;
            progress.read(inputs.iter().map(|b| b.len() as u64).sum());
            out.clear();
            out.resize(t.byte_len() as usize, 0);
            compute(unit, method, t, &inputs, &mut out)?;
            writer.write_all(&out)?;
            hasher.update(&out);
            size += out.len() as u64;
            progress.written(out.len() as u64);
        }
        Ok(())
    })?;
    writer.commit()?;
    Ok(UnitOutput {
        unit: unit.id,
        file_name: unit.file_name.clone(),
        size,
        sha256: hex::encode(hasher.finalize()),
        tensors: unit.tensors.iter().map(|t| t.name.clone()).collect(),
    })
}

fn compute(
    unit: &WorkUnit,
    method: &dyn methods::MergeMethod,
    t: &OutputTensor,
    inputs: &[Vec<u8>],
    out: &mut [u8],
) -> Result<(), ExecError> {
    match t.op {
        TensorOp::CopyIdentical => {
            if inputs.iter().any(|b| b != &inputs[0]) {
                return Err(ExecError::BuffersDiffer {
                    tensor: t.name.clone(),
                    models: t
                        .inputs
                        .iter()
                        .map(|r| r.name.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            out.copy_from_slice(&inputs[0]);
            Ok(())
        }
        TensorOp::Merge => {
            let job = MergeJob {
                name: &t.name,
                shape: &t.shape,
                inputs: t
                    .inputs
                    .iter()
                    .zip(inputs)
                    .map(|(r, b)| TensorView {
                        dtype: r.dtype,
                        bytes: b,
                    })
                    .collect(),
                base: t.base,
                params: &t.params,
                seed: unit.seed,
            };
            let mut view = OutputView {
                dtype: t.dtype,
                bytes: out,
            };
            method.merge(&job, &mut view)?;
            Ok(())
        }
    }
}
