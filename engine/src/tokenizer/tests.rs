//! The vocabulary build against the conformance kit's tokenizer models
//! (`examples/models/tok-*`, copies of the kit's): what mergekit 0.1.5 built
//! for the kit's `tok_*` cases, ids included, and the errors.

use super::*;
use crate::config::tokenizer::{parse, TokenizerConfig};
use crate::config::{ConfigError, ModelRef, Spanned};
use crate::yaml::Node;
use std::path::{Path, PathBuf};

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models")
}

fn model_ref(node: &Node, key_path: &str) -> Result<Spanned<ModelRef>, ConfigError> {
    match node.as_str() {
        Some(s) => Ok(Spanned::new(ModelRef::new(s, None), node.span)),
        None => Err(ConfigError {
            file: "t.yaml".into(),
            key_path: key_path.into(),
            span: Some(node.span),
            message: "not a model".into(),
        }),
    }
}

fn settings(yaml: &str) -> TokenizerConfig {
    let root = Node::parse("t.yaml", yaml).unwrap();
    let entries = root.as_map().unwrap();
    let find = |key: &str| entries.iter().find(|(k, _)| k.as_str() == Some(key));
    parse(
        "t.yaml",
        find("tokenizer_source"),
        find("tokenizer"),
        &model_ref,
    )
    .unwrap()
    .expect("tokenizer settings")
}

/// A model of the kit by name (`tok-base`, ...), its vocab_size from config.json.
fn kit(name: &str) -> VocabModel {
    model_at(name, &models_dir().join(name))
}

fn model_at(name: &str, dir: &Path) -> VocabModel {
    let config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    VocabModel {
        reference: ModelRef::new(name, None),
        location: dir.to_string_lossy().into_owned(),
        vocab_size: config_vocab_size(&config),
    }
}

fn build(
    yaml: &str,
    models: &[VocabModel],
    base: Option<usize>,
) -> Result<Vocabulary, TokenizerError> {
    let s = settings(yaml);
    let source_location = match &s.source.value {
        crate::config::tokenizer::TokenizerSource::Model(r) => {
            Some(models_dir().join(&r.path).to_string_lossy().into_owned())
        }
        _ => None,
    };
    build_vocabulary(&VocabRequest {
        config_file: "t.yaml",
        settings: &s,
        models,
        base,
        source_location: source_location.as_deref(),
    })
}

/// The regular tokens of the kit's tokenizers: `<unk>`, `<s>`, `</s>`, `_tok_3` ... `_tok_63`.
fn kit_token(id: usize) -> String {
    match id {
        0 => "<unk>".into(),
        1 => "<s>".into(),
        2 => "</s>".into(),
        _ => format!("_tok_{id}"),
    }
}

fn run(out: u64, src: u64, len: u64) -> RowRun {
    RowRun { out, src, len }
}

fn file<'a>(files: &'a [(String, String)], name: &str) -> &'a str {
    &files
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} written"))
        .1
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

