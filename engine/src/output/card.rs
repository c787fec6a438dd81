//! The `README.md` model card: mergekit 0.1.5's template (`card.py`) with our
//! own tag added, including its YAML front matter as PyYAML dumps it.

/// What the card says about a merge.
pub struct CardInput<'a> {
    /// Basename of the output directory.
    pub name: &'a str,
    /// The configured `merge_method`.
    pub merge_method: &'a str,
    pub method_pretty: Option<&'a str>,
    pub method_url: Option<&'a str>,
    pub base_model: Option<&'a str>,
    /// Referenced models in config order, base included; `path+lora` references
    /// are split as mergekit's `ModelReference` does.
    pub models: &'a [String],
    /// The YAML config text, verbatim.
    pub config_yaml: &'a str,
    /// Whether a path exists on the local filesystem (mergekit's `os.path.exists`).
    pub model_exists_locally: &'a dyn Fn(&str) -> bool,
}

const TAGS: &[&str] = &["merge", "mergekit", "fleetmerge"];

/// The model card text.
pub fn model_card(input: &CardInput) -> String {
    let name = if input.name.is_empty() {
        "Untitled Model (1)"
    } else {
        input.name
    };
    let is_hf = |p: &str| is_hf(p, input.model_exists_locally);
    // mergekit links `model.path`, without the `@revision`.
    let link = |p: &str| {
        let p = without_revision(p);
        if is_hf(p) {
            format!("[{p}](https://huggingface.co/{p})")
        } else {
            p.to_string()
        }
    };
    let model_md = |m: &str| match split_lora(m) {
        (path, Some(lora)) => format!("{} + {}", link(path), link(lora)),
        (path, None) => link(path),
    };

    let mut models: Vec<&str> = Vec::with_capacity(input.models.len());
    for m in input.models {
        // mergekit's referenced models come from a set.
        if !models.contains(&m.as_str()) {
            models.push(m);
        }
    }
    let hf_paths: Vec<&str> = models
        .iter()
        .flat_map(|m| {
            let (path, lora) = split_lora(m);
            std::iter::once(path).chain(lora)
        })
        .map(without_revision)
        .filter(|p| is_hf(p))
        .collect();

    // mergekit lists slerp's base as an ordinary model ("curse my past self").
    let actual_base = input.base_model.filter(|_| input.merge_method != "slerp");
    let base_text = actual_base
        .map(|b| format!(" using {} as a base", model_md(b)))
        .unwrap_or_default();
    let bullets: Vec<String> = models
        .iter()
        .filter(|m| Some(**m) != actual_base)
        .map(|m| format!("* {}", model_md(m)))
        .collect();

    let method_name = input.method_pretty.unwrap_or(input.merge_method);
    let method = match input.method_url.filter(|u| !u.trim().is_empty()) {
        Some(url) => format!("[{method_name}]({url})"),
        None => method_name.to_string(),
    };

    format!(
        "---\n{metadata}\n---\n# {name}\n\n\
This is a merge of pre-trained language models created using [mergekit](https://github.com/cg123/mergekit).\n\n\
## Merge Details\n### Merge Method\n\n\
This model was merged using the {method} merge method{base_text}.\n\n\
### Models Merged\n\n\
The following models were included in the merge:\n{models}\n\n\
### Configuration\n\n\
The following YAML configuration was used to produce this model:\n\n\
```yaml\n{config_yaml}\n```\n",
        metadata = front_matter(&hf_paths),
        models = bullets.join("\n"),
        config_yaml = input.config_yaml,
    )
}

/// What a user of a big merge wants on record beyond mergekit's card.
pub struct Provenance<'a> {
    pub merge_method: &'a str,
    pub out_dtype: Option<String>,
    pub parameters: u64,
    pub total_size: u64,
    /// (reference as written, where it was read from).
    pub models: &'a [(String, String)],
    /// Hash of the config and of every input's headers and sizes.
    pub fingerprint: &'a str,
    /// (file, bytes, sha256) of every shard.
    pub shards: &'a [(String, u64, String)],
}

