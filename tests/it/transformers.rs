//! Merged models as Hugging Face transformers sees them: every tokenizer case
//! of the conformance kit, merged by `fleetmerge run`, loads with
//! `AutoTokenizer` and `AutoConfig` and gives mergekit's token for every id,
//! its special and added tokens, and its ids for strings of added tokens
//! (tests/fixtures/transformers_check.py; transformers without torch, from the
//! test venv). The same script with `--model` and a python that has torch also
//! loads both models and compares their logits (not run here: torch is a
//! multi-gigabyte install).

use crate::common::*;

const CASES: [&str; 5] = [
    "tok_union_linear",
    "tok_source_base_ties",
    "tok_source_model",
    "tok_force_tokens",
    "tok_slerp_union_pad",
];

#[test]
fn merged_tokenizers_load_in_transformers_and_encode_as_mergekits() {
    let dir = tempfile::tempdir().unwrap();
    let script = root().join("tests/fixtures/transformers_check.py");
    for case in CASES {
        let out = dir.path().join(case);
        let config = fixture(case).join("config.yaml");
        let o = fleetmerge(
            &examples(),
            &[
                "run",
                config.to_str().unwrap(),
                out.to_str().unwrap(),
                "--quiet",
            ],
        );
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let o = std::process::Command::new(venv_python())
            .arg(&script)
            .arg(&out)
            .arg(fixture(case).join("expected"))
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_VERBOSITY", "error")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && text.contains("{\"ok\": true}"),
            "{case}: {text}{}",
            stderr(&o)
        );
        // Each check printed its line: a script that stopped early fails.
        assert_eq!(text.matches("ok: ").count(), 4, "{case}: {text}");
    }
}
