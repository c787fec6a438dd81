//! The family on a compute device: the [`TaskVectorOp`] that computes a job
//! with the bytes of the CPU merge, for the members whose sparsifier the
//! device runs (none, magnitude top-k, random draws).

use super::sparsify::magnitude_k;
use super::{lambda, plain_divisor, Consensus, Gta, Sparsify};
use crate::methods::device::{StreamKeep, TaskStream, TaskVectorOp};
use crate::methods::rng::Stream;
use crate::methods::select::EXACT_LIMIT;
use crate::methods::MergeJob;

impl Gta {
    /// `job` as a device op: task_arithmetic, dare_linear and dare_ties, and
    /// ties above [`EXACT_LIMIT`] elements (a smaller tensor replays torch's
    /// sort order on the CPU); `None` for the other sparsifiers (breadcrumbs,
    /// DELLA) and without a base.
    pub(super) fn task_vector_op(&self, job: &MergeJob) -> Option<TaskVectorOp> {
        match self.sparsify {
            Sparsify::None | Sparsify::Random => {}
            Sparsify::Magnitude if job.numel() > EXACT_LIMIT => {}
            Sparsify::Magnitude | Sparsify::MagnitudeOutliers | Sparsify::DellaMagprune => {
                return None
            }
        }
        let base = job.base?;
        let n = job.numel() as u64;
        let param =
            |i: usize, name: &str, default: f64| job.params.input_f64(i, name).unwrap_or(default);
        let streams: Vec<TaskStream> = job
            .non_base()
            .into_iter()
            .map(|i| {
                let density = param(i, "density", 1.0);
                let keep = match self.sparsify {
                    Sparsify::Magnitude => match magnitude_k(density, n) {
                        k if k >= n => StreamKeep::All,
                        k => StreamKeep::Top(k),
                    },
                    Sparsify::Random if density < 1.0 => StreamKeep::Random {
                        p: density as f32,
                        key: Stream::new(job.seed, job.name, i).key(),
                    },
                    _ => StreamKeep::All,
                };
                TaskStream {
                    input: i,
                    weight: param(i, "weight", 0.0) as f32,
                    keep,
                }
            })
            .collect();
        Some(TaskVectorOp {
            base,
            chunk: self.chunk_size(job),
            normalize: self.flag(job, "normalize"),
            rescale: self.rescales(job),
            lambda: lambda(job),
            sign_consensus: self.consensus == Consensus::Sum,
            plain_divisor: plain_divisor(streams.iter().map(|s| s.weight)),
            streams,
        })
    }
}