/// Output tokenizer.json: token -> (id, special for added tokens).
fn vocab_of(text: &str) -> Vec<(String, u64, Option<bool>)> {
    let t = json(text);
    let mut out: Vec<(String, u64, Option<bool>)> = t["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap(), None))
        .collect();
    for a in t["added_tokens"].as_array().unwrap() {
        let (content, id) = (a["content"].as_str().unwrap(), a["id"].as_u64().unwrap());
        let special = a["special"].as_bool();
        match out.iter_mut().find(|(k, _, _)| k == content) {
            Some(e) => {
                assert_eq!(e.1, id, "{content}");
                e.2 = special;
            }
            None => out.push((content.to_string(), id, special)),
        }
    }
    out.sort_by_key(|e| e.1);
    out
}

#[test]
fn union_of_base_padded_and_chatml() {
    // tok_union_linear: padded's <UNUSED_i> (ids 64..67) are past its 64 rows and
    // dropped; chatml adds <|im_start|> (64) and <|im_end|> (65), special.
    let models = [kit("tok-base"), kit("tok-padded"), kit("tok-chatml")];
    let v = build("tokenizer_source: union\n", &models, Some(0)).unwrap();
    assert_eq!((v.len(), v.rows()), (66, 66));
    let expected: Vec<String> = (0..64)
        .map(kit_token)
        .chain(["<|im_start|>".into(), "<|im_end|>".into()])
        .collect();
    assert_eq!(v.tokens(), expected.as_slice());
    let identity = |n: u32| {
        (0..66)
            .map(move |i| (i < n).then_some(i))
            .collect::<Vec<_>>()
    };
    assert_eq!(v.permutation(0), identity(64).as_slice());
    assert_eq!(v.permutation(1), identity(64).as_slice());
    assert_eq!(v.permutation(2), identity(66).as_slice());

    let a = v.alignment(&[0, 1, 2], Some(0), &[64, 64, 66]).unwrap();
    a.validate(&[64, 64, 66]).unwrap();
    assert_eq!(
        a.runs,
        [
            vec![run(0, 0, 64)],
            vec![run(0, 0, 64)],
            vec![run(0, 0, 66)]
        ]
    );
    assert_eq!(
        a.fills,
        [
            RowFill {
                row: 64,
                fill: Fill::Row { input: 2, row: 64 }
            },
            RowFill {
                row: 65,
                fill: Fill::Row { input: 2, row: 65 }
            },
        ]
    );
    assert!(a.is_identity(2) && !a.is_identity(0));

    let s = v.summary(Some(0)).unwrap();
    assert_eq!((s.source.as_str(), s.tokens, s.rows), ("union", 66, 66));
    assert_eq!(
        s.added,
        [
            AddedEntry {
                token: "<|im_start|>".into(),
                id: 64,
                from: "tok-chatml".into(),
                special: true
            },
            AddedEntry {
                token: "<|im_end|>".into(),
                id: 65,
                from: "tok-chatml".into(),
                special: true
            },
        ]
    );
    assert_eq!(s.fallbacks.len(), 2);
    assert_eq!(s.fallbacks[0].lacking, ["tok-base", "tok-padded"]);
    assert_eq!(
        s.fallbacks[0].rule,
        "the row of tok-chatml, the only model with it"
    );
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);

    let files = v.output_files(None).unwrap();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json"
        ]
    );
    let vocab = vocab_of(file(&files, "tokenizer.json"));
    assert_eq!(vocab.len(), 66);
    assert_eq!(vocab[64], ("<|im_start|>".into(), 64, Some(true)));
    assert_eq!(vocab[65], ("<|im_end|>".into(), 65, Some(true)));
    assert_eq!(vocab[0], ("<unk>".into(), 0, Some(true)));
    assert_eq!(vocab[3], ("_tok_3".into(), 3, None));
    // It loads, and the added tokens encode to their ids.
    let t: tokenizers::Tokenizer = file(&files, "tokenizer.json").parse().unwrap();
    let ids = t
        .encode("<|im_start|><|im_end|>", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids, [64, 65]);
    let config = json(file(&files, "tokenizer_config.json"));
    let keys: Vec<&str> = config
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "added_tokens_decoder",
            "tokenizer_class",
            "bos_token",
            "eos_token",
            "unk_token",
            "model_max_length"
        ]
    );
    let decoder = config["added_tokens_decoder"].as_object().unwrap();
    assert_eq!(
        decoder.keys().collect::<Vec<_>>(),
        ["0", "1", "2", "64", "65"]
    );
    assert_eq!(
        decoder["64"],
        serde_json::json!({"content": "<|im_start|>", "lstrip": false, "normalized": false,
                           "rstrip": false, "single_word": false, "special": true})
    );
    // the base's special tokens map, as it is
    let base_map =
        std::fs::read_to_string(models_dir().join("tok-base/special_tokens_map.json")).unwrap();
    assert_eq!(file(&files, "special_tokens_map.json"), base_map);
}

