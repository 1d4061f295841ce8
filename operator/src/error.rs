//! The operator's one error type. Each variant maps to one metric label.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{object} has no {field}")]
    MissingField { object: String, field: &'static str },
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
        }
    }
}
