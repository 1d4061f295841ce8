//! Pure validation of a FineTuneJob beyond what the CRD schema checks: defaults resolved, the
//! registry known, and the model fitting the GPUs it asks for.

use crate::config::OperatorConfig;
use crate::pvc::{self, ClaimMounts};
use crate::workload::{check_image, requested_gpus};
use kubetune_crds::trainer_contract::{
    TrainerDataset, TrainerDpo, TrainerEvaluation, TrainerInitFrom, TrainerLora, TrainerQuantization, TrainerTraining,
};
use kubetune_crds::{
    DatasetFormat, DatasetSpec, DpoLossType, EvaluationSpec, FineTuneJobSpec, FineTuneMethod, LoraSpec, LrScheduler,
    QuantType, TargetModule,
};

/// Why a FineTuneJob cannot run as written. `reason` becomes the condition reason.
#[derive(Clone, Debug, PartialEq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

/// Something the job needs that does not exist yet, such as its storage Secret. Unlike
/// [`Invalid`] this is not final: GitOps tools and people often create the Secret after the
/// job, so the job waits, and runs once it appears. `reason` becomes the condition reason.
#[derive(Clone, Debug, PartialEq)]
pub struct Waiting {
    pub reason: &'static str,
    pub message: String,
}

/// What the cluster and the model say, gathered before validation (by `dereference`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Facts {
    /// Memory of one GPU in MiB on the largest node the job could land on, when nodes say.
    pub gpu_memory_mib: Option<u64>,
    /// The base model's shape, when its config.json could be read.
    pub model: Option<ModelShape>,
}

/// The parts of a Llama-family config.json that decide memory use.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub vocab_size: u64,
    pub tie_word_embeddings: bool,
}

/// A FineTuneJob with every default filled in: what the trainer is asked to do, in the very
/// types the trainer receives, plus what the pod needs.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidFineTuneJob {
    pub method: FineTuneMethod,
    /// spec.lora with defaults. Under initFrom the trainer takes the starting adapter's own
    /// settings instead; without spec.lora these are then the defaults, which only the
    /// GPU-memory estimate reads.
    pub lora: TrainerLora,
    /// spec.initFrom, with spec.lora as written for the trainer to check against the adapter.
    pub init_from: Option<TrainerInitFrom>,
    /// spec.output.merge.
    pub merge: bool,
    pub quantization: Option<TrainerQuantization>,
    pub dataset: TrainerDataset,
    pub training: TrainerTraining,
    /// spec.evaluation with its defaults; None when the job asks for no judgement.
    pub evaluation: Option<TrainerEvaluation>,
    /// spec.dpo with its defaults; present exactly under method dpo.
    pub dpo: Option<TrainerDpo>,
    /// The registry root (spec.output.registry or the operator's default); trainer checkpoints
    /// go below it, adapters below its part for the job's namespace (`registry_scope`).
    pub registry: String,
    pub registry_scope: kubetune_storage::RegistryScope,
    /// spec.baseModel.uri as the trainer reads it (a claim's `file://` mount for `pvc://`).
    pub base_model_uri: String,
    /// The claims `pvc://` URIs name, mounted read-only into the trainer pod.
    pub claims: ClaimMounts,
    pub image: String,
    pub backoff_limit: i32,
    /// GPUs the trainer pod asks for: 0 (CPU training) or 1, as validation refuses more.
    pub gpus: u64,
}

pub const DEFAULT_BACKOFF_LIMIT: i32 = 3;

/// Checkpoints often enough that a retry loses little, rarely enough that uploads stay cheap.
const DEFAULT_CHECKPOINT_STEPS: u64 = 50;

/// Enough held-out examples for a score to mean something, few enough that greedy decoding
/// them twice (base and adapter) stays small next to training.
pub const DEFAULT_EVAL_MAX_EXAMPLES: u32 = 100;
/// Room for a label or a short answer; longer answers are cut, which exactMatch then misses.
pub const DEFAULT_EVAL_MAX_NEW_TOKENS: u32 = 32;

