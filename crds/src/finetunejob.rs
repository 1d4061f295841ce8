//! FineTuneJob: base model + dataset + LoRA/QLoRA settings → a trainer Job → a versioned adapter.

use crate::common::{BaseModelSpec, PodPlacement, SecretRef};
use crate::conditions::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec fields that reach the trainer pod: its template, or the job description in its
/// environment. A Job's pod template cannot change, so these cannot take effect once the trainer
/// Job exists; the schema makes them immutable (one CEL rule each, naming the field, added by
/// [`crate::all_crds`]) rather than let an edit be silently ignored.
pub const FINETUNEJOB_IMMUTABLE_FIELDS: &[&str] = &[
    "baseModel",
    "method",
    "lora",
    "quantization",
    "dataset",
    "training",
    "output",
    "evaluation",
    "dpo",
    "initFrom",
    "image",
    "resources",
    "nodeSelector",
    "tolerations",
    "affinity",
    "priorityClassName",
    "serviceAccountName",
    "imagePullSecrets",
    "storageSecretRef",
];

/// Spec fields the operator copies onto the existing trainer Job, so they may change at any time.
pub const FINETUNEJOB_MUTABLE_FIELDS: &[&str] = &[
    "suspend",
    "backoffLimit",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
];

/// A LoRA or QLoRA fine-tuning run of a base model on a dataset, producing a new version of a
/// named adapter in the adapter registry. Only suspend, backoffLimit, activeDeadlineSeconds and
/// ttlSecondsAfterFinished may change once it exists; the rest is fixed in the trainer pod.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kubetune.dev",
    version = "v1alpha1",
    kind = "FineTuneJob",
    plural = "finetunejobs",
    shortname = "ftj",
    category = "kubetune",
    namespaced,
    status = "FineTuneJobStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Pending, Running, Succeeded, Failed or Suspended"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress.display","description":"Optimizer steps done of the total"}"#,
    printcolumn = r#"{"name":"Loss","type":"number","jsonPath":".status.progress.trainLoss","description":"Latest training loss"}"#,
    printcolumn = r#"{"name":"Adapter","type":"string","jsonPath":".status.adapter.reference","description":"The adapter version this job published"}"#,
    printcolumn = r#"{"name":"Evaluation","type":"string","jsonPath":".status.evaluation.display","description":"The adapter's held-out score (or loss) against the base model's"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.method != 'qlora' || (has(self.quantization) && self.quantization.bits == 4)",
        "message": "spec.quantization: method qlora needs 4-bit quantization (quantization.bits: 4)",
        "fieldPath": ".quantization",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "!has(self.evaluation) || has(self.dataset.validationUri) || (has(self.dataset.validationSplit) && self.dataset.validationSplit > 0.0)",
        "message": "spec.evaluation: needs held-out data: set dataset.validationUri or dataset.validationSplit",
        "fieldPath": ".evaluation",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "(self.method == 'dpo') == (self.dataset.format == 'preference')",
        "message": "spec.dataset.format: method dpo trains on preference pairs (format preference), and preference data only with method dpo",
        "fieldPath": ".dataset.format"
    },
    {
        "rule": "!has(self.dpo) || self.method == 'dpo'",
        "message": "spec.dpo: only used with method dpo",
        "fieldPath": ".dpo"
    },
    {
        "rule": "self.method != 'dpo' || !has(self.quantization) || self.quantization.bits == 4",
        "message": "spec.quantization: method dpo trains on a full-precision base, or on a 4-bit one (quantization.bits: 4) as QLoRA does",
        "fieldPath": ".quantization"
    },
    {
        "rule": "self.method != 'dpo' || !has(self.evaluation)",
        "message": "spec.evaluation: not available with method dpo; the held-out rewards and reward accuracy are reported in status instead",
        "fieldPath": ".evaluation"
    },
    {
        "rule": "has(self.lora) || has(self.initFrom)",
        "message": "spec.lora: required unless spec.initFrom names the adapter to start from (whose settings are then used)",
        "fieldPath": ".lora",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "!has(self.output.merge) || !self.output.merge || !(self.method == 'qlora' || (self.method == 'dpo' && has(self.quantization)))",
        "message": "spec.output.merge: the adapter was trained on a 4-bit base; merging it into the full-precision weights would not give the model it was trained as, so merge is only for a full-precision base",
        "fieldPath": ".output.merge"
    },
    {
        "rule": "!has(self.evaluation) || !has(self.evaluation.metric) || self.dataset.format != 'text'",
        "message": "spec.evaluation.metric: scores answers to prompts, so it needs instruction or chat data, not text",
        "fieldPath": ".evaluation.metric"
    }
]))]
pub struct FineTuneJobSpec {
    /// The model to fine-tune.
    pub base_model: BaseModelSpec,
    /// Fine-tuning method: `lora` trains low-rank adapters on a full-precision frozen base;
    /// `qlora` does the same on a 4-bit quantized base (needs `quantization.bits: 4`); `dpo`
    /// trains a low-rank adapter by direct preference optimisation on `preference` data, on a
    /// full-precision base or, with `quantization.bits: 4`, a 4-bit one.
    pub method: FineTuneMethod,
    /// Low-rank adapter settings, as in HF PEFT's LoraConfig. Required unless `initFrom` is set;
    /// with it, rank, alpha and target modules come from the starting adapter, and any given
    /// here must equal its own (the job fails naming the field otherwise); dropout may differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    /// Continue training an adapter version already in the registry (the namespace's, where
    /// this job publishes) instead of a fresh adapter: e.g. a DPO job starting from the SFT
    /// adapter. Its files are checked against its manifest before training, and the new
    /// version records it (name, version, manifest digest) as its lineage. Under `method: dpo`
    /// the reference policy is this starting adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<InitFromSpec>,
    /// How the frozen base is quantized in memory. Required for `qlora`, not allowed to be
    /// anything but 4-bit there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantizationSpec>,
    /// The training data.
    pub dataset: DatasetSpec,
    /// Optimisation settings.
    pub training: TrainingSpec,
    /// Where the adapter goes.
    pub output: OutputSpec,
    /// Direct preference optimisation settings, for `method: dpo` (all optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoSpec>,
    /// How the adapter is judged against its base model on the held-out data, after training
    /// and before publishing. Unset: no judgement beyond the evaluation loss in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<EvaluationSpec>,
    /// Trainer container image; the operator's configured default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Where the trainer pod runs and with what resources.
    #[serde(flatten)]
    pub placement: PodPlacement,
    /// Suspends the job: no trainer pod runs while true. Flipping it back resumes from the last
    /// checkpoint. Queueing systems such as Kueue use this to admit jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// How many times a failed or preempted trainer pod is retried (each retry resumes from the
    /// last checkpoint). Defaults to 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub backoff_limit: Option<i32>,
    /// Wall-clock limit for the whole job, in seconds; the job fails with DeadlineExceeded after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Seconds after the job finishes before its trainer Job and pods are deleted. The
    /// FineTuneJob and the published adapter stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,
    /// Secret with the object-storage credentials the trainer uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_secret_ref: Option<SecretRef>,
}

