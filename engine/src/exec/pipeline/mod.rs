//! The pipeline that runs one validated unit: three stages on three threads,
//! joined by named channels.
//!
//! ```text
//!   read stage ──Windows──▶ compute stage ──OutputBuffers──▶ write stage
//!   (reader.rs)  loaded      (compute.rs,    filled            (writer.rs)
//!                requests     rayon within)   ◀── free ──
//! ```
//!
//! The read stage loads a window of inputs while the compute stage computes
//! the one before it; the compute stage fills one of two output buffers while
//! the write stage streams the other to storage, hashing it. The shard appears
//! in storage (committed) only when all of it is written; a unit that is a
//! part of a shard writes its byte range into the shard's parts (see
//! [`crate::unit::UnitPart`]), which appear once the coordinator finishes them. An error or a panic
//! in any stage ends the unit: the compute stage's end of both channels is
//! dropped, so the other two stop, and the writer's error, when it has one, is
//! the one reported.

mod compute;
mod reader;
mod writer;

use super::{guard, inputs, read, unit_method, Device, ExecError, ExecLimits, Progress};
use crate::storage;
use crate::unit::UnitOutput;
use crate::unit::WorkUnit;
use sha2::Digest;

/// Runs `unit` (validated), writing its shard into `out_dir`.
pub(super) fn run_unit(
    unit: &WorkUnit,
    out_dir: &str,
    progress: &dyn Progress,
    limits: &ExecLimits,
    device: &Device,
) -> Result<UnitOutput, ExecError> {
    let method = unit_method(unit)?;
    let layout = unit.written_layout();
    let maps = read::Maps::open(&unit.tensors)?;
    inputs::check(unit, &maps)?;
    let windows = read::windows(&unit.tensors, limits.window_bytes);
    let out_store = storage::for_location(out_dir);
    let location = out_store.join(out_dir, &unit.file_name);
    let writer = match &unit.part {
        None => out_store.create(&location)?,
        Some(part) => out_store.parts_writer(&location, &part.spec())?,
    };

    let written = std::thread::scope(|scope| {
        let input = reader::Windows::spawn(scope, &unit.tensors, &windows, &maps, limits, progress);
        let (output, writing) = writer::spawn(scope, writer, &layout, progress, &location);
        let stage = compute::Compute {
            unit,
            method,
            maps: &maps,
            limits,
            device,
            progress,
        };
        let computed = stage.run(&windows, &input, &output);
        // The writer ends with the channel of filled buffers, the reader with
        // its windows' channels.
        drop(output);
        drop(input);
        let written = writing.join().unwrap_or_else(|p| Err(guard::internal(p)));
        // A failed writer stops the compute too: its error is the one to report.
        let written = written?;
        computed?;
        Ok::<_, ExecError>(written)
    })?;
    let chunks = written.writer.commit_chunks()?;
    for t in &written.non_finite {
        tracing::warn!(
            tensor = %t.tensor,
            nan = t.nan,
            inf = t.inf,
            shard = %unit.file_name,
            "the merged tensor has non-finite values"
        );
    }
    Ok(UnitOutput {
        unit: unit.id,
        file_name: unit.file_name.clone(),
        size: written.size,
        sha256: hex::encode(written.hasher.finalize()),
        tensors: unit.tensors.iter().map(|t| t.name.clone()).collect(),
        offset: unit.part.as_ref().map_or(0, |p| p.offset),
        chunks,
        non_finite: written.non_finite,
    })
}
