//! Copying the donor's tokenizer files into the output, optionally with a chat
//! template set in `tokenizer_config.json`.

use super::chat_templates::resolve_chat_template;
use super::model_config::to_pretty_json;
use super::OutputError;
use crate::storage::Storage;
use serde_json::Value;

/// The files mergekit 0.1.5 copies (`merge.py: _copy_tokenizer`), plus
/// `vocab.json`: mergekit forgets it, but BPE tokenizers without a
/// `tokenizer.json` cannot load without it.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "generation_config.json",
    "chat_template.json",
    "video_preprocessor_config.json",
];

/// Files that would override a `chat_template` set in `tokenizer_config.json`
/// (transformers prefers them when loading), so they are left behind when a
/// template is configured.
const TEMPLATE_FILES: &[&str] = &["chat_template.jinja", "chat_template.json"];

/// Copies the donor's tokenizer files from `donor_dir` to `out_dir` and returns
/// the names copied. A donor without `tokenizer_config.json` and (`tokenizer.json`
/// or `tokenizer.model`) has no usable tokenizer: nothing is copied, and the
/// caller decides whether to warn. With `chat_template`, the copied
/// `tokenizer_config.json` gets `"chat_template"` set (other keys and their order
/// kept); an invalid template is an error before anything is written.
pub fn copy_tokenizer(
    storage: &dyn Storage,
    out_storage: &dyn Storage,
    donor_dir: &str,
    out_dir: &str,
    chat_template: Option<&str>,
) -> Result<Vec<String>, OutputError> {
    let template = chat_template.map(resolve_chat_template).transpose()?;
    let donor = |name: &str| storage.join(donor_dir, name);
    let has_tokenizer = storage.exists(&donor("tokenizer_config.json"))?
        && (storage.exists(&donor("tokenizer.json"))?
            || storage.exists(&donor("tokenizer.model"))?);
    if !has_tokenizer {
        return Ok(Vec::new());
    }

    let mut copied = Vec::new();
    for &name in TOKENIZER_FILES {
        if template.is_some() && TEMPLATE_FILES.contains(&name) {
            continue;
        }
        let from = donor(name);
        if !storage.exists(&from)? {
            continue;
        }
        let mut bytes = storage.read_all(&from)?;
        if let (Some(t), "tokenizer_config.json") = (&template, name) {
            bytes = with_chat_template(&from, &bytes, t)?.into_bytes();
        }
        out_storage.put(&out_storage.join(out_dir, name), &bytes)?;
        copied.push(name.to_string());
    }
    Ok(copied)
}