/// An adapter version to start training from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitFromSpec {
    /// Adapter name in the registry (a DNS-1123 label).
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(min = 1, max = 63))]
    pub adapter_name: String,
    /// The version to start from, from 1. A number rather than `latest`, so that a retried
    /// trainer pod and the lineage the new version records always mean the same adapter.
    #[schemars(range(min = 1))]
    pub version: u32,
}

/// The fine-tuning method.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FineTuneMethod {
    /// Low-rank adapters on a full-precision frozen base.
    Lora,
    /// Low-rank adapters on a 4-bit quantized frozen base.
    Qlora,
    /// A low-rank adapter trained by direct preference optimisation on preference pairs; the
    /// reference model is the base with the adapter switched off.
    Dpo,
}

/// DPO settings (TRL's DPOConfig: beta, loss_type, label_smoothing).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.labelSmoothing) || self.labelSmoothing == 0.0 || !has(self.loss) || self.loss == 'sigmoid'",
        "message": "spec.dpo.labelSmoothing: applies to the sigmoid loss only",
        "fieldPath": ".labelSmoothing"
    }
]))]
pub struct DpoSpec {
    /// How far the adapter may move from the reference: rewards are beta times the log-prob
    /// ratio to the reference. Greater than 0; defaults to 0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true))]
    pub beta: Option<f64>,
    /// `sigmoid` (the DPO paper's loss, the default) or `ipo` (on log-probs averaged over the
    /// answer's tokens, as TRL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<DpoLossType>,
    /// The assumed share of pairs with swapped labels (conservative DPO), in [0, 0.5);
    /// sigmoid only. Defaults to 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Not `exclusiveMaximum`: the API server checks a whole-number value such as 0 against the
    // maximum cut to an integer (0.5 -> 0), so 0 would fail "less than 0". The operator refuses
    // 0.5 itself.
    #[schemars(extend("minimum" = 0, "maximum" = 0.5))]
    pub label_smoothing: Option<f64>,
}

