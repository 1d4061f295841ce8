//! The run's settings: a YAML (or JSON) file, with names as in the FineTuneJob spec
//! (camelCase), so an operator-made job and a hand-written train.yaml read the same.
//! Unknown keys are errors: a misspelt `learningRate` must not silently train with the default.

use crate::error::{Result, TrainError};
use kubetune_crds::EvaluationMetric;
use kubetune_model::{LoraConfig, TargetModule};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainConfig {
    /// Directory of the base model in HF layout (path or file:// URI).
    pub model: String,
    /// Recorded as base_model_name_or_path in adapter_config.json; defaults to `model`.
    #[serde(default)]
    pub base_model_name: Option<String>,
    pub dataset: DatasetConfig,
    #[serde(default)]
    pub method: Method,
    #[serde(default)]
    pub lora: LoraSettings,
    #[serde(default)]
    pub training: TrainingSettings,
    /// Output directory: adapter files, training_metrics.json and checkpoints/.
    pub output: String,
    /// Judge the adapter against the base model on the held-out data once training is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<EvaluationSettings>,
    /// Preference optimisation settings; used by (and only allowed with) `method: dpo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoSettings>,
    /// How the frozen base is held under `method: dpo` (lora and qlora imply it): `bits: 4` is
    /// NF4 as in QLoRA, absent is full precision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantizationSettings>,
    /// Start from this adapter instead of a fresh one. `lora` must then hold its rank, alpha
    /// and target modules (the run is refused naming the field otherwise); dropout may differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<InitFrom>,
}

/// An adapter to continue training: a PEFT directory, and what the new adapter records of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitFrom {
    /// Directory with adapter_config.json and adapter_model.safetensors (path or file:// URI).
    pub path: String,
    /// Its registry name, `name@N`, for the lineage (job mode sets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Its manifest digest, `sha256:…` (job mode sets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl InitFrom {
    /// What identifies the starting adapter across pods: its digest, else its name, else its
    /// path. A retried pod downloads it to another place and must still resume.
    pub fn identity(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.reference.as_deref())
            .unwrap_or(&self.path)
    }
}

/// As the FineTuneJob's spec.dpo (TRL's DPOConfig names: beta, loss_type, label_smoothing).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DpoSettings {
    /// How far the policy may move from the reference: the rewards are beta times the log-prob
    /// ratios.
    pub beta: f64,
    pub loss: DpoLoss,
    /// The assumed share of pairs whose labels are flipped (conservative DPO); sigmoid only.
    pub label_smoothing: f64,
}

impl Default for DpoSettings {
    /// TRL's defaults.
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss: DpoLoss::Sigmoid,
            label_smoothing: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    /// The DPO paper's loss, -log sigmoid(beta * margin).
    #[default]
    Sigmoid,
    /// Identity preference optimisation: (margin - 1 / (2 beta))^2 on per-token mean log-probs.
    Ipo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuantizationSettings {
    pub bits: u32,
}

/// As the FineTuneJob's spec.evaluation (without minImprovement, which only job mode acts on,
/// since only it publishes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EvaluationSettings {
    /// exactMatch, contains or labelAccuracy of greedy answers; None: the loss only.
    #[serde(default)]
    pub metric: Option<EvaluationMetric>,
    #[serde(default = "default_max_examples")]
    pub max_examples: usize,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
}

fn default_max_examples() -> usize {
    100
}

