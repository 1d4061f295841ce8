//! Name validation. Everything a user (or a registry someone else wrote to) supplies passes
//! through here before it becomes part of an object key or a local path, so that nothing can
//! reach outside the registry prefix or the fetch destination. The allowed alphabets are
//! deliberately small: with no `%`, `/`, `\` or leading `.` allowed, percent-encoded and
//! dot-dot tricks have nothing to work with.

use crate::error::{Result, StorageError};

/// Longest DNS-1123 label.
const MAX_LABEL: usize = 63;
/// Longest single path segment; most filesystems cap names at 255 bytes.
const MAX_SEGMENT: usize = 255;
/// Deepest nesting allowed for a file inside an adapter version.
const MAX_FILE_DEPTH: usize = 8;

/// Checks that `name` is a DNS-1123 label (what Kubernetes allows for most object names), which
/// adapter names must be so they can be used as resource names and object-key segments alike.
pub fn validate_adapter_name(name: &str) -> Result<()> {
    validate_label("adapter name", name)
}

/// Checks that `name`, the value of `field`, is a DNS-1123 label.
pub(crate) fn validate_label(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(StorageError::invalid_name(field, name, "must not be empty"));
    }
    if name.len() > MAX_LABEL {
        return Err(StorageError::invalid_name(
            field,
            name,
            format!("must be at most {MAX_LABEL} characters (DNS-1123 label)"),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(StorageError::invalid_name(
            field,
            name,
            format!("character {bad:?} not allowed; use lowercase letters, digits and '-' (DNS-1123 label)"),
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(StorageError::invalid_name(
            field,
            name,
            "must start and end with a lowercase letter or digit (DNS-1123 label)",
        ));
    }
    Ok(())
}

/// Checks one path segment: `[A-Za-z0-9._-]+`, not `.`/`..`, not starting with `.`.
/// Used for prefix segments of storage URIs and for components of adapter file names.
pub fn validate_segment(field: &'static str, segment: &str) -> Result<()> {
    if segment.is_empty() {
        return Err(StorageError::invalid_name(
            field,
            segment,
            "empty path segment (doubled or trailing '/')",
        ));
    }
    if segment.len() > MAX_SEGMENT {
        return Err(StorageError::invalid_name(
            field,
            segment,
            format!("path segment longer than {MAX_SEGMENT} bytes"),
        ));
    }
    if segment.starts_with('.') {
        return Err(StorageError::invalid_name(
            field,
            segment,
            "path segments must not start with '.' (no '.', '..' or hidden names)",
        ));
    }
    if let Some(bad) = segment
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(StorageError::invalid_name(
            field,
            segment,
            format!("character {bad:?} not allowed; use letters, digits, '.', '_' and '-'"),
        ));
    }
    Ok(())
}

/// Checks a relative '/'-separated path whose segments each pass [`validate_segment`].
pub fn validate_relative_path(field: &'static str, path: &str) -> Result<()> {
    if path.starts_with('/') {
        return Err(StorageError::invalid_name(
            field,
            path,
            "must be relative, not absolute",
        ));
    }
    let segments: Vec<&str> = path.split('/').collect();
    if segments.len() > MAX_FILE_DEPTH {
        return Err(StorageError::invalid_name(
            field,
            path,
            format!("nested deeper than {MAX_FILE_DEPTH} directories"),
        ));
    }
    for segment in segments {
        validate_segment(field, segment).map_err(|e| match e {
            StorageError::InvalidName { reason, .. } => StorageError::invalid_name(field, path, reason),
            other => other,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names_follow_dns_1123() {
        for ok in ["a", "support-bot", "x1", "0abc", &"a".repeat(63)] {
            assert!(validate_adapter_name(ok).is_ok(), "{ok} should be accepted");
        }
        let hostile = [
            "",
            "..",
            "../etc",
            "a/b",
            "/abs",
            "%2e%2e",
            "Upper",
            "-lead",
            "trail-",
            "a_b",
            "a.b",
            "a b",
            "a\0b",
            "é",
            &"a".repeat(64),
        ];
        for bad in hostile {
            let err = validate_adapter_name(bad).expect_err(bad);
            assert!(err.to_string().contains("adapter name"), "{err}");
        }
    }
}