fn with_chat_template(location: &str, bytes: &[u8], template: &str) -> Result<String, OutputError> {
    let invalid = |message: String| OutputError::TokenizerConfig {
        location: location.to_string(),
        message,
    };
    let mut config = match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(invalid("not a JSON object".to_string())),
        Err(e) => return Err(invalid(e.to_string())),
    };
    config.insert("chat_template".into(), Value::from(template));
    Ok(to_pretty_json(&config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::builtin_chat_template;
    use crate::storage::LocalStorage;

    fn donor(files: &[(&str, &str)]) -> (tempfile::TempDir, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("donor");
        std::fs::create_dir(&d).unwrap();
        for (name, text) in files {
            std::fs::write(d.join(name), text).unwrap();
        }
        let out = dir.path().join("out").to_string_lossy().into_owned();
        (dir, d.to_string_lossy().into_owned(), out)
    }

    const CONFIG: &str = "{\n  \"tokenizer_class\": \"PreTrainedTokenizerFast\",\n  \"bos_token\": \"<s>\",\n  \"chat_template\": \"old\",\n  \"model_max_length\": 256\n}";

    #[test]
    fn copies_existing_files_verbatim() {
        let (_d, donor_dir, out) = donor(&[
            ("tokenizer_config.json", CONFIG),
            ("tokenizer.json", "{}"),
            ("vocab.json", "{\"a\": 0}"),
            ("merges.txt", "a b"),
            ("chat_template.jinja", "{{ x }}"),
            ("config.json", "{}"),
        ]);
        let copied = copy_tokenizer(&LocalStorage, &LocalStorage, &donor_dir, &out, None).unwrap();
        assert_eq!(
            copied,
            [
                "tokenizer_config.json",
                "tokenizer.json",
                "merges.txt",
                "vocab.json",
                "chat_template.jinja"
            ]
        );
        let read = |n: &str| std::fs::read_to_string(format!("{out}/{n}")).unwrap();
        assert_eq!(read("tokenizer_config.json"), CONFIG);
        assert_eq!(read("vocab.json"), "{\"a\": 0}");
        assert!(!std::path::Path::new(&format!("{out}/config.json")).exists());
    }

    #[test]
    fn sentencepiece_only_donor_counts() {
        let (_d, donor_dir, out) =
            donor(&[("tokenizer_config.json", "{}"), ("tokenizer.model", "spm")]);
        let copied = copy_tokenizer(&LocalStorage, &LocalStorage, &donor_dir, &out, None).unwrap();
        assert_eq!(copied, ["tokenizer_config.json", "tokenizer.model"]);
    }

    #[test]
    fn no_tokenizer_copies_nothing() {
        let (_d, donor_dir, out) = donor(&[("tokenizer.json", "{}"), ("merges.txt", "")]);
        assert!(
            copy_tokenizer(&LocalStorage, &LocalStorage, &donor_dir, &out, None)
                .unwrap()
                .is_empty()
        );
        let (_d, donor_dir, out) = donor(&[("tokenizer_config.json", "{}")]);
        assert!(
            copy_tokenizer(&LocalStorage, &LocalStorage, &donor_dir, &out, None)
                .unwrap()
                .is_empty()
        );
        assert!(!std::path::Path::new(&out).exists());
    }

    #[test]
    fn builtin_chat_template_is_set_in_place() {
        let (_d, donor_dir, out) = donor(&[
            ("tokenizer_config.json", CONFIG),
            ("tokenizer.json", "{}"),
            ("chat_template.jinja", "{{ x }}"),
        ]);
        let copied = copy_tokenizer(
            &LocalStorage,
            &LocalStorage,
            &donor_dir,
            &out,
            Some("chatml"),
        )
        .unwrap();
        assert_eq!(copied, ["tokenizer_config.json", "tokenizer.json"]);
        let text = std::fs::read_to_string(format!("{out}/tokenizer_config.json")).unwrap();
        let v: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
        let keys: Vec<&str> = v.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "tokenizer_class",
                "bos_token",
                "chat_template",
                "model_max_length"
            ]
        );
        assert_eq!(v["chat_template"], builtin_chat_template("chatml").unwrap());
        assert_eq!(v["model_max_length"], 256);
    }

    #[test]
    fn literal_template_is_added() {
        let (_d, donor_dir, out) = donor(&[
            ("tokenizer_config.json", "{\"a\": 1}"),
            ("tokenizer.json", "{}"),
        ]);
        let t = "{% for m in messages %}{{ m.content }}{% endfor %}";
        copy_tokenizer(&LocalStorage, &LocalStorage, &donor_dir, &out, Some(t)).unwrap();
        let text = std::fs::read_to_string(format!("{out}/tokenizer_config.json")).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v, serde_json::json!({"a": 1, "chat_template": t}));
    }

    #[test]
    fn invalid_template_writes_nothing() {
        let (_d, donor_dir, out) =
            donor(&[("tokenizer_config.json", "{}"), ("tokenizer.json", "{}")]);
        let err = copy_tokenizer(&LocalStorage, &LocalStorage, &donor_dir, &out, Some("nope"))
            .unwrap_err();
        assert!(matches!(err, OutputError::InvalidChatTemplate { .. }));
        assert!(err.to_string().contains("Invalid chat template"));
        assert!(!std::path::Path::new(&out).exists());
    }

    #[test]
    fn broken_tokenizer_config_with_template_is_an_error() {
        let (_d, donor_dir, out) =
            donor(&[("tokenizer_config.json", "[1]"), ("tokenizer.json", "{}")]);
        let err = copy_tokenizer(
            &LocalStorage,
            &LocalStorage,
            &donor_dir,
            &out,
            Some("llama3"),
        )
        .unwrap_err();
        assert!(matches!(err, OutputError::TokenizerConfig { .. }));
    }
}