fn default_max_new_tokens() -> usize {
    32
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatasetConfig {
    pub path: String,
    pub format: DataFormat,
    /// Fraction of the examples held out for evaluation (taken after a seeded shuffle).
    #[serde(default)]
    pub validation_split: Option<f64>,
    /// A separate validation file in the same format; excludes `validationSplit`.
    #[serde(default)]
    pub validation_path: Option<String>,
    /// Skip malformed lines (and report how many) instead of failing before training.
    #[serde(default)]
    pub skip_invalid: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    Instruction,
    Chat,
    Text,
    /// `{"prompt", "chosen", "rejected"}` pairs, for `method: dpo`.
    Preference,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[default]
    Lora,
    Qlora,
    /// Direct preference optimisation of a LoRA adapter on preference pairs.
    Dpo,
}

impl TrainConfig {
    /// Whether the frozen base is held in NF4: always under qlora, under dpo when asked.
    pub fn quantized_base(&self) -> bool {
        match self.method {
            Method::Lora => false,
            Method::Qlora => true,
            Method::Dpo => self.quantization.is_some_and(|q| q.bits == 4),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<TargetModule>,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: vec![TargetModule::QProj, TargetModule::VProj],
        }
    }
}

impl LoraSettings {
    pub fn to_lora(&self) -> LoraConfig {
        let mut target_modules = self.target_modules.clone();
        target_modules.sort();
        target_modules.dedup();
        LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            target_modules,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    Constant,
    #[default]
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TrainingSettings {
    /// Passes over the data; ignored when `maxSteps` is set.
    pub epochs: Option<u32>,
    pub max_steps: Option<u64>,
    pub learning_rate: f64,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub max_seq_length: usize,
    pub warmup_steps: u64,
    pub scheduler: Scheduler,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub max_grad_norm: f64,
    /// Concatenate examples into sequences of up to maxSeqLength tokens.
    pub packing: bool,
    /// Evaluate every N optimizer steps (0: only at the end).
    pub eval_steps: u64,
    /// Checkpoint every N optimizer steps (0: never).
    pub save_steps: u64,
    /// Log the training loss every N steps.
    pub logging_steps: u64,
    pub seed: u64,
    /// Keep only each layer's input during the forward pass and recompute the layer in the
    /// backward pass (as HF's gradient_checkpointing): much less memory for a second forward.
    /// Left out of the serialised form when off, so older checkpoints' fingerprints still match.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
}

impl Default for TrainingSettings {
    fn default() -> Self {
        Self {
            epochs: Some(1),
            max_steps: None,
            learning_rate: 2e-4,
            batch_size: 4,
            gradient_accumulation_steps: 1,
            max_seq_length: 512,
            warmup_steps: 0,
            scheduler: Scheduler::Linear,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            packing: false,
            eval_steps: 0,
            save_steps: 0,
            logging_steps: 10,
            seed: 42,
            gradient_checkpointing: false,
        }
    }
}

impl TrainConfig {
    /// Reads YAML (JSON is YAML too); serde_yaml's message carries the line and column.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
        let config: TrainConfig = serde_yaml::from_str(&text).map_err(|e| TrainError::Config {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Checks ranges the training loop relies on; `source` labels the error.
    pub fn validate(&self, source: &str) -> Result<()> {
        let bad = |field: &str, why: String| TrainError::Config {
            path: source.into(),
            message: format!("{field}: {why}"),
        };
        let t = &self.training;
        if t.epochs.unwrap_or(0) == 0 && t.max_steps.unwrap_or(0) == 0 {
            return Err(bad("training", "set epochs or maxSteps to a positive number".into()));
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            return Err(bad(
                "training.learningRate",
                format!("{} must be positive", t.learning_rate),
            ));
        }
        for (field, v) in [
            ("training.batchSize", t.batch_size),
            ("training.gradientAccumulationSteps", t.gradient_accumulation_steps),
        ] {
            if v == 0 {
                return Err(bad(field, "must be positive".into()));
            }
        }
        if t.max_seq_length < 2 {
            return Err(bad(
                "training.maxSeqLength",
                format!("{} is too short (at least 2)", t.max_seq_length),
            ));
        }
        if t.weight_decay < 0.0 || t.max_grad_norm < 0.0 {
            return Err(bad("training.weightDecay/maxGradNorm", "must not be negative".into()));
        }
        if let Some(split) = self.dataset.validation_split {
            if !(split > 0.0 && split < 1.0) {
                return Err(bad("dataset.validationSplit", format!("{split} is not in (0, 1)")));
            }
            if self.dataset.validation_path.is_some() {
                return Err(bad("dataset", "set validationSplit or validationPath, not both".into()));
            }
        }
        self.lora.to_lora().validate().map_err(|e| bad("lora", e.to_string()))?;
        self.validate_dpo().map_err(|(field, why)| bad(field, why))?;
        if let Some(e) = &self.evaluation {
            let held_out = self.dataset.validation_path.is_some() || self.dataset.validation_split.is_some();
            if !held_out {
                return Err(bad(
                    "evaluation",
                    "needs held-out data: set dataset.validationPath or dataset.validationSplit".into(),
                ));
            }
            if e.metric.is_some() && self.dataset.format == DataFormat::Text {
                return Err(bad(
                    "evaluation.metric",
                    "text lines have no reference answers; use instruction or chat data".into(),
                ));
            }
            if e.max_examples == 0 || e.max_new_tokens == 0 {
                return Err(bad("evaluation.maxExamples/maxNewTokens", "must be positive".into()));
            }
        }
        Ok(())
    }

    /// Preference data and `method: dpo` go together, and the DPO settings are in range.
    fn validate_dpo(&self) -> std::result::Result<(), (&'static str, String)> {
        let preference = self.dataset.format == DataFormat::Preference;
        match (self.method == Method::Dpo, preference) {
            (true, false) => {
                return Err((
                    "dataset.format",
                    "method dpo trains on preference pairs: set format preference".into(),
                ))
            }
            (false, true) => {
                return Err((
                    "method",
                    "preference data trains only with method dpo (it has no single answer to learn)".into(),
                ))
            }
            (false, false) if self.dpo.is_some() => {
                return Err(("dpo", "is only used with method dpo".into()));
            }
            (false, false) if self.quantization.is_some() => {
                return Err((
                    "quantization",
                    "is only read under method dpo (qlora implies 4 bits, lora full precision)".into(),
                ));
            }
            (false, false) => return Ok(()),
            (true, true) => {}
        }
        let d = self.dpo.unwrap_or_default();
        if !(d.beta > 0.0 && d.beta.is_finite()) {
            return Err(("dpo.beta", format!("{} must be positive", d.beta)));
        }
        if !(0.0..0.5).contains(&d.label_smoothing) {
            return Err((
                "dpo.labelSmoothing",
                format!("{} is not in [0, 0.5)", d.label_smoothing),
            ));
        }
        if d.label_smoothing > 0.0 && d.loss == DpoLoss::Ipo {
            return Err(("dpo.labelSmoothing", "applies to the sigmoid loss only, not ipo".into()));
        }
        if self.quantization.is_some_and(|q| q.bits != 4) {
            return Err((
                "quantization.bits",
                "the trainer quantizes a base only to 4 bits (NF4)".into(),
            ));
        }
        if self.training.packing {
            return Err((
                "training.packing",
                "cannot pack preference pairs: each is scored whole".into(),
            ));
        }
        if self.evaluation.is_some() {
            return Err((
                "evaluation",
                "is not available with method dpo; the held-out rewards and reward accuracy are reported instead"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misspelt_keys_are_errors_with_a_location() {
        let dir = std::env::temp_dir().join(format!("kubetune-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("train.yaml");
        std::fs::write(
            &path,
            "model: m\noutput: o\ndataset:\n  path: d\n  format: text\ntraining:\n  learningrate: 1\n",
        )
        .expect("write");
        let err = TrainConfig::from_file(&path).expect_err("typo").to_string();
        assert!(
            err.contains("train.yaml") && err.contains("learningrate") && err.contains("line 7"),
            "{err}"
        );
    }

    #[test]
    fn defaults_fill_an_minimal_config() {
        let c: TrainConfig =
            serde_yaml::from_str("model: m\noutput: o\ndataset: {path: d, format: chat}\n").expect("minimal");
        c.validate("t").expect("valid");
        assert_eq!(c.training.batch_size, 4);
        assert_eq!(
            c.lora.to_lora().target_modules,
            vec![TargetModule::QProj, TargetModule::VProj]
        );
    }

    #[test]
    fn evaluation_needs_held_out_data_and_a_metric_needs_prompts() {
        let config = |dataset: &str| -> TrainConfig {
            serde_yaml::from_str(&format!(
                "model: m\noutput: o\ndataset: {dataset}\nevaluation: {{metric: exactMatch}}\n"
            ))
            .expect("config")
        };
        let err = config("{path: d, format: chat}")
            .validate("t")
            .expect_err("no held-out data")
            .to_string();
        assert!(err.contains("evaluation:") && err.contains("validationPath"), "{err}");
        let err = config("{path: d, format: text, validationSplit: 0.1}")
            .validate("t")
            .expect_err("text has no answers")
            .to_string();
        assert!(err.contains("evaluation.metric:"), "{err}");
        let ok = config("{path: d, format: instruction, validationSplit: 0.1}");
        ok.validate("t").expect("valid");
        let e = ok.evaluation.expect("evaluation");
        assert_eq!((e.max_examples, e.max_new_tokens), (100, 32), "defaults");
    }

    #[test]
    fn preference_data_and_method_dpo_require_each_other_and_dpo_settings_are_checked() {
        let config = |rest: &str| -> TrainConfig {
            serde_yaml::from_str(&format!("model: m\noutput: o\n{rest}\n")).expect("config")
        };
        let error = |rest: &str| config(rest).validate("t").expect_err(rest).to_string();
        assert!(error("dataset: {path: d, format: chat}\nmethod: dpo").contains("dataset.format:"));
        assert!(error("dataset: {path: d, format: preference}").contains("method:"));
        assert!(error("dataset: {path: d, format: chat}\ndpo: {beta: 0.1}").contains("dpo:"));
        let dpo = "dataset: {path: d, format: preference}\nmethod: dpo";
        assert!(error(&format!("{dpo}\ndpo: {{beta: 0}}")).contains("dpo.beta:"));
        assert!(error(&format!("{dpo}\ndpo: {{labelSmoothing: 0.5}}")).contains("dpo.labelSmoothing:"));
        assert!(error(&format!("{dpo}\ndpo: {{loss: ipo, labelSmoothing: 0.1}}")).contains("dpo.labelSmoothing:"));
        assert!(error(&format!("{dpo}\nquantization: {{bits: 8}}")).contains("quantization.bits:"));
        assert!(error(&format!("{dpo}\ntraining: {{packing: true}}")).contains("training.packing:"));
        let ok = config(&format!("{dpo}\nquantization: {{bits: 4}}"));
        ok.validate("t").expect("valid");
        assert!(ok.quantized_base());
        assert_eq!(ok.dpo.unwrap_or_default().beta, 0.1, "TRL's default beta");
    }
}
