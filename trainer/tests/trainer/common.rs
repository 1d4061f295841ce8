//! Shared test helpers: a tiny model, a synthetic fact dataset and a config for them.

use kubetune_model::tiny::{write_tiny_model, TinySpec};
use kubetune_model::TargetModule;
use kubetune_trainer::config::{
    DataFormat, DatasetConfig, LoraSettings, Method, Scheduler, TrainConfig, TrainingSettings,
};
use std::path::Path;

const NAMES: &str = "Ann Ben Carl Dora Emil Fay Gus Hana Ivan Jo Kai Lena Max Nina Otto Pia Quinn Rosa Sam Tina \
    Uma Vic Wes Xena Yuri Zoe Abel Bea Cole Dina Eli Flo Gabe Hugo Iris Jack Kim Leo Mia Ned Ola Pete Rex Sara Tom \
    Una Vera Walt Yves Zack";
const THINGS: &str = "apples bread fish cheese tea honey rice milk eggs salt books trains boats birds rivers letters \
    music summer dogs cats beans pears owls foxes oak maps snow gardens markets libraries";

/// 50 facts "What does NAME like?" -> THING, each name with its own answer.
pub fn facts() -> Vec<(String, String)> {
    let things: Vec<&str> = THINGS.split_whitespace().collect();
    NAMES
        .split_whitespace()
        .enumerate()
        .map(|(i, n)| {
            (
                format!("What does {n} like?"),
                things[(i * 7) % things.len()].to_string(),
            )
        })
        .collect()
}

pub fn write_facts(path: &Path) {
    let lines: Vec<String> = facts()
        .into_iter()
        .map(|(q, a)| serde_json::json!({"instruction": q, "response": a}).to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").expect("write facts");
}

pub fn tiny_model(dir: &Path) {
    write_tiny_model(dir, &TinySpec::default()).expect("tiny model");
}

/// A config that learns the facts: LoRA r=16 on all projections, 400 steps.
pub fn facts_config(model: &Path, data: &Path, output: &Path) -> TrainConfig {
    TrainConfig {
        model: model.display().to_string(),
        base_model_name: Some("kubetune/tiny-llama".into()),
        dataset: DatasetConfig {
            path: data.display().to_string(),
            format: DataFormat::Instruction,
            validation_split: None,
            validation_path: Some(data.display().to_string()),
            skip_invalid: false,
        },
        method: Method::Lora,
        lora: LoraSettings {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: TargetModule::ALL.to_vec(),
        },
        training: TrainingSettings {
            epochs: Some(80),
            learning_rate: 1e-2,
            batch_size: 10,
            max_seq_length: 64,
            warmup_steps: 5,
            scheduler: Scheduler::Cosine,
            logging_steps: 0,
            seed: 1,
            ..TrainingSettings::default()
        },
        output: output.display().to_string(),
        evaluation: None,
        dpo: None,
        quantization: None,
        init_from: None,
    }
}
