//! [`TaskVectorOp`] (task_arithmetic, ties, dare_linear, dare_ties) on the
//! device: the top-k thresholds of magnitude sparsification from histograms
//! counted on the device (the selection itself is the CPU's:
//! [`top_k_counted`]), the L1 norms of the rescale per chunk, then one
//! `gta_merge` launch, a block per chunk.

use super::backend::{download_vec, grid, upload_vec, Arg, Backend, Kernel};
use super::{GpuError, THREADS};
use crate::methods::device::{top_k_counted, KeyCounts, StreamKeep, TaskVectorOp, TopK};

/// `y` (n elements) from the decoded inputs `xs`.
pub(super) fn run<B: Backend>(
    b: &B,
    s: &TaskVectorOp,
    n: usize,
    xs: &B::Buf,
    y: &B::Buf,
) -> Result<(), GpuError> {
    let chunks = n.div_ceil(s.chunk);
    let k = s.streams.len();
    let ks: Vec<u64> = s
        .streams
        .iter()
        .map(|st| match st.keep {
            StreamKeep::Top(k) => k,
            _ => n as u64,
        })
        .collect();
    let tops = if s
        .streams
        .iter()
        .any(|st| matches!(st.keep, StreamKeep::Top(_)))
    {
        let mut counts = DeviceCounts {
            b,
            s,
            n,
            chunks,
            xs,
        };
        top_k_counted(&ks, n as u64, chunks, &mut counts)?
    } else {
        vec![TopK::All; k]
    };
    // Per stream: mode (0 all, 1 nothing, 2 top-k, 3 random), threshold, p, key.
    let mut mode = Vec::with_capacity(k);
    let mut threshold = Vec::with_capacity(k);
    let mut quota = vec![0u32; k * chunks * 2];
    let mut p = Vec::with_capacity(k);
    let mut rng = Vec::with_capacity(k);
    for (i, (st, top)) in s.streams.iter().zip(&tops).enumerate() {
        let (m, t, pp, r): (i32, u32, f32, u64) = match (&st.keep, top) {
            (StreamKeep::Random { p, key }, _) => (3, 0, *p, *key),
            (StreamKeep::Top(_), TopK::Nothing) => (1, 0, 0.0, 0),
            (StreamKeep::Top(_), TopK::Threshold { key, quota: q }) => {
                for (c, tq) in q.iter().enumerate().take(chunks) {
                    quota[(i * chunks + c) * 2] = tq.skip;
                    quota[(i * chunks + c) * 2 + 1] = tq.take;
                }
                (2, *key, 0.0, 0)
            }
            _ => (0, 0, 0.0, 0),
        };
        mode.push(m);
        threshold.push(t);
        p.push(pp);
        rng.push(r);
    }
    let d_quota = upload_vec(b, &quota, |v| v.to_le_bytes())?;
    let mut scale = vec![1.0f32; k];
    if s.rescale {
        // L1 norms before and after sparsifying, per chunk in element order
        // (as the CPU sums them), added up here in chunk order.
        let before = b.alloc(chunks * 8)?;
        let after = b.alloc(chunks * 8)?;
        for (i, st) in s.streams.iter().enumerate() {
            b.launch(
                Kernel::L1Parts,
                (chunks as u32).div_ceil(64),
                64,
                &[
                    Arg::Buf(xs),
                    Arg::I32(st.input as i32),
                    Arg::I32(s.base as i32),
                    Arg::U64(n as u64),
                    Arg::U32(s.chunk as u32),
                    Arg::U32(chunks as u32),
                    Arg::I32(mode[i]),
                    Arg::U32(threshold[i]),
                    Arg::Buf(&d_quota),
                    Arg::U64((i * chunks * 2) as u64),
                    Arg::F32(p[i]),
                    Arg::U64(rng[i]),
                    Arg::Buf(&before),
                    Arg::Buf(&after),
                ],
            )?;
            let bf = download_vec(b, &before, chunks, f64::from_le_bytes)?;
            let af = download_vec(b, &after, chunks, f64::from_le_bytes)?;
            let (mut before_sum, mut after_sum) = (0.0f64, 0.0f64);
            for (x, y) in bf.iter().zip(&af) {
                before_sum += x;
                after_sum += y;
            }
            // mergekit: rescale only when both norms are at least 1e-7.
            if before_sum >= 1e-7 && after_sum >= 1e-7 {
                scale[i] = (before_sum / after_sum) as f32;
            }
        }
    }
    let idx: Vec<i32> = s.streams.iter().map(|st| st.input as i32).collect();
    let weight: Vec<f32> = s.streams.iter().map(|st| st.weight).collect();
    let d_idx = upload_vec(b, &idx, |v| v.to_le_bytes())?;
    let d_mode = upload_vec(b, &mode, |v| v.to_le_bytes())?;
    let d_threshold = upload_vec(b, &threshold, |v| v.to_le_bytes())?;
    let d_p = upload_vec(b, &p, |v| v.to_le_bytes())?;
    let d_rng = upload_vec(b, &rng, |v| v.to_le_bytes())?;
    let d_scale = upload_vec(b, &scale, |v| v.to_le_bytes())?;
    let d_weight = upload_vec(b, &weight, |v| v.to_le_bytes())?;
    b.launch(
        Kernel::GtaMerge,
        chunks as u32,
        THREADS,
        &[
            Arg::Buf(xs),
            Arg::U64(n as u64),
            Arg::I32(s.base as i32),
            Arg::I32(k as i32),
            Arg::Buf(&d_idx),
            Arg::Buf(&d_mode),
            Arg::Buf(&d_threshold),
            Arg::Buf(&d_quota),
            Arg::U32(chunks as u32),
            Arg::Buf(&d_p),
            Arg::Buf(&d_rng),
            Arg::Buf(&d_scale),
            Arg::Buf(&d_weight),
            Arg::U32(s.chunk as u32),
            Arg::I32(s.sign_consensus as i32),
            Arg::I32(s.normalize as i32),
            Arg::F32(s.plain_divisor),
            Arg::F32(s.lambda),
            Arg::Buf(y),
        ],
    )
}

