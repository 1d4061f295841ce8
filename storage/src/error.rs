//! The one error type of this crate. Every variant names the URI, field or path it is about,
//! so a user reading an operator event or CLI output knows what to fix without a debugger.

use std::path::PathBuf;

/// Errors from storage, cache and registry operations.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A URI the user supplied cannot be used.
    #[error("invalid storage URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },

    /// A name (adapter name, file name, prefix segment, reference) was rejected.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidName {
        field: &'static str,
        value: String,
        reason: String,
    },

    /// A credential source (environment or mounted Secret directory) could not be read.
    /// Never carries a secret value, only the key or file name.
    #[error("credentials: {0}")]
    Credentials(String),

    /// The object does not exist.
    #[error("{uri} not found")]
    NotFound { uri: String },

    /// A create-only write found the object already there.
    #[error("{uri} already exists")]
    AlreadyExists { uri: String },

    /// A transfer or store operation failed (after retries, if the error was transient).
    #[error("{operation} {uri} failed after {attempts} attempt(s): {source}")]
    Transfer {
        operation: &'static str,
        uri: String,
        attempts: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// Downloaded or stored bytes do not hash to the digest that was promised for them.
    #[error("digest mismatch for {uri}: expected {expected}, got {actual}")]
    DigestMismatch {
        uri: String,
        expected: String,
        actual: String,
    },

    /// Local filesystem I/O failed (cache, fetch destination, lock files).
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A manifest in the registry cannot be parsed or is inconsistent with where it lives.
    #[error("invalid manifest {uri}: {reason}")]
    InvalidManifest { uri: String, reason: String },

    /// The requested adapter version or reference does not resolve to a published version.
    #[error("adapter {reference} not found in registry {registry}: {reason}")]
    AdapterNotFound {
        registry: String,
        reference: String,
        reason: String,
    },

    /// HF_HUB_OFFLINE=1 and the requested model is not in the local cache.
    #[error("{uri} is not in the cache at {cache_dir} and HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE or pre-populate the cache")]
    Offline { uri: String, cache_dir: PathBuf },

    /// Publishing gave up finding a free version number.
    #[error("could not claim a version for adapter {name} in {registry} after {attempts} attempts; too many concurrent publishers")]
    VersionContention {
        registry: String,
        name: String,
        attempts: u32,
    },
}

impl StorageError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StorageError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid_name(field: &'static str, value: &str, reason: impl Into<String>) -> Self {
        StorageError::InvalidName {
            field,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