/// The section appended to mergekit's card: version, inputs, method, dtype,
/// size and a checksum for every shard.
pub fn provenance(p: &Provenance) -> String {
    let mut s = String::from("\n## Provenance\n\n");
    s.push_str(&format!(
        "Merged with fleetmerge {} using `{}`, output dtype {}: {} parameters, {} bytes of \
         tensors in {} file{}.\n\n",
        env!("CARGO_PKG_VERSION"),
        p.merge_method,
        p.out_dtype.as_deref().unwrap_or("as the inputs"),
        p.parameters,
        p.total_size,
        p.shards.len(),
        if p.shards.len() == 1 { "" } else { "s" }
    ));
    s.push_str("Input models (the config's reference, and where it was read):\n\n");
    for (reference, location) in p.models {
        if let Ok(h) = crate::storage::hub::parse_location(location) {
            s.push_str(&format!(
                "* `{reference}`: Hugging Face Hub `{}` at commit [`{}`]({})\n",
                h.repo,
                h.commit,
                crate::storage::hub::commit_url(&h.repo, &h.commit)
            ));
        } else if reference == location {
            s.push_str(&format!("* `{reference}`\n"));
        } else {
            s.push_str(&format!("* `{reference}`: `{location}`\n"));
        }
    }
    s.push_str(&format!(
        "\nInput fingerprint (sha256 of the resolved config and of every input's \
         safetensors headers and file sizes): `{}`\n\n",
        p.fingerprint
    ));
    s.push_str("| file | bytes | sha256 |\n| --- | --- | --- |\n");
    for (file, size, sha) in p.shards {
        s.push_str(&format!("| {file} | {size} | `{sha}` |\n"));
    }
    s
}

/// `path` of `path@revision` (mergekit's `ModelPath.path`).
fn without_revision(p: &str) -> &str {
    p.split_once('@').map_or(p, |(path, _)| path)
}

/// `path+lora` as mergekit's `ModelReference.parse` splits it.
fn split_lora(model: &str) -> (&str, Option<&str>) {
    match model.split_once('+') {
        Some((path, lora)) => (path, Some(lora)),
        None => (model, None),
    }
}

/// card.py's `is_hf`, minus the Hub query: a path that exists locally is taken
/// as local, since we never call the Hub.
fn is_hf(path: &str, exists_locally: &dyn Fn(&str) -> bool) -> bool {
    match path.chars().next() {
        None | Some('/') | Some('~') => false,
        Some(_) => path.matches('/').count() <= 1 && !exists_locally(path),
    }
}

/// `yaml.dump({"base_model": ..., "library_name": ..., "tags": ...})`: block
/// style, keys sorted, ending in a newline.
fn front_matter(hf_paths: &[&str]) -> String {
    let mut out = String::new();
    if hf_paths.is_empty() {
        out.push_str("base_model: []\n");
    } else {
        out.push_str("base_model:\n");
        for p in hf_paths {
            out.push_str(&format!("- {}\n", yaml_scalar(p)));
        }
    }
    out.push_str("library_name: transformers\ntags:\n");
    for t in TAGS {
        out.push_str(&format!("- {t}\n"));
    }
    out
}

/// A string as PyYAML's emitter writes it in block context: plain when it reads
/// back as the same string, else single-quoted, else (control or non-ASCII
/// characters, which PyYAML escapes by default) double-quoted. Line folding of
/// long scalars with spaces is not reproduced; model paths have no spaces.
fn yaml_scalar(s: &str) -> String {
    let special = s.chars().any(|c| !(' '..='~').contains(&c));
    if special {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                ' '..='~' => out.push(c),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) <= 0xff => out.push_str(&format!("\\x{:02X}", c as u32)),
                c if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04X}", c as u32)),
                c => out.push_str(&format!("\\U{:08X}", c as u32)),
            }
        }
        out.push('"');
        return out;
    }
    if plain_allowed(s) && !resolves_to_non_string(s) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// PyYAML `analyze_scalar`'s `allow_block_plain` for a printable ASCII string.
fn plain_allowed(s: &str) -> bool {
    if s.is_empty() || s.starts_with(' ') || s.ends_with(' ') {
        return false;
    }
    if s.starts_with("---") || s.starts_with("...") {
        return false;
    }
    let bytes = s.as_bytes();
    let ws_after = |i: usize| bytes.get(i + 1).is_none_or(|c| matches!(c, b' ' | b'\t'));
    for (i, &c) in bytes.iter().enumerate() {
        let blocks = if i == 0 {
            b"#,[]{}&*!|>'\"%@`".contains(&c) || (matches!(c, b'?' | b':' | b'-') && ws_after(i))
        } else {
            (c == b':' && ws_after(i)) || (c == b'#' && bytes.get(i - 1) == Some(&b' '))
        };
        if blocks {
            return false;
        }
    }
    true
}

