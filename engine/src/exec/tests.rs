//! The executor end to end: units on the emulated GPU, panics and hostile
//! inputs as the unit's error, and a measurement of the checks' cost.

use super::pipeline::run_unit;
use super::*;
use crate::config::MergeConfig;
use crate::dtype::DType;
use crate::plan::{plan, PlanOptions, DEFAULT_SHARD_SIZE};
use crate::unit::{TensorOp, TensorRef};
use std::path::PathBuf;
use std::sync::mpsc;

/// The conformance kit's cases for the methods the GPU path computes, run
/// unit by unit on the CPU and on the emulated GPU (through the same
/// executor: windows, tensors merged in parallel): the shards are equal. The
/// tokenizer cases merge vocabulary tensors whose rows were read by range and
/// aligned before the device takes them.
#[test]
fn units_on_the_emulated_gpu_write_the_cpu_bytes() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for case in [
        "linear",
        "dare_ties",
        "task_arithmetic",
        "mixtral_task_arithmetic",
        "tok_union_linear",
        "tok_source_base_ties",
    ] {
        let path = root
            .join("tests/fixtures/cases")
            .join(case)
            .join("config.yaml");
        let yaml = std::fs::read_to_string(&path).unwrap();
        let cfg = MergeConfig::parse("config.yaml", &yaml).unwrap();
        let p = plan(
            &cfg,
            &PlanOptions {
                unit_size: None,
                out_shard_size: DEFAULT_SHARD_SIZE / 4,
                seed: 7,
                allow_crimes: false,
                keep_fp8: false,
                base_dir: root.join("examples"),
            },
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = |d: &str| {
            let o = dir.path().join(d);
            std::fs::create_dir_all(&o).unwrap();
            o.to_string_lossy().into_owned()
        };
        let (cpu, gpu) = (out("cpu"), out("gpu"));
        for unit in &p.units {
            let limits = ExecLimits::default();
            let a = execute_unit_on(unit, &cpu, &NoProgress, &limits, &Device::Cpu).unwrap();
            let b = execute_unit_on(unit, &gpu, &NoProgress, &limits, &Device::Emulated).unwrap();
            assert_eq!(a.sha256, b.sha256, "{case}: {} differs", unit.file_name);
        }
    }
}

fn ties_unit() -> WorkUnit {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let yaml = std::fs::read_to_string(root.join("tests/fixtures/cases/ties/config.yaml")).unwrap();
    let cfg = MergeConfig::parse("config.yaml", &yaml).unwrap();
    let mut p = plan(
        &cfg,
        &PlanOptions {
            unit_size: None,
            out_shard_size: DEFAULT_SHARD_SIZE,
            seed: 7,
            allow_crimes: false,
            keep_fp8: false,
            base_dir: root.join("examples"),
        },
    )
    .unwrap();
    p.units.remove(0)
}

/// `f`'s result on a thread of its own, or a failed test after `limit`
/// (a hang) or if the thread panicked (a panic that escaped).
fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("the unit did not end within 60 s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the panic escaped"),
    }
}

fn out_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_string_lossy().into_owned();
    (dir, out)
}

fn assert_internal(e: &ExecError) {
    let text = e.to_string();
    assert!(matches!(e, ExecError::Internal(_)), "{text}");
    assert!(
        text.starts_with("internal error (a bug): panicked at ") && text.contains(".rs:"),
        "{text}"
    );
}

/// A kernel that panics (an integer merged output, which validation would
/// refuse: the pipeline is called without it) fails the unit within
/// bounded time, in the parallel compute of a window, in a window of one
/// tensor, and in a streamed tensor; nothing is written.
#[test]
fn a_panicking_kernel_is_the_units_error_not_a_hang() {
    let mut unit = ties_unit();
    for t in &mut unit.tensors {
        t.dtype = DType::I64;
    }
    assert!(unit.validate().is_err());
    for limits in [
        ExecLimits::default(),
        ExecLimits {
            window_bytes: 1,
            read_ahead: false,
            stream: false,
        },
        ExecLimits {
            window_bytes: 4096,
            read_ahead: true,
            stream: true,
        },
    ] {
        let (dir, out) = out_dir();
        let u = unit.clone();
        let r = bounded(move || run_unit(&u, &out, &NoProgress, &limits, &Device::Cpu));
        let e = r.expect_err("a panic is an error");
        assert_internal(&e);
        assert!(e.to_string().contains("non-float dtype I64"), "{e}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{limits:?}"
        );
        // Through the public entry, validation refuses the unit first.
        let (_dir, out) = out_dir();
        let e = execute_unit_with(&unit, &out, &NoProgress, &limits).unwrap_err();
        assert!(matches!(e, ExecError::Invalid(_)), "{e}");
    }
}