#[test]
fn source_base_reindexes_the_others_and_keeps_the_file() {
    // tok_source_base_ties: chatml's 66 rows go into the base's 64.
    let models = [kit("tok-base"), kit("tok-chatml"), kit("tok-padded")];
    let v = build("tokenizer_source: base\n", &models, Some(0)).unwrap();
    assert_eq!((v.len(), v.rows()), (64, 64));
    let a = v.alignment(&[1, 2], Some(0), &[66, 64]).unwrap();
    a.validate(&[66, 64]).unwrap();
    assert_eq!(a.runs, [vec![run(0, 0, 64)], vec![run(0, 0, 64)]]);
    assert!(a.fills.is_empty());
    assert_eq!((a.rows, a.tokens), (64, 64));
    let s = v.summary(Some(0)).unwrap();
    assert_eq!(s.source, "base (tok-base)");
    assert!(s.added.is_empty() && s.fallbacks.is_empty());
    let files = v.output_files(None).unwrap();
    let base_json = std::fs::read_to_string(models_dir().join("tok-base/tokenizer.json")).unwrap();
    assert_eq!(file(&files, "tokenizer.json"), base_json);
}

#[test]
fn source_model_takes_its_tokenizer_as_it_is() {
    // tok_source_model: chatml's tokenizer; base and padded lack the two chat
    // tokens, whose rows then come from chatml alone.
    let models = [kit("tok-base"), kit("tok-padded"), kit("tok-chatml")];
    let v = build("tokenizer_source: tok-chatml\n", &models, Some(0)).unwrap();
    assert_eq!((v.len(), v.rows()), (66, 66));
    let a = v.alignment(&[0, 1, 2], Some(0), &[64, 64, 66]).unwrap();
    assert_eq!(a.fills.iter().map(|f| f.row).collect::<Vec<_>>(), [64, 65]);
    assert_eq!(a.fills[1].fill, Fill::Row { input: 2, row: 65 });
    let files = v.output_files(None).unwrap();
    let chatml = std::fs::read_to_string(models_dir().join("tok-chatml/tokenizer.json")).unwrap();
    assert_eq!(file(&files, "tokenizer.json"), chatml);
    // A source that is not one of the merged models.
    let v = build("tokenizer_source: tok-chatml\n", &models[..2], Some(0)).unwrap();
    assert_eq!(v.len(), 66);
    let s = v.summary(Some(0)).unwrap();
    assert_eq!(s.added[0].from, "tok-chatml");
    assert_eq!(s.fallbacks[0].rule, "zeros: no model has it");
    assert_eq!(s.warnings.len(), 2, "{:?}", s.warnings);
    assert!(
        s.warnings[0].contains("'<|im_start|>' is in no model"),
        "{:?}",
        s.warnings
    );
}

const FORCE: &str = concat!(
    "tokenizer:\n",
    "  source: union\n",
    "  tokens:\n",
    "    _tok_10:\n",
    "      source: tok-chatml\n",
    "      force: true\n",
    "    _tok_11:\n",
    "      source: tok-base\n",
    "      force: true\n",
    "    \"<|new|>\":\n",
    "      source:\n",
    "        kind: model_token\n",
    "        model: tok-chatml\n",
    "        token: \"<|im_end|>\"\n",
);