/// Whether PyYAML's implicit resolvers (YAML 1.1: bool, int, float, null,
/// timestamp, merge, value) would read the plain scalar as something else.
fn resolves_to_non_string(s: &str) -> bool {
    const BOOLS: &[&str] = &[
        "yes", "Yes", "YES", "no", "No", "NO", "true", "True", "TRUE", "false", "False", "FALSE",
        "on", "On", "ON", "off", "Off", "OFF",
    ];
    BOOLS.contains(&s)
        || matches!(s, "" | "~" | "null" | "Null" | "NULL" | "<<" | "=")
        || is_yaml_int(s)
        || is_yaml_float(s)
        || is_yaml_timestamp(s)
}

fn all(s: &str, f: impl Fn(u8) -> bool) -> bool {
    s.bytes().all(f)
}

fn digit_run(s: &str) -> bool {
    all(s, |c| c.is_ascii_digit() || c == b'_')
}

/// `(:[0-5]?[0-9])+` after the leading group.
fn sexagesimal_tail(s: &str) -> bool {
    let mut parts = s.split(':');
    parts.next() == Some("")
        && parts.all(|p| {
            let b = p.as_bytes();
            match b {
                [d] => d.is_ascii_digit(),
                [a, d] => (b'0'..=b'5').contains(a) && d.is_ascii_digit(),
                _ => false,
            }
        })
}

fn strip_sign(s: &str) -> &str {
    s.strip_prefix(['-', '+']).unwrap_or(s)
}

fn is_yaml_int(s: &str) -> bool {
    let u = strip_sign(s);
    if let Some(b) = u.strip_prefix("0b") {
        return !b.is_empty() && all(b, |c| matches!(c, b'0' | b'1' | b'_'));
    }
    if let Some(x) = u.strip_prefix("0x") {
        return !x.is_empty() && all(x, |c| c.is_ascii_hexdigit() || c == b'_');
    }
    if u == "0" {
        return true;
    }
    if let Some(o) = u.strip_prefix('0') {
        return !o.is_empty() && all(o, |c| (b'0'..=b'7').contains(&c) || c == b'_');
    }
    if !u.starts_with(|c: char| ('1'..='9').contains(&c)) {
        return false;
    }
    match u.find(':') {
        None => digit_run(u),
        Some(i) => digit_run(&u[..i]) && sexagesimal_tail(&u[i..]),
    }
}

/// `[eE][-+][0-9]+` or nothing.
fn exponent_ok(e: &str) -> bool {
    if e.is_empty() {
        return true;
    }
    let Some(rest) = e.strip_prefix(['e', 'E']) else {
        return false;
    };
    let Some(digits) = rest.strip_prefix(['-', '+']) else {
        return false;
    };
    !digits.is_empty() && all(digits, |c| c.is_ascii_digit())
}

fn is_yaml_float(s: &str) -> bool {
    if matches!(s, ".nan" | ".NaN" | ".NAN") {
        return true;
    }
    let u = strip_sign(s);
    if matches!(u, ".inf" | ".Inf" | ".INF") {
        return true;
    }
    let exp_at = |t: &str| t.find(['e', 'E']).unwrap_or(t.len());
    // \.[0-9][0-9_]*(exp)? — no sign allowed.
    if let Some(frac) = s.strip_prefix('.') {
        let e = exp_at(frac);
        return frac.starts_with(|c: char| c.is_ascii_digit())
            && digit_run(&frac[..e])
            && exponent_ok(&frac[e..]);
    }
    if !u.starts_with(|c: char| c.is_ascii_digit()) {
        return false;
    }
    let Some(dot) = u.find('.') else {
        return false;
    };
    let (int, frac) = (&u[..dot], &u[dot + 1..]);
    if let Some(colon) = int.find(':') {
        // [0-9][0-9_]*(:[0-5]?[0-9])+\.[0-9_]*
        return digit_run(&int[..colon]) && sexagesimal_tail(&int[colon..]) && digit_run(frac);
    }
    let e = exp_at(frac);
    digit_run(int) && digit_run(&frac[..e]) && exponent_ok(&frac[e..])
}

