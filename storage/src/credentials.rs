//! Credentials for the object stores and the Hugging Face hub, taken from the environment or
//! from a mounted Kubernetes Secret (one file per key). Values are never logged: `Debug` prints
//! key names only, and nothing in this crate formats a value into a message.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use crate::error::{Result, StorageError};

/// Environment variable prefixes (and exact names) that carry storage configuration.
const ENV_PREFIXES: &[&str] = &["AWS_", "GOOGLE_", "AZURE_"];
const ENV_EXACT: &[&str] = &["HF_TOKEN"];

/// A set of credential and store-configuration values, keyed by environment-variable name
/// (e.g. `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `GOOGLE_SERVICE_ACCOUNT`, `HF_TOKEN`).
#[derive(Clone, Default)]
pub struct Credentials {
    values: BTreeMap<String, String>,
}

impl Credentials {
    /// No credentials: enough for `file://` and public buckets.
    pub fn none() -> Self {
        Self::default()
    }

    /// Collects the `AWS_*`, `GOOGLE_*`, `AZURE_*` and `HF_TOKEN` variables of this process.
    pub fn from_env() -> Self {
        Self::from_vars(std::env::vars())
    }

    /// Like [`Credentials::from_env`], from an explicit list of variables (tests, env files).
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let values = vars
            .into_iter()
            .filter(|(k, _)| ENV_PREFIXES.iter().any(|p| k.starts_with(p)) || ENV_EXACT.contains(&k.as_str()))
            .collect();
        Self { values }
    }

    /// Reads a mounted Secret directory: every regular file whose name is an upper-case
    /// environment-style key becomes a value (a trailing newline is stripped). Kubernetes'
    /// own `..data` symlink bookkeeping is skipped; any other unexpected name is an error so a
    /// mistyped key is noticed instead of being ignored.
    pub fn from_secret_dir(dir: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| StorageError::Credentials(format!("reading secret directory {}: {e}", dir.display())))?;
        let mut values = BTreeMap::new();
        for entry in entries {
            let entry = entry
                .map_err(|e| StorageError::Credentials(format!("reading secret directory {}: {e}", dir.display())))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(StorageError::Credentials(format!(
                    "secret directory {} holds a file whose name is not UTF-8",
                    dir.display()
                )));
            };
            if name.starts_with("..") {
                continue; // Kubernetes' atomic-update bookkeeping (..data, ..2024_01_01...).
            }
            if !is_env_key(name) {
                return Err(StorageError::Credentials(format!(
                    "secret directory {}: key {name:?} is not an environment-style name like AWS_ACCESS_KEY_ID (upper-case letters, digits, '_')",
                    dir.display()
                )));
            }
            let path = entry.path();
            let value = std::fs::read_to_string(&path).map_err(|e| {
                StorageError::Credentials(format!("reading secret key {name} in {}: {e}", dir.display()))
            })?;
            let value = value.strip_suffix('\n').unwrap_or(&value);
            values.insert(name.to_string(), value.strip_suffix('\r').unwrap_or(value).to_string());
        }
        Ok(Self { values })
    }

    /// Returns these credentials with `other`'s values taking precedence.
    pub fn merged(mut self, other: Credentials) -> Self {
        self.values.extend(other.values);
        self
    }

    /// Sets one value.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.values.insert(key.into(), value.into());
        self
    }

    /// Looks up one value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// All `(key, value)` pairs whose key starts with `prefix`.
    pub(crate) fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.values
            .iter()
            .filter(move |(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

fn is_env_key(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key names help debugging ("is AWS_REGION set?"); values never appear.
        f.debug_map()
            .entries(self.values.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_values() {
        let creds = Credentials::from_vars([
            ("AWS_SECRET_ACCESS_KEY".to_string(), "s3cr3t-value".to_string()),
            ("HF_TOKEN".to_string(), "hf_tokenvalue".to_string()),
            ("PATH".to_string(), "/usr/bin".to_string()),
        ]);
        let shown = format!("{creds:?} {creds:#?}");
        assert!(!shown.contains("s3cr3t") && !shown.contains("hf_token"), "{shown}");
        assert!(shown.contains("AWS_SECRET_ACCESS_KEY") && shown.contains("<redacted>"));
        assert_eq!(creds.get("PATH"), None, "unrelated variables are not collected");
    }

    #[test]
    fn reads_mounted_secret_and_rejects_odd_keys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("AWS_ACCESS_KEY_ID"), "id\n").unwrap();
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        let creds = Credentials::from_secret_dir(dir.path()).unwrap();
        assert_eq!(creds.get("AWS_ACCESS_KEY_ID"), Some("id"));

        std::fs::write(dir.path().join("access-key"), "x").unwrap();
        let err = Credentials::from_secret_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("access-key") && !err.contains("id\n"), "{err}");
    }
}
