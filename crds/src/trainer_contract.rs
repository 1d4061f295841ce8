//! What the operator hands the trainer pod: the FineTuneJob with every default resolved, as JSON
//! in the environment variable [`TRAINER_JOB_ENV`]. One type on both sides keeps them in step,
//! and the trainer never re-derives a default the operator already chose.

use crate::{
    DatasetFormat, DpoLossType, EvaluationMetric, EvaluationResult, FineTuneMethod, LrScheduler, QuantType,
    TargetModule,
};
use serde::{Deserialize, Serialize};

/// Environment variable holding the JSON [`TrainerJob`].
pub const TRAINER_JOB_ENV: &str = "KUBETUNE_TRAINER_JOB";

/// The FineTuneJob a trainer pod runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerJob {
    /// Which FineTuneJob this is; recorded in the adapter manifest.
    pub owner: JobIdentity,
    pub base_model_uri: String,
    pub dataset: TrainerDataset,
    pub method: FineTuneMethod,
    pub lora: TrainerLora,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<TrainerQuantization>,
    pub training: TrainerTraining,
    /// Adapter name to publish the next version of.
    pub adapter_name: String,
    /// Registry root the adapter is published to.
    pub registry: String,
    /// Where checkpoints go so that a retried pod resumes instead of starting over.
    pub checkpoint_uri: String,
    /// Judge the adapter against the base model before publishing; absent: no judgement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<TrainerEvaluation>,
    /// spec.dpo with its defaults resolved; present exactly when the method is dpo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<TrainerDpo>,
    /// spec.initFrom: the adapter version in `registry` to start from. The trainer then takes
    /// rank, alpha and target modules from its adapter_config.json, not from `lora`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<TrainerInitFrom>,
    /// spec.output.merge: also publish the base model with the adapter folded in.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merge: bool,
}

/// spec.initFrom, with spec.lora as the user wrote it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerInitFrom {
    pub adapter_name: String,
    pub version: u32,
    /// spec.lora without defaults, so that the trainer checks only what the user set against
    /// the starting adapter (the job's `lora` has defaults filled in that the user never chose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::LoraSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerDpo {
    pub beta: f64,
    pub loss: DpoLossType,
    pub label_smoothing: f64,
}

/// spec.evaluation with its defaults resolved.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerEvaluation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<EvaluationMetric>,
    pub max_examples: u32,
    pub max_new_tokens: u32,
    /// Score points (or, without a metric, loss) the adapter must gain over the base; nothing
    /// is published when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_improvement: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerDataset {
    pub uri: String,
    pub format: DatasetFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_split: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_uri: Option<String>,
    pub skip_invalid: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerLora {
    pub r: u32,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<TargetModule>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerQuantization {
    pub bits: u32,
    pub quant_type: QuantType,
    pub double_quant: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerTraining {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    pub learning_rate: f64,
    pub batch_size: u32,
    pub gradient_accumulation_steps: u32,
    pub max_seq_length: u32,
    pub warmup_steps: u64,
    pub scheduler: LrScheduler,
    pub seed: u64,
    /// Steps between checkpoints uploaded to `checkpoint_uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_steps: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
}

/// What the trainer writes to its termination message (one JSON object), so the operator can
/// report the outcome without reading logs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase", tag = "result")]
// One value per trainer pod, written once and read once: the size of a Failed is of no account.
#[allow(clippy::large_enum_variant)]
pub enum TrainerOutcome {
    /// The adapter version was published.
    Succeeded {
        adapter: crate::PublishedAdapter,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        train_loss: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eval_loss: Option<f64>,
        /// The checkpoint step this pod resumed from, when it was a retry.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resumed_from_step: Option<u64>,
        /// The base model and the adapter on the held-out data, when the job asked for it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        evaluation: Option<EvaluationResult>,
        /// Under method dpo, the held-out pairs' rewards after the last step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dpo: Option<crate::DpoRewards>,
        /// Under method dpo, the last optimizer step's rewards on its training pairs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        train_dpo: Option<crate::DpoRewards>,
        /// The optimizer step the run ended at; absent from trainers that predate it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<u64>,
        /// The optimizer steps the run planned; absent from trainers that predate it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total_steps: Option<u64>,
    },
    /// The run failed; `reason` is a condition reason such as DatasetInvalid or LossDiverged.
    Failed {
        reason: String,
        message: String,
        /// The evaluation that failed the job (reason EvaluationBelowThreshold).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        evaluation: Option<EvaluationResult>,
    },
}

/// Trainer exit code for bad input (dataset, model, config): retrying cannot help, so the Job's
/// pod failure policy fails the Job at once.
pub const EXIT_INVALID_INPUT: i32 = 2;
/// Trainer exit code for a NaN or infinite loss: retrying from the checkpoint would diverge again.
pub const EXIT_LOSS_DIVERGED: i32 = 3;
/// Trainer exit code for an adapter that did not beat the base model by
/// `evaluation.minImprovement`: final, a retry would train and judge the same adapter again.
pub const EXIT_EVALUATION_BELOW_THRESHOLD: i32 = 4;
/// Condition reason of a job whose adapter did not beat the base model by enough.
pub const EVALUATION_BELOW_THRESHOLD: &str = "EvaluationBelowThreshold";
