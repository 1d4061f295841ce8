//! Trainer errors. Each variant maps to a condition reason and an exit code the operator
//! understands (see kubetune-crds' trainer contract): bad input is not worth a retry.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config {path}: {message}")]
    Config { path: String, message: String },
    /// One bad dataset line; `line` is 1-based.
    #[error("{}:{line}: {message}", file.display())]
    Data {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: {message}", file.display())]
    Dataset { file: PathBuf, message: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] kubetune_model::ModelError),
    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("loss became {loss} at step {step}; training stopped (lower the learning rate or check the data)")]
    Diverged { step: u64, loss: f64 },
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    /// The condition reason the operator shows for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            TrainError::Config { .. } => "ConfigInvalid",
            TrainError::Data { .. } | TrainError::Dataset { .. } | TrainError::Tokenizer { .. } => "DatasetInvalid",
            TrainError::Model(_) => "ModelInvalid",
            TrainError::Diverged { .. } => "LossDiverged",
            TrainError::Checkpoint { .. } => "CheckpointInvalid",
            TrainError::Io { .. } | TrainError::Metrics(_) | TrainError::Candle(_) => "TrainerFailed",
        }
    }

    /// Process exit code: 2 for input no retry can fix, 3 for divergence, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self.reason() {
            "ConfigInvalid" | "DatasetInvalid" | "ModelInvalid" | "CheckpointInvalid" => 2,
            "LossDiverged" => 3,
            _ => 1,
        }
    }
}