fn is_yaml_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if b.len() == 10
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
    {
        return true;
    }
    // The date-time form: yyyy-m[m]-d[d] followed by T/t or blanks and a time.
    // Only its prefix is checked, which suffices for model paths.
    let mut parts = s.splitn(3, '-');
    let (Some(y), Some(m), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let d_len = rest.bytes().take_while(u8::is_ascii_digit).count();
    y.len() == 4
        && all(y, |c| c.is_ascii_digit())
        && (1..=2).contains(&m.len())
        && all(m, |c| c.is_ascii_digit())
        && (1..=2).contains(&d_len)
        && rest[d_len..].starts_with(['T', 't', ' ', '\t'])
        && rest[d_len..].contains(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// mergekit 0.1.5's card for conformance case `ties` (tags aside).
    const TIES_EXPECTED: &str = "---
base_model: []
library_name: transformers
tags:
- mergekit
- merge

---
# expected

This is a merge of pre-trained language models created using [mergekit](https://github.com/cg123/mergekit).

## Merge Details
### Merge Method

This model was merged using the [TIES](https://arxiv.org/abs/2306.01708) merge method using ./models/llama-base as a base.

### Models Merged

The following models were included in the merge:
* ./models/llama-ft-a
* ./models/llama-ft-b
* ./models/llama-ft-c

### Configuration

The following YAML configuration was used to produce this model:

```yaml
models:
  - model: ./models/llama-ft-a
    parameters: {weight: 1.0, density: 0.5}
  - model: ./models/llama-ft-b
    parameters: {weight: 0.5, density: 0.7}
  - model: ./models/llama-ft-c
    parameters: {weight: 0.8, density: 0.3}
merge_method: ties
base_model: ./models/llama-base
parameters:
  normalize: true
dtype: float32
out_dtype: bfloat16

```
";

    const OUR_TAGS: &str = "tags:\n- merge\n- mergekit\n- fleetmerge\n";
    const MK_TAGS: &str = "tags:\n- mergekit\n- merge\n";

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn yaml_of(card: &str) -> &str {
        let start = card.find("```yaml\n").unwrap() + 8;
        &card[start..card.len() - 5]
    }

    #[test]
    fn ties_with_local_base_matches_mergekit() {
        let config_yaml = yaml_of(TIES_EXPECTED);
        let models = strings(&[
            "./models/llama-base",
            "./models/llama-ft-a",
            "./models/llama-ft-b",
            "./models/llama-ft-c",
        ]);
        let card = model_card(&CardInput {
            name: "expected",
            merge_method: "ties",
            method_pretty: Some("TIES"),
            method_url: Some("https://arxiv.org/abs/2306.01708"),
            base_model: Some("./models/llama-base"),
            models: &models,
            config_yaml,
            model_exists_locally: &|_| true,
        });
        assert_eq!(card, TIES_EXPECTED.replace(MK_TAGS, OUR_TAGS));
    }

    #[test]
    fn linear_without_base_and_without_url() {
        let models = strings(&["/m/b", "/m/a"]);
        let card = model_card(&CardInput {
            name: "",
            merge_method: "linear",
            method_pretty: Some("Linear"),
            method_url: None,
            base_model: None,
            models: &models,
            config_yaml: "merge_method: linear\n",
            model_exists_locally: &|_| true,
        });
        assert!(card.starts_with("---\nbase_model: []\nlibrary_name: transformers\n"));
        assert!(card.contains("\n---\n# Untitled Model (1)\n\n"));
        assert!(card.contains("This model was merged using the Linear merge method.\n"));
        assert!(card.contains("merge:\n* /m/b\n* /m/a\n\n### Configuration"));
        assert!(card.ends_with("```yaml\nmerge_method: linear\n\n```\n"));
    }

    #[test]
    fn slerp_lists_base_as_a_model() {
        let models = strings(&["./a", "./b"]);
        let card = model_card(&CardInput {
            name: "out",
            merge_method: "slerp",
            method_pretty: Some("SLERP"),
            method_url: Some("https://en.wikipedia.org/wiki/Slerp"),
            base_model: Some("./a"),
            models: &models,
            config_yaml: "x: 1\n",
            model_exists_locally: &|_| true,
        });
        assert!(
            card.contains("using the [SLERP](https://en.wikipedia.org/wiki/Slerp) merge method.\n")
        );
        assert!(card.contains("merge:\n* ./a\n* ./b\n\n"));
    }

    #[test]
    fn hub_paths_are_linked_and_listed() {
        let models = strings(&["org/base", "org/a", "local/exists", "~/x", "a/b/c", "org/a"]);
        let card = model_card(&CardInput {
            name: "m",
            merge_method: "custom_thing",
            method_pretty: None,
            method_url: Some("  "),
            base_model: Some("org/base"),
            models: &models,
            config_yaml: "",
            model_exists_locally: &|p| p == "local/exists",
        });
        assert!(card.starts_with(
            "---\nbase_model:\n- org/base\n- org/a\nlibrary_name: transformers\ntags:\n- merge\n- mergekit\n- fleetmerge\n\n---\n# m\n"
        ));
        assert!(card.contains(
            "using the custom_thing merge method using [org/base](https://huggingface.co/org/base) as a base.\n"
        ));
        assert!(card.contains(
            "merge:\n* [org/a](https://huggingface.co/org/a)\n* local/exists\n* ~/x\n* a/b/c\n\n"
        ));
    }

    #[test]
    fn hub_revisions_are_left_out_of_links_and_commits_recorded() {
        let models = strings(&["org/base@v1", "org/a@main"]);
        let card = model_card(&CardInput {
            name: "m",
            merge_method: "ties",
            method_pretty: None,
            method_url: None,
            base_model: Some("org/base@v1"),
            models: &models,
            config_yaml: "",
            model_exists_locally: &|_| false,
        });
        assert!(
            card.starts_with("---\nbase_model:\n- org/base\n- org/a\n"),
            "{card}"
        );
        assert!(card.contains("using [org/base](https://huggingface.co/org/base) as a base"));
        assert!(
            card.contains("* [org/a](https://huggingface.co/org/a)\n"),
            "{card}"
        );
        let c = "0123456789abcdef0123456789abcdef01234567";
        let p = provenance(&Provenance {
            merge_method: "ties",
            out_dtype: None,
            parameters: 1,
            total_size: 2,
            models: &[("org/a@main".into(), format!("hf://org/a@{c}"))],
            fingerprint: "f",
            shards: &[],
        });
        assert!(
            p.contains(&format!(
                "* `org/a@main`: Hugging Face Hub `org/a` at commit [`{c}`]("
            )),
            "{p}"
        );
        assert!(p.contains(&format!("/org/a/tree/{c})")), "{p}");
    }

    #[test]
    fn lora_references() {
        let models = strings(&["org/model+org/lora"]);
        let card = model_card(&CardInput {
            name: "m",
            merge_method: "linear",
            method_pretty: None,
            method_url: None,
            base_model: None,
            models: &models,
            config_yaml: "",
            model_exists_locally: &|_| false,
        });
        assert!(card.contains("base_model:\n- org/model\n- org/lora\n"));
        assert!(card.contains(
            "* [org/model](https://huggingface.co/org/model) + [org/lora](https://huggingface.co/org/lora)\n"
        ));
    }

    /// Expected values from PyYAML 6.0 `yaml.dump([s])`.
    #[test]
    fn yaml_scalars_match_pyyaml() {
        let cases = [
            ("org/model", "org/model"),
            ("Qwen2.5-7B", "Qwen2.5-7B"),
            ("yes", "'yes'"),
            ("No", "'No'"),
            ("null", "'null'"),
            ("123", "'123'"),
            ("0x1F", "'0x1F'"),
            ("0755", "'0755'"),
            ("0789", "0789"),
            ("1_000", "'1_000'"),
            ("1.5", "'1.5'"),
            ("1.", "'1.'"),
            (".5", "'.5'"),
            ("1e5", "1e5"),
            ("1.0e+5", "'1.0e+5'"),
            (".inf", "'.inf'"),
            ("-.inf", "'-.inf'"),
            ("2024-01-01", "'2024-01-01'"),
            ("2024-1-1", "2024-1-1"),
            ("1:30", "'1:30'"),
            ("1:30.5", "'1:30.5'"),
            ("-model", "-model"),
            ("- model", "'- model'"),
            ("@org/x", "'@org/x'"),
            ("a: b", "'a: b'"),
            ("a:b", "a:b"),
            ("a #b", "'a #b'"),
            ("a#b", "a#b"),
            ("it's", "it's"),
            ("'q", "'''q'"),
            ("---x", "'---x'"),
            ("...", "'...'"),
            ("a,b", "a,b"),
            ("[x", "'[x'"),
            ("=", "'='"),
            ("<<", "'<<'"),
            ("caf\u{e9}", "\"caf\\xE9\""),
            ("", "''"),
        ];
        for (input, expected) in cases {
            assert_eq!(yaml_scalar(input), expected, "{input:?}");
        }
    }
}
