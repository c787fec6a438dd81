//! Merged models as Hugging Face transformers sees them: every tokenizer case
//! of the conformance kit, merged by `fleetmerge run`, loads with
//! `AutoTokenizer` and `AutoConfig` and gives mergekit's token for every id,
//! its special and added tokens, and its ids for strings of added tokens
//! (tests/fixtures/transformers_check.py; transformers without torch, from the
//! test venv); with torch (`FLEETMERGE_TORCH_PYTHON`) both models load and
//! give the same logits.

use crate::common::*;

const CASES: [&str; 5] = [
    "tok_union_linear",
    "tok_source_base_ties",
    "tok_source_model",
    "tok_force_tokens",
    "tok_slerp_union_pad",
];

/// Merges every case into `dir` and runs the check script on each with
/// `python` (and `extra` arguments); `lines`: the `ok: ` lines it must print.
fn check_cases(python: &std::path::Path, extra: &[&str], lines: usize) {
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
        let o = std::process::Command::new(python)
            .arg(&script)
            .arg(&out)
            .arg(fixture(case).join("expected"))
            .args(extra)
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
        assert_eq!(text.matches("ok: ").count(), lines, "{case}: {text}");
    }
}

#[test]
fn merged_tokenizers_load_in_transformers_and_encode_as_mergekits() {
    check_cases(&venv_python(), &[], 4);
}

/// The merged models load as `AutoModelForCausalLM` and give mergekit's
/// logits for the strings of the tokenizer check.
#[test]
fn merged_models_load_in_transformers_with_mergekits_logits() {
    check_cases(&torch_python(), &["--model"], 5);
}
