//! Tests of header validation and model directory opening, on files built here.

use super::torch::tests as torch_tests;
use super::*;
use crate::output::ShardLayout;
use crate::storage::{LocalStorage, Storage};
use proptest::prelude::*;
use std::path::Path;

fn parse(json: &str, data_len: u64) -> Result<SafetensorsHeader, CheckpointError> {
    parse_header(
        "f.safetensors",
        8 + json.len() as u64 + data_len,
        json.as_bytes(),
    )
}

fn layout_file(tensors: &[(&str, DType, &[u64])]) -> Vec<u8> {
    let specs: Vec<(String, DType, Vec<u64>)> = tensors
        .iter()
        .map(|(n, d, s)| (n.to_string(), *d, s.to_vec()))
        .collect();
    let l = ShardLayout::new(&specs);
    let mut b = l.header.clone();
    b.resize(l.file_size as usize, 7);
    b
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_string_lossy().into_owned()
}

fn loc(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn layout_file_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "m.safetensors",
        &layout_file(&[("w", DType::BF16, &[4, 4]), ("b", DType::F32, &[4])]),
    );
    let h = read_header(&LocalStorage, &f).unwrap();
    let names: Vec<&str> = h.tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["w", "b"]);
    assert_eq!(h.tensors[0].1.offset, h.data_start);
    assert_eq!(h.tensors[0].1.numel(), 16);
    assert_eq!(h.tensors[1].1.offset, h.data_start + 32);
    assert_eq!(h.metadata["format"], "pt");
}

#[test]
fn large_header_takes_a_second_read() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..3000)
        .map(|i| format!("model.layers.{i}.weight"))
        .collect();
    let specs: Vec<(&str, DType, &[u64])> = names
        .iter()
        .map(|n| (n.as_str(), DType::F16, &[2u64][..]))
        .collect();
    let f = write(dir.path(), "big.safetensors", &layout_file(&specs));
    let h = read_header(&LocalStorage, &f).unwrap();
    assert!(h.data_start > 64 * 1024);
    assert_eq!(h.tensors.len(), 3000);
}

#[test]
fn sorted_by_offset_and_scalars() {
    let json = r#"{"b":{"dtype":"F32","shape":[],"data_offsets":[4,8]},"a":{"dtype":"I8","shape":[2,2],"data_offsets":[0,4]},"e":{"dtype":"F16","shape":[0],"data_offsets":[8,8]}}"#;
    let h = parse(json, 8).unwrap();
    let names: Vec<&str> = h.tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b", "e"]);
    assert_eq!(h.tensors[1].1.numel(), 1);
    assert!(h.metadata.is_empty());
}

#[test]
fn truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = layout_file(&[("w", DType::BF16, &[4, 4])]);
    bytes.truncate(bytes.len() - 3);
    let f = write(dir.path(), "t.safetensors", &bytes);
    let err = read_header(&LocalStorage, &f).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::Truncated { tensor, end: 32, data_len: 29, .. } if tensor == "w"),
        "{err}"
    );
    assert!(err.to_string().contains("truncated"));
    assert!(err.to_string().contains("t.safetensors"));
}

#[test]
fn huge_header_lengths() {
    let dir = tempfile::tempdir().unwrap();
    for len in [u64::MAX, 200 * 1024 * 1024] {
        let mut b = len.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        let f = write(dir.path(), "h.safetensors", &b);
        let err = read_header(&LocalStorage, &f).unwrap_err();
        assert!(
            matches!(err, CheckpointError::HeaderTooLarge { len: l, .. } if l == len),
            "{err}"
        );
    }
}