/// Checks a spec against the operator's settings and the gathered facts.
pub fn validate(spec: &FineTuneJobSpec, config: &OperatorConfig, facts: &Facts) -> Result<ValidFineTuneJob, Invalid> {
    let registry = spec
        .output
        .registry
        .clone()
        .or_else(|| config.default_registry.clone())
        .ok_or_else(|| Invalid {
            reason: "InvalidSpec",
            message: "spec.output.registry: not set, and the operator has no default registry (--default-registry)"
                .into(),
        })?;
    if registry.starts_with("hf://") {
        return Err(Invalid {
            reason: "InvalidSpec",
            message: format!("spec.output.registry: {registry} is on the Hugging Face hub, which kubetune only reads; use s3, gs, az or file"),
        });
    }
    // The schema no longer allows it; objects stored before it did are refused here.
    if spec.output.registry.as_deref().is_some_and(pvc::is_pvc) {
        return Err(Invalid {
            reason: "InvalidSpec",
            message: pvc::registry_refused("spec.output.registry", &registry),
        });
    }
    check_image("spec.image", spec.image.as_deref(), &config.allowed_images).map_err(|message| Invalid {
        reason: "ImageNotAllowed",
        message,
    })?;
    let mut claims = ClaimMounts::default();
    let mut local = |field: &str, uri: &str| {
        claims.local_uri(field, uri).map_err(|message| Invalid {
            reason: "InvalidSpec",
            message,
        })
    };
    let base_model_uri = local("spec.baseModel.uri", &spec.base_model.uri)?;
    let dataset_uri = local("spec.dataset.uri", &spec.dataset.uri)?;
    let validation_uri = spec
        .dataset
        .validation_uri
        .as_deref()
        .map(|uri| local("spec.dataset.validationUri", uri))
        .transpose()?;
    let gpus = requested_gpus(&spec.placement, &config.gpu_resource).map_err(|message| Invalid {
        reason: "InvalidSpec",
        message,
    })?;
    let evaluation = spec
        .evaluation
        .as_ref()
        .map(|e| evaluation(e, &spec.dataset))
        .transpose()?;
    let dpo = dpo(spec)?;
    let (init_from, merge) = (init_from(spec)?, merge(spec)?);
    let training = &spec.training;
    let lora = spec.lora.clone().unwrap_or(LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout: None,
        target_modules: None,
    });
    let valid = ValidFineTuneJob {
        method: spec.method,
        lora: TrainerLora {
            r: lora.r,
            alpha: lora.alpha,
            dropout: lora.dropout.unwrap_or(0.0),
            target_modules: lora
                .target_modules
                .unwrap_or_else(|| vec![TargetModule::QProj, TargetModule::VProj]),
        },
        init_from,
        merge,
        quantization: spec.quantization.as_ref().map(|q| TrainerQuantization {
            bits: q.bits,
            quant_type: q
                .quant_type
                .unwrap_or(if q.bits == 8 { QuantType::Int8 } else { QuantType::Nf4 }),
            double_quant: q.double_quant.unwrap_or(true),
        }),
        dataset: TrainerDataset {
            uri: dataset_uri,
            format: spec.dataset.format,
            validation_split: spec.dataset.validation_split,
            validation_uri,
            skip_invalid: spec.dataset.skip_invalid.unwrap_or(false),
        },
        training: TrainerTraining {
            epochs: training.epochs,
            max_steps: training.max_steps,
            learning_rate: training.learning_rate,
            batch_size: training.batch_size.unwrap_or(4),
            gradient_accumulation_steps: training.gradient_accumulation_steps.unwrap_or(1),
            max_seq_length: training.max_seq_length.unwrap_or(512),
            warmup_steps: training.warmup_steps.unwrap_or(0),
            scheduler: training.scheduler.unwrap_or(LrScheduler::Linear),
            seed: training.seed.unwrap_or(42),
            checkpoint_steps: Some(training.checkpoint_steps.unwrap_or(DEFAULT_CHECKPOINT_STEPS)),
            gradient_checkpointing: training.gradient_checkpointing.unwrap_or(false),
        },
        evaluation,
        dpo,
        registry,
        registry_scope: config.registry_scope,
        base_model_uri,
        claims,
        image: spec.image.clone().unwrap_or_else(|| config.trainer_image.clone()),
        backoff_limit: spec.backoff_limit.unwrap_or(DEFAULT_BACKOFF_LIMIT),
        gpus,
    };
    check_gpu_memory(&valid, facts)?;
    Ok(valid)
}

/// spec.initFrom for the trainer; spec.lora is required without it. The schema's CEL rule says
/// the same at apply time; this holds for objects stored before that rule.
fn init_from(spec: &FineTuneJobSpec) -> Result<Option<TrainerInitFrom>, Invalid> {
    let Some(from) = &spec.init_from else {
        return match spec.lora {
            Some(_) => Ok(None),
            None => Err(Invalid {
                reason: "InvalidSpec",
                message: "spec.lora: required unless spec.initFrom names the adapter to start from".into(),
            }),
        };
    };
    kubetune_storage::validate_adapter_name(&from.adapter_name).map_err(|e| Invalid {
        reason: "InvalidSpec",
        message: format!("spec.initFrom.adapterName: {e}"),
    })?;
    if from.version == 0 {
        return Err(Invalid {
            reason: "InvalidSpec",
            message: "spec.initFrom.version: versions count from 1".into(),
        });
    }
    Ok(Some(TrainerInitFrom {
        adapter_name: from.adapter_name.clone(),
        version: from.version,
        lora: spec.lora.clone(),
    }))
}

/// spec.output.merge, refused on a 4-bit base: the adapter learned to correct the quantized
/// weights, so folding it into the full-precision ones would publish a model nobody trained.
fn merge(spec: &FineTuneJobSpec) -> Result<bool, Invalid> {
    let merge = spec.output.merge.unwrap_or(false);
    let four_bit = match spec.method {
        FineTuneMethod::Lora => false,
        FineTuneMethod::Qlora => true,
        FineTuneMethod::Dpo => spec.quantization.as_ref().is_some_and(|q| q.bits == 4),
    };
    if merge && four_bit {
        return Err(Invalid {
            reason: "InvalidSpec",
            message: "spec.output.merge: only for a full-precision base; this job trains on a 4-bit one".into(),
        });
    }
    Ok(merge)
}

