//! Grouping the output tensors into shards: each shard is one [`WorkUnit`].

use super::build::PlanOptions;
use crate::unit::{OutputTensor, WorkUnit, PLAN_FORMAT};

/// Groups tensors into shards of at most `out_shard_size` bytes (a tensor larger
/// than that gets a shard of its own), in output order, as mergekit's writer does.
pub(super) fn shard(tensors: Vec<OutputTensor>, opts: &PlanOptions, method: &str) -> Vec<WorkUnit> {
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
    groups
        .into_iter()
        .zip(names)
        .enumerate()
        .map(|(id, (tensors, file_name))| WorkUnit {
            format: PLAN_FORMAT,
            id,
            file_name,
            merge_method: method.to_string(),
            seed: opts.seed,
            tensors,
        })
        .collect()
}