#[test]
fn header_past_eof_zero_and_tiny_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = 100u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    let f = write(dir.path(), "p.safetensors", &b);
    let err = read_header(&LocalStorage, &f).unwrap_err();
    assert!(
        matches!(
            err,
            CheckpointError::HeaderPastEnd {
                len: 100,
                file_size: 10,
                ..
            }
        ),
        "{err}"
    );

    let f = write(dir.path(), "z.safetensors", &0u64.to_le_bytes());
    assert!(matches!(
        read_header(&LocalStorage, &f),
        Err(CheckpointError::HeaderEmpty { .. })
    ));

    let f = write(dir.path(), "s.safetensors", b"abc");
    assert!(matches!(
        read_header(&LocalStorage, &f),
        Err(CheckpointError::FileTooSmall { size: 3, .. })
    ));

    let missing = loc(&dir.path().join("none.safetensors"));
    assert!(matches!(
        read_header(&LocalStorage, &missing),
        Err(CheckpointError::Storage(
            crate::storage::StorageError::NotFound { .. }
        ))
    ));
}

#[test]
fn overlapping_offsets() {
    let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
    let err = parse(json, 8).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::Overlap { first, second, .. } if first == "a" && second == "b"),
        "{err}"
    );
    // Contained in an earlier, longer tensor, past a shorter one.
    let json = r#"{"a":{"dtype":"U8","shape":[10],"data_offsets":[0,10]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},"c":{"dtype":"U8","shape":[1],"data_offsets":[5,6]}}"#;
    assert!(matches!(
        parse(json, 10),
        Err(CheckpointError::Overlap { .. })
    ));
}

#[test]
fn shape_and_byte_length_mismatch() {
    let json = r#"{"w":{"dtype":"BF16","shape":[4,4],"data_offsets":[0,30]}}"#;
    let err = parse(json, 32).unwrap_err();
    assert!(
        matches!(
            err,
            CheckpointError::SizeMismatch {
                needed: 32,
                span: 30,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("shape [4, 4] of BF16 needs 32 bytes but data_offsets span 30"),
        "{err}"
    );
    let json = r#"{"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
    assert!(matches!(
        parse(json, 8),
        Err(CheckpointError::SizeOverflow { .. })
    ));
}

#[test]
fn bad_shapes() {
    for shape in ["[-1, 4]", "[1.5]", "[1e3]", "\"4\"", "[null]", "[[4]]", "4"] {
        let json = format!(r#"{{"w":{{"dtype":"U8","shape":{shape},"data_offsets":[0,4]}}}}"#);
        let err = parse(&json, 4).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::BadShape { tensor, .. } if tensor == "w"),
            "{shape}: {err}"
        );
    }
}

#[test]
fn bad_offsets() {
    for offsets in ["[4, 0]", "[0]", "[0, 4, 8]", "[-1, 3]", "[0.0, 4]", "null"] {
        let json = format!(r#"{{"w":{{"dtype":"U8","shape":[4],"data_offsets":{offsets}}}}}"#);
        let err = parse(&json, 8).unwrap_err();
        assert!(
            matches!(err, CheckpointError::BadOffsets { .. }),
            "{offsets}: {err}"
        );
    }
}

#[test]
fn unknown_dtype_key_and_missing_field() {
    let json = r#"{"w":{"dtype":"F4","shape":[4],"data_offsets":[0,4]}}"#;
    let err = parse(json, 4).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::UnknownDtype { dtype, .. } if dtype == "\"F4\""),
        "{err}"
    );
    let json = r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"extra":1}}"#;
    assert!(
        matches!(parse(json, 4), Err(CheckpointError::UnknownKey { key, .. }) if key == "extra")
    );
    let json = r#"{"w":{"dtype":"U8","shape":[4]}}"#;
    assert!(matches!(
        parse(json, 4),
        Err(CheckpointError::MissingField {
            field: "data_offsets",
            ..
        })
    ));
    let json = r#"{"w":[1,2]}"#;
    assert!(matches!(
        parse(json, 4),
        Err(CheckpointError::EntryNotObject { .. })
    ));
}

#[test]
fn non_object_and_invalid_json() {
    for json in ["[1,2,3]", "\"x\"", "42", "null"] {
        assert!(
            matches!(parse(json, 0), Err(CheckpointError::HeaderNotObject { .. })),
            "{json}"
        );
    }
    for json in ["{", "{\"a\":}", "{} x"] {
        assert!(
            matches!(parse(json, 0), Err(CheckpointError::HeaderJson { .. })),
            "{json}"
        );
    }
    let bad_utf8 = [b'{', 0xff, b'}'];
    assert!(matches!(
        parse_header("f", 100, &bad_utf8),
        Err(CheckpointError::HeaderNotUtf8 { .. })
    ));
    let deep = format!("{{\"a\":{}", "[".repeat(10_000));
    assert!(matches!(
        parse(&deep, 0),
        Err(CheckpointError::HeaderJson { .. })
    ));
}

