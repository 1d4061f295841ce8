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
    /// A weight that cannot be quantized, or a quantized base used where it cannot be (an
    /// int8 base in training, or in another dtype than f32).
    #[error("quantize: {0}")]
    Quantize(String),
    /// A KV cache that does not fit the model or the call: another layer count, positions
    /// that do not match the offset, empty where decoding needs a prompt, or a layer not
    /// filled yet.
    #[error("KV cache: {0}")]
    CacheMismatch(String),
    /// A sequence longer than the model's positions (max_position_embeddings).
    #[error("context too long: {0}")]
    ContextTooLong(String),
    /// A call with nothing to do: no rows, an empty prompt, an empty training batch.
    #[error("empty input: {0}")]
    EmptyInput(String),
    /// A token id, input or target, that the vocabulary (or embedding table) has no row for.
    #[error("token past the vocabulary: {0}")]
    TokenOutOfVocab(String),
    /// Tensors or slices whose shapes do not fit each other: a product's inner dimensions,
    /// a bias or norm weight of the wrong length, loss targets of another row count.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// A CPU kernel handed what it cannot take (not f32 on the CPU, not contiguous, or a CPU
    /// without the instructions); callers check first, so this is a bug if it is seen.
    #[error("CPU kernel: {0}")]
    Kernel(String),
    /// A backward pass that lost track of a layer's input, tape or gradient: a bug, or an
    /// adapter whose pairs do not match the layers being trained.
    #[error("backward pass: {0}")]
    Backward(String),
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
