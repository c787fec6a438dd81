//! Per-location storage settings (`--storage-config FILE` or
//! `FLEETMERGE_STORAGE_CONFIG`): a YAML mapping from a URL prefix (a bucket, or a
//! folder in one) to `object_store` options that apply on top of the
//! environment for the objects under it. For models in several clouds or
//! accounts, S3-compatible stores beside AWS, or credentials kept in a file (a
//! Kubernetes Secret) rather than the environment:
//!
//! ```yaml
//! s3://partner-models:
//!   aws_endpoint: https://ACCOUNT.r2.cloudflarestorage.com
//!   aws_access_key_id: ...
//!   aws_secret_access_key: ...
//! s3://my-bucket/private-model:
//!   aws_region: eu-west-1
//! gs://research:
//!   google_service_account: /secrets/research-sa.json
//! ```
//!
//! The longest prefix that matches a location wins. Keys are `object_store`'s
//! configuration keys for the scheme (`aws_*`, `google_*`, `azure_*`, and
//! client options such as `allow_http` or `timeout`).

use crate::yaml::{Node, NodeKind, Span, YamlError};
use std::sync::OnceLock;

/// Options for the locations under one prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub prefix: String,
    pub options: Vec<(String, String)>,
}

/// A storage config that cannot be used, or a second installation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OverridesError {
    /// Not YAML this reader takes.
    #[error(transparent)]
    Yaml(#[from] YamlError),
    /// A prefix or option that is not one: the file, the `PREFIX[.OPTION]`
    /// key and its position (shown as `FILE: KEY (line L, column C): MESSAGE`).
    #[error(
        "{file}{}{}: {message}",
        if key.is_empty() { String::new() } else { format!(": {key}") },
        format!(" ({span})")
    )]
    Entry {
        file: String,
        key: String,
        span: Span,
        message: String,
    },
    #[error("storage overrides were already installed")]
    AlreadyInstalled,
}

static OVERRIDES: OnceLock<Vec<Override>> = OnceLock::new();

/// Reads a storage config; every key is checked against the options of its
/// prefix's scheme, so a typo is an error naming the key and its line.
pub fn parse(file: &str, text: &str) -> Result<Vec<Override>, OverridesError> {
    let err = |key: &str, node: &Node, message: String| OverridesError::Entry {
        file: file.to_string(),
        key: key.to_string(),
        span: node.span,
        message,
    };
    let root = Node::parse(file, text)?;
    if root.is_null() {
        return Ok(Vec::new());
    }
    let entries = root.as_map().ok_or_else(|| {
        err(
            "",
            &root,
            format!(
                "expected a mapping from URL prefixes to options, got {}",
                root.describe()
            ),
        )
    })?;
    let mut out = Vec::new();
    for (k, v) in entries {
        let prefix = k
            .as_str()
            .ok_or_else(|| {
                err(
                    "",
                    k,
                    format!("expected a URL prefix, got {}", k.describe()),
                )
            })?
            .trim_end_matches('/')
            .to_string();
        if !super::is_url(&prefix) {
            return Err(err(
                &prefix,
                k,
                "expected an object-store URL prefix (s3://, gs://, az://, http(s)://)".into(),
            ));
        }
        let opts = v.as_map().ok_or_else(|| {
            err(
                &prefix,
                v,
                format!("expected a mapping of options, got {}", v.describe()),
            )
        })?;
        let mut options = Vec::new();
        for (ok, ov) in opts {
            let key = ok
                .as_str()
                .ok_or_else(|| {
                    err(
                        &prefix,
                        ok,
                        format!("expected an option name, got {}", ok.describe()),
                    )
                })?
                .to_ascii_lowercase();
            let value = match &ov.kind {
                NodeKind::Str(s) => s.clone(),
                NodeKind::Bool(b) => b.to_string(),
                NodeKind::Int(i) => i.to_string(),
                NodeKind::Float(f) => f.to_string(),
                _ => {
                    return Err(err(
                        &format!("{prefix}.{key}"),
                        ov,
                        format!("expected a string, got {}", ov.describe()),
                    ))
                }
            };
            check_option(&prefix, &key).map_err(|m| err(&format!("{prefix}.{key}"), ok, m))?;
            options.push((key, value));
        }
        out.push(Override { prefix, options });
    }
    Ok(out)
}

/// Checks that `key` is an option of the object store for `prefix`'s scheme.
fn check_option(prefix: &str, key: &str) -> Result<(), String> {
    use std::str::FromStr;
    let scheme = prefix.split("://").next().unwrap_or("");
    let known = match scheme {
        "s3" | "s3a" => object_store::aws::AmazonS3ConfigKey::from_str(key).is_ok(),
        "gs" => object_store::gcp::GoogleConfigKey::from_str(key).is_ok(),
        "az" | "abfs" | "abfss" => object_store::azure::AzureConfigKey::from_str(key).is_ok(),
        "http" | "https" => object_store::ClientConfigKey::from_str(key).is_ok(),
        "hf" => return crate::storage::hub::check_option(key),
        other => return Err(format!("unsupported scheme {other}://")),
    };
    if known {
        Ok(())
    } else {
        Err(format!("unknown option '{key}' for {scheme}:// locations"))
    }
}

/// Installs the overrides for this process (once, before any storage is used).
pub fn install(overrides: Vec<Override>) -> Result<(), OverridesError> {
    OVERRIDES
        .set(overrides)
        .map_err(|_| OverridesError::AlreadyInstalled)
}

/// The override with the longest prefix that contains `location`.
pub fn for_location(location: &str) -> Option<&'static Override> {
    OVERRIDES
        .get()?
        .iter()
        .filter(|o| {
            location == o.prefix
                || location
                    .strip_prefix(&o.prefix)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .max_by_key(|o| o.prefix.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prefixes_and_checks_keys() {
        let o = parse(
            "s.yaml",
            "s3://a:\n  aws_endpoint: http://x:9000\n  allow_http: true\ngs://b/c/:\n  google_service_account: /sa.json\n",
        )
        .unwrap();
        assert_eq!(o.len(), 2);
        assert_eq!(o[0].prefix, "s3://a");
        assert_eq!(o[0].options[1], ("allow_http".into(), "true".into()));
        assert_eq!(o[1].prefix, "gs://b/c");

        let e = parse("s.yaml", "s3://a:\n  aws_endpoitn: http://x\n").unwrap_err();
        let m = e.to_string();
        assert!(m.contains("aws_endpoitn") && m.contains("line 2"), "{m}");
        let e = parse("s.yaml", "/local/path:\n  a: b\n").unwrap_err();
        assert!(e.to_string().contains("URL prefix"), "{e}");
    }

    #[test]
    fn errors_name_the_file_key_and_line() {
        let e = parse("s.yaml", "s3://a:\n  aws_endpoitn: http://x\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "s.yaml: s3://a.aws_endpoitn (line 2, column 3): unknown option 'aws_endpoitn' for \
             s3:// locations"
        );
        let e = parse("s.yaml", "- s3://a\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "s.yaml (line 1, column 1): expected a mapping from URL prefixes to options, got a list"
        );
        let e = parse("s.yaml", "s3://a: {}\ns3://a: {}\n").unwrap_err();
        assert!(matches!(e, OverridesError::Yaml(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "s.yaml (line 2, column 1): duplicate key 's3://a' (first on line 1, again on line 2)"
        );
    }
}