/// A panic on the writer thread (here in a progress callback) fails the
/// unit too, with the panic's message and place.
#[test]
fn a_panic_on_the_writer_thread_is_the_units_error() {
    struct Explodes;
    impl Progress for Explodes {
        fn written(&self, _: u64) {
            panic!("progress callback exploded");
        }
    }
    let unit = ties_unit();
    let (dir, out) = out_dir();
    let r = bounded(move || execute_unit(&unit, &out, &Explodes));
    let e = r.expect_err("a panic is an error");
    assert_internal(&e);
    assert!(e.to_string().contains("progress callback exploded"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Inputs are read only as tensors of their file's own header.
#[test]
fn inputs_must_be_tensors_of_their_files_header() {
    let unit = ties_unit();
    let (dir, out) = out_dir();
    let run = |u: &WorkUnit| execute_unit(u, &out, &NoProgress).unwrap_err().to_string();
    let name = unit.tensors[0].name.clone();

    // Shifted by one element: same length, not the header's range.
    let mut u = unit.clone();
    u.tensors[0].inputs[1].offset += 2;
    let e = run(&u);
    let file = &unit.tensors[0].inputs[1].location;
    assert!(e.contains(&name) && e.contains(file.as_str()), "{e}");
    assert!(e.contains("but the file's header has"), "{e}");

    // Another tensor's name at this tensor's range.
    let mut u = unit.clone();
    u.tensors[0].inputs[0].name = "model.norm.weight".into();
    assert!(run(&u).contains("but the file's header has"));

    // A name the file does not have.
    let mut u = unit.clone();
    u.tensors[0].inputs[0].name = "exfil".into();
    assert!(run(&u).contains("exfil") && run(&u).contains("no such tensor"));

    // A file that is not a safetensors file.
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, vec![b'x'; 200_000]).unwrap();
    let mut u = unit.clone();
    u.tensors[0].inputs[0].location = secret.to_string_lossy().into_owned();
    let e = run(&u);
    assert!(
        e.contains("secret.txt") && e.contains("not a usable safetensors file"),
        "{e}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("secret.txt")]);
}

/// What the checks cost on a unit of 12,000 tensors from four 12,000-tensor
/// files (`cargo test --release -p fleetmerge-engine check_cost -- --ignored
/// --nocapture`).
#[test]
#[ignore = "a measurement"]
fn check_cost() {
    use crate::unit::TensorRef;
    use crate::unit::{ParamValue, TensorParams};
    use std::time::Instant;
    const N: usize = 12_000;
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..N)
        .map(|i| {
            format!(
                "model.layers.{}.mlp.experts.{}.up_proj.weight",
                i / 100,
                i % 100
            )
        })
        .collect();
    let mut files = Vec::new();
    for m in 0..4 {
        let mut header = serde_json::Map::new();
        for (i, n) in names.iter().enumerate() {
            header.insert(
                n.clone(),
                serde_json::json!({"dtype": "BF16", "shape": [64], "data_offsets": [i * 128, (i + 1) * 128]}),
            );
        }
        let json = serde_json::to_vec(&header).unwrap();
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&json);
        let start = bytes.len() as u64;
        bytes.resize(bytes.len() + N * 128, 0x3f);
        let path = dir.path().join(format!("m{m}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        files.push((path.to_string_lossy().into_owned(), start));
    }
    let mut params = TensorParams::default();
    params
        .shared
        .insert("normalize".into(), ParamValue::Bool(true));
    params.per_input = vec![[("weight".to_string(), ParamValue::Number(0.25))].into(); 4];
    let unit = WorkUnit {
        part: None,
        format: PLAN_FORMAT,
        id: 0,
        file_name: "model.safetensors".into(),
        merge_method: "linear".into(),
        seed: 0,
        tensors: names
            .iter()
            .enumerate()
            .map(|(i, n)| OutputTensor {
                name: n.clone(),
                dtype: DType::BF16,
                shape: vec![64],
                op: TensorOp::Merge,
                inputs: files
                    .iter()
                    .enumerate()
                    .map(|(m, (loc, start))| TensorRef {
                        model: m,
                        name: n.clone(),
                        location: loc.clone(),
                        offset: start + i as u64 * 128,
                        len: 128,
                        dtype: DType::BF16,
                        shape: vec![64],
                        lora: None,
                    })
                    .collect(),
                base: None,
                params: params.clone(),
                scales: Vec::new(),
                block: None,
                requant: None,
                packed: None,
                vocab: None,
            })
            .collect(),
    };
    let t = Instant::now();
    unit.validate().unwrap();
    let validate = t.elapsed();
    let t = Instant::now();
    let maps = read::Maps::open(&unit.tensors).unwrap();
    inputs::check(&unit, &maps).unwrap();
    let check = t.elapsed();
    let (_out, out) = out_dir();
    let t = Instant::now();
    execute_unit(&unit, &out, &NoProgress).unwrap();
    let whole = t.elapsed();
    println!(
        "{N} tensors x 4 inputs: validate {validate:?}, header check (4 headers of {N}) \
         {check:?}, whole unit (both included) {whole:?}"
    );
}

/// A vocabulary tensor merges its inputs re-indexed into the output rows:
/// copied runs, a row one input lacks filled from the other, and a padding
/// row (each input's mean of its aligned token rows). The same bytes
/// streamed under a tiny window (rows aligned a segment at a time).
#[test]
fn vocabulary_tensors_merge_their_aligned_rows() {
    use crate::unit::{Fill, ParamValue, RowFill, RowRun, TensorParams, VocabAlignment};
    let dir = tempfile::tempdir().unwrap();
    // Input 0: 3 rows of 2; input 1: 2 rows of 2 (it lacks token 2).
    let rows: [&[f32]; 2] = [&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3.0, 4.0, 7.0, 8.0]];
    let mut refs = Vec::new();
    for (m, values) in rows.iter().enumerate() {
        let n = values.len() / 2;
        let header = serde_json::json!({"embed": {"dtype": "F32", "shape": [n, 2],
            "data_offsets": [0, values.len() * 4]}});
        let json = serde_json::to_vec(&header).unwrap();
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&json);
        let offset = bytes.len() as u64;
        for v in *values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let path = dir.path().join(format!("m{m}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        refs.push(TensorRef {
            model: m,
            name: "embed".into(),
            location: path.to_string_lossy().into_owned(),
            offset,
            len: values.len() as u64 * 4,
            dtype: DType::F32,
            shape: vec![n as u64, 2],
            lora: None,
        });
    }
    let params = TensorParams {
        per_input: vec![[("weight".to_string(), ParamValue::Number(0.5))].into(); 2],
        ..Default::default()
    };
    let unit = WorkUnit {
        part: None,
        format: PLAN_FORMAT,
        id: 0,
        file_name: "model.safetensors".into(),
        merge_method: "linear".into(),
        seed: 0,
        tensors: vec![OutputTensor {
            name: "embed".into(),
            dtype: DType::F32,
            shape: vec![4, 2],
            op: TensorOp::Merge,
            inputs: refs,
            base: None,
            params,
            scales: Vec::new(),
            block: None,
            requant: None,
            packed: None,
            vocab: Some(VocabAlignment {
                rows: 4,
                tokens: 3,
                runs: vec![
                    vec![RowRun {
                        out: 0,
                        src: 0,
                        len: 3,
                    }],
                    vec![RowRun {
                        out: 0,
                        src: 0,
                        len: 2,
                    }],
                ],
                fills: vec![RowFill {
                    row: 2,
                    fill: Fill::Row { input: 0, row: 2 },
                }],
            }),
        }],
    };
    unit.validate().unwrap();
    // Aligned: input 0 [1 2; 3 4; 5 6; pad 3 4], input 1 [3 4; 7 8; 5 6; pad 5 6].
    let want: Vec<f32> = vec![2.0, 3.0, 5.0, 6.0, 5.0, 6.0, 4.0, 5.0];
    let mut shas = Vec::new();
    for limits in [
        ExecLimits::default(),
        ExecLimits {
            window_bytes: 8,
            read_ahead: false,
            stream: true,
        },
    ] {
        let (_keep, out) = out_dir();
        let done = execute_unit_on(&unit, &out, &NoProgress, &limits, &Device::Cpu).unwrap();
        let bytes = std::fs::read(PathBuf::from(&out).join("model.safetensors")).unwrap();
        let data = &bytes[bytes.len() - 32..];
        let got: Vec<f32> = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, want, "{limits:?}");
        shas.push(done.sha256);
    }
    assert_eq!(shas[0], shas[1]);
    // A unit whose alignment reads past an input is refused before any read.
    let mut bad = unit.clone();
    bad.tensors[0].vocab.as_mut().unwrap().runs[1][0].len = 3;
    let (_keep, out) = out_dir();
    let e = execute_unit(&bad, &out, &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocab"), "{e}");
}

/// Writes a safetensors file of F32 tensors (name, shape, values) and returns
/// a reference to each, in order.
fn f32_file(path: &std::path::Path, tensors: &[(&str, Vec<u64>, Vec<f32>)]) -> Vec<TensorRef> {
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for (name, shape, values) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape,
                "data_offsets": [at, at + values.len() * 4]}),
        );
        at += values.len() * 4;
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    let data_start = bytes.len() as u64;
    let mut refs = Vec::new();
    let mut offset = data_start;
    for (name, shape, values) in tensors {
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        refs.push(TensorRef {
            model: 0,
            name: name.to_string(),
            location: path.to_string_lossy().into_owned(),
            offset,
            len: values.len() as u64 * 4,
            dtype: DType::F32,
            shape: shape.clone(),
            lora: None,
        });
        offset += values.len() as u64 * 4;
    }
    std::fs::write(path, bytes).unwrap();
    refs
}

