//! Grouping the output tensors into shards, and the shards into work units: a
//! shard whose inputs exceed the unit size is written by several units, each a
//! byte range of it (a [`UnitPart`]), so that a cluster has enough units of
//! balanced size to keep every node busy to the end.

use super::build::PlanOptions;
use crate::output::ShardLayout;
use crate::unit::{OutputTensor, UnitPart, WorkUnit, CHUNK, MAX_CHUNKS, MIN_CHUNK, PLAN_FORMAT};

/// Smallest and largest automatic unit sizes (input bytes).
const AUTO_MIN: u64 = 16 << 20;
const AUTO_MAX: u64 = 1 << 30;
/// Units the automatic size aims at for the whole merge.
const AUTO_UNITS: u64 = 64;

/// The input bytes a unit aims at: `--unit-size`, or a 64th of the merge's
/// inputs within 16 MiB ..= 1 GiB.
pub(super) fn unit_size(tensors: &[OutputTensor], opts: &PlanOptions) -> u64 {
    opts.unit_size.unwrap_or_else(|| {
        let total: u64 = tensors.iter().map(OutputTensor::input_bytes).sum();
        (total / AUTO_UNITS).clamp(AUTO_MIN, AUTO_MAX)
    })
}

/// Groups tensors into shards of at most `out_shard_size` bytes (a tensor larger
/// than that gets a shard of its own), in output order, as mergekit's writer
/// does; then cuts each shard into units of about `unit_size` input bytes.
pub(super) fn shard(tensors: Vec<OutputTensor>, opts: &PlanOptions, method: &str) -> Vec<WorkUnit> {
    let unit_size = unit_size(&tensors, opts);
    let mut groups: Vec<Vec<OutputTensor>> = Vec::new();
    let mut current = 0u64;
    for t in tensors {
        let size = t.byte_len();
        match groups.last_mut() {
            Some(g) if !g.is_empty() && current + size <= opts.out_shard_size => {
                current += size;
                g.push(t);
            }
            _ => {
                current = size;
                groups.push(vec![t]);
            }
        }
    }
    let names = crate::output::shard_file_names(groups.len());
    let mut units = Vec::new();
    for (tensors, file_name) in groups.into_iter().zip(names) {
        for (tensors, part) in split(tensors, unit_size) {
            units.push(WorkUnit {
                format: PLAN_FORMAT,
                id: units.len(),
                file_name: file_name.clone(),
                merge_method: method.to_string(),
                seed: opts.seed,
                tensors,
                part,
            });
        }
    }
    units
}

/// Cuts one shard's tensors into parts of about `unit_size` input bytes, each
/// writing at least [`MIN_CHUNK`] bytes but the last; a shard that makes one
/// part stays a whole unit (`None`).
fn split(
    tensors: Vec<OutputTensor>,
    unit_size: u64,
) -> Vec<(Vec<OutputTensor>, Option<UnitPart>)> {
    let mut cuts = vec![0usize];
    let (mut input, mut output) = (0u64, 0u64);
    for (i, t) in tensors.iter().enumerate() {
        input += t.input_bytes();
        output += t.byte_len();
        if input >= unit_size && output >= MIN_CHUNK && i + 1 < tensors.len() {
            cuts.push(i + 1);
            (input, output) = (0, 0);
        }
    }
    if cuts.len() == 1 {
        return vec![(tensors, None)];
    }
    let shard_tensors: Vec<_> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let layout = ShardLayout::new(&shard_tensors);
    let chunk = CHUNK.max(layout.file_size.div_ceil(MAX_CHUNKS / 2));
    cuts.push(tensors.len());
    let count = cuts.len() - 1;
    let mut parts = Vec::with_capacity(count);
    let mut first_chunk = 0u32;
    let mut rest = tensors.into_iter();
    for (index, w) in cuts.windows(2).enumerate() {
        let own: Vec<OutputTensor> = rest.by_ref().take(w[1] - w[0]).collect();
        let start = if index == 0 { 0 } else { layout.tensors[w[0]].3 };
        let end = layout.tensors[w[1] - 1].3 + layout.tensors[w[1] - 1].4;
        let len = end - start;
        let part = UnitPart {
            index: index as u32,
            count: count as u32,
            offset: start,
            len,
            shard_size: layout.file_size,
            chunk,
            first_chunk,
            shard_tensors: if index == 0 {
                shard_tensors.clone()
            } else {
                Vec::new()
            },
            upload: None,
        };
        first_chunk += crate::unit::upload_chunks(len, chunk).len() as u32;
        parts.push((own, Some(part)));
    }
    parts
}
