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
fn split(tensors: Vec<OutputTensor>, unit_size: u64) -> Vec<(Vec<OutputTensor>, Option<UnitPart>)> {
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
        let start = if index == 0 {
            0
        } else {
            layout.tensors[w[0]].3
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::unit::{upload_chunks, ParamValue, TensorOp, TensorParams, TensorRef};

    fn tensor(i: usize, elements: u64) -> OutputTensor {
        let input = |model: usize| TensorRef {
            model,
            name: format!("t{i}"),
            location: format!("/m{model}/model.safetensors"),
            offset: 8,
            len: elements * 2,
            dtype: DType::BF16,
            shape: vec![elements],
            lora: None,
        };
        OutputTensor {
            name: format!("t{i}"),
            dtype: DType::BF16,
            shape: vec![elements],
            op: TensorOp::Merge,
            inputs: vec![input(0), input(1)],
            base: None,
            params: TensorParams {
                shared: Default::default(),
                per_input: vec![
                    [("weight".to_string(), ParamValue::Number(0.5))].into(),
                    [("weight".to_string(), ParamValue::Number(0.5))].into(),
                ],
            },
            scales: Vec::new(),
            block: None,
            requant: None,
            packed: None,
            vocab: None,
        }
    }

    fn options(unit_size: Option<u64>) -> PlanOptions {
        PlanOptions {
            out_shard_size: 1 << 40,
            seed: 0,
            allow_crimes: false,
            base_dir: ".".into(),
            keep_fp8: false,
            unit_size,
        }
    }

    #[test]
    fn upload_chunks_join_a_short_tail_and_cover_the_part() {
        const M: u64 = 1 << 20;
        let sizes = |len: u64, chunk: u64| -> Vec<u64> {
            upload_chunks(len, chunk)
                .iter()
                .map(|r| r.end - r.start)
                .collect()
        };
        assert_eq!(sizes(0, 16 * M), vec![0]);
        assert_eq!(sizes(3 * M, 16 * M), vec![3 * M]);
        assert_eq!(sizes(32 * M, 16 * M), vec![16 * M, 16 * M]);
        assert_eq!(sizes(33 * M, 16 * M), vec![16 * M, 17 * M]);
        assert_eq!(sizes(38 * M, 16 * M), vec![16 * M, 16 * M, 6 * M]);
        for len in [1, 5 * M, 16 * M + 1, 100 * M + 7] {
            let r = upload_chunks(len, 16 * M);
            assert_eq!(r.first().unwrap().start, 0);
            assert_eq!(r.last().unwrap().end, len);
            assert!(r.windows(2).all(|w| w[0].end == w[1].start));
            assert!(r[..r.len() - 1]
                .iter()
                .all(|c| c.end - c.start >= MIN_CHUNK));
        }
    }

    /// A shard cut in parts: the parts tile the shard's bytes, the first
    /// starts with the header, chunks are numbered across parts, and every
    /// unit is valid.
    #[test]
    fn a_large_shard_is_cut_into_parts_that_tile_it() {
        // 8 tensors of 3 MiB output, 6 MiB input each.
        let tensors: Vec<_> = (0..8).map(|i| tensor(i, 3 << 19)).collect();
        let whole = ShardLayout::new(
            &tensors
                .iter()
                .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
                .collect::<Vec<_>>(),
        );
        let units = shard(tensors, &options(Some(12 << 20)), "linear");
        assert_eq!(units.len(), 4);
        let mut at = 0;
        let mut chunks = 0;
        for (i, u) in units.iter().enumerate() {
            u.validate().unwrap_or_else(|e| panic!("part {i}: {e}"));
            let p = u.part.as_ref().expect("a part");
            assert_eq!((p.index, p.count), (i as u32, 4));
            assert_eq!(p.offset, at);
            assert_eq!(p.shard_size, whole.file_size);
            assert_eq!(p.first_chunk, chunks);
            assert_eq!(p.shard_tensors.is_empty(), i > 0);
            assert_eq!(u.file_name, "model.safetensors");
            assert_eq!(u.written_layout().file_size, p.len);
            at += p.len;
            chunks += upload_chunks(p.len, p.chunk).len() as u32;
        }
        assert_eq!(at, whole.file_size);
        assert_eq!(units[0].layout().header, whole.header);
    }

    #[test]
    fn small_shards_and_parts_below_an_upload_chunk_stay_whole() {
        // 6 MiB of output in all: a cut would leave a part under 5 MiB.
        let tensors: Vec<_> = (0..4).map(|i| tensor(i, 3 << 18)).collect();
        let units = shard(tensors, &options(Some(1 << 20)), "linear");
        assert_eq!(units.len(), 1);
        assert!(units[0].part.is_none());
        // The automatic size: a 64th of the inputs, at least 16 MiB.
        let tensors: Vec<_> = (0..8).map(|i| tensor(i, 3 << 19)).collect();
        assert_eq!(unit_size(&tensors, &options(None)), 16 << 20);
    }

    /// A part whose place in its shard disagrees with its tensors is refused.
    #[test]
    fn a_part_that_lies_about_its_place_is_refused() {
        let tensors: Vec<_> = (0..8).map(|i| tensor(i, 3 << 19)).collect();
        let units = shard(tensors, &options(Some(12 << 20)), "linear");
        type Mutation = fn(&mut UnitPart);
        let cases: [(&str, Mutation); 6] = [
            ("part", |p| p.index = p.count),
            ("part.len", |p| p.len += 2),
            ("part.len", |p| p.offset = p.shard_size - 8),
            ("part.offset", |p| p.offset = 0),
            ("part.chunk", |p| p.chunk = 1),
            ("part.upload", |p| p.upload = Some("a\nb".into())),
        ];
        for (field, mutate) in cases {
            let mut u = units[1].clone();
            mutate(u.part.as_mut().unwrap());
            let e = u.validate().expect_err(field).to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        let mut first = units[0].clone();
        first.part.as_mut().unwrap().shard_tensors.swap(0, 1);
        let e = first.validate().unwrap_err().to_string();
        assert!(e.contains("part.shard_tensors"), "{e}");
    }
}