/// The F32 values of the last `n` elements of the unit's shard.
fn shard_tail(out: &str, n: usize) -> Vec<f32> {
    let bytes = std::fs::read(PathBuf::from(out).join("model.safetensors")).unwrap();
    bytes[bytes.len() - 4 * n..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// An adapted input reads as `W + scale · B·A` (an embedding's, transposed,
/// also when its rows are re-indexed into an output vocabulary): the same
/// bits whole, streamed in segments of a few rows, and computed alone (the
/// coordinator's spot check). Values are exact in f32, so the expected
/// output is exact too.
#[test]
fn adapted_inputs_read_as_their_folded_weights() {
    use crate::unit::{LoraRef, ParamValue, RowRun, TensorParams, VocabAlignment};
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols, rank) = (40usize, 3usize, 2usize);
    let w: Vec<f32> = (0..rows * cols).map(|i| (i % 13) as f32 / 8.0).collect();
    let other: Vec<f32> = (0..rows * cols).map(|i| (i % 5) as f32).collect();
    let a: Vec<f32> = (0..rank * cols).map(|i| i as f32 - 2.0).collect();
    let b: Vec<f32> = (0..rows * rank).map(|i| (i % 7) as f32 * 0.5).collect();
    // An embedding's factors: A [r, rows], B [cols, r], delta (B·A)ᵀ.
    let ea: Vec<f32> = (0..rank * rows).map(|i| (i % 3) as f32).collect();
    let eb: Vec<f32> = (0..cols * rank).map(|i| i as f32 * 0.25).collect();
    let base = f32_file(
        &dir.path().join("base.safetensors"),
        &[
            ("w", vec![rows as u64, cols as u64], w.clone()),
            ("embed", vec![rows as u64, cols as u64], w.clone()),
        ],
    );
    let second = f32_file(
        &dir.path().join("other.safetensors"),
        &[("w", vec![rows as u64, cols as u64], other.clone())],
    );
    let adapter = f32_file(
        &dir.path().join("adapter_model.safetensors"),
        &[
            ("w.lora_A.weight", vec![rank as u64, cols as u64], a.clone()),
            ("w.lora_B.weight", vec![rows as u64, rank as u64], b.clone()),
            (
                "embed.lora_embedding_A",
                vec![rank as u64, rows as u64],
                ea.clone(),
            ),
            (
                "embed.lora_embedding_B",
                vec![cols as u64, rank as u64],
                eb.clone(),
            ),
        ],
    );
    let scale = 0.5f64;
    let mut adapted = base[0].clone();
    adapted.lora = Some(Box::new(LoraRef {
        a: adapter[0].clone(),
        b: adapter[1].clone(),
        scale,
        transposed: false,
    }));
    let mut embed = base[1].clone();
    embed.lora = Some(Box::new(LoraRef {
        a: adapter[2].clone(),
        b: adapter[3].clone(),
        scale,
        transposed: true,
    }));
    let mut other_ref = second[0].clone();
    other_ref.model = 1;
    let params = TensorParams {
        per_input: vec![[("weight".to_string(), ParamValue::Number(1.0))].into(); 2],
        ..Default::default()
    };
    let tensor = |name: &str, inputs: Vec<TensorRef>, vocab: Option<VocabAlignment>| {
        let shape = vec![vocab.as_ref().map_or(rows as u64, |v| v.rows), cols as u64];
        OutputTensor {
            name: name.into(),
            dtype: DType::F32,
            shape,
            op: TensorOp::Merge,
            inputs,
            base: None,
            params: params.clone(),
            scales: Vec::new(),
            block: None,
            requant: None,
            packed: None,
            vocab,
        }
    };
    // The embedding's rows re-indexed after the adapter is folded: rows
    // 20..30 first, then 0..20, then 35; rows 30..35 and 36..40 are never
    // read, so each row read gets the delta of its own index.
    let picked: Vec<usize> = (20..30).chain(0..20).chain([35]).collect();
    let run = |out: usize, src: usize, len: usize| RowRun {
        out: out as u64,
        src: src as u64,
        len: len as u64,
    };
    let runs = vec![run(0, 20, 10), run(10, 0, 20), run(30, 35, 1)];
    let vocab = VocabAlignment {
        rows: picked.len() as u64,
        tokens: picked.len() as u64,
        runs: vec![runs.clone(), runs],
        fills: Vec::new(),
    };
    let e_rows = picked.len();
    let mut other_embed = second[0].clone();
    other_embed.model = 1;
    let unit = WorkUnit {
        part: None,
        format: PLAN_FORMAT,
        id: 0,
        file_name: "model.safetensors".into(),
        merge_method: "linear".into(),
        seed: 0,
        tensors: vec![
            tensor("embed", vec![embed, other_embed], Some(vocab)),
            tensor("w", vec![adapted, other_ref], None),
        ],
    };
    unit.validate().unwrap();
    // Linear, weights 1 and 1 (normalized): the mean of folded W and `other`.
    let mut want_w = Vec::new();
    for i in 0..rows {
        for j in 0..cols {
            let p: f32 = (0..rank).map(|k| b[i * rank + k] * a[k * cols + j]).sum();
            let folded = w[i * cols + j] + p * scale as f32;
            want_w.push((folded + other[i * cols + j]) / 2.0);
        }
    }
    let mut want_e = Vec::new();
    for &i in &picked {
        for j in 0..cols {
            let p: f32 = (0..rank).map(|k| eb[j * rank + k] * ea[k * rows + i]).sum();
            let folded = w[i * cols + j] + p * scale as f32;
            want_e.push((folded + other[i * cols + j]) / 2.0);
        }
    }
    let mut shas = Vec::new();
    for limits in [
        ExecLimits::default(),
        // Both streamed in segments of a few rows (the factors read whole;
        // the embedding's rows read, adapted and aligned a segment at a time).
        ExecLimits {
            window_bytes: 64,
            read_ahead: false,
            stream: true,
        },
        ExecLimits {
            window_bytes: 200,
            read_ahead: true,
            stream: true,
        },
    ] {
        assert_eq!(limits.streams(&unit.tensors[0]), limits.stream);
        assert_eq!(limits.streams(&unit.tensors[1]), limits.stream);
        let (_keep, out) = out_dir();
        let done = execute_unit_on(&unit, &out, &NoProgress, &limits, &Device::Cpu).unwrap();
        let got = shard_tail(&out, rows * cols + e_rows * cols);
        assert_eq!(got[..e_rows * cols], want_e[..], "{limits:?}: embed");
        assert_eq!(got[e_rows * cols..], want_w[..], "{limits:?}: w");
        shas.push(done.sha256);
    }
    assert!(shas.iter().all(|s| *s == shas[0]));
    // The embedding computed alone (rows read by range, adapted, aligned).
    let alone = compute_tensor(&unit, 0).unwrap();
    let alone: Vec<f32> = alone
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(alone, want_e);
    let alone = compute_tensor(&unit, 1).unwrap();
    let alone: Vec<f32> = alone
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(alone, want_w);
    // The estimate counts the factors: read, and decoded to f32.
    let mut plain = unit.clone();
    for t in &mut plain.tensors {
        for r in &mut t.inputs {
            r.lora = None;
        }
    }
    let est = |u: &WorkUnit| memory::estimate(u, "/tmp", &ExecLimits::default(), 1);
    let factors: u64 = adapter.iter().map(|r| r.len).sum();
    assert!(est(&unit).inputs >= est(&plain).inputs + factors);
    assert!(est(&unit).working >= est(&plain).working + factors);
    // A factor whose reference does not match its file's header is refused.
    let mut bad = unit.clone();
    bad.tensors[1].inputs[0].lora.as_mut().unwrap().a.name = "w.lora_B.weight".into();
    let (_keep, out) = out_dir();
    let e = execute_unit(&bad, &out, &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("w.lora_B.weight"), "{e}");
}

/// An adapted FP8 weight is dequantized with its block scales first, then
/// gets the delta: `fp8 · scale + s · B·A`.
#[test]
fn an_adapted_fp8_weight_is_dequantized_then_adapted() {
    use crate::unit::{LoraRef, ParamValue, TensorParams};
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols) = (4u64, 3u64);
    // E4M3 codes 0x38 (1.0) and 0x30 (0.5), alternating; one block, scale 2.
    let codes: Vec<u8> = (0..rows * cols)
        .map(|i| if i % 2 == 0 { 0x38 } else { 0x30 })
        .collect();
    let header = serde_json::json!({
        "w": {"dtype": "F8_E4M3", "shape": [rows, cols], "data_offsets": [0, codes.len()]},
        "w_scale_inv": {"dtype": "F32", "shape": [1, 1], "data_offsets": [codes.len(), codes.len() + 4]},
    });
    let json = serde_json::to_vec(&header).unwrap();
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    let start = bytes.len() as u64;
    bytes.extend_from_slice(&codes);
    bytes.extend_from_slice(&2f32.to_le_bytes());
    let path = dir.path().join("fp8.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let location = path.to_string_lossy().into_owned();
    let r = |name: &str, dtype: DType, shape: Vec<u64>, offset: u64, len: u64| TensorRef {
        model: 0,
        name: name.into(),
        location: location.clone(),
        offset,
        len,
        dtype,
        shape,
        lora: None,
    };
    let a: Vec<f32> = vec![1.0, 0.0, -1.0];
    let b: Vec<f32> = vec![0.5, 1.0, 0.0, 2.0];
    let factors = f32_file(
        &dir.path().join("adapter_model.safetensors"),
        &[
            ("a", vec![1, cols], a.clone()),
            ("b", vec![rows, 1], b.clone()),
        ],
    );
    let mut input = r("w", DType::F8_E4M3, vec![rows, cols], start, rows * cols);
    input.lora = Some(Box::new(LoraRef {
        a: factors[0].clone(),
        b: factors[1].clone(),
        scale: 0.5,
        transposed: false,
    }));
    let unit = WorkUnit {
        part: None,
        format: PLAN_FORMAT,
        id: 0,
        file_name: "model.safetensors".into(),
        merge_method: "linear".into(),
        seed: 0,
        tensors: vec![OutputTensor {
            name: "w".into(),
            dtype: DType::F32,
            shape: vec![rows, cols],
            op: TensorOp::Merge,
            inputs: vec![input],
            base: None,
            params: TensorParams {
                per_input: vec![[("weight".to_string(), ParamValue::Number(1.0))].into()],
                ..Default::default()
            },
            scales: vec![Some(r(
                "w_scale_inv",
                DType::F32,
                vec![1, 1],
                start + rows * cols,
                4,
            ))],
            block: Some([128, 128]),
            requant: None,
            packed: None,
            vocab: None,
        }],
    };
    unit.validate().unwrap();
    let (_keep, out) = out_dir();
    execute_unit(&unit, &out, &NoProgress).unwrap();
    let want: Vec<f32> = (0..(rows * cols) as usize)
        .map(|i| {
            let w = if i % 2 == 0 { 2.0 } else { 1.0 };
            w + 0.5 * b[i / cols as usize] * a[i % cols as usize]
        })
        .collect();
    assert_eq!(shard_tail(&out, want.len()), want);
}

/// A vocabulary tensor of `tokens` output tokens (padded to `rows`) over
/// inputs whose token `t` is at row `maps[i][t]` (`None`: the input lacks
/// it): runs where an input has consecutive rows, and each missing row
/// filled as the tokenizer fills it (the base's row, the only input with
/// it, else the mean of those with it).
fn vocab_tensor(
    dir: &std::path::Path,
    maps: &[Vec<Option<u64>>],
    dtypes: &[DType],
    width: u64,
    rows: u64,
    method: &str,
) -> WorkUnit {
    use crate::methods::testing::{num, params};
    use crate::unit::{Fill, RowFill, RowRun, TensorRef, VocabAlignment};
    let tokens = maps[0].len() as u64;
    let mut runs: Vec<Vec<RowRun>> = vec![Vec::new(); maps.len()];
    for (i, map) in maps.iter().enumerate() {
        for (t, row) in map.iter().enumerate() {
            let Some(row) = *row else { continue };
            let t = t as u64;
            match runs[i].last_mut() {
                Some(r) if r.out + r.len == t && r.src + r.len == row => r.len += 1,
                _ => runs[i].push(RowRun {
                    out: t,
                    src: row,
                    len: 1,
                }),
            }
        }
    }
    let fills = (0..tokens as usize)
        .filter(|&t| maps.iter().any(|m| m[t].is_none()))
        .map(|t| {
            let have: Vec<(usize, u64)> = maps
                .iter()
                .enumerate()
                .filter_map(|(i, m)| m[t].map(|r| (i, r)))
                .collect();
            let fill = match have.as_slice() {
                [] => Fill::Zero,
                [(0, row), ..] => Fill::Row {
                    input: 0,
                    row: *row,
                },
                [(input, row)] => Fill::Row {
                    input: *input,
                    row: *row,
                },
                _ => Fill::Mean(have),
            };
            RowFill {
                row: t as u64,
                fill,
            }
        })
        .collect();
    let mut refs = Vec::new();
    for (i, (map, dtype)) in maps.iter().zip(dtypes).enumerate() {
        let n = map.iter().flatten().max().map_or(0, |m| m + 1) + 7;
        let values: Vec<f32> = (0..n * width)
            .map(|k| ((k * 7919 + i as u64 * 104_729) % 4001) as f32 * 5e-4 - 1.0)
            .collect();
        let mut data = vec![0u8; values.len() * dtype.size()];
        crate::dtype::encode_f32(*dtype, &values, &mut data);
        let header = serde_json::json!({"embed": {"dtype": dtype.to_string(),
            "shape": [n, width], "data_offsets": [0, data.len()]}});
        let json = serde_json::to_vec(&header).unwrap();
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&json);
        let offset = bytes.len() as u64;
        bytes.extend_from_slice(&data);
        let path = dir.join(format!("m{i}-{method}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        refs.push(TensorRef {
            model: i,
            name: "embed".into(),
            location: path.to_string_lossy().into_owned(),
            offset,
            len: data.len() as u64,
            dtype: *dtype,
            shape: vec![n, width],
            lora: None,
        });
    }
    let n = maps.len();
    let (base, params) = match method {
        "linear" => (None, params(&[], &vec![&[("weight", num(0.4))][..]; n])),
        "slerp" => (Some(0), params(&[("t", num(0.3))], &[&[], &[]])),
        _ => {
            let ft: &[(&str, _)] = &[("weight", num(0.6)), ("density", num(0.5))];
            let mut per: Vec<&[(&str, _)]> = vec![ft; n];
            per[0] = &[];
            (Some(0), params(&[], &per))
        }
    };
    WorkUnit {
        part: None,
        format: PLAN_FORMAT,
        id: 0,
        file_name: "model.safetensors".into(),
        merge_method: method.into(),
        seed: 3,
        tensors: vec![OutputTensor {
            name: "model.embed_tokens.weight".into(),
            dtype: DType::BF16,
            shape: vec![rows, width],
            op: TensorOp::Merge,
            inputs: refs,
            base,
            params,
            scales: Vec::new(),
            block: None,
            requant: None,
            packed: None,
            vocab: Some(VocabAlignment {
                rows,
                tokens,
                runs,
                fills,
            }),
        }],
    }
}

