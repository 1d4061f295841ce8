//! Parsing of the storage URIs users write in FineTuneJob / ModelDeployment specs.
//!
//! Parsed by hand rather than with `url::Url`, because `Url` silently normalises: it resolves
//! `a/../b`, percent-encodes spaces and lowercases hosts. A URI that does not mean exactly what
//! it says is rejected instead, with the reason.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Result, StorageError};
use crate::names::{validate_relative_path, validate_segment};

/// A parsed storage location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageUri {
    /// `s3://bucket/prefix`: AWS S3 or an S3-compatible store (MinIO, Ceph) via AWS_ENDPOINT_URL.
    S3 { bucket: String, prefix: Vec<String> },
    /// `gs://bucket/prefix`: Google Cloud Storage.
    Gcs { bucket: String, prefix: Vec<String> },
    /// `az://container/prefix`: Azure Blob Storage (account from AZURE_STORAGE_ACCOUNT_NAME).
    Azure { container: String, prefix: Vec<String> },
    /// `file:///absolute/path`: the local filesystem (a PVC or hostPath in the cluster).
    File { path: PathBuf },
    /// `hf://org/name[@revision]`: a model on the Hugging Face hub (read-only).
    HuggingFace(HfRepo),
}

/// The revision of an `hf://` URI that names none, as on the hub.
const DEFAULT_HF_REVISION: &str = "main";

/// A model repository on the hub, at a revision (branch, tag or commit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfRepo {
    pub org: Option<String>,
    pub name: String,
    pub revision: String,
}

impl HfRepo {
    /// Parses the part of `hf://…` after the scheme.
    pub(crate) fn parse(uri: &str, rest: &str) -> Result<Self> {
        let invalid = |reason: String| StorageError::InvalidUri {
            uri: uri.to_string(),
            reason,
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (rest, DEFAULT_HF_REVISION),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let (org, name) = match parts.as_slice() {
            [name] => (None, *name),
            [org, name] => (Some(*org), *name),
            _ => return Err(invalid("expected hf://org/name[@revision]".into())),
        };
        for segment in org.iter().chain(std::iter::once(&name)) {
            validate_segment("Hugging Face repository name", segment).map_err(|e| invalid(e.to_string()))?;
        }
        // Branch names may contain '/', e.g. refs/pr/1; each segment must still be safe because
        // the revision becomes a path under refs/ in the cache.
        validate_relative_path("Hugging Face revision", revision).map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            org: org.map(str::to_string),
            name: name.to_string(),
            revision: revision.to_string(),
        })
    }

    /// `org/name` as the hub spells it.
    pub fn repo_id(&self) -> String {
        match &self.org {
            Some(org) => format!("{org}/{}", self.name),
            None => self.name.clone(),
        }
    }

    /// True when the revision is a full commit sha, which never moves.
    pub(crate) fn is_commit(&self) -> bool {
        self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit())
    }
}

impl fmt::Display for HfRepo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hf://{}@{}", self.repo_id(), self.revision)
    }
}

const ALLOWED: &str =
    "s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, file:///absolute/path or hf://org/name[@revision]";

impl StorageUri {
    /// Parses a URI; the error names the URI and the allowed forms.
    pub fn parse(uri: &str) -> Result<Self> {
        let invalid = |reason: String| StorageError::InvalidUri {
            uri: uri.to_string(),
            reason,
        };
        if let Some(bad) = uri.chars().find(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid(format!(
                "contains {bad:?}; whitespace and control characters are not allowed"
            )));
        }
        for (c, why) in [
            ('%', "percent-encoding is not allowed; write names literally"),
            ('?', "query strings are not allowed"),
            ('#', "fragments are not allowed"),
            ('\\', "backslashes are not allowed"),
        ] {
            if uri.contains(c) {
                return Err(invalid(why.to_string()));
            }
        }
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| invalid(format!("missing scheme; expected {ALLOWED}")))?;
        match scheme {
            "s3" | "gs" | "az" => {
                let (bucket, prefix) = split_bucket(rest).map_err(invalid)?;
                Ok(match scheme {
                    "s3" => StorageUri::S3 { bucket, prefix },
                    "gs" => StorageUri::Gcs { bucket, prefix },
                    _ => StorageUri::Azure {
                        container: bucket,
                        prefix,
                    },
                })
            }
            "file" => {
                if !rest.starts_with('/') {
                    return Err(invalid(
                        "file URIs need an absolute path with an empty host: file:///absolute/path".into(),
                    ));
                }
                let trimmed = rest.trim_end_matches('/');
                for segment in trimmed.split('/').skip(1) {
                    if segment.is_empty() || segment == "." || segment == ".." {
                        return Err(invalid(format!(
                            "path segment {segment:?} not allowed; use a normalised absolute path"
                        )));
                    }
                }
                Ok(StorageUri::File {
                    path: PathBuf::from(if trimmed.is_empty() { "/" } else { trimmed }),
                })
            }
            "hf" => Ok(StorageUri::HuggingFace(HfRepo::parse(uri, rest)?)),
            other => Err(invalid(format!("unsupported scheme {other:?}; expected {ALLOWED}"))),
        }
    }
}

