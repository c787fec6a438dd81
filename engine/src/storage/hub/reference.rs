//! Names on the Hugging Face Hub: the repo-id rule (huggingface_hub's
//! `validate_repo_id`), and the location strings that plans carry for a Hub
//! model pinned to a commit, `hf://ORG/NAME@COMMIT[/PATH]` (the form
//! huggingface_hub's `HfFileSystem` uses, with the revision always a commit).

/// The scheme of Hub locations.
pub const SCHEME: &str = "hf://";

/// Whether `s` is a valid Hub repo id: `name` or `org/name`, each part made of
/// letters, digits, `-`, `_` and `.`, starting and ending with a letter, digit
/// or `_`, the name at most 96 characters; no `--` or `..`, not ending in
/// `.git` (huggingface_hub `utils/_validators.py`).
pub fn is_repo_id(s: &str) -> bool {
    if s.contains("--") || s.contains("..") || s.ends_with(".git") {
        return false;
    }
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let part_ok = |p: &str, max: usize| {
        let n = p.chars().count();
        n >= 1
            && n <= max
            && p.chars().all(|c| word(c) || c == '-' || c == '.')
            && p.chars().next().is_some_and(word)
            && p.chars().next_back().is_some_and(word)
    };
    match s.split_once('/') {
        None => part_ok(s, 96),
        Some((org, name)) => !name.contains('/') && part_ok(org, usize::MAX) && part_ok(name, 96),
    }
}

/// Whether `s` is a full commit hash (40 lowercase hex digits).
pub fn is_commit(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `location` is a Hub location.
pub fn is_hub_location(location: &str) -> bool {
    location.starts_with(SCHEME)
}

/// A Hub location taken apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HubPath {
    pub repo: String,
    pub commit: String,
    /// The file inside the repository (`a/b.safetensors`); empty for the
    /// repository itself.
    pub path: String,
}

impl HubPath {
    /// The location string of this file.
    pub fn location(&self) -> String {
        let dir = model_location(&self.repo, &self.commit);
        if self.path.is_empty() {
            dir
        } else {
            format!("{dir}/{}", self.path)
        }
    }
}

/// The location of a repository at a commit.
pub fn model_location(repo: &str, commit: &str) -> String {
    format!("{SCHEME}{repo}@{commit}")
}

/// Parses `hf://REPO@COMMIT[/PATH]`. Locations come from plans, which may come
/// from another machine: the repo id must be valid, the commit a full hash,
/// and the path plain names (no `.`, `..`, empty parts or backslashes).
pub fn parse_location(location: &str) -> Result<HubPath, String> {
    let rest = location
        .strip_prefix(SCHEME)
        .ok_or_else(|| format!("{location}: not a Hugging Face Hub location (hf://...)"))?;
    let (repo, rest) = rest.split_once('@').ok_or_else(|| {
        format!("{location}: a Hub location names a commit (hf://ORG/NAME@COMMIT/FILE)")
    })?;
    let (commit, path) = rest.split_once('/').unwrap_or((rest, ""));
    let path = path.trim_end_matches('/');
    if !is_repo_id(repo) {
        return Err(format!("{location}: '{repo}' is not a valid Hub repo id"));
    }
    if !is_commit(commit) {
        return Err(format!(
            "{location}: '{commit}' is not a commit hash (40 hex digits)"
        ));
    }
    if !path.is_empty()
        && path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == ".." || p.contains('\\'))
    {
        return Err(format!(
            "{location}: the file path must be plain names separated by '/'"
        ));
    }
    Ok(HubPath {
        repo: repo.to_string(),
        commit: commit.to_string(),
        path: path.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_follow_huggingface_hubs_rule() {
        for ok in [
            "gpt2",
            "mistralai/Mistral-7B-v0.1",
            "Qwen/Qwen2.5-7B",
            "a/b",
            "org_1/x.y-z",
            "_x/_y_",
        ] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in [
            "",
            "./models/x",
            "models/x/y",
            "/abs/path",
            "a--b/c",
            "a/b..c",
            "a/b.git",
            "-a/b",
            "a/b-",
            "a/.b",
            "a b/c",
            "a/",
            "/b",
            "~/x",
            "a/b@main",
            &format!("a/{}", "x".repeat(97)),
        ] {
            assert!(!is_repo_id(bad), "{bad}");
        }
        assert!(is_repo_id(&format!("a/{}", "x".repeat(96))));
    }

    #[test]
    fn locations_round_trip_and_refuse_tricks() {
        let c = "0123456789abcdef0123456789abcdef01234567";
        let p = parse_location(&format!("hf://org/name@{c}/sub/model.safetensors")).unwrap();
        assert_eq!(
            p,
            HubPath {
                repo: "org/name".into(),
                commit: c.into(),
                path: "sub/model.safetensors".into()
            }
        );
        assert_eq!(
            p.location(),
            format!("hf://org/name@{c}/sub/model.safetensors")
        );
        let d = parse_location(&format!("hf://gpt2@{c}")).unwrap();
        assert_eq!((d.repo.as_str(), d.path.as_str()), ("gpt2", ""));
        for bad in [
            format!("hf://org/name@{c}/../x"),
            format!("hf://org/name@{c}/a//b"),
            format!("hf://org/name@{c}/./b"),
            "hf://org/name@main/x".to_string(),
            format!("hf://org/na--me@{c}/x"),
            format!("hf://org/name/{c}/x"),
            format!("s3://org/name@{c}/x"),
        ] {
            assert!(parse_location(&bad).is_err(), "{bad}");
        }
    }
}