/// The key counts of [`top_k_counted`], on the device: the keys are the
/// magnitudes `|x_s − base|` of the decoded inputs `xs`.
struct DeviceCounts<'a, B: Backend> {
    b: &'a B,
    s: &'a TaskVectorOp,
    n: usize,
    chunks: usize,
    xs: &'a B::Buf,
}

impl<B: Backend> KeyCounts for DeviceCounts<'_, B> {
    type Error = GpuError;

    fn histogram(
        &mut self,
        stream: usize,
        prefix: u32,
        mask: u32,
        shift: u32,
        buckets: usize,
    ) -> Result<Vec<u64>, GpuError> {
        let (b, n) = (self.b, self.n);
        let d_hist = b.alloc(buckets * 8)?;
        b.launch(
            Kernel::DigitHist,
            grid(n),
            THREADS,
            &[
                Arg::Buf(self.xs),
                Arg::I32(self.s.streams[stream].input as i32),
                Arg::I32(self.s.base as i32),
                Arg::U64(n as u64),
                Arg::U32(prefix),
                Arg::U32(mask),
                Arg::U32(shift),
                Arg::U32(buckets as u32),
                Arg::Buf(&d_hist),
            ],
        )?;
        download_vec(b, &d_hist, buckets, u64::from_le_bytes)
    }

    fn ties(&mut self, stream: usize, key: u32) -> Result<Vec<u32>, GpuError> {
        let (b, n, chunks) = (self.b, self.n, self.chunks);
        let counts = b.alloc(chunks * 4)?;
        b.launch(
            Kernel::ChunkTies,
            chunks as u32,
            THREADS,
            &[
                Arg::Buf(self.xs),
                Arg::I32(self.s.streams[stream].input as i32),
                Arg::I32(self.s.base as i32),
                Arg::U64(n as u64),
                Arg::U32(key),
                Arg::U32(self.s.chunk as u32),
                Arg::Buf(&counts),
            ],
        )?;
        download_vec(b, &counts, chunks, u32::from_le_bytes)
    }
}
