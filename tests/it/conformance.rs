//! Every conformance case copied into tests/fixtures, run through the real
//! binary and judged against mergekit's output as the kit judges it.

use crate::common::*;

fn manifest() -> serde_json::Map<String, serde_json::Value> {
    let raw = std::fs::read(root().join("tests/fixtures/cases/MANIFEST.json")).unwrap();
    serde_json::from_slice(&raw).unwrap()
}

fn run_case(name: &str, extra: &[&str]) {
    let case = &manifest()[name];
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let config = fixture(name).join("config.yaml");
    let mut args = vec![
        "run",
        config.to_str().unwrap(),
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    // Kit configs name `./models/...`, relative to the folder holding the models.
    let o = fleetmerge(&examples(), &args);
    if let Some(word) = case.get("expect_error").and_then(|v| v.as_str()) {
        let err = stderr(&o);
        assert!(
            !o.status.success(),
            "{name}: expected a failure, got success"
        );
        assert!(
            err.to_lowercase().contains(word),
            "{name}: error does not mention '{word}': {err}"
        );
        assert!(
            err.lines().count() <= 2,
            "{name}: error should be one paragraph: {err}"
        );
        assert!(
            !out.join("model.safetensors").exists()
                && !out.join("model.safetensors.index.json").exists()
        );
        return;
    }
    assert!(o.status.success(), "{name}: {}", stderr(&o));
    if case["mode"] == "stat" {
        let dir = fixture(name);
        let problems = compare_stat(
            &read_model(&out),
            &read_model(&dir.join(case["expected"].as_str().unwrap())),
            &read_model(&dir.join(case["alt"].as_str().unwrap())),
            &read_model(&examples().join(case["base"].as_str().unwrap())),
        );
        assert!(problems.is_empty(), "{name}: {problems:#?}");
        return;
    }
    let mode = match case["mode"].as_str().unwrap() {
        "exact" => Mode::Exact,
        "close" => Mode::Close,
        "bf16" => Mode::Bf16,
        other => panic!("mode {other} is not judged here"),
    };
    // `expected` is relative to the case folder, or a model under examples/ (ties_single
    // must equal its fine-tune bit for bit).
    let expected = case["expected"].as_str().unwrap();
    let expected_dir = if expected.starts_with("models/") {
        examples().join(expected)
    } else {
        fixture(name).join(expected)
    };
    if case.get("tokenizer").and_then(|v| v.as_str()) == Some("ids") {
        // Every token has mergekit's id, so rows compare by position too.
        assert_eq!(
            vocabulary(&out.join("tokenizer.json")),
            vocabulary(&expected_dir.join("tokenizer.json")),
            "{name}: tokenizer.json vocabulary"
        );
    }
    let problems = compare(&read_model(&out), &read_model(&expected_dir), mode);
    assert!(problems.is_empty(), "{name}: {problems:#?}");
    // config.json: the keys the kit checks.
    let ours: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(expected_dir.join("config.json")).unwrap()).unwrap();
    for key in [
        "architectures",
        "num_hidden_layers",
        "hidden_size",
        "vocab_size",
    ] {
        assert_eq!(ours[key], reference[key], "{name}: config.json {key}");
    }
    assert!(out.join("README.md").exists() && out.join("mergekit_config.yml").exists());
    let yaml = std::fs::read_to_string(&config).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("mergekit_config.yml")).unwrap(),
        yaml
    );
    // The base model carries the tokenizer; merges with it as donor copy it.
    if yaml.contains("base_model: ./models/llama-base")
        || yaml.contains("base_model: ./models/mixtral-base")
    {
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            assert!(out.join(f).exists(), "{name}: {f} not copied");
        }
    }
}

/// A tokenizer.json as the kit judges it: every token (model vocabulary and
/// added tokens) with its id, and each added token's `special` flag.
fn vocabulary(path: &std::path::Path) -> std::collections::BTreeMap<String, (u64, Option<bool>)> {
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap();
    let mut out = std::collections::BTreeMap::new();
    for (token, id) in json["model"]["vocab"].as_object().unwrap() {
        out.insert(token.clone(), (id.as_u64().unwrap(), None));
    }
    for t in json["added_tokens"].as_array().unwrap() {
        out.insert(
            t["content"].as_str().unwrap().to_string(),
            (t["id"].as_u64().unwrap(), t["special"].as_bool()),
        );
    }
    out
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_case(stringify!($name), &[]);
            }
        )*
        /// Every case that has a test above.
        const CASES: &[&str] = &[$(stringify!($name)),*];
    };
}

cases!(
    linear,
    slerp_filter,
    slerp_gradient,
    task_arithmetic,
    ties,
    ties_bf16,
    ties_single,
    passthrough_slices,
    mixtral_task_arithmetic,
    mixtral_ties,
    dare_ties,
    della,
    breadcrumbs_ties,
    sce,
    nuslerp,
    multislerp,
    karcher,
    model_stock,
    nearswap,
    arcee_fusion,
    err_ties_no_base,
    err_unknown_method,
    err_missing_model,
    err_layer_range,
    err_della_epsilon,
    err_vocab_mismatch,
    tok_union_linear,
    tok_source_base_ties,
    tok_source_model,
    tok_force_tokens,
    tok_slerp_union_pad,
    lora_linear,
    lora_ties,
    lora_base_model,
    bin_linear,
    bin_mixed_ties,
    err_bin_unsafe_pickle,
    gptoss_linear,
    gptoss_ties,
);