#[test]
fn metadata_and_duplicates() {
    let json = r#"{"__metadata__":{"format":"pt","n":1}}"#;
    assert!(matches!(
        parse(json, 0),
        Err(CheckpointError::BadMetadata { .. })
    ));
    let json = r#"{"__metadata__":[]}"#;
    assert!(matches!(
        parse(json, 0),
        Err(CheckpointError::BadMetadata { .. })
    ));
    let json = r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
    assert!(
        matches!(parse(json, 2), Err(CheckpointError::DuplicateHeaderEntry { tensor, .. }) if tensor == "w")
    );
    // A key repeated inside a tensor entry (the reference library refuses it;
    // a plain JSON map would keep the last value).
    let json = r#"{"w":{"dtype":"F32","dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    let e = parse(json, 4).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::HeaderJson { message, .. } if message.contains("duplicate key \"dtype\"")),
        "{e}"
    );
    let json = r#"{"__metadata__":{"a":"1","a":"2"}}"#;
    assert!(matches!(
        parse(json, 0),
        Err(CheckpointError::HeaderJson { .. })
    ));
}

/// The attack campaign's mutant: the conformance model's header with `dtype`
/// twice in `lm_head.weight`'s entry.
#[test]
fn duplicate_dtype_in_an_entry_from_the_campaign_is_refused() {
    let prefix: &[u8] = include_bytes!(
        "../../../tests/fixtures/reliability/safetensors_dup_dtype_in_entry.header.bin"
    );
    let len = u64::from_le_bytes(prefix[..8].try_into().unwrap());
    let header = &prefix[8..8 + len as usize];
    // the data section of the kit's llama-ft-a follows the header in the file
    let e = parse_header("m.safetensors", 8 + len + 685_696, header).unwrap_err();
    assert!(e.to_string().contains("duplicate key \"dtype\""), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), extra in 0u64..1024) {
        let _ = parse_header("f", bytes.len() as u64 + 8 + extra, &bytes);
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "r.safetensors", &bytes);
        let _ = read_header(&LocalStorage, &f);
    }

    #[test]
    fn mutated_headers_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = layout_file(&[("a", DType::BF16, &[3, 5]), ("b", DType::F32, &[2]), ("c", DType::U8, &[])]);
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        if bytes.len() >= 8 {
            let _ = parse_header("f", bytes.len() as u64, &bytes[8..]);
        }
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "m.safetensors", &bytes);
        let _ = read_header(&LocalStorage, &f);
    }

    #[test]
    fn mutated_json_values_never_panic(n in any::<u64>(), m in any::<u64>(), d in "[A-Z0-9_]{0,8}") {
        let json = format!(r#"{{"w":{{"dtype":"{d}","shape":[{n},{m}],"data_offsets":[{m},{n}]}}}}"#);
        let _ = parse(&json, n % 4096);
    }
}

// --- model directories ---

const CONFIG: &str =
    r#"{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "torch_dtype": "bfloat16"}"#;

fn model_dir(files: &[(&str, Vec<u8>)]) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("model");
    std::fs::create_dir(&m).unwrap();
    for (name, bytes) in files {
        write(&m, name, bytes);
    }
    (dir, loc(&m))
}

fn index(map: &[(&str, &str)]) -> Vec<u8> {
    let entries: Vec<String> = map
        .iter()
        .map(|(t, s)| format!("\"{t}\": \"{s}\""))
        .collect();
    format!(
        "{{\"metadata\": {{\"total_size\": 1}}, \"weight_map\": {{{}}}}}",
        entries.join(", ")
    )
    .into_bytes()
}