#[test]
fn token_overrides_and_forced_rows() {
    // tok_force_tokens: <|new|> is appended (66) with mergekit's flags for a
    // token added by name (normalized, not special) and takes chatml's row of
    // <|im_end|>; _tok_10 and _tok_11 are forced from one model for every input.
    let models = [kit("tok-base"), kit("tok-chatml")];
    let v = build(FORCE, &models, Some(0)).unwrap();
    assert_eq!((v.len(), v.rows()), (67, 67));
    assert_eq!(v.tokens()[66], "<|new|>");
    let a = v.alignment(&[0, 1], Some(0), &[64, 66]).unwrap();
    a.validate(&[64, 66]).unwrap();
    assert_eq!(
        a.runs,
        [
            vec![run(0, 0, 10), run(12, 12, 52)],
            vec![run(0, 0, 10), run(12, 12, 54)]
        ]
    );
    assert_eq!(
        a.fills,
        [
            RowFill {
                row: 10,
                fill: Fill::Row { input: 1, row: 10 }
            },
            RowFill {
                row: 11,
                fill: Fill::Row { input: 0, row: 11 }
            },
            RowFill {
                row: 64,
                fill: Fill::Row { input: 1, row: 64 }
            },
            RowFill {
                row: 65,
                fill: Fill::Row { input: 1, row: 65 }
            },
            RowFill {
                row: 66,
                fill: Fill::Row { input: 1, row: 65 }
            },
        ]
    );
    // Rows as numbers: input i's row r holds 1000 i + r.
    let rows = |i: usize, n: usize| (0..n).map(|r| (1000 * i + r) as f32).collect::<Vec<_>>();
    let (r0, r1) = (rows(0, 64), rows(1, 66));
    let out = a.align(&[&r0, &r1], 1);
    for o in &out {
        assert_eq!(o[10], 1010.0); // chatml's _tok_10, forced
        assert_eq!(o[11], 11.0); // the base's _tok_11, forced
        assert_eq!(o[66], 1065.0); // chatml's <|im_end|>
        assert_eq!((o[64], o[65]), (1064.0, 1065.0));
    }
    assert_eq!((out[0][12], out[1][12]), (12.0, 1012.0));

    let s = v.summary(Some(0)).unwrap();
    let added: Vec<(&str, &str, bool)> = s
        .added
        .iter()
        .map(|a| (a.token.as_str(), a.from.as_str(), a.special))
        .collect();
    assert_eq!(
        added,
        [
            ("<|im_start|>", "tok-chatml", true),
            ("<|im_end|>", "tok-chatml", true),
            ("<|new|>", "tokenizer.tokens", false)
        ]
    );
    assert_eq!(s.fallbacks[0].lacking, ["tok-base", "tok-chatml"]);
    assert_eq!(
        s.fallbacks[0].rule,
        "row 10 of tok-chatml (tokenizer.tokens)"
    );

    let files = v.output_files(None).unwrap();
    let t = json(file(&files, "tokenizer.json"));
    let new = &t["added_tokens"].as_array().unwrap()[5];
    assert_eq!(
        *new,
        serde_json::json!({"id": 66, "content": "<|new|>", "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": true, "special": false})
    );
}

#[test]
fn padding_rows() {
    // tok_slerp_union_pad: 66 tokens padded to 80 rows, each the input's mean.
    let yaml = "tokenizer:\n  source: union\n  pad_to_multiple_of: 16\n";
    let models = [kit("tok-base"), kit("tok-chatml")];
    let v = build(yaml, &models, Some(0)).unwrap();
    assert_eq!((v.len(), v.rows()), (66, 80));
    let a = v.alignment(&[0, 1], Some(0), &[64, 66]).unwrap();
    assert_eq!((a.rows, a.tokens), (80, 66));
    let rows = |i: usize, n: usize| (0..n).map(|r| (1000 * i + r) as f32).collect::<Vec<_>>();
    let (r0, r1) = (rows(0, 64), rows(1, 66));
    let out = a.align(&[&r0, &r1], 1);
    // base: rows 0..63, then chatml's 1064, 1065
    let mean0 = ((0..64).sum::<usize>() + 1064 + 1065) as f32 / 66.0;
    assert!(
        out[0][66..].iter().all(|&x| x == mean0),
        "{:?}",
        &out[0][66..]
    );
    let mean1 = (0..66).map(|r| 1000 + r).sum::<usize>() as f32 / 66.0;
    assert!(out[1][66..].iter().all(|&x| x == mean1));
    assert_eq!(v.summary(Some(0)).unwrap().rows, 80);
}

#[test]
fn several_models_with_a_token_take_the_base_row_or_the_mean() {
    // chatml twice (a second copy under another name): with the base in the
    // merge, rows the base lacks are the mean of the two; chatml as base gives
    // its own rows.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("chatml2");
    copy_tokenizer(&models_dir().join("tok-chatml"), &copy);
    let models = [
        kit("tok-base"),
        kit("tok-chatml"),
        model_at("chatml2", &copy),
    ];
    let v = build("tokenizer_source: union\n", &models, Some(0)).unwrap();
    let a = v.alignment(&[0, 1, 2], Some(0), &[64, 66, 66]).unwrap();
    assert_eq!(
        a.fills[0],
        RowFill {
            row: 64,
            fill: Fill::Mean(vec![(1, 64), (2, 64)])
        }
    );
    let a = v.alignment(&[0, 1, 2], Some(1), &[64, 66, 66]).unwrap();
    assert_eq!(
        a.fills[0],
        RowFill {
            row: 64,
            fill: Fill::Row { input: 1, row: 64 }
        }
    );
    // no base_model: the mean
    let a = v.alignment(&[0, 1, 2], None, &[64, 66, 66]).unwrap();
    assert!(matches!(a.fills[0].fill, Fill::Mean(_)));
    let s = v.summary(Some(0)).unwrap();
    assert_eq!(s.fallbacks[0].rule, "the mean of tok-chatml, chatml2");
}