/// TRL's defaults: beta 0.1, the sigmoid loss, no label smoothing.
const DEFAULT_DPO_BETA: f64 = 0.1;

/// spec.dpo with defaults under method dpo, which needs preference data and the reverse; None
/// for the other methods. The schema's CEL rules say the same at apply time; this holds for
/// objects stored before those rules.
fn dpo(spec: &FineTuneJobSpec) -> Result<Option<TrainerDpo>, Invalid> {
    let invalid = |message: String| Invalid {
        reason: "InvalidSpec",
        message,
    };
    let is_dpo = spec.method == FineTuneMethod::Dpo;
    let preference = spec.dataset.format == DatasetFormat::Preference;
    if is_dpo != preference {
        return Err(invalid(if is_dpo {
            "spec.dataset.format: method dpo trains on preference pairs; set format: preference".into()
        } else {
            "spec.dataset.format: preference data trains only with method: dpo".into()
        }));
    }
    if !is_dpo {
        return match spec.dpo {
            Some(_) => Err(invalid("spec.dpo: only used with method: dpo".into())),
            None => Ok(None),
        };
    }
    if spec.quantization.as_ref().is_some_and(|q| q.bits != 4) {
        return Err(invalid(
            "spec.quantization.bits: method dpo trains on a full-precision base or a 4-bit (NF4) one".into(),
        ));
    }
    if spec.evaluation.is_some() {
        return Err(invalid(
            "spec.evaluation: not available with method dpo; the held-out rewards and reward accuracy are reported in status instead".into(),
        ));
    }
    let d = spec.dpo.clone().unwrap_or_default();
    let beta = d.beta.unwrap_or(DEFAULT_DPO_BETA);
    if !(beta > 0.0 && beta.is_finite()) {
        return Err(invalid(format!("spec.dpo.beta: {beta} must be greater than 0")));
    }
    let loss = d.loss.unwrap_or(DpoLossType::Sigmoid);
    let label_smoothing = d.label_smoothing.unwrap_or(0.0);
    if !(0.0..0.5).contains(&label_smoothing) {
        return Err(invalid(format!(
            "spec.dpo.labelSmoothing: {label_smoothing} is not in [0, 0.5)"
        )));
    }
    if label_smoothing > 0.0 && loss != DpoLossType::Sigmoid {
        return Err(invalid(
            "spec.dpo.labelSmoothing: applies to the sigmoid loss only".into(),
        ));
    }
    Ok(Some(TrainerDpo {
        beta,
        loss,
        label_smoothing,
    }))
}

/// spec.evaluation with defaults, checked against the data it is to run on. The schema's CEL
/// rules say the same at apply time; this holds for objects stored before those rules.
fn evaluation(e: &EvaluationSpec, dataset: &DatasetSpec) -> Result<TrainerEvaluation, Invalid> {
    let invalid = |message: String| Invalid {
        reason: "InvalidSpec",
        message,
    };
    let held_out = dataset.validation_uri.is_some() || dataset.validation_split.is_some_and(|f| f > 0.0);
    if !held_out {
        let field = if e.min_improvement.is_some() {
            "spec.evaluation.minImprovement"
        } else {
            "spec.evaluation"
        };
        return Err(invalid(format!(
            "{field}: there is no held-out data to evaluate on; set spec.dataset.validationUri or spec.dataset.validationSplit"
        )));
    }
    if e.metric.is_some() && dataset.format == DatasetFormat::Text {
        return Err(invalid(
            "spec.evaluation.metric: text lines have no reference answers to score; use instruction or chat data, or leave metric out to compare losses".into(),
        ));
    }
    if let Some(m) = e.min_improvement.filter(|m| !m.is_finite()) {
        return Err(invalid(format!("spec.evaluation.minImprovement: {m} is not a number")));
    }
    for (field, value) in [("maxExamples", e.max_examples), ("maxNewTokens", e.max_new_tokens)] {
        if value == Some(0) {
            return Err(invalid(format!("spec.evaluation.{field}: must be at least 1")));
        }
    }
    Ok(TrainerEvaluation {
        metric: e.metric,
        max_examples: e.max_examples.unwrap_or(DEFAULT_EVAL_MAX_EXAMPLES),
        max_new_tokens: e.max_new_tokens.unwrap_or(DEFAULT_EVAL_MAX_NEW_TOKENS),
        min_improvement: e.min_improvement,
    })
}

/// Fails fast when the estimated training memory cannot fit the job's GPU, rather than letting
/// the pod be scheduled and die of OOM. Only when both the node's GPU memory and the model's
/// shape are known. One GPU's memory, whatever the node has: the trainer opens one device.
fn check_gpu_memory(job: &ValidFineTuneJob, facts: &Facts) -> Result<(), Invalid> {
    let (Some(gpu_mib), Some(model)) = (facts.gpu_memory_mib, facts.model.as_ref()) else {
        return Ok(());
    };
    if job.gpus == 0 {
        return Ok(());
    }
    let need = estimate_training_memory_mib(job, model);
    if need > gpu_mib {
        return Err(Invalid {
            reason: "InsufficientGPUMemory",
            message: format!(
                "the model needs about {need} MiB to train with {:?} at batch {} x {} tokens, but its GPU has {gpu_mib} MiB; use qlora, gradientCheckpointing, a smaller batchSize or maxSeqLength, or a node with a larger GPU",
                job.method, job.training.batch_size, job.training.max_seq_length
            ),
        });
    }
    Ok(())
}

