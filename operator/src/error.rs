//! The operator's one error type. Each variant maps to one metric label.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{object} has no {field}")]
    MissingField { object: String, field: &'static str },
    /// An object the operator would create exists and belongs to someone else.
    #[error("{0} exists and is not owned by this object; delete it or rename the object")]
    NotOwned(String),
    /// The operator could not make a secret (the kernel's random source failed).
    #[error("generating {what}: {source}")]
    Generate { what: &'static str, source: std::io::Error },
    /// A registry root that cannot be scoped to the object's namespace.
    #[error("adapter registry: {0}")]
    Registry(#[from] kubetune_storage::StorageError),
    /// A reconcile that ran past its limit, most likely on a request that was never answered
    /// (kube-client sets no read timeout).
    #[error("the reconcile did not finish within {0:?} (a request that was never answered?)")]
    TimedOut(std::time::Duration),
    #[error("serialising {what}: {source}")]
    Serialize {
        what: &'static str,
        source: serde_json::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Label for the reconcile-errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::MissingField { .. } => "missing_field",
            Error::Serialize { .. } => "serialize",
            Error::NotOwned(_) => "not_owned",
            Error::Generate { .. } => "generate",
            Error::Registry(_) => "registry",
            Error::TimedOut(_) => "timeout",
        }
    }
}