/// Copies a model's tokenizer and config files (no weights) into `to`.
fn copy_tokenizer(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

#[test]
fn base_with_tokens_past_its_rows_is_stripped() {
    // padded as the base: <UNUSED_0..3> have no rows and leave the tokenizer.
    let models = [kit("tok-padded"), kit("tok-chatml")];
    let v = build("tokenizer_source: base\n", &models, Some(0)).unwrap();
    assert_eq!(v.len(), 64);
    let files = v.output_files(None).unwrap();
    let vocab = vocab_of(file(&files, "tokenizer.json"));
    assert_eq!(vocab.len(), 64);
    assert!(vocab.iter().all(|(t, _, _)| !t.starts_with("<UNUSED")));
    let config = json(file(&files, "tokenizer_config.json"));
    assert_eq!(config["added_tokens_decoder"].as_object().unwrap().len(), 3);
    // union: chatml's two tokens follow the stripped 64
    let v = build("tokenizer_source: union\n", &models, Some(0)).unwrap();
    assert_eq!(&v.tokens()[64..], ["<|im_start|>", "<|im_end|>"]);
}

#[test]
fn beyond_mergekit_new_token_on_a_base_source() {
    // mergekit 0.1.5 fails with a KeyError here (the token is added to the
    // base tokenizer itself, past the base's rows); the token is appended and
    // its row comes from its source.
    let yaml = concat!(
        "tokenizer:\n",
        "  source: base\n",
        "  tokens:\n",
        "    \"<|im_start|>\": {source: tok-chatml}\n",
        "    \"<tool>\": {source: {kind: model_token, model: tok-base, token_id: 5}}\n",
    );
    let models = [kit("tok-base"), kit("tok-chatml")];
    let v = build(yaml, &models, Some(0)).unwrap();
    assert_eq!(&v.tokens()[64..], ["<|im_start|>", "<tool>"]);
    let a = v.alignment(&[0, 1], Some(0), &[64, 66]).unwrap();
    a.validate(&[64, 66]).unwrap();
    assert_eq!(
        a.fills,
        [
            RowFill {
                row: 64,
                fill: Fill::Row { input: 1, row: 64 }
            },
            RowFill {
                row: 65,
                fill: Fill::Row { input: 0, row: 5 }
            },
        ]
    );
    assert_eq!(a.runs[1], [run(0, 0, 65)]);
}

#[test]
fn override_mistakes_name_the_key_and_line() {
    let models = [kit("tok-base"), kit("tok-chatml")];
    let head = "tokenizer:\n  tokens:\n";
    let config_err = |yaml: &str| match build(yaml, &models, Some(0)) {
        Err(TokenizerError::Config(e)) => e,
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("expected a config error"),
    };
    // a model that is not merged
    let e = config_err(&format!("{head}    x: {{source: tok-padded}}\n"));
    assert_eq!(
        (e.key_path.as_str(), e.span.map(|s| s.line)),
        ("tokenizer.tokens.x.source", Some(3))
    );
    assert!(
        e.message.contains("not one of the models of this merge"),
        "{e}"
    );
    // a token id out of range (chatml has 66 rows)
    let e = config_err(&format!(
        "{head}    x:\n      source: {{kind: model_token, model: tok-chatml, token_id: 66}}\n"
    ));
    assert_eq!(
        (e.key_path.as_str(), e.span.map(|s| s.line)),
        ("tokenizer.tokens.x.source.model", Some(4))
    );
    assert!(
        e.message
            .contains("token id 66 is out of range for tok-chatml"),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("t.yaml: tokenizer.tokens.x.source.model (line 4, "),
        "{e}"
    );
    // a token the model does not have
    let e = config_err(&format!(
        "{head}    x:\n      source: {{kind: model_token, model: tok-base, token: \"<|im_end|>\"}}\n"
    ));
    assert!(
        e.message
            .contains("'<|im_end|>' is not in the vocabulary of tok-base"),
        "{e}"
    );
    // a token past the model's rows (padded's <UNUSED_0> is 64 of 64 rows)
    let models3 = [kit("tok-base"), kit("tok-padded")];
    let e = match build(
        &format!("{head}    x:\n      source: {{kind: model_token, model: tok-padded, token: \"<UNUSED_0>\"}}\n"),
        &models3,
        Some(0),
    ) {
        Err(TokenizerError::Config(e)) => e,
        other => panic!("{:?}", other.map(|_| ())),
    };
    assert!(
        e.message
            .contains("token id 64 is out of range for tok-padded"),
        "{e}"
    );
    // a model's own row of a token it lacks
    let v = build(
        &format!("{head}    x: {{source: tok-chatml}}\n"),
        &models,
        Some(0),
    )
    .unwrap();
    let e = match v.alignment(&[0, 1], Some(0), &[64, 66]) {
        Err(TokenizerError::Config(e)) => e,
        other => panic!("{:?}", other.map(|_| ())),
    };
    assert_eq!(
        (e.key_path.as_str(), e.span.map(|s| s.line)),
        ("tokenizer.tokens.x.source", Some(3))
    );
    assert!(
        e.message
            .contains("'x' is not in the vocabulary of tok-chatml"),
        "{e}"
    );
    // a model that is merged but not an input of this tensor
    let v = build(
        &format!("{head}    \"<|im_end|>\": {{source: tok-chatml}}\n"),
        &models,
        Some(0),
    )
    .unwrap();
    let e = match v.alignment(&[0], Some(0), &[64]) {
        Err(TokenizerError::Config(e)) => e,
        other => panic!("{:?}", other.map(|_| ())),
    };
    assert!(e.message.contains("not an input of this tensor"), "{e}");
}

#[test]
fn rows_that_do_not_match_the_tokenizer_are_an_error() {
    let models = [kit("tok-base"), kit("tok-chatml")];
    let v = build("tokenizer_source: union\n", &models, Some(0)).unwrap();
    let e = v.alignment(&[0, 1], Some(0), &[64, 65]).unwrap_err();
    assert!(
        e.to_string().contains(
            "tok-chatml: its tokenizer gives '<|im_end|>' the id 65, but its embedding has 65 rows"
        ),
        "{e}"
    );
}

#[test]
fn missing_and_unreadable_tokenizers() {
    let dir = tempfile::tempdir().unwrap();
    let spm = dir.path().join("spm");
    std::fs::create_dir(&spm).unwrap();
    std::fs::copy(
        models_dir().join("tok-base/config.json"),
        spm.join("config.json"),
    )
    .unwrap();
    std::fs::write(spm.join("tokenizer.model"), b"\x0a\x05hello").unwrap();
    std::fs::write(spm.join("tokenizer_config.json"), "{}").unwrap();
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(
        models_dir().join("tok-base/config.json"),
        bare.join("config.json"),
    )
    .unwrap();

    // a sentencepiece-only model anywhere in the merge: the file is named
    let models = [kit("tok-base"), model_at("spm", &spm)];
    let e = build("tokenizer_source: union\n", &models, Some(0)).unwrap_err();
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("{}", spm.join("tokenizer.model").display())),
        "{shown}"
    );
    assert!(shown.contains("without tokenizer.json"), "{shown}");

    // a base without tokenizer
    let models = [model_at("bare", &bare), kit("tok-chatml")];
    let e = build("tokenizer_source: union\n", &models, Some(0)).unwrap_err();
    assert!(
        e.to_string()
            .contains("the base model bare has no tokenizer"),
        "{e}"
    );
    assert!(e.to_string().contains("tokenizer.json"), "{e}");

    // another model without tokenizer: taken to have the base's vocabulary
    let models = [kit("tok-base"), model_at("bare", &bare), kit("tok-chatml")];
    let v = build("tokenizer_source: union\n", &models, Some(0)).unwrap();
    assert_eq!(v.len(), 66);
    assert_eq!(v.permutation(1)[63], Some(63));
    assert_eq!(v.permutation(1)[64], None);
    assert!(
        v.warnings()[0].contains("bare has no tokenizer files"),
        "{:?}",
        v.warnings()
    );

    // a tokenizer.json that is not one
    let broken = dir.path().join("broken");
    copy_tokenizer(&models_dir().join("tok-chatml"), &broken);
    std::fs::write(broken.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let models = [kit("tok-base"), model_at("broken", &broken)];
    let e = build("tokenizer_source: union\n", &models, Some(0)).unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "{}: cannot be read as a tokenizer",
            broken.join("tokenizer.json").display()
        )),
        "{e}"
    );
}