/// The DPO loss.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossType {
    /// -log sigmoid(beta * margin).
    Sigmoid,
    /// (margin - 1 / (2 beta))^2.
    Ipo,
}

/// A projection of a Llama-family decoder layer that can carry an adapter (HF PEFT names).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TargetModule {
    /// Attention query projection.
    QProj,
    /// Attention key projection.
    KProj,
    /// Attention value projection.
    VProj,
    /// Attention output projection.
    OProj,
    /// MLP gate projection.
    GateProj,
    /// MLP up projection.
    UpProj,
    /// MLP down projection.
    DownProj,
}

/// LoRA hyperparameters (HF PEFT LoraConfig names: r, lora_alpha, lora_dropout, target_modules).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoraSpec {
    /// Rank of the low-rank update, 1 to 256.
    #[schemars(range(min = 1, max = 256))]
    pub r: u32,
    /// Scaling numerator: the update is scaled by alpha / r. Must be greater than 0.
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true))]
    pub alpha: f64,
    /// Dropout on the adapter input during training, in [0, 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0, "maximum" = 1, "exclusiveMaximum" = true))]
    pub dropout: Option<f64>,
    /// Projections that get adapters. Defaults to q_proj and v_proj.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 7), extend("x-kubernetes-list-type" = "set"))]
    pub target_modules: Option<Vec<TargetModule>>,
}

/// Quantization of the frozen base model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.type) || (self.type == 'int8') == (self.bits == 8)",
        "message": "quantization.type: int8 goes with bits 8, nf4 and fp4 with bits 4",
        "fieldPath": ".type"
    }
]))]
pub struct QuantizationSpec {
    /// Bits per base weight: 4 or 8.
    #[schemars(extend("enum" = [4, 8]))]
    pub bits: u32,
    /// Number format: nf4 (QLoRA's 4-bit NormalFloat, the default for 4 bits), fp4, or int8.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub quant_type: Option<QuantType>,
    /// Also quantize the per-block scales (QLoRA's double quantization). Defaults to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub double_quant: Option<bool>,
}

/// Number format of quantized base weights.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// 4-bit NormalFloat (QLoRA paper).
    Nf4,
    /// 4-bit floating point.
    Fp4,
    /// 8-bit integers.
    Int8,
}

/// The training data.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(has(self.validationSplit) && has(self.validationUri))",
        "message": "spec.dataset: set at most one of validationSplit and validationUri",
        "fieldPath": ".validationUri"
    }
]))]
pub struct DatasetSpec {
    /// JSON Lines file (or prefix of files) with one example per line. pvc://claim/path reads
    /// from a PersistentVolumeClaim of the namespace, mounted read-only into the trainer pod.
    #[schemars(regex(pattern = r"^(s3|gs|az|file|pvc|hf)://.+$"), length(max = 2048))]
    pub uri: String,
    /// Line format: `instruction` (instruction, context, response), `chat` (messages with role
    /// and content) or `text` (a text field).
    pub format: DatasetFormat,
    /// Fraction of examples held out for evaluation, in [0, 1). Not together with validationUri.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0, "maximum" = 1, "exclusiveMaximum" = true))]
    pub validation_split: Option<f64>,
    /// A separate evaluation file in the same format. Not together with validationSplit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(s3|gs|az|file|pvc|hf)://.+$"), length(max = 2048))]
    pub validation_uri: Option<String>,
    /// Skip malformed lines (and report how many) instead of failing before training starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_invalid: Option<bool>,
}

