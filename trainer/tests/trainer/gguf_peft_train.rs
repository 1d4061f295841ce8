//! How the reference adapter of `tests/reference/gguf_peft/` is trained: shared by the example
//! that wrote it (`examples/gguf_adapter.rs`) and the test that trains it again
//! (`gguf_peft.rs`), so both train with the same settings.

use kubetune_model::TargetModule;
use kubetune_trainer::config::{
    DataFormat, DatasetConfig, LoraSettings, Method, Scheduler, TrainConfig, TrainingSettings,
};
use kubetune_trainer::{run, RunOptions, TrainingMetrics};
use std::path::Path;

/// Trains a rank-4 LoRA adapter on every projection for 12 steps, on the GGUF file `gguf` as
/// the base and the instruction data `data`, and writes it to `output`. The trainer imports
/// the file beside it (`<gguf>.hf`), so `gguf` should be a copy in a scratch directory.
pub fn train_on_gguf(gguf: &Path, data: &Path, output: &Path) -> TrainingMetrics {
    let config = TrainConfig {
        model: gguf.display().to_string(),
        base_model_name: Some("tiny.gguf".into()),
        dataset: DatasetConfig {
            path: data.display().to_string(),
            format: DataFormat::Instruction,
            validation_split: None,
            validation_path: None,
            skip_invalid: false,
        },
        method: Method::Lora,
        lora: LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModule::ALL.to_vec(),
        },
        training: TrainingSettings {
            max_steps: Some(12),
            learning_rate: 2e-2,
            batch_size: 4,
            max_seq_length: 64,
            warmup_steps: 2,
            scheduler: Scheduler::Constant,
            logging_steps: 0,
            seed: 5,
            ..TrainingSettings::default()
        },
        output: output.display().to_string(),
        evaluation: None,
        dpo: None,
        quantization: None,
        init_from: None,
    };
    run(&config, &RunOptions::default()).expect("training on the GGUF base")
}