#[test]
fn only_bpe_tokenizers_are_stripped() {
    // padded's tokenizer rewritten as WordLevel: its <UNUSED_i> cannot be removed.
    let dir = tempfile::tempdir().unwrap();
    let wl = dir.path().join("wordlevel");
    copy_tokenizer(&models_dir().join("tok-padded"), &wl);
    let mut t = json(&std::fs::read_to_string(wl.join("tokenizer.json")).unwrap());
    let vocab = t["model"]["vocab"].clone();
    t["model"] = serde_json::json!({"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"});
    std::fs::write(wl.join("tokenizer.json"), t.to_string()).unwrap();
    let models = [model_at("wordlevel", &wl), kit("tok-chatml")];
    let e = build("tokenizer_source: base\n", &models, Some(0)).unwrap_err();
    assert!(
        e.to_string()
            .contains("model is WordLevel; like mergekit, only BPE"),
        "{e}"
    );
    // with nothing to strip, any model type is fine
    let models = [kit("tok-base"), model_at("wordlevel", &wl)];
    assert_eq!(
        build("tokenizer_source: union\n", &models, Some(0))
            .unwrap()
            .len(),
        64
    );
}

#[test]
fn chat_template_goes_into_tokenizer_config() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    copy_tokenizer(&models_dir().join("tok-base"), &base);
    std::fs::write(base.join("chat_template.jinja"), "{{ messages }}").unwrap();
    let models = [model_at("base", &base), kit("tok-chatml")];
    let v = build("tokenizer_source: union\n", &models, Some(0)).unwrap();
    // without a configured template the base's file travels along
    let files = v.output_files(None).unwrap();
    assert_eq!(file(&files, "chat_template.jinja"), "{{ messages }}");
    let template = "{% for m in messages %}{{ m.content }}{% endfor %}";
    let files = v.output_files(Some(template)).unwrap();
    assert!(files.iter().all(|(n, _)| n != "chat_template.jinja"));
    assert_eq!(
        json(file(&files, "tokenizer_config.json"))["chat_template"],
        template
    );
}