/// Format of each dataset line.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// `{"instruction": ..., "context": ..., "response": ...}` (dolly-15k style); loss on the response only.
    Instruction,
    /// `{"messages": [{"role": ..., "content": ...}]}`; loss on assistant turns only.
    Chat,
    /// `{"text": ...}`; loss on every token.
    Text,
    /// `{"prompt": ..., "chosen": ..., "rejected": ...}`: the prompt a string or chat messages,
    /// the answers strings or assistant messages; for `method: dpo`, loss on the answers only.
    Preference,
}

/// Optimisation settings (names as in HF TrainingArguments, camelCased).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.epochs) || has(self.maxSteps)",
        "message": "spec.training: set epochs (>= 1) or maxSteps (>= 1)",
        "reason": "FieldValueRequired"
    }
]))]
pub struct TrainingSpec {
    /// Passes over the dataset. At least one of epochs and maxSteps must be set; when both are,
    /// training stops at whichever comes first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub epochs: Option<u32>,
    /// Optimizer steps to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_steps: Option<u64>,
    /// Peak learning rate, in (0, 1).
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true, "maximum" = 1, "exclusiveMaximum" = true))]
    pub learning_rate: f64,
    /// Sequences per micro-batch. Defaults to 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub batch_size: Option<u32>,
    /// Micro-batches whose gradients add up to one optimizer step. Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub gradient_accumulation_steps: Option<u32>,
    /// Longest sequence in tokens; longer examples are truncated (and counted). Defaults to 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8, max = 131072))]
    pub max_seq_length: Option<u32>,
    /// Steps of linear warm-up from 0 to the learning rate. Defaults to 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub warmup_steps: Option<u64>,
    /// Learning-rate schedule after warm-up. Defaults to linear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<LrScheduler>,
    /// Seed for adapter initialisation, dropout and data shuffling. Defaults to 42.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub seed: Option<u64>,
    /// Optimizer steps between checkpoints in object storage; a retried or preempted trainer
    /// pod resumes from the last one. Defaults to 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub checkpoint_steps: Option<u64>,
    /// Recompute each layer's activations in the backward pass instead of keeping them (as
    /// HF's gradient_checkpointing): far less memory for about a third more compute.
    /// Defaults to false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
}

/// Learning-rate schedule.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    /// Stays at the learning rate.
    Constant,
    /// Decays linearly to 0 at the last step.
    Linear,
    /// Follows a half cosine down to 0 at the last step.
    Cosine,
}

/// How the adapter is judged. Both the base model (no adapter) and the adapter are evaluated on
/// the same held-out examples (dataset.validationUri, or the validationSplit), after training
/// and before anything is published.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvaluationSpec {
    /// Scores greedy answers to the held-out prompts against the reference answer (the
    /// response of an instruction line, the final assistant message of a chat line), besides
    /// the held-out loss, which is always computed. Instruction or chat data only.
    /// `exactMatch`: the answer equals the reference once surrounding whitespace is trimmed.
    /// `contains`: the answer contains the (trimmed) reference. `labelAccuracy`: for answers
    /// that are class labels; scored as exactMatch. A score is the fraction of examples right,
    /// from 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<EvaluationMetric>,
    /// Held-out examples evaluated (the first ones of the held-out data), to bound the cost.
    /// Defaults to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_examples: Option<u32>,
    /// Longest greedy answer, in tokens; answers stop earlier at the end of the turn.
    /// Defaults to 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_new_tokens: Option<u32>,
    /// How much the adapter must beat the base model by: with a metric, in score (adapter minus
    /// base, e.g. 0.05 for five points); without one, in held-out loss (base minus adapter). A job
    /// whose adapter falls short fails with reason EvaluationBelowThreshold and publishes
    /// nothing, so ModelDeployments following the latest version never roll out a worse
    /// adapter. Negative values allow the adapter to be at most that much worse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_improvement: Option<f64>,
}

/// How greedy answers are scored against the reference answers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum EvaluationMetric {
    /// The trimmed answer equals the trimmed reference.
    ExactMatch,
    /// The answer contains the trimmed reference.
    Contains,
    /// Answers are class labels: the trimmed answer equals the trimmed label.
    LabelAccuracy,
}