/// Streamed in segments (several per pass; TIES and SLERP take more than
/// one pass), a vocabulary tensor with runs that skip input rows, fills of
/// every kind and padding rows is merged to the bytes of its whole merge,
/// for methods with and without whole-tensor statistics, and the
/// coordinator's spot check ([`compute_tensor`]) computes the same bytes.
#[test]
fn streamed_vocabulary_tensors_give_the_bytes_of_whole_ones() {
    let dir = tempfile::tempdir().unwrap();
    // 705 tokens: the base has 0..600; input 1 has 0..550 and 600..700 (at
    // rows 550..650); input 2 has 0..300, drops its rows 300..405, and has
    // 300..705 at rows 405..810.
    let base: Vec<Option<u64>> = (0..705).map(|t| (t < 600).then_some(t)).collect();
    let one: Vec<Option<u64>> = (0..705)
        .map(|t| match t {
            0..550 => Some(t),
            600..700 => Some(t - 50),
            _ => None,
        })
        .collect();
    let two: Vec<Option<u64>> = (0..705)
        .map(|t| if t < 300 { Some(t) } else { Some(t + 105) })
        .collect();
    let width = 512;
    // (method, per input: the output row each input row goes to, input dtypes)
    type Case = (&'static str, Vec<Vec<Option<u64>>>, Vec<DType>);
    let cases: [Case; 4] = [
        (
            "linear",
            vec![base.clone(), one.clone(), two.clone()],
            vec![DType::BF16, DType::F32, DType::F16],
        ),
        (
            "ties",
            vec![base.clone(), one.clone(), two.clone()],
            vec![DType::BF16, DType::BF16, DType::F32],
        ),
        (
            "dare_ties",
            vec![base.clone(), one.clone(), two],
            vec![DType::BF16, DType::BF16, DType::BF16],
        ),
        ("slerp", vec![base, one], vec![DType::BF16, DType::F32]),
    ];
    for (method, maps, dtypes) in cases {
        let unit = vocab_tensor(dir.path(), &maps, &dtypes, width, 720, method);
        unit.validate().unwrap();
        let t = &unit.tensors[0];
        let mut shards = Vec::new();
        for window in [read::WINDOW_BYTES, 200_000, 50_000, 1] {
            let limits = ExecLimits {
                window_bytes: window,
                read_ahead: false,
                stream: true,
            };
            assert_eq!(limits.streams(t), window < read::WINDOW_BYTES, "{method}");
            let (_keep, out) = out_dir();
            execute_unit_on(&unit, &out, &NoProgress, &limits, &Device::Cpu).unwrap();
            let bytes = std::fs::read(PathBuf::from(&out).join("model.safetensors")).unwrap();
            shards.push(bytes);
        }
        let whole = &shards[0];
        for (k, s) in shards.iter().enumerate().skip(1) {
            assert!(s == whole, "{method}: streamed shard {k} differs");
        }
        let tensor = compute_tensor(&unit, 0).unwrap();
        assert!(
            whole.ends_with(&tensor),
            "{method}: the spot check computes other bytes"
        );
    }
}

/// A unit whose progress says it is cancelled (a worker's revoked lease)
/// stops before its next window, or its streamed tensor before its next
/// segment, with `StorageError::Cancelled`, and leaves no shard behind.
#[test]
fn a_cancelled_unit_stops_before_its_next_read_and_writes_nothing() {
    use std::sync::atomic::{AtomicU64, Ordering};
    struct CancelsOnceWritten(AtomicU64);
    impl Progress for CancelsOnceWritten {
        fn written(&self, bytes: u64) {
            self.0.fetch_add(bytes, Ordering::SeqCst);
        }
        fn cancelled(&self) -> bool {
            self.0.load(Ordering::SeqCst) > 0
        }
    }
    let unit = ties_unit();
    assert!(unit.tensors.len() >= 3, "{} tensors", unit.tensors.len());
    let smallest = unit.tensors.iter().map(|t| t.numel()).min().unwrap();
    for (what, limits) in [
        (
            "a window per tensor",
            ExecLimits {
                window_bytes: 1,
                read_ahead: false,
                stream: false,
            },
        ),
        (
            "streamed in segments",
            ExecLimits {
                // Several segments of even the smallest tensor.
                window_bytes: smallest * 2,
                read_ahead: false,
                stream: true,
            },
        ),
    ] {
        let (dir, out) = out_dir();
        let progress = CancelsOnceWritten(AtomicU64::new(0));
        let e = execute_unit_with(&unit, &out, &progress, &limits).unwrap_err();
        assert!(
            matches!(e, ExecError::Storage(StorageError::Cancelled { .. })),
            "{what}: {e}"
        );
        let written = progress.0.load(Ordering::SeqCst);
        let total: u64 = unit.tensors.iter().map(|t| t.byte_len()).sum();
        assert!(written < total, "{what}: wrote {written} of {total} bytes");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{what}");
    }
}