#[test]
fn special_tokens_map_from_tokenizer_config_when_missing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    copy_tokenizer(&models_dir().join("tok-base"), &base);
    std::fs::remove_file(base.join("special_tokens_map.json")).unwrap();
    let models = [model_at("base", &base)];
    let v = build("tokenizer_source: base\n", &models, None).unwrap();
    let files = v.output_files(None).unwrap();
    assert_eq!(
        json(file(&files, "special_tokens_map.json")),
        serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    );
}

#[test]
fn ids_that_leave_holes_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let holes = dir.path().join("holes");
    copy_tokenizer(&models_dir().join("tok-chatml"), &holes);
    let mut t = json(&std::fs::read_to_string(holes.join("tokenizer.json")).unwrap());
    t["model"]["vocab"]["_tok_63"] = 100.into();
    std::fs::write(holes.join("tokenizer.json"), t.to_string()).unwrap();
    let models = [kit("tok-base"), model_at("holes", &holes)];
    let s = settings("tokenizer_source: holes\n");
    let location = holes.to_string_lossy().into_owned();
    let e = build_vocabulary(&VocabRequest {
        config_file: "t.yaml",
        settings: &s,
        models: &models,
        base: Some(0),
        source_location: Some(&location),
    })
    .expect_err("an error");
    assert!(
        e.to_string()
            .contains("not contiguous: '_tok_63' has id 100"),
        "{e}"
    );
}
