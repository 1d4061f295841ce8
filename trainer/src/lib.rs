//! kubetune-trainer: LoRA / QLoRA fine-tuning of Llama-family models with candle.
//!
//! The binary is a thin wrapper around [`train::run`]; the operator's tests and the trainer's
//! own tests call the library directly.

pub mod base_digest;
pub mod card;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dpo;
pub mod error;
pub mod evaluate;
pub mod io;
pub mod job;
pub mod merge;
pub mod metrics;
pub mod optim;
pub mod prepare;
pub mod progress;
pub mod timing;
pub mod train;

pub use config::TrainConfig;
pub use error::{Result, TrainError};
pub use train::{run, ProgressObserver, RunOptions, StepProgress, TrainingMetrics};