#[test]
fn every_fixture_case_has_a_test() {
    for name in manifest().keys() {
        assert!(
            CASES.contains(&name.as_str()),
            "fixture case {name} has no test"
        );
    }
}

#[test]
fn small_shards_give_the_same_tensors_and_a_valid_index() {
    let dir = tempfile::tempdir().unwrap();
    let (one, many) = (dir.path().join("one"), dir.path().join("many"));
    let config = fixture("ties").join("config.yaml");
    for (out, size) in [(&one, "5B"), (&many, "100K")] {
        let o = fleetmerge(
            &examples(),
            &[
                "run",
                config.to_str().unwrap(),
                out.to_str().unwrap(),
                "--quiet",
                "--out-shard-size",
                size,
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert!(one.join("model.safetensors").exists());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(many.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() > 3, "{shards:?}");
    let n = shards.len();
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(*s, format!("model-{:05}-of-{:05}.safetensors", i + 1, n));
    }
    let tensors = read_model(&many);
    let total: u64 = tensors.values().map(|t| t.bytes.len() as u64).sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    assert_eq!(tensors, read_model(&one));
}

#[test]
fn randomized_merges_do_not_depend_on_threads_or_unit_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for (name, extra) in [
        ("t1", vec!["--threads", "1"]),
        ("t4", vec!["--threads", "4"]),
        (
            "w3",
            vec![
                "--threads",
                "3",
                "--workers",
                "3",
                "--out-shard-size",
                "100K",
            ],
        ),
    ] {
        for case in ["dare_ties", "della"] {
            let out = dir.path().join(format!("{case}-{name}"));
            let config = fixture(case).join("config.yaml");
            let mut args = vec![
                "run",
                config.to_str().unwrap(),
                out.to_str().unwrap(),
                "--quiet",
                "--random-seed",
                "7",
            ];
            args.extend(extra.iter().copied());
            let o = fleetmerge(&examples(), &args);
            assert!(o.status.success(), "{}", stderr(&o));
            outputs.push((case, read_model(&out)));
        }
    }
    for case in ["dare_ties", "della"] {
        let runs: Vec<_> = outputs
            .iter()
            .filter(|(c, _)| *c == case)
            .map(|(_, m)| m)
            .collect();
        assert!(
            runs.windows(2).all(|w| w[0] == w[1]),
            "{case}: outputs differ between runs"
        );
    }
    // A different seed gives a different draw.
    let out = dir.path().join("seed8");
    let config = fixture("dare_ties").join("config.yaml");
    let o = fleetmerge(
        &examples(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
            "--random-seed",
            "8",
        ],
    );
    assert!(o.status.success());
    assert_ne!(
        &read_model(&out),
        outputs
            .iter()
            .find(|(c, _)| *c == "dare_ties")
            .map(|(_, m)| m)
            .unwrap()
    );
}

#[test]
fn merging_again_into_the_same_folder_leaves_one_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let config = fixture("linear").join("config.yaml");
    let run = |size: &str| {
        let o = fleetmerge(
            &examples(),
            &[
                "run",
                config.to_str().unwrap(),
                out.to_str().unwrap(),
                "--quiet",
                "--out-shard-size",
                size,
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let shards = || {
        let mut v: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors") || n.ends_with(".index.json"))
            .collect();
        v.sort();
        v
    };
    run("100K");
    let many = shards();
    assert!(many.len() > 3 && many.contains(&"model.safetensors.index.json".to_string()));
    run("5B");
    assert_eq!(shards(), vec!["model.safetensors".to_string()]);
    run("200K");
    assert!(shards()
        .iter()
        .all(|n| n.starts_with("model-") || n == "model.safetensors.index.json"));
}

/// The kit's tokenizer cases on its tokenizer models widened to 16 Ki
/// columns (`write_wide_tok_models`: the same vocabularies and alignments,
/// embeddings of 1 to 2.6 MB per model): under a `--max-memory` that cannot
/// hold an embedding's aligned inputs whole, both vocabulary tensors stream
/// (rows read and aligned a segment at a time, padding rows included) and
/// every output file has the bytes of the run without a budget.
#[test]
fn tokenizer_cases_streamed_under_max_memory_match_the_whole_run() {
    let dir = tempfile::tempdir().unwrap();
    write_wide_tok_models(dir.path(), 16 << 10, 0);
    let budget = "95MiB";
    for case in [
        "tok_union_linear",
        "tok_source_base_ties",
        "tok_source_model",
        "tok_force_tokens",
        "tok_slerp_union_pad",
    ] {
        let config = fixture(case).join("config.yaml");
        let config = config.to_str().unwrap();
        let (whole, limited) = (
            dir.path().join(format!("{case}-whole")),
            dir.path().join(case),
        );
        // The plan says the two vocabulary tensors stream within the budget.
        let o = fleetmerge(
            dir.path(),
            &[
                "plan",
                config,
                "--json",
                "--threads",
                "2",
                "--max-memory",
                budget,
            ],
        );
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            plan["plan"]["streamed_tensors"],
            2,
            "{case}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        for (out, extra) in [(&whole, vec![]), (&limited, vec!["--max-memory", budget])] {
            let mut args = vec![
                "run",
                config,
                out.to_str().unwrap(),
                "--quiet",
                "--threads",
                "2",
            ];
            args.extend(extra);
            let o = fleetmerge(dir.path(), &args);
            assert!(o.status.success(), "{case}: {}", stderr(&o));
        }
        assert!(same_output_files(&limited, &whole) >= 4, "{case}");
    }
}