/// Where the trained adapter is published.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// Adapter name in the registry (a DNS-1123 label). Each successful job publishes the next
    /// version of it: v1, v2, ...
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(min = 1, max = 63))]
    pub adapter_name: String,
    /// Adapter registry root, e.g. s3://bucket/kubetune; the operator's configured default when unset.
    /// Not on a PersistentVolumeClaim: the operator reads registries itself, and mounts no claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(s3|gs|az|file|hf)://.+$"), length(max = 2048))]
    pub registry: Option<String>,
    /// Also publish the base model with the adapter folded into its weights (W + alpha/r·B·A,
    /// PEFT's merge_and_unload), in Hugging Face layout, for serving stacks that cannot load
    /// adapters: at `<registry>/merged/<adapterName>/v<N>/` beside the adapter version N, with
    /// its own manifest. Full-precision bases only (not qlora, nor dpo on 4 bits). Defaults
    /// to false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<bool>,
}

/// Observed state of a FineTuneJob.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FineTuneJobStatus {
    /// Coarse state: Pending, Running, Succeeded, Failed or Suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<FineTuneJobPhase>,
    /// Ready, Running, Succeeded and Failed conditions. Ready is true once the adapter is published.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Live training progress, taken from the trainer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TrainingProgress>,
    /// When the trainer first started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job succeeded or failed for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The adapter version this job published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PublishedAdapter>,
    /// Retries of the trainer pod so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i32>,
    /// The base model and the adapter judged on the held-out data (spec.evaluation), once the
    /// trainer has done so; also on a job that failed with EvaluationBelowThreshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<EvaluationResult>,
}

/// The base model and the adapter on the same held-out examples.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvaluationResult {
    /// The metric the scores are in; absent when only the loss was evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<EvaluationMetric>,
    /// The base model without the adapter.
    pub base: ModelEvaluation,
    /// The base model with the trained adapter.
    pub adapter: ModelEvaluation,
    /// Held-out examples evaluated.
    pub examples: u32,
    /// "score (base score)" or "loss (base loss)", for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

/// One model's results on the held-out examples.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelEvaluation {
    /// Mean loss per answer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Fraction of examples answered right under the metric, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
}

/// Coarse state of a FineTuneJob.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum FineTuneJobPhase {
    /// Accepted, waiting for the trainer pod to start.
    Pending,
    /// The trainer is running.
    Running,
    /// The adapter is published.
    Succeeded,
    /// The job failed for good; the Failed condition says why.
    Failed,
    /// spec.suspend is true.
    Suspended,
}

/// Training progress as last reported by the trainer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingProgress {
    /// Optimizer steps done.
    pub step: u64,
    /// Optimizer steps the run will take.
    pub total_steps: u64,
    /// Fractional epoch reached, e.g. 1.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<f64>,
    /// Latest training loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    /// Latest evaluation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Training throughput, in tokens per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Estimated time left as of the last step, as a duration such as 3m20s; absent once the
    /// job no longer runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<String>,
    /// When the operator first saw the current step. The ETA is computed from it and the start
    /// time, never from the clock, so a status only changes when training moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<Time>,
    /// "step/totalSteps (percent)", for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    /// The step a retried trainer pod resumed from (its last checkpoint); absent when the run
    /// started from zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<u64>,
    /// Under `method: dpo`: the latest step's rewards (trainLoss is then the DPO loss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoRewards>,
    /// Under `method: dpo`: the held-out pairs' rewards at the latest evaluation (evalLoss is
    /// then their DPO loss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_dpo: Option<DpoRewards>,
}

/// DPO rewards over a set of pairs (TRL's rewards/chosen, rewards/rejected, rewards/margins,
/// rewards/accuracies).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DpoRewards {
    /// Mean reward of the chosen answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<f64>,
    /// Mean reward of the rejected answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<f64>,
    /// Mean of chosen minus rejected reward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margins: Option<f64>,
    /// Share of pairs whose chosen answer's reward is higher, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracies: Option<f64>,
}

/// An adapter version in the registry.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublishedAdapter {
    /// Adapter name.
    pub name: String,
    /// Version number, from 1.
    pub version: u32,
    /// URI of the version's directory in the registry.
    pub uri: String,
    /// sha256 digest of the version's manifest, "sha256:<hex>".
    pub digest: String,
    /// "name@vN", for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// URI of the merged model published beside it (spec.output.merge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_uri: Option<String>,
}
