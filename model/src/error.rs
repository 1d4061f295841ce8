//! Errors of the model crate. Each names the file and, where there is one, the field or tensor,
//! because a user staring at a failed pod has only the message to go on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// serde_json's message carries the line and column.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: field `{field}`: {reason}")]
    InvalidConfig {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{path}: {source}")]
    Weights {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("{dir}: no model.safetensors and no model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("adapter: {0}")]
    Adapter(String),
    /// A KV cache or decode batch that does not fit the model or the call.
    #[error("quantize: {0}")]
    Quantize(String),
    #[error("decode: {0}")]
    Decode(String),
    /// A `--device` that does not parse or cannot be opened.
    #[error("{0}")]
    Device(String),
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    /// A chat template that does not compile; `reason` names the template line.
    #[error("{path}: chat_template: {reason}")]
    ChatTemplate { path: PathBuf, reason: String },
    /// A chat template that fails on a conversation, e.g. through its own raise_exception.
    #[error("chat template: {0}")]
    ChatRender(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