/// Splits `bucket/a/b/` into the bucket and validated prefix segments.
fn split_bucket(rest: &str) -> std::result::Result<(String, Vec<String>), String> {
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let mut parts = rest.split('/');
    let bucket = parts.next().unwrap_or_default();
    if bucket.is_empty() || bucket.len() > 222 {
        return Err("bucket name must be 1 to 222 characters".into());
    }
    if bucket.contains("..")
        || bucket.starts_with(['.', '-'])
        || !bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
    {
        return Err(format!(
            "bucket {bucket:?} not allowed; use lowercase letters, digits, '.', '-' and '_', starting with a letter or digit"
        ));
    }
    let mut prefix = Vec::new();
    for segment in parts {
        validate_segment("URI path segment", segment).map_err(|e| e.to_string())?;
        prefix.push(segment.to_string());
    }
    Ok((bucket.to_string(), prefix))
}

impl fmt::Display for StorageUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with_prefix = |f: &mut fmt::Formatter<'_>, scheme: &str, bucket: &str, prefix: &[String]| {
            write!(f, "{scheme}://{bucket}")?;
            for segment in prefix {
                write!(f, "/{segment}")?;
            }
            Ok(())
        };
        match self {
            StorageUri::S3 { bucket, prefix } => with_prefix(f, "s3", bucket, prefix),
            StorageUri::Gcs { bucket, prefix } => with_prefix(f, "gs", bucket, prefix),
            StorageUri::Azure { container, prefix } => with_prefix(f, "az", container, prefix),
            StorageUri::File { path } => write!(f, "file://{}", path.display()),
            StorageUri::HuggingFace(repo) => write!(f, "{repo}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_scheme() {
        assert_eq!(
            StorageUri::parse("s3://kubetune/registry/team-a/").unwrap(),
            StorageUri::S3 {
                bucket: "kubetune".into(),
                prefix: vec!["registry".into(), "team-a".into()]
            }
        );
        assert_eq!(
            StorageUri::parse("gs://b").unwrap(),
            StorageUri::Gcs {
                bucket: "b".into(),
                prefix: vec![]
            }
        );
        assert_eq!(
            StorageUri::parse("az://models/x").unwrap(),
            StorageUri::Azure {
                container: "models".into(),
                prefix: vec!["x".into()]
            }
        );
        assert_eq!(
            StorageUri::parse("file:///var/lib/kubetune").unwrap(),
            StorageUri::File {
                path: "/var/lib/kubetune".into()
            }
        );
        assert_eq!(
            StorageUri::parse("s3://kubetune/a/b").unwrap().to_string(),
            "s3://kubetune/a/b"
        );
    }

    #[test]
    fn rejects_hostile_or_ambiguous_uris() {
        let cases = [
            ("kubetune/registry", "missing scheme"),
            ("ftp://host/x", "unsupported scheme"),
            ("s3://", "bucket name"),
            ("s3://Bucket/x", "bucket"),
            ("s3://b/../x", "URI path segment"),
            ("s3://b/a//c", "empty path segment"),
            ("s3://b/%2e%2e/x", "percent-encoding"),
            ("s3://b/x?versionId=1", "query"),
            ("s3://b/x#frag", "fragment"),
            ("s3://b/a b", "whitespace"),
            ("file://relative/path", "absolute path"),
            ("file:///a/../etc", "segment \"..\""),
            ("file:///a\\..\\b", "backslash"),
        ];
        for (uri, needle) in cases {
            let err = StorageUri::parse(uri).expect_err(uri).to_string();
            assert!(
                err.contains(needle) && err.contains(&format!("{uri:?}")),
                "{uri}: {err}"
            );
        }
    }
}