/// A deliberately simple estimate of peak GPU memory, in MiB, in the dtypes the trainer holds on
/// a GPU:
/// - frozen base weights: bf16 (2 bytes per parameter) for LoRA; for QLoRA NF4 codes (half a
///   byte) plus one f32 absmax per block of 64, about 0.5625 bytes per parameter (the double
///   quantization is undone at load), plus one projection expanded to bf16 for its matmul;
/// - LoRA A and B, their gradients and AdamW's two moments, all f32: 16 bytes per trainable
///   parameter;
/// - activations kept for the backward pass in bf16, and the logits in f32 (the loss is f32);
/// - a fixed CUDA overhead (context, cuBLAS workspace, allocator slack).
pub fn estimate_training_memory_mib(job: &ValidFineTuneJob, m: &ModelShape) -> u64 {
    let head_dim = m.hidden_size / m.num_attention_heads.max(1);
    let kv_dim = head_dim * m.num_key_value_heads;
    let (h, i) = (m.hidden_size, m.intermediate_size);
    let per_layer = h * h * 2 + h * kv_dim * 2 + 3 * h * i;
    let embeddings = m.vocab_size * h * if m.tie_word_embeddings { 1 } else { 2 };
    let params = per_layer * m.num_hidden_layers + embeddings;
    let nf4 = match job.method {
        FineTuneMethod::Lora => false,
        FineTuneMethod::Qlora => true,
        FineTuneMethod::Dpo => job.quantization.as_ref().is_some_and(|q| q.bits == 4),
    };
    let base_bytes = if nf4 {
        // Packed codes, an f32 absmax per 64 weights, and the largest projection expanded.
        params / 2 + params * 4 / 64 + h * i.max(h) * 2
    } else {
        params * 2
    };
    let adapter_params: u64 = job
        .lora
        .target_modules
        .iter()
        .map(|t| {
            let (fan_in, fan_out) = match t {
                TargetModule::QProj | TargetModule::OProj => (h, h),
                TargetModule::KProj | TargetModule::VProj => (h, kv_dim),
                TargetModule::GateProj | TargetModule::UpProj => (h, i),
                TargetModule::DownProj => (i, h),
            };
            u64::from(job.lora.r) * (fan_in + fan_out)
        })
        .sum::<u64>()
        * m.num_hidden_layers;
    // Weight, gradient and two moments, each f32.
    let adapter_bytes = adapter_params * 4 * 4;
    // A DPO batch of pairs is twice as many sequences: each pair's chosen and rejected answer.
    let sequences_per_example = if job.method == FineTuneMethod::Dpo { 2 } else { 1 };
    let tokens = u64::from(job.training.batch_size) * u64::from(job.training.max_seq_length) * sequences_per_example;
    // About 34 bf16 values per token per hidden unit per layer survive to the backward pass
    // without gradient checkpointing, plus the f32 logits. With it, each layer keeps only its
    // input, one layer at a time is rebuilt, and the logits go in chunks of 256 rows.
    let activation_bytes = if job.training.gradient_checkpointing {
        tokens * h * m.num_hidden_layers * 2 + tokens * h * 34 * 2 + tokens.min(256) * m.vocab_size * 4
    } else {
        tokens * h * m.num_hidden_layers * 34 * 2 + tokens * m.vocab_size * 4
    };
    let overhead = 1024 * 1024 * 1024;
    (base_bytes + adapter_bytes + activation_bytes + overhead).div_ceil(1024 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::finetunejob;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn llama_8b() -> ModelShape {
        ModelShape {
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            vocab_size: 128256,
            tie_word_embeddings: false,
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let ftj = finetunejob("minimal.yaml");
        let valid = validate(&ftj.spec, &OperatorConfig::for_tests(), &Facts::default()).expect("valid");
        assert_eq!(
            valid.lora.target_modules,
            vec![TargetModule::QProj, TargetModule::VProj]
        );
        assert_eq!(
            (
                valid.training.batch_size,
                valid.training.gradient_accumulation_steps,
                valid.training.max_seq_length
            ),
            (4, 1, 512)
        );
        assert_eq!(valid.training.scheduler, LrScheduler::Linear);
        assert_eq!(valid.registry, "s3://kubetune/registry");
        assert_eq!(valid.image, "kubetune/trainer:test");
        assert_eq!(valid.gpus, 1, "no resources at all means one GPU");
        assert_eq!(valid.backoff_limit, DEFAULT_BACKOFF_LIMIT);
    }

    #[test]
    fn a_registry_is_required_from_spec_or_operator() {
        let ftj = finetunejob("minimal.yaml");
        let config = OperatorConfig {
            default_registry: None,
            ..OperatorConfig::for_tests()
        };
        let err = validate(&ftj.spec, &config, &Facts::default()).expect_err("no registry");
        assert_eq!(err.reason, "InvalidSpec");
        assert!(err.message.starts_with("spec.output.registry"), "{}", err.message);
    }

    #[test]
    fn hub_registry_is_rejected() {
        let mut ftj = finetunejob("minimal.yaml");
        ftj.spec.output.registry = Some("hf://org/adapters".into());
        let err = validate(&ftj.spec, &OperatorConfig::for_tests(), &Facts::default()).expect_err("read-only");
        assert!(err.message.contains("only reads"), "{}", err.message);
    }

    #[test]
    fn a_registry_on_a_claim_is_refused_naming_the_field() {
        let mut ftj = finetunejob("minimal.yaml");
        ftj.spec.output.registry = Some("pvc://adapters/registry".into());
        let err = validate(&ftj.spec, &OperatorConfig::for_tests(), &Facts::default()).expect_err("claim registry");
        assert_eq!(err.reason, "InvalidSpec");
        assert!(
            err.message
                .starts_with("spec.output.registry: pvc://adapters/registry is on a PersistentVolumeClaim"),
            "{}",
            err.message
        );
    }

    #[test]
    fn an_image_outside_the_allowed_images_is_refused_naming_the_field() {
        let mut spec = finetunejob("minimal.yaml").spec;
        spec.image = Some("ghcr.io/x/y:1".into());
        let err = checked(&spec).expect_err("not an allowed image");
        assert_eq!(err.reason, "ImageNotAllowed");
        assert!(
            err.message
                .starts_with("spec.image: ghcr.io/x/y:1 is not in the operator's allowed images (kubetune/trainer, "),
            "{}",
            err.message
        );
        spec.image = Some("kubetune/trainer:v2".into());
        assert_eq!(
            checked(&spec).expect("an allowed repository").image,
            "kubetune/trainer:v2"
        );
        spec.image = None;
        assert_eq!(
            checked(&spec).expect("the operator's default").image,
            "kubetune/trainer:test"
        );
    }

    #[test]
    fn model_and_data_on_claims_are_read_from_their_mounts() {
        let mut ftj = finetunejob("minimal.yaml");
        ftj.spec.base_model.uri = "pvc://models/smollm2".into();
        ftj.spec.dataset.uri = "pvc://datasets/triage/train.jsonl".into();
        ftj.spec.dataset.validation_split = None;
        ftj.spec.dataset.validation_uri = Some("pvc://datasets/triage/heldout.jsonl".into());
        let valid = validate(&ftj.spec, &OperatorConfig::for_tests(), &Facts::default()).expect("valid");
        assert_eq!(valid.base_model_uri, "file:///mnt/kubetune/pvc/models/smollm2");
        assert_eq!(
            valid.dataset.uri,
            "file:///mnt/kubetune/pvc/datasets/triage/train.jsonl"
        );
        assert_eq!(
            valid.dataset.validation_uri.as_deref(),
            Some("file:///mnt/kubetune/pvc/datasets/triage/heldout.jsonl")
        );
        assert_eq!(valid.claims.claims().collect::<Vec<_>>(), ["datasets", "models"]);
    }

    #[test]
    fn a_malformed_claim_uri_is_refused_naming_the_field() {
        let mut ftj = finetunejob("minimal.yaml");
        ftj.spec.dataset.validation_split = None;
        ftj.spec.dataset.validation_uri = Some("pvc://datasets/../secrets".into());
        let err = validate(&ftj.spec, &OperatorConfig::for_tests(), &Facts::default()).expect_err("'..'");
        assert_eq!(err.reason, "InvalidSpec");
        assert!(
            err.message.starts_with("spec.dataset.validationUri: "),
            "{}",
            err.message
        );
    }

    fn with_yaml(patch: &str) -> FineTuneJobSpec {
        let mut value = serde_json::to_value(&finetunejob("minimal.yaml").spec).expect("json");
        let patch: serde_json::Value = serde_yaml::from_str(patch).expect("patch");
        for (k, v) in patch.as_object().expect("object") {
            value[k] = v.clone();
        }
        serde_json::from_value(value).expect("spec")
    }

    #[test]
    fn method_dpo_resolves_trls_defaults_and_needs_preference_data_and_the_reverse() {
        let config = OperatorConfig::for_tests();
        let pairs = "dataset: {uri: s3://data/pairs.jsonl, format: preference}";
        let valid = validate(&with_yaml(&format!("method: dpo\n{pairs}")), &config, &Facts::default()).expect("valid");
        assert_eq!(
            valid.dpo,
            Some(TrainerDpo {
                beta: 0.1,
                loss: DpoLossType::Sigmoid,
                label_smoothing: 0.0
            })
        );
        let refused = |patch: &str| {
            validate(&with_yaml(patch), &config, &Facts::default())
                .expect_err(patch)
                .message
        };
        assert!(refused("method: dpo").starts_with("spec.dataset.format: method dpo"));
        assert!(refused(pairs).starts_with("spec.dataset.format: preference data"));
        assert!(refused("dpo: {beta: 0.2}").starts_with("spec.dpo: "));
        assert!(refused(&format!("method: dpo\n{pairs}\ndpo: {{beta: 0}}")).starts_with("spec.dpo.beta: "));
        let ipo_smoothed = format!("method: dpo\n{pairs}\ndpo: {{loss: ipo, labelSmoothing: 0.1}}");
        assert!(refused(&ipo_smoothed).starts_with("spec.dpo.labelSmoothing: "));
        let judged = format!("method: dpo\n{pairs}\nevaluation: {{}}");
        assert!(refused(&judged).starts_with("spec.evaluation: "));
        let int8 = format!("method: dpo\n{pairs}\nquantization: {{bits: 8}}");
        assert!(refused(&int8).starts_with("spec.quantization.bits: "));
    }

    #[test]
    fn the_dpo_example_manifest_is_valid_and_keeps_its_settings() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/dpo-finetunejob.yaml");
        let ftj: kubetune_crds::FineTuneJob =
            serde_yaml::from_str(&std::fs::read_to_string(path).expect("example")).expect("a FineTuneJob");
        let valid = validate(&ftj.spec, &OperatorConfig::for_tests(), &Facts::default()).expect("valid");
        assert_eq!(valid.method, FineTuneMethod::Dpo);
        assert_eq!(valid.dataset.format, DatasetFormat::Preference);
        assert_eq!(valid.dpo.map(|d| (d.beta, d.loss)), Some((0.1, DpoLossType::Sigmoid)));
    }

    #[test]
    fn the_sft_to_dpo_example_starts_from_the_sft_adapter_with_no_lora_of_its_own_and_merges() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/dpo-from-sft-finetunejob.yaml");
        let ftj: kubetune_crds::FineTuneJob =
            serde_yaml::from_str(&std::fs::read_to_string(path).expect("example")).expect("a FineTuneJob");
        let valid = validate(&ftj.spec, &OperatorConfig::for_tests(), &Facts::default()).expect("valid");
        assert_eq!(valid.method, FineTuneMethod::Dpo);
        let from = valid.init_from.expect("initFrom reaches the trainer");
        assert_eq!(
            (from.adapter_name.as_str(), from.version, from.lora),
            ("support-bot", 1, None)
        );
        assert!(valid.merge);
    }

    #[test]
    fn init_from_hands_the_trainer_spec_lora_as_written_so_it_checks_only_what_the_user_set() {
        let config = OperatorConfig::for_tests();
        let valid = validate(
            &with_yaml("initFrom: {adapterName: sft, version: 3}\nlora: {r: 16, alpha: 32}"),
            &config,
            &Facts::default(),
        )
        .expect("valid");
        let from = valid.init_from.expect("initFrom");
        let lora = from.lora.expect("spec.lora as written");
        assert_eq!(
            (lora.r, lora.target_modules),
            (16, None),
            "no default target modules added"
        );
    }

    #[test]
    fn a_job_without_lora_or_init_from_and_a_bad_init_from_are_refused_naming_the_field() {
        let config = OperatorConfig::for_tests();
        let refused = |spec: FineTuneJobSpec| {
            validate(&spec, &config, &Facts::default())
                .expect_err("refused")
                .message
        };
        let mut no_lora = finetunejob("minimal.yaml").spec;
        no_lora.lora = None;
        assert!(refused(no_lora).starts_with("spec.lora: required unless spec.initFrom"));
        let version_0 = with_yaml("initFrom: {adapterName: sft, version: 0}");
        assert!(refused(version_0).starts_with("spec.initFrom.version: "));
        let bad_name = with_yaml("initFrom: {adapterName: Not_A_Label, version: 1}");
        assert!(refused(bad_name).starts_with("spec.initFrom.adapterName: "));
    }

    #[test]
    fn merge_is_refused_naming_the_field_on_a_4_bit_base_and_reaches_the_trainer_otherwise() {
        let config = OperatorConfig::for_tests();
        let merged = "output: {adapterName: minimal, merge: true}";
        let valid = validate(&with_yaml(merged), &config, &Facts::default()).expect("lora merges");
        assert!(valid.merge);
        let qlora = with_yaml(&format!("{merged}\nmethod: qlora\nquantization: {{bits: 4}}"));
        let err = validate(&qlora, &config, &Facts::default()).expect_err("qlora cannot merge");
        assert!(err.message.starts_with("spec.output.merge: "), "{}", err.message);
        let pairs = "method: dpo\ndataset: {uri: s3://data/pairs.jsonl, format: preference}\nquantization: {bits: 4}";
        let dpo_4bit = with_yaml(&format!("{merged}\n{pairs}"));
        let err = validate(&dpo_4bit, &config, &Facts::default()).expect_err("4-bit dpo cannot merge");
        assert!(err.message.starts_with("spec.output.merge: "), "{}", err.message);
    }

    #[test]
    fn a_dpo_batch_holds_twice_the_activations_and_a_4_bit_dpo_base_is_nf4() {
        let config = OperatorConfig::for_tests();
        let pairs = "method: dpo\ndataset: {uri: s3://data/pairs.jsonl, format: preference}";
        let lora = validate(&finetunejob("minimal.yaml").spec, &config, &Facts::default()).expect("lora");
        let dpo = validate(&with_yaml(pairs), &config, &Facts::default()).expect("dpo");
        let dpo_4bit = validate(
            &with_yaml(&format!("{pairs}\nquantization: {{bits: 4}}")),
            &config,
            &Facts::default(),
        )
        .expect("4-bit dpo");
        let m = llama_8b();
        let doubled = ValidFineTuneJob {
            training: TrainerTraining {
                batch_size: lora.training.batch_size * 2,
                ..lora.training.clone()
            },
            ..lora.clone()
        };
        assert_eq!(
            estimate_training_memory_mib(&dpo, &m),
            estimate_training_memory_mib(&doubled, &m)
        );
        let qlora = ValidFineTuneJob {
            method: FineTuneMethod::Qlora,
            ..doubled
        };
        assert_eq!(
            estimate_training_memory_mib(&dpo_4bit, &m),
            estimate_training_memory_mib(&qlora, &m)
        );
    }

    #[test]
    fn cpu_training_when_resources_name_no_gpu() {
        let ftj = finetunejob("cpu.yaml");
        let valid = validate(&ftj.spec, &OperatorConfig::for_tests(), &Facts::default()).expect("valid");
        assert_eq!(valid.gpus, 0);
    }

    #[test]
    fn two_gpus_are_refused_naming_the_field_and_saying_one_is_supported() {
        let mut ftj = finetunejob("full.yaml");
        let limits = ftj
            .spec
            .placement
            .resources
            .as_mut()
            .and_then(|r| r.limits.as_mut())
            .expect("full.yaml sets limits");
        limits.insert("nvidia.com/gpu".into(), Quantity("2".into()));
        let err = validate(&ftj.spec, &OperatorConfig::for_tests(), &Facts::default()).expect_err("two GPUs");
        assert_eq!(err.reason, "InvalidSpec");
        assert!(
            err.message
                .starts_with(r#"spec.resources.limits["nvidia.com/gpu"]: 2 GPUs"#),
            "{}",
            err.message
        );
        assert!(err.message.contains("one GPU per pod is supported"), "{}", err.message);
    }

    #[test]
    fn lora_holds_the_base_in_bf16_and_qlora_in_nf4_with_f32_absmax() {
        let lora = validate(
            &finetunejob("minimal.yaml").spec,
            &OperatorConfig::for_tests(),
            &Facts::default(),
        )
        .expect("valid");
        let qlora = ValidFineTuneJob {
            method: FineTuneMethod::Qlora,
            ..lora.clone()
        };
        let m = llama_8b();
        // 8,029,995,008 weights: 2 bytes each in bf16, 0.5625 in NF4; QLoRA also holds its largest
        // projection (4096 x 14336) expanded to bf16. Everything else is the same for both.
        let bf16_minus_nf4 = (8_029_995_008u64 * 2 - 8_029_995_008 * 9 / 16 - 4096 * 14336 * 2) >> 20;
        let difference = estimate_training_memory_mib(&lora, &m) - estimate_training_memory_mib(&qlora, &m);
        assert!(
            difference.abs_diff(bf16_minus_nf4) <= 1,
            "{difference} MiB vs {bf16_minus_nf4} MiB"
        );
    }

    #[test]
    fn every_trainable_parameter_costs_16_bytes_of_f32_weight_gradient_and_moments() {
        let small = validate(
            &finetunejob("minimal.yaml").spec,
            &OperatorConfig::for_tests(),
            &Facts::default(),
        )
        .expect("valid");
        let mut large = small.clone();
        large.lora.r *= 2;
        let m = llama_8b();
        // r=16 on q_proj (4096 -> 4096) and v_proj (4096 -> 1024) of 32 layers.
        let added_params = 16 * ((4096 + 4096) + (4096 + 1024)) * 32u64;
        let added = estimate_training_memory_mib(&large, &m) - estimate_training_memory_mib(&small, &m);
        assert!(added.abs_diff((added_params * 16) >> 20) <= 1, "{added} MiB");
    }

    #[test]
    fn lora_of_an_8b_model_does_not_fit_a_24gib_gpu_but_qlora_does() {
        let facts = Facts {
            gpu_memory_mib: Some(24576),
            model: Some(llama_8b()),
        };
        let lora = finetunejob("minimal.yaml");
        let err =
            validate(&lora.spec, &OperatorConfig::for_tests(), &facts).expect_err("bf16 8B + activations > 24 GiB");
        assert_eq!(err.reason, "InsufficientGPUMemory");
        assert!(err.message.contains("24576 MiB"), "{}", err.message);

        let qlora = finetunejob("qlora.yaml");
        validate(&qlora.spec, &OperatorConfig::for_tests(), &facts).expect("4-bit 8B at batch 1 fits 24 GiB");
    }

    #[test]
    fn unknown_gpu_memory_skips_the_check() {
        let facts = Facts {
            gpu_memory_mib: None,
            model: Some(llama_8b()),
        };
        validate(&finetunejob("minimal.yaml").spec, &OperatorConfig::for_tests(), &facts)
            .expect("nothing to compare with");
    }

    #[test]
    fn estimate_grows_with_batch_and_shrinks_with_qlora() {
        let config = OperatorConfig::for_tests();
        let lora = validate(&finetunejob("minimal.yaml").spec, &config, &Facts::default()).expect("valid");
        let mut bigger = lora.clone();
        bigger.training.batch_size *= 4;
        let qlora = ValidFineTuneJob {
            method: FineTuneMethod::Qlora,
            ..lora.clone()
        };
        let m = llama_8b();
        assert!(estimate_training_memory_mib(&bigger, &m) > estimate_training_memory_mib(&lora, &m));
        assert!(estimate_training_memory_mib(&qlora, &m) < estimate_training_memory_mib(&lora, &m));
    }

    #[test]
    fn gradient_checkpointing_reaches_the_trainer_and_lowers_the_estimate() {
        let config = OperatorConfig::for_tests();
        let mut spec = finetunejob("minimal.yaml").spec;
        let plain = validate(&spec, &config, &Facts::default()).expect("valid");
        assert!(!plain.training.gradient_checkpointing, "off unless asked for");
        spec.training.gradient_checkpointing = Some(true);
        let checkpointed = validate(&spec, &config, &Facts::default()).expect("valid");
        assert!(checkpointed.training.gradient_checkpointing);
        let m = llama_8b();
        let (with, without) = (
            estimate_training_memory_mib(&checkpointed, &m),
            estimate_training_memory_mib(&plain, &m),
        );
        // Batch 4 x 512 of an 8B model keeps about 18 GiB of activations without it.
        assert!(
            without - with > 16 * 1024,
            "{with} MiB with checkpointing vs {without} MiB without"
        );
    }

    /// minimal.yaml with spec.evaluation and dataset fields set from YAML.
    fn with_evaluation(evaluation: &str, dataset: &str) -> FineTuneJobSpec {
        let mut spec = finetunejob("minimal.yaml").spec;
        spec.evaluation = Some(serde_yaml::from_str(evaluation).expect("evaluation"));
        spec.dataset = serde_yaml::from_str(dataset).expect("dataset");
        spec
    }

    fn checked(spec: &FineTuneJobSpec) -> Result<ValidFineTuneJob, Invalid> {
        validate(spec, &OperatorConfig::for_tests(), &Facts::default())
    }

    #[test]
    fn evaluation_reaches_the_trainer_with_its_defaults() {
        let spec = with_evaluation(
            "{metric: exactMatch, minImprovement: 0.05}",
            "{uri: s3://d/t.jsonl, format: chat, validationSplit: 0.1}",
        );
        let valid = checked(&spec).expect("valid");
        assert_eq!(
            valid.evaluation,
            Some(TrainerEvaluation {
                metric: Some(kubetune_crds::EvaluationMetric::ExactMatch),
                max_examples: DEFAULT_EVAL_MAX_EXAMPLES,
                max_new_tokens: DEFAULT_EVAL_MAX_NEW_TOKENS,
                min_improvement: Some(0.05),
            })
        );
        assert_eq!(
            checked(&finetunejob("minimal.yaml").spec).expect("valid").evaluation,
            None
        );
    }

    #[test]
    fn a_min_improvement_without_held_out_data_is_refused_naming_the_field() {
        let spec = with_evaluation("{minImprovement: 0.1}", "{uri: s3://d/t.jsonl, format: instruction}");
        let err = checked(&spec).expect_err("no held-out data");
        assert_eq!(err.reason, "InvalidSpec");
        assert!(
            err.message.starts_with("spec.evaluation.minImprovement:") && err.message.contains("validationUri"),
            "{}",
            err.message
        );
        let zero_split = with_evaluation("{}", "{uri: s3://d/t.jsonl, format: instruction, validationSplit: 0.0}");
        assert!(checked(&zero_split)
            .expect_err("a split of 0 holds nothing out")
            .message
            .starts_with("spec.evaluation:"));
    }

    #[test]
    fn a_metric_on_text_data_is_refused_naming_the_field() {
        let spec = with_evaluation(
            "{metric: contains}",
            "{uri: s3://d/t.jsonl, format: text, validationUri: s3://d/v.jsonl}",
        );
        let err = checked(&spec).expect_err("text has no reference answers");
        assert!(err.message.starts_with("spec.evaluation.metric:"), "{}", err.message);
        let loss_only = with_evaluation(
            "{minImprovement: 0.0}",
            "{uri: s3://d/t.jsonl, format: text, validationUri: s3://d/v.jsonl}",
        );
        assert!(checked(&loss_only).is_ok(), "text data is judged by its loss");
    }

    #[test]
    fn an_unknown_metric_name_is_not_a_metric() {
        let err = serde_yaml::from_str::<kubetune_crds::EvaluationSpec>("{metric: bleu}")
            .expect_err("unknown metric")
            .to_string();
        assert!(err.contains("bleu") && err.contains("exactMatch"), "{err}");
    }
}