#[test]
fn opens_single_file_model() {
    let (_d, m) = model_dir(&[
        ("config.json", CONFIG.into()),
        (
            "model.safetensors",
            layout_file(&[("w", DType::BF16, &[2, 2]), ("b", DType::BF16, &[2])]),
        ),
    ]);
    let ck = Checkpoint::open(&LocalStorage, &m).unwrap();
    assert_eq!(ck.location, m);
    assert_eq!(ck.files, [LocalStorage.join(&m, "model.safetensors")]);
    assert_eq!(ck.tensors.keys().collect::<Vec<_>>(), ["b", "w"]);
    assert_eq!(ck.tensors["w"].file, ck.files[0]);
    assert_eq!(ck.tensors["w"].info.shape, [2, 2]);
    assert_eq!(ck.num_layers(), Some(("num_hidden_layers".to_string(), 2)));
    let keys: Vec<&str> = ck.config.keys().map(String::as_str).collect();
    assert_eq!(keys, ["architectures", "num_hidden_layers", "torch_dtype"]);
}

#[test]
fn opens_sharded_model_and_ignores_unindexed_tensors() {
    let (_d, m) = model_dir(&[
        ("config.json", CONFIG.into()),
        (
            "model-00001-of-00002.safetensors",
            layout_file(&[("a", DType::F32, &[2]), ("stray", DType::F32, &[1])]),
        ),
        (
            "model-00002-of-00002.safetensors",
            layout_file(&[("b", DType::F16, &[3])]),
        ),
        (
            "model.safetensors.index.json",
            index(&[
                ("b", "model-00002-of-00002.safetensors"),
                ("a", "model-00001-of-00002.safetensors"),
            ]),
        ),
        // A single file next to the index must not be used: the index wins.
        ("model.safetensors", b"garbage".to_vec()),
    ]);
    let ck = Checkpoint::open(&LocalStorage, &m).unwrap();
    assert_eq!(ck.tensors.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(ck.files.len(), 2);
    assert!(ck.tensors["a"]
        .file
        .ends_with("/model-00001-of-00002.safetensors"));
    assert!(ck.tensors["b"]
        .file
        .ends_with("/model-00002-of-00002.safetensors"));
    assert_eq!(ck.tensors["b"].info.dtype, DType::F16);
}

#[test]
fn the_conformance_model_opens() {
    let m = "/work/shared/conformance/models/llama-base";
    if !Path::new(m).exists() {
        return;
    }
    let ck = Checkpoint::open(&LocalStorage, m).unwrap();
    assert_eq!(ck.files.len(), 2);
    assert!(ck.tensors.contains_key("model.embed_tokens.weight"));
    assert!(ck.num_layers().is_some());
}

#[test]
fn missing_shard() {
    let (_d, m) = model_dir(&[
        ("config.json", CONFIG.into()),
        (
            "model.safetensors.index.json",
            index(&[("a", "model-00001-of-00002.safetensors")]),
        ),
    ]);
    let err = Checkpoint::open(&LocalStorage, &m).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::Storage(crate::storage::StorageError::NotFound { location }) if location.ends_with("model-00001-of-00002.safetensors")),
        "{err}"
    );
}

#[test]
fn tensor_missing_from_its_shard() {
    let (_d, m) = model_dir(&[
        ("config.json", CONFIG.into()),
        ("s1.safetensors", layout_file(&[("a", DType::F32, &[2])])),
        ("s2.safetensors", layout_file(&[("b", DType::F32, &[2])])),
        (
            "model.safetensors.index.json",
            index(&[("a", "s1.safetensors"), ("b", "s1.safetensors")]),
        ),
    ]);
    let err = Checkpoint::open(&LocalStorage, &m).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::TensorNotInShard { tensor, shard, .. } if tensor == "b" && shard == "s1.safetensors"),
        "{err}"
    );
}

#[test]
fn tensor_in_two_shards() {
    let (_d, m) = model_dir(&[
        ("config.json", CONFIG.into()),
        ("s1.safetensors", layout_file(&[("a", DType::F32, &[2])])),
        (
            "s2.safetensors",
            layout_file(&[("a", DType::F32, &[2]), ("b", DType::F32, &[2])]),
        ),
        (
            "model.safetensors.index.json",
            index(&[("a", "s1.safetensors"), ("b", "s2.safetensors")]),
        ),
    ]);
    let err = Checkpoint::open(&LocalStorage, &m).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::DuplicateTensor { tensor, .. } if tensor == "a"),
        "{err}"
    );
}

#[test]
fn bad_shard_names() {
    for shard in ["../x.safetensors", "sub/x.safetensors", "", "..", "a\\\\b"] {
        let (_d, m) = model_dir(&[
            ("config.json", CONFIG.into()),
            ("model.safetensors.index.json", index(&[("a", shard)])),
        ]);
        let err = Checkpoint::open(&LocalStorage, &m).unwrap_err();
        assert!(
            matches!(err, CheckpointError::BadShardName { .. }),
            "{shard}: {err}"
        );
    }
}

#[test]
fn bad_index() {
    for text in [
        "[]",
        "{}",
        "{\"weight_map\": {\"a\": 1}}",
        "{\"weight_map\": []}",
        "not json",
    ] {
        let (_d, m) = model_dir(&[
            ("config.json", CONFIG.into()),
            ("model.safetensors.index.json", text.into()),
        ]);
        let err = Checkpoint::open(&LocalStorage, &m).unwrap_err();
        assert!(
            matches!(err, CheckpointError::BadIndex { .. }),
            "{text}: {err}"
        );
    }
    let (_d, m) = model_dir(&[
        ("config.json", CONFIG.into()),
        ("s.safetensors", layout_file(&[("a", DType::F32, &[2])])),
        (
            "model.safetensors.index.json",
            b"{\"weight_map\": {\"a\": \"s.safetensors\", \"a\": \"s.safetensors\"}}".to_vec(),
        ),
    ]);
    assert!(matches!(
        Checkpoint::open(&LocalStorage, &m),
        Err(CheckpointError::BadIndex { .. })
    ));
}

#[test]
fn no_checkpoint() {
    let (_d, m) = model_dir(&[("config.json", CONFIG.into()), ("model.pt", vec![0; 4])]);
    let err = Checkpoint::open(&LocalStorage, &m).unwrap_err();
    assert!(matches!(err, CheckpointError::NoCheckpoint { .. }), "{err}");
    assert!(err
        .to_string()
        .contains("model.pt is not supported; convert the checkpoint to safetensors"));

    let (_d, m) = model_dir(&[("config.json", CONFIG.into())]);
    let err = Checkpoint::open(&LocalStorage, &m).unwrap_err();
    assert!(matches!(err, CheckpointError::NoCheckpoint { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");

    let (_d, m) = model_dir(&[("model-00001-of-00002.safetensors", vec![0; 4])]);
    let err = Checkpoint::open(&LocalStorage, &m).unwrap_err();
    assert!(
        err.to_string().contains("model-00001-of-00002.safetensors"),
        "{err}"
    );

    let (_d, m) = model_dir(&[("pytorch_model-00001-of-00002.bin", vec![0; 4])]);
    let err = Checkpoint::open(&LocalStorage, &m).unwrap_err().to_string();
    assert!(
        err.contains(
            "found pytorch_model-00001-of-00002.bin but neither pytorch_model.bin nor \
             pytorch_model.bin.index.json"
        ),
        "{err}"
    );
}

#[test]
fn a_broken_pytorch_model_bin_is_an_error_naming_it() {
    let (_d, m) = model_dir(&[
        ("config.json", CONFIG.into()),
        ("pytorch_model.bin", vec![0; 4]),
    ]);
    let err = Checkpoint::open(&LocalStorage, &m).unwrap_err();
    assert!(matches!(err, CheckpointError::TorchZip { .. }), "{err}");
    assert!(err.to_string().contains("pytorch_model.bin"), "{err}");
}

/// A model directory of torch checkpoints: `files` as (name, tensors).
fn torch_dir(
    files: &[(&str, Vec<torch_tests::View>)],
    extra: &[(&str, Vec<u8>)],
) -> (tempfile::TempDir, String) {
    let mut all: Vec<(&str, Vec<u8>)> = vec![("config.json", CONFIG.into())];
    for (name, views) in files {
        all.push((name, torch_tests::checkpoint(views, b"")));
    }
    all.extend(extra.iter().cloned());
    model_dir(&all)
}

#[test]
fn pytorch_model_bin_and_its_sharded_index_open() {
    use torch_tests::View;
    let w = |n: &str, k: &str| View::contiguous(n, k, "BFloat16Storage", &[4, 4]);
    let (_d, m) = torch_dir(
        &[("pytorch_model.bin", vec![w("a", "0"), w("b", "1")])],
        &[],
    );
    let c = Checkpoint::open(&LocalStorage, &m).unwrap();
    assert_eq!(c.tensors.len(), 2);
    assert_eq!(c.format(), "torch zip");
    assert!(c.tensors["a"].file.ends_with("pytorch_model.bin"));
    assert_eq!(c.tensors["a"].info.dtype, DType::BF16);

    let index = br#"{"metadata": {"total_size": 64}, "weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}"#;
    let (_d, m) = torch_dir(
        &[
            ("pytorch_model-00001-of-00002.bin", vec![w("a", "0")]),
            ("pytorch_model-00002-of-00002.bin", vec![w("b", "0")]),
        ],
        &[("pytorch_model.bin.index.json", index.to_vec())],
    );
    let c = Checkpoint::open(&LocalStorage, &m).unwrap();
    assert_eq!(c.files.len(), 2);
    assert!(c.tensors["b"]
        .file
        .ends_with("pytorch_model-00002-of-00002.bin"));

    // A tensor the index puts in the wrong shard.
    let wrong = br#"{"weight_map": {"a": "pytorch_model-00002-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}"#;
    let (_d, m) = torch_dir(
        &[
            ("pytorch_model-00001-of-00002.bin", vec![w("a", "0")]),
            ("pytorch_model-00002-of-00002.bin", vec![w("b", "0")]),
        ],
        &[("pytorch_model.bin.index.json", wrong.to_vec())],
    );
    let err = Checkpoint::open(&LocalStorage, &m).unwrap_err();
    assert!(
        matches!(err, CheckpointError::TensorNotInShard { .. }),
        "{err}"
    );
}

#[test]
fn safetensors_is_preferred_to_pytorch_model_bin() {
    use torch_tests::View;
    let (_d, m) = torch_dir(
        &[(
            "pytorch_model.bin",
            vec![View::contiguous("t", "0", "FloatStorage", &[2])],
        )],
        &[("model.safetensors", layout_file(&[("s", DType::F32, &[2])]))],
    );
    let c = Checkpoint::open(&LocalStorage, &m).unwrap();
    assert_eq!(c.tensors.keys().collect::<Vec<_>>(), ["s"]);
    assert_eq!(c.format(), "safetensors");
    // Even an unsafe pytorch_model.bin beside it is never opened.
    let mut p = torch_tests::Pickler::default();
    p.str("x")
        .global("posix", "system")
        .str("id")
        .op(&[0x85])
        .op(b"R");
    let evil = torch_tests::checkpoint(&[View::contiguous("t", "0", "FloatStorage", &[2])], &p.out);
    let (_d, m) = model_dir(&[
        ("config.json", CONFIG.into()),
        ("pytorch_model.bin", evil),
        ("model.safetensors", layout_file(&[("s", DType::F32, &[2])])),
    ]);
    assert!(Checkpoint::open(&LocalStorage, &m).is_ok());
    // The index of pytorch_model.bin comes before it, as mergekit looks.
    let (_d, m) = torch_dir(
        &[
            (
                "pytorch_model.bin",
                vec![View::contiguous("t", "0", "FloatStorage", &[2])],
            ),
            (
                "shard.bin",
                vec![View::contiguous("u", "0", "FloatStorage", &[2])],
            ),
        ],
        &[(
            "pytorch_model.bin.index.json",
            br#"{"weight_map": {"u": "shard.bin"}}"#.to_vec(),
        )],
    );
    let c = Checkpoint::open(&LocalStorage, &m).unwrap();
    assert_eq!(c.tensors.keys().collect::<Vec<_>>(), ["u"]);
}

#[test]
fn missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let m = format!("{}/no/such/model", dir.path().display());
    let err = Checkpoint::open(&LocalStorage, &m).unwrap_err();
    assert!(
        matches!(err, CheckpointError::ModelNotFound { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&m));
}

#[test]
fn missing_or_invalid_config() {
    let st = layout_file(&[("w", DType::F32, &[1])]);
    let (_d, m) = model_dir(&[("model.safetensors", st.clone())]);
    let err = Checkpoint::open(&LocalStorage, &m).unwrap_err();
    assert!(
        matches!(err, CheckpointError::ConfigMissing { .. }),
        "{err}"
    );
    for text in ["[1]", "{"] {
        let (_d, m) = model_dir(&[
            ("model.safetensors", st.clone()),
            ("config.json", text.into()),
        ]);
        let err = Checkpoint::open(&LocalStorage, &m).unwrap_err();
        assert!(
            matches!(err, CheckpointError::ConfigInvalid { .. }),
            "{text}: {err}"
        );
    }
}

#[test]
fn layer_count_keys() {
    let ck = |config: serde_json::Value| Checkpoint {
        location: String::new(),
        config: match config {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        },
        tensors: Default::default(),
        files: vec![],
    };
    let n = |v| ck(v).num_layers();
    assert_eq!(
        n(serde_json::json!({"n_layer": 12, "num_layers": 3})),
        Some(("n_layer".into(), 12))
    );
    assert_eq!(
        n(serde_json::json!({"num_layers": 3})),
        Some(("num_layers".into(), 3))
    );
    assert_eq!(
        n(serde_json::json!({"text_config": {"num_hidden_layers": 40}})),
        Some(("text_config.num_hidden_layers".into(), 40))
    );
    assert_eq!(n(serde_json::json!({"num_hidden_layers": "x"})), None);
}

#[test]
fn layer_counts_that_disagree_with_the_weights_are_refused() {
    let ck = |config: serde_json::Value| Checkpoint {
        location: "models/m".into(),
        config: match config {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        },
        tensors: Default::default(),
        files: vec![],
    };
    for bad in [
        serde_json::json!(-1),
        serde_json::json!(6.5),
        serde_json::json!([6]),
        serde_json::json!("6"),
    ] {
        let e = ck(serde_json::json!({"num_hidden_layers": bad}))
            .check_layer_count(6)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("models/m/config.json: num_hidden_layers is ")
                && e.contains("not a whole number"),
            "{e}"
        );
    }
    let e = ck(serde_json::json!({"text_config": {"num_hidden_layers": 6.5}}))
        .check_layer_count(6)
        .unwrap_err()
        .to_string();
    assert!(e.contains("text_config.num_hidden_layers"), "{e}");
    // more layers in the tensors than the config says
    let e = ck(serde_json::json!({"num_hidden_layers": 4}))
        .check_layer_count(6)
        .unwrap_err();
    assert!(
        matches!(&e, CheckpointError::LayerCountTooSmall { file, key, count: 4, layers: 6 }
            if file == "models/m/config.json" && key == "num_hidden_layers"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "models/m/config.json: num_hidden_layers is 4, but the checkpoint's tensors hold 6 layers \
         (0 to 5); fix config.json so that it describes the weights"
    );
    // what is fine: agreement, fewer tensors' layers, DeepSeek's MTP layer, no key
    assert!(ck(serde_json::json!({"num_hidden_layers": 6}))
        .check_layer_count(6)
        .is_ok());
    assert!(ck(serde_json::json!({"num_hidden_layers": 6}))
        .check_layer_count(0)
        .is_ok());
    let ds = serde_json::json!({"num_hidden_layers": 61, "num_nextn_predict_layers": 1});
    assert!(ck(ds).check_layer_count(62).is_ok());
    assert!(ck(serde_json::json!({})).check_layer_count(9).is_ok());
}
