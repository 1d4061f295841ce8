//! Job mode: the FineTuneJob the operator hands a trainer pod (`KUBETUNE_TRAINER_JOB`), run
//! end to end through object storage.
//!
//! 1. If this job (by uid) already published a version, report it: the pod died after
//!    publishing and before exiting, and a second publish would make a duplicate version.
//! 2. Download the base model and the dataset into the work directory's cache.
//! 3. Restore the newest checkpoint under `checkpointUri`, if a previous pod left one.
//! 4. Train; every `checkpointSteps` steps the checkpoint is uploaded, files first and the
//!    `latest.json` pointer last, so a half-uploaded checkpoint is never resumed from.
//! 5. With `evaluation`, judge the adapter against the base model on the held-out data; one
//!    that falls short of `minImprovement` fails the job and nothing is published.
//! 6. Publish the adapter, with its model card (README.md, see [`crate::card`]), as the
//!    registry's next version (atomic, see kubetune-storage), then remove the checkpoints.

use crate::card::{CardInput, DataFile};
use crate::config::TrainConfig;
use crate::error::TrainError;
use crate::metrics::Metrics;
use crate::train::{run, CheckpointHook, RunOptions, TrainingMetrics};
use kubetune_crds::trainer_contract::{
    TrainerEvaluation, TrainerInitFrom, TrainerJob, TrainerLora, TrainerOutcome, EVALUATION_BELOW_THRESHOLD,
    EXIT_EVALUATION_BELOW_THRESHOLD, EXIT_INVALID_INPUT, EXIT_LOSS_DIVERGED, TRAINER_JOB_ENV,
};
use kubetune_crds::{DpoRewards, EvaluationResult, FineTuneMethod, PublishedAdapter};
use kubetune_storage::{
    AdapterRef, Cache, Credentials, JobRef, PublishRequest, Registry, ResolvedAdapter, SourceRef, Storage,
    StorageError, VersionSelector, CARD_FILE,
};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Pointer to the newest complete checkpoint, written after its files.
const LATEST: &str = "latest.json";
/// Exit code of a run stopped by SIGTERM (128 + 15), as a shell would report it.
pub const EXIT_STOPPED: i32 = 143;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// `KUBETUNE_TRAINER_JOB` is not a job description this trainer understands.
    #[error("{TRAINER_JOB_ENV}: {0}")]
    InvalidJob(String),
    #[error("{0}")]
    Train(TrainError),
    /// A dataset line the trainer rejected, named by its URI rather than the local copy.
    #[error("{uri} line {line}: {message}")]
    DataLine { uri: String, line: usize, message: String },
    /// The base model or a dataset the job names is not in object storage.
    #[error("{what}: {source}")]
    MissingInput { what: Input, source: StorageError },
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("stopped at step {step} (SIGTERM); the retry resumes from the checkpoint in object storage")]
    Stopped { step: u64 },
    /// The adapter did not beat the base model by `evaluation.minImprovement`.
    #[error("{message}; nothing was published")]
    EvaluationBelowThreshold {
        message: String,
        evaluation: Box<EvaluationResult>,
    },
    #[error("{0}")]
    Internal(String),
}

/// The inputs a job downloads, for errors that say which one is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    BaseModel,
    Dataset,
    ValidationDataset,
    /// The adapter version spec.initFrom names.
    StartAdapter,
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Input::BaseModel => "base model",
            Input::Dataset => "dataset",
            Input::ValidationDataset => "validation dataset",
            Input::StartAdapter => "spec.initFrom",
        })
    }
}

impl JobError {
    /// The condition reason the operator shows. A bad trainer config is a bad FineTuneJob
    /// spec here, so it carries the operator's own reason for that.
    pub fn reason(&self) -> &'static str {
        match self {
            JobError::InvalidJob(_)
            | JobError::Train(TrainError::Config { .. })
            | JobError::Storage(StorageError::InvalidUri { .. } | StorageError::InvalidName { .. }) => "InvalidSpec",
            JobError::Train(e) => e.reason(),
            JobError::DataLine { .. }
            | JobError::MissingInput {
                what: Input::Dataset | Input::ValidationDataset,
                ..
            } => "DatasetInvalid",
            JobError::MissingInput {
                what: Input::BaseModel, ..
            } => "ModelInvalid",
            JobError::MissingInput {
                what: Input::StartAdapter,
                ..
            } => "AdapterNotFound",
            JobError::Storage(_) => "StorageError",
            JobError::Stopped { .. } => "Stopped",
            JobError::EvaluationBelowThreshold { .. } => EVALUATION_BELOW_THRESHOLD,
            JobError::Internal(_) => "TrainerFailed",
        }
    }

    /// Bad input is not worth a retry (the Job's pod failure policy fails it at once); storage
    /// and other errors may be transient and are retried (exit 1).
    pub fn exit_code(&self) -> i32 {
        match self {
            JobError::InvalidJob(_)
            | JobError::DataLine { .. }
            | JobError::MissingInput { .. }
            | JobError::Storage(StorageError::InvalidUri { .. } | StorageError::InvalidName { .. }) => {
                EXIT_INVALID_INPUT
            }
            JobError::Train(e) => e.exit_code(),
            JobError::Stopped { .. } => EXIT_STOPPED,
            // Final: a retry would train and judge the same adapter again.
            JobError::EvaluationBelowThreshold { .. } => EXIT_EVALUATION_BELOW_THRESHOLD,
            JobError::Storage(_) | JobError::Internal(_) => 1,
        }
    }

    /// True when the process should write a failed outcome (not for a stop, which is retried).
    pub fn is_final(&self) -> bool {
        !matches!(self, JobError::Stopped { .. })
    }

    /// The evaluation that failed the job, for its outcome.
    pub fn evaluation(&self) -> Option<&EvaluationResult> {
        match self {
            JobError::EvaluationBelowThreshold { evaluation, .. } => Some(evaluation),
            _ => None,
        }
    }
}

/// Compile-time check that the contract's exit codes are the ones TrainError uses.
const _: () = assert!(EXIT_INVALID_INPUT == 2 && EXIT_LOSS_DIVERGED == 3 && EXIT_EVALUATION_BELOW_THRESHOLD == 4);

/// Everything a job run needs from its process.
pub struct JobRun {
    pub job: TrainerJob,
    /// Scratch directory: cache, output, checkpoints.
    pub work_dir: PathBuf,
    pub credentials: Credentials,
    pub metrics: Option<Arc<Metrics>>,
    /// Set on SIGTERM.
    pub stop: Option<Arc<AtomicBool>>,
    /// Stop as a preempted pod would once this many steps are done (tests); None in a pod.
    pub stop_after_steps: Option<u64>,
    pub device: candle_core::Device,
}

/// Parses the operator's job description; the error names the variable.
pub fn parse_job(text: &str) -> Result<TrainerJob, JobError> {
    serde_json::from_str(text).map_err(|e| JobError::InvalidJob(format!("not a valid trainer job description: {e}")))
}

/// Runs the job; the outcome for the termination message.
pub async fn run_job(r: JobRun) -> Result<TrainerOutcome, JobError> {
    let job = &r.job;
    let registry = Registry::open(Storage::from_uri(&job.registry, &r.credentials)?);
    if let Some(done) = published_by_this_job(&registry, job).await? {
        tracing::info!(adapter = %done.name, version = done.version, "this job already published; reporting that version");
        // The pod that published may have died before the merged model was whole.
        let merged_uri = if job.merge {
            Some(merged_of_published(&registry, job, &done, &r).await?)
        } else {
            None
        };
        // Nor may it have removed the checkpoints, which no run of this job resumes from now.
        let removed = match Storage::from_uri(&job.checkpoint_uri, &r.credentials) {
            Ok(checkpoints) => remove_checkpoints(&checkpoints).await,
            Err(e) => Err(e),
        };
        if let Err(e) = removed {
            tracing::warn!(error = %e, "could not remove the checkpoints; they are no longer needed");
        }
        let metrics = &done.manifest.metrics;
        let recorded = published_training_metrics(&done, &r.credentials).await;
        let field = |name: &str| recorded.as_ref().and_then(|m| m.get(name)).cloned();
        let dpo = metrics.dpo.as_ref();
        return Ok(TrainerOutcome::Succeeded {
            adapter: published_adapter(&done, merged_uri),
            train_loss: metrics.train_loss,
            eval_loss: metrics.eval_loss,
            resumed_from_step: None,
            evaluation: field("evaluation").and_then(|e| serde_json::from_value(e).ok()),
            dpo: dpo.and_then(|d| d.eval.as_ref()).map(outcome_dpo),
            train_dpo: dpo.and_then(|d| d.train.as_ref()).map(outcome_dpo),
            step: field("steps").and_then(|v| v.as_u64()),
            total_steps: field("totalSteps").and_then(|v| v.as_u64()),
        });
    }
    let inputs = download_inputs(job, &r.work_dir, &r.credentials).await?;
    let start = match &job.init_from {
        Some(from) => Some(fetch_start(&registry, job, from, &inputs, &r.work_dir).await?),
        None => None,
    };
    // From here on, `lora` is what the run trains: the starting adapter's own settings.
    let continued = start.as_ref().map(|s| continued_job(job, s));
    let job = continued.as_ref().unwrap_or(job);
    let output = r.work_dir.join("output");
    let checkpoints = Storage::from_uri(&job.checkpoint_uri, &r.credentials)?;
    let resume_step = restore_checkpoint(&checkpoints, &output).await?;
    // A pod deleted while it downloaded has nothing new to save: stop before training.
    if r.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
        return Err(JobError::Stopped {
            step: resume_step.unwrap_or(0),
        });
    }
    let mut config = train_config(job, &inputs, &output)?;
    config.init_from = start.as_ref().map(|s| crate::config::InitFrom {
        path: s.dir.display().to_string(),
        reference: Some(format!("{}@{}", s.adapter.name, s.adapter.version)),
        digest: Some(s.adapter.digest.to_string()),
    });
    let result = train(&r, config, &inputs, checkpoints.clone(), resume_step.is_some()).await?;
    if !result.completed {
        return Err(JobError::Stopped { step: result.steps });
    }
    if let Err(e) = check_improvement(job.evaluation.as_ref(), result.evaluation.as_ref()) {
        // The job is over for good: its checkpoints will never be resumed from.
        if let Err(e) = remove_checkpoints(&checkpoints).await {
            tracing::warn!(error = %e, "could not remove the checkpoints; they are no longer needed");
        }
        return Err(e);
    }
    let published = publish(&registry, job, &inputs, &output, &result, &r.work_dir, start.as_ref()).await?;
    tracing::info!(adapter = %published.name, version = published.version, uri = %published.uri, "published");
    let merged_uri = if job.merge {
        let base = SourceRef {
            uri: job.base_model_uri.clone(),
            digest: Some(inputs.base_digest.clone()),
        };
        Some(merge_and_publish(&registry, &base, &inputs.model, &output, &published, &r.work_dir).await?)
    } else {
        None
    };
    if let Err(e) = remove_checkpoints(&checkpoints).await {
        tracing::warn!(error = %e, "could not remove the checkpoints; they are no longer needed");
    }
    let dpo = result.dpo.as_ref();
    Ok(TrainerOutcome::Succeeded {
        adapter: published_adapter(&published, merged_uri),
        train_loss: result.final_train_loss,
        eval_loss: result.final_eval_loss,
        resumed_from_step: result.resumed_from_step,
        evaluation: result.evaluation,
        dpo: dpo.and_then(|d| d.eval.as_ref()).map(run_dpo),
        train_dpo: dpo.and_then(|d| d.train.as_ref()).map(run_dpo),
        step: Some(result.steps),
        total_steps: Some(result.total_steps),
    })
}

/// The adapter version a job continues from, downloaded and checked.
pub struct StartAdapter {
    pub adapter: ResolvedAdapter,
    /// Its files, each checked against its manifest.
    pub dir: PathBuf,
    /// Its LoRA settings, as the model reads its adapter_config.json.
    pub lora: kubetune_model::LoraConfig,
}

/// Resolves `initFrom` in the job's registry, refuses an adapter of another base model or with
/// settings that contradict spec.lora, and downloads its files, each verified against the
/// version's manifest as the registry's fetch does.
async fn fetch_start(
    registry: &Registry,
    job: &TrainerJob,
    from: &TrainerInitFrom,
    inputs: &Inputs,
    work_dir: &Path,
) -> Result<StartAdapter, JobError> {
    let reference = AdapterRef {
        name: from.adapter_name.clone(),
        version: VersionSelector::Number(from.version),
    };
    let adapter = registry.resolve(&reference).await.map_err(|e| match e {
        StorageError::AdapterNotFound { .. } | StorageError::NotFound { .. } => JobError::MissingInput {
            what: Input::StartAdapter,
            source: e,
        },
        other => other.into(),
    })?;
    let spec_error = |message: String| {
        JobError::Train(TrainError::Config {
            path: TRAINER_JOB_ENV.into(),
            message,
        })
    };
    if adapter.manifest.base_model.uri != job.base_model_uri {
        return Err(spec_error(format!(
            "spec.initFrom: {}@{} was trained on {}, not on spec.baseModel.uri {}",
            adapter.name, adapter.version, adapter.manifest.base_model.uri, job.base_model_uri
        )));
    }
    // The same URI may hold other weights by now (a re-uploaded model): the adapter's deltas
    // only mean something on the weights they were trained against.
    if let Some(trained_on) = adapter.manifest.base_model.digest.as_ref() {
        if *trained_on != inputs.base_digest {
            return Err(spec_error(format!(
                "spec.initFrom: {}@{} was trained on {} with digest {trained_on}, but spec.baseModel.uri now holds \
                 digest {}: the base model changed since",
                adapter.name, adapter.version, job.base_model_uri, inputs.base_digest
            )));
        }
    }
    let dir = work_dir
        .join("init-from")
        .join(format!("{}-v{}", adapter.name, adapter.version));
    remove_stale(&dir)?;
    create_dir(dir.parent().unwrap_or(work_dir))?;
    tracing::info!(adapter = %adapter.name, version = adapter.version, digest = %adapter.digest, "downloading the adapter to start from");
    registry.fetch(&adapter, &dir, None).await?;
    let model_dir = kubetune_model::gguf::model_dir(&inputs.model).map_err(|e| JobError::Train(e.into()))?;
    let config = kubetune_model::Config::from_model_dir(&model_dir).map_err(|e| JobError::Train(e.into()))?;
    let (_, loaded) = kubetune_model::peft::load(&dir, &config, &candle_core::Device::Cpu)
        .map_err(|e| spec_error(format!("spec.initFrom: {}@{}: {e}", adapter.name, adapter.version)))?;
    if let Some(given) = &from.lora {
        let mut wanted = loaded.config.clone();
        wanted.r = given.r as usize;
        wanted.alpha = given.alpha;
        if let Some(targets) = &given.target_modules {
            wanted.target_modules = targets.iter().map(|&t| model_target(t)).collect();
        }
        crate::train::check_start_settings(&wanted, &loaded.config)
            .map_err(|message| spec_error(format!("spec.{message} ({}@{})", adapter.name, adapter.version)))?;
    }
    Ok(StartAdapter {
        adapter,
        dir,
        lora: loaded.config,
    })
}

/// The job with `lora` the starting adapter's settings (dropout as spec.lora asks, else the
/// adapter's), so that the trainer config, the manifest and the model card say what was trained.
fn continued_job(job: &TrainerJob, start: &StartAdapter) -> TrainerJob {
    let dropout = job
        .init_from
        .as_ref()
        .and_then(|f| f.lora.as_ref())
        .and_then(|l| l.dropout)
        .unwrap_or(start.lora.dropout);
    let mut job = job.clone();
    job.lora = TrainerLora {
        r: start.lora.r as u32,
        alpha: start.lora.alpha,
        dropout,
        target_modules: start.lora.target_modules.iter().map(|&t| crd_target(t)).collect(),
    };
    job
}

/// The model's name for a projection (the two crates share PEFT's names).
fn model_target(t: kubetune_crds::TargetModule) -> kubetune_model::TargetModule {
    serde_json::from_value(json!(t)).expect("the CRD's target modules are the model's")
}

fn crd_target(t: kubetune_model::TargetModule) -> kubetune_crds::TargetModule {
    serde_json::from_value(json!(t)).expect("the model's target modules are the CRD's")
}

/// Folds the published adapter (its files in `adapter_dir`) into the base model and publishes
/// the result beside the version (see [`kubetune_storage::publish_merged`]); its URI.
async fn merge_and_publish(
    registry: &Registry,
    base: &SourceRef,
    model: &Path,
    adapter_dir: &Path,
    published: &ResolvedAdapter,
    work_dir: &Path,
) -> Result<String, JobError> {
    let dir = work_dir.join("merged");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JobError::Train(TrainError::Io { path, source })
    };
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    let model_dir = kubetune_model::gguf::model_dir(model).map_err(|e| JobError::Train(e.into()))?;
    let (from, to) = (adapter_dir.to_path_buf(), dir.clone());
    let merged = tokio::task::spawn_blocking(move || crate::merge::merge_into_base(&model_dir, &from, &to))
        .await
        .map_err(|e| JobError::Internal(format!("merge thread: {e}")))?
        .map_err(JobError::Train)?;
    tracing::info!(projections = merged, "adapter folded into the base model");
    let done = kubetune_storage::publish_merged(registry.storage(), published, base, &dir).await?;
    tracing::info!(uri = %done.uri, digest = %done.digest, "merged model published");
    Ok(done.uri)
}

/// The merged model of a version this job published before (`output.merge`): the one in the
/// registry, or, when the pod that published the version died before the merged model's
/// manifest was written, a merge of the published adapter made now. The adapter's files are
/// fetched from the registry and checked against its manifest, so what is folded in is the
/// version's bytes, whatever this pod's local output holds. Its URI.
async fn merged_of_published(
    registry: &Registry,
    job: &TrainerJob,
    done: &ResolvedAdapter,
    r: &JobRun,
) -> Result<String, JobError> {
    match kubetune_storage::resolve_merged(registry.storage(), &done.name, done.version).await {
        Ok(merged) if merged.manifest.adapter_digest == done.digest => {
            tracing::info!(uri = %merged.uri, "the merged model of this version is published");
            return Ok(merged.uri);
        }
        // A number is one adapter's, ever: another digest there is not this job's to replace.
        Ok(merged) => return Err(StorageError::AlreadyExists { uri: merged.uri }.into()),
        Err(StorageError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    tracing::info!(adapter = %done.name, version = done.version, "the merged model of this version was never published; merging it now");
    let cache = Cache::new(r.work_dir.join("cache"))?;
    let model = download_base_model(&cache, job, &r.credentials).await?;
    // The merged manifest names the base that was folded into, as hashed now.
    let base_digest = crate::base_digest::of_model(&model).await.map_err(JobError::Train)?;
    if done
        .manifest
        .base_model
        .digest
        .as_ref()
        .is_some_and(|d| *d != base_digest)
    {
        tracing::warn!(
            trained_on = ?done.manifest.base_model.digest,
            merged_into = %base_digest,
            "the base model at the URI is not the one the adapter was trained on"
        );
    }
    let base = SourceRef {
        uri: job.base_model_uri.clone(),
        digest: Some(base_digest),
    };
    let adapter_dir = r
        .work_dir
        .join("published")
        .join(format!("{}-v{}", done.name, done.version));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JobError::Train(TrainError::Io { path, source })
    };
    if adapter_dir.exists() {
        std::fs::remove_dir_all(&adapter_dir).map_err(io(&adapter_dir))?;
    }
    let parent = adapter_dir.parent().unwrap_or(&r.work_dir);
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    registry.fetch(done, &adapter_dir, None).await?;
    merge_and_publish(registry, &base, &model, &adapter_dir, done, &r.work_dir).await
}

/// Err when the job sets `minImprovement` and the adapter fell short of it: in score points
/// with a metric, else in held-out loss. Runs before publishing, so that ModelDeployments
/// following the latest version never roll out an adapter worse than asked.
pub fn check_improvement(asked: Option<&TrainerEvaluation>, judged: Option<&EvaluationResult>) -> Result<(), JobError> {
    let Some(min) = asked.and_then(|a| a.min_improvement) else {
        return Ok(());
    };
    let judged = judged
        .ok_or_else(|| JobError::Internal("evaluation.minImprovement is set but nothing was evaluated".into()))?;
    let gained = crate::evaluate::improvement(judged)
        .ok_or_else(|| JobError::Internal("the evaluation has no numbers to compare".into()))?;
    if gained >= min {
        return Ok(());
    }
    let (what, adapter, base) = match judged.metric {
        Some(metric) => (
            format!("{metric:?} score"),
            judged.adapter.score.unwrap_or_default(),
            judged.base.score.unwrap_or_default(),
        ),
        None => (
            "held-out loss".to_string(),
            judged.adapter.loss.unwrap_or_default(),
            judged.base.loss.unwrap_or_default(),
        ),
    };
    Err(JobError::EvaluationBelowThreshold {
        message: format!(
            "spec.evaluation.minImprovement: the adapter's {what} is {adapter:.4} against the base model's {base:.4} on {} held-out examples, an improvement of {gained:.4}, short of {min}",
            judged.examples
        ),
        evaluation: Box::new(judged.clone()),
    })
}

/// The training_metrics.json a version's publisher recorded (its evaluation and step counts),
/// for the outcome of a pod that finds its job already published. Missing or unreadable: none,
/// with a warning; the adapter is published either way.
async fn published_training_metrics(done: &ResolvedAdapter, credentials: &Credentials) -> Option<serde_json::Value> {
    let read = async {
        let bytes = Storage::from_uri(&done.uri, credentials)?
            .get_bytes(crate::train::METRICS_FILE)
            .await?;
        Ok::<_, StorageError>(serde_json::from_slice::<serde_json::Value>(&bytes).ok())
    };
    match read.await {
        Ok(metrics) => metrics,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the published version's training metrics");
            None
        }
    }
}

/// Local copies of the job's inputs.
struct Inputs {
    model: PathBuf,
    /// The base model's digest (see [`crate::base_digest`]), taken once after the download.
    base_digest: kubetune_storage::Sha256Digest,
    dataset: PathBuf,
    validation: Option<PathBuf>,
}

async fn download_inputs(job: &TrainerJob, work_dir: &Path, credentials: &Credentials) -> Result<Inputs, JobError> {
    let missing = |what: Input| {
        move |e: JobError| match e {
            JobError::Storage(source @ StorageError::NotFound { .. }) => JobError::MissingInput { what, source },
            other => other,
        }
    };
    let cache = Cache::new(work_dir.join("cache"))?;
    let model = download_base_model(&cache, job, credentials).await?;
    let hashing = std::time::Instant::now();
    let base_digest = crate::base_digest::of_model(&model).await.map_err(JobError::Train)?;
    tracing::info!(digest = %base_digest, seconds = hashing.elapsed().as_secs_f64(), "base model hashed");
    let dataset = download_file(&cache, &job.dataset.uri, "dataset.uri", credentials)
        .await
        .map_err(missing(Input::Dataset))?;
    let validation = match &job.dataset.validation_uri {
        Some(uri) => Some(
            download_file(&cache, uri, "dataset.validationUri", credentials)
                .await
                .map_err(missing(Input::ValidationDataset))?,
        ),
        None => None,
    };
    Ok(Inputs {
        model,
        base_digest,
        dataset,
        validation,
    })
}

/// Runs the training loop on a blocking thread, uploading each checkpoint as it is made. A
/// checkpoint that cannot be used (made by another trainer version, say) is dropped once and
/// the run starts over rather than failing the job for good.
async fn train(
    r: &JobRun,
    config: TrainConfig,
    inputs: &Inputs,
    checkpoints: Storage,
    resume: bool,
) -> Result<TrainingMetrics, JobError> {
    let handle = tokio::runtime::Handle::current();
    let hook: CheckpointHook = Arc::new(move |dir: &Path, step: u64| {
        // An upload that fails after the store's own retries costs only progress on a later
        // retry of the pod, so training goes on; the publish at the end needs the store anyway.
        if let Err(e) = handle.block_on(upload_checkpoint(&checkpoints, dir, step)) {
            tracing::warn!(step, error = %e, "checkpoint upload failed; training continues");
        }
        Ok(())
    });
    let mut options = RunOptions {
        resume,
        stop_after_steps: r.stop_after_steps,
        metrics: r.metrics.clone(),
        device: r.device.clone(),
        stop: r.stop.clone(),
        on_checkpoint: Some(hook),
        // A pod's log has no terminal to draw a progress bar on.
        progress: None,
    };
    let sources = [(inputs.dataset.clone(), r.job.dataset.uri.clone())]
        .into_iter()
        .chain(inputs.validation.clone().zip(r.job.dataset.validation_uri.clone()))
        .collect::<Vec<_>>();
    match run_blocking(&config, &options).await? {
        // A bad base model fails the fresh attempt the same way, so catching Model here only
        // costs a second load; a checkpoint's tensors that do not fit the model also land here.
        Err(e @ (TrainError::Checkpoint { .. } | TrainError::Model(_))) if resume => {
            tracing::warn!(error = %e, "the checkpoint cannot be resumed from; starting from step 0");
            let local = crate::io::local_path(&config.output, "output")
                .map_err(JobError::Train)?
                .join("checkpoints");
            std::fs::remove_dir_all(&local).map_err(|e| JobError::Train(TrainError::Io { path: local, source: e }))?;
            options.resume = false;
            run_blocking(&config, &options)
                .await?
                .map_err(|e| named_by_uri(e, &sources))
        }
        other => other.map_err(|e| named_by_uri(e, &sources)),
    }
}

async fn run_blocking(config: &TrainConfig, options: &RunOptions) -> Result<crate::Result<TrainingMetrics>, JobError> {
    let (config, options) = (config.clone(), options.clone());
    tokio::task::spawn_blocking(move || run(&config, &options))
        .await
        .map_err(|e| JobError::Internal(format!("training thread: {e}")))
}

/// The published version as the outcome reports it.
fn published_adapter(a: &ResolvedAdapter, merged_uri: Option<String>) -> PublishedAdapter {
    PublishedAdapter {
        name: a.name.clone(),
        version: a.version,
        uri: a.uri.clone(),
        digest: a.digest.to_string(),
        reference: Some(format!("{}@{}", a.name, a.version)),
        merged_uri,
    }
}

/// Removes what an earlier attempt of this pod may have left at `dir`.
fn remove_stale(dir: &Path) -> Result<(), JobError> {
    if !dir.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(dir).map_err(|source| {
        JobError::Train(TrainError::Io {
            path: dir.to_path_buf(),
            source,
        })
    })
}

fn create_dir(dir: &Path) -> Result<(), JobError> {
    std::fs::create_dir_all(dir).map_err(|source| {
        JobError::Train(TrainError::Io {
            path: dir.to_path_buf(),
            source,
        })
    })
}

/// A dataset line error names the dataset's URI, which is what the user wrote.
fn named_by_uri(e: TrainError, sources: &[(PathBuf, String)]) -> JobError {
    match e {
        TrainError::Data { file, line, message } => match sources.iter().find(|(local, _)| *local == file) {
            Some((_, uri)) => JobError::DataLine {
                uri: uri.clone(),
                line,
                message,
            },
            None => JobError::Train(TrainError::Data { file, line, message }),
        },
        TrainError::Dataset { file, message } => match sources.iter().find(|(local, _)| *local == file) {
            Some((_, uri)) => JobError::Train(TrainError::Dataset {
                file: PathBuf::from(uri),
                message,
            }),
            None => JobError::Train(TrainError::Dataset { file, message }),
        },
        other => JobError::Train(other),
    }
}

/// The version this job published before, found by its uid in the manifests.
async fn published_by_this_job(registry: &Registry, job: &TrainerJob) -> Result<Option<ResolvedAdapter>, JobError> {
    let versions = match registry.list(&job.adapter_name).await {
        Ok(v) => v,
        Err(StorageError::NotFound { .. } | StorageError::AdapterNotFound { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    Ok(versions
        .into_iter()
        .rev()
        .find(|v| v.manifest.job.as_ref().is_some_and(|j| j.uid == job.owner.uid)))
}

/// The base model into the cache; its local path (a file for GGUF, else a directory).
async fn download_base_model(cache: &Cache, job: &TrainerJob, credentials: &Credentials) -> Result<PathBuf, JobError> {
    tracing::info!(uri = %job.base_model_uri, "downloading the base model");
    cache
        .download_model(&job.base_model_uri, credentials)
        .await
        .map_err(|e| match e {
            source @ StorageError::NotFound { .. } => JobError::MissingInput {
                what: Input::BaseModel,
                source,
            },
            other => other.into(),
        })
}

/// One object into the cache; its local path. `field` names the spec field in errors.
async fn download_file(cache: &Cache, uri: &str, field: &str, credentials: &Credentials) -> Result<PathBuf, JobError> {
    let (parent, name) = uri
        .rsplit_once('/')
        .filter(|(p, n)| !n.is_empty() && p.contains("://"))
        .ok_or_else(|| {
            JobError::Train(TrainError::Config {
                path: field.into(),
                message: format!("`{uri}` does not name a file"),
            })
        })?;
    let storage = Storage::from_uri(parent, credentials)?;
    tracing::info!(%uri, "downloading");
    Ok(cache.download_object(&storage, name, None).await?)
}

/// Downloads the checkpoint `latest.json` points at into `output/checkpoints/step-N`.
async fn restore_checkpoint(checkpoints: &Storage, output: &Path) -> Result<Option<u64>, JobError> {
    let pointer = match checkpoints.get_bytes(LATEST).await {
        Ok(bytes) => bytes,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let step = serde_json::from_slice::<serde_json::Value>(&pointer)
        .ok()
        .and_then(|v| v["step"].as_u64())
        .ok_or_else(|| {
            JobError::Train(TrainError::Checkpoint {
                path: PathBuf::from(checkpoints.object_uri(LATEST)),
                message: "expected {\"step\": N}".into(),
            })
        })?;
    let prefix = format!("step-{step}");
    // Downloaded beside its final name and renamed when whole: the trainer resumes from any
    // `step-N` directory it finds.
    let root = output.join("checkpoints");
    let partial = root.join(format!(".download-{prefix}"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JobError::Train(TrainError::Io { path, source })
    };
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    for object in checkpoints.list(&prefix).await? {
        let Some(name) = object.key.rsplit('/').next() else {
            continue;
        };
        checkpoints
            .download_to(&object.key, &partial.join(name), None, None)
            .await?;
    }
    let complete = root.join(&prefix);
    if complete.exists() {
        std::fs::remove_dir_all(&complete).map_err(io(&complete))?;
    }
    std::fs::rename(&partial, &complete).map_err(io(&root))?;
    tracing::info!(step, uri = %checkpoints.object_uri(&prefix), "resuming from step {step}");
    Ok(Some(step))
}

/// Uploads one checkpoint, then points `latest.json` at it, then drops older ones.
async fn upload_checkpoint(checkpoints: &Storage, dir: &Path, step: u64) -> Result<(), StorageError> {
    let prefix = format!("step-{step}");
    let entries = std::fs::read_dir(dir).map_err(|e| StorageError::Io {
        action: "reading",
        path: dir.to_path_buf(),
        source: e,
    })?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::Io {
            action: "reading",
            path: dir.to_path_buf(),
            source: e,
        })?;
        if entry
            .file_type()
            .map_err(|e| StorageError::Io {
                action: "reading",
                path: dir.to_path_buf(),
                source: e,
            })?
            .is_file()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            checkpoints
                .put_file(&format!("{prefix}/{name}"), &entry.path(), None)
                .await?;
        }
    }
    checkpoints
        .put_bytes(LATEST, json!({"step": step}).to_string().into())
        .await?;
    for object in checkpoints.list("").await? {
        let stale = object
            .key
            .split('/')
            .next()
            .is_some_and(|first| first.starts_with("step-") && first != prefix);
        if stale {
            checkpoints.delete(&object.key).await?;
        }
    }
    tracing::info!(step, uri = %checkpoints.object_uri(&prefix), "checkpoint uploaded");
    Ok(())
}

async fn remove_checkpoints(checkpoints: &Storage) -> Result<(), StorageError> {
    // The pointer goes first, so a crash half way never points at deleted files.
    match checkpoints.delete(LATEST).await {
        Ok(()) | Err(StorageError::NotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    for object in checkpoints.list("").await? {
        checkpoints.delete(&object.key).await?;
    }
    Ok(())
}

/// The trainer config for the job, with names as in the FineTuneJob spec.
fn train_config(job: &TrainerJob, inputs: &Inputs, output: &Path) -> Result<TrainConfig, JobError> {
    let t = &job.training;
    let value = json!({
        "model": inputs.model,
        "baseModelName": job.base_model_uri,
        "dataset": {
            "path": inputs.dataset,
            "format": job.dataset.format,
            "validationSplit": job.dataset.validation_split,
            "validationPath": inputs.validation,
            "skipInvalid": job.dataset.skip_invalid,
        },
        "method": job.method,
        "lora": {"r": job.lora.r, "alpha": job.lora.alpha, "dropout": job.lora.dropout, "targetModules": job.lora.target_modules},
        "training": {
            "epochs": t.epochs,
            "maxSteps": t.max_steps,
            "learningRate": t.learning_rate,
            "batchSize": t.batch_size,
            "gradientAccumulationSteps": t.gradient_accumulation_steps,
            "maxSeqLength": t.max_seq_length,
            "warmupSteps": t.warmup_steps,
            "scheduler": t.scheduler,
            "seed": t.seed,
            "saveSteps": t.checkpoint_steps.unwrap_or(50),
            "gradientCheckpointing": t.gradient_checkpointing,
        },
        "output": output,
        "evaluation": job.evaluation.as_ref().map(|e| json!({
            "metric": e.metric,
            "maxExamples": e.max_examples,
            "maxNewTokens": e.max_new_tokens,
        })),
        "dpo": job.dpo.as_ref().map(|d| json!({
            "beta": d.beta,
            "loss": d.loss,
            "labelSmoothing": d.label_smoothing,
        })),
        // Only dpo reads it: qlora implies 4 bits, and lora trains on a full-precision base.
        "quantization": (job.method == FineTuneMethod::Dpo)
            .then_some(job.quantization.as_ref())
            .flatten()
            .map(|q| json!({"bits": q.bits})),
    });
    let config: TrainConfig = serde_json::from_value(value).map_err(|e| JobError::InvalidJob(e.to_string()))?;
    config.validate(TRAINER_JOB_ENV).map_err(JobError::Train)?;
    Ok(config)
}

/// Publishes the adapter files (not the checkpoints beside them) as the next version.
async fn publish(
    registry: &Registry,
    job: &TrainerJob,
    inputs: &Inputs,
    output: &Path,
    result: &TrainingMetrics,
    work_dir: &Path,
    start: Option<&StartAdapter>,
) -> Result<ResolvedAdapter, JobError> {
    let dir = work_dir.join("publish");
    remove_stale(&dir)?;
    create_dir(&dir)?;
    for name in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_metrics.json",
    ] {
        let from = output.join(name);
        std::fs::copy(&from, dir.join(name)).map_err(|e| {
            JobError::Train(TrainError::Io {
                path: from.clone(),
                source: e,
            })
        })?;
    }
    // What was trained on, hashed from the local copies, in case the objects at the URIs are
    // replaced later.
    let dataset = DataFile::read(&job.dataset.uri, &inputs.dataset).await?;
    let validation = match inputs.validation.as_ref().zip(job.dataset.validation_uri.as_ref()) {
        Some((local, uri)) => Some(DataFile::read(uri, local).await?),
        None => None,
    };
    let card = crate::card::render(&CardInput {
        job,
        base_model_digest: Some(&inputs.base_digest),
        dataset: &dataset,
        validation: validation.as_ref(),
        metrics: result,
        started_from: start.map(|s| &s.adapter),
    });
    // In the directory the registry publishes, so the manifest lists and hashes it and it
    // appears with the version, atomically, like the adapter's other files.
    let card_path = dir.join(CARD_FILE);
    std::fs::write(&card_path, card).map_err(|e| {
        JobError::Train(TrainError::Io {
            path: card_path.clone(),
            source: e,
        })
    })?;
    let mut hyperparameters =
        json!({"method": job.method, "lora": job.lora, "quantization": job.quantization, "training": job.training});
    if let Some(dpo) = &job.dpo {
        hyperparameters["dpo"] = json!(dpo);
    }
    // The lineage: the version training continued from, pinned by its manifest digest.
    if let Some(s) = start {
        hyperparameters["initFrom"] = json!({
            "adapter": format!("{}@{}", s.adapter.name, s.adapter.version),
            "digest": s.adapter.digest.to_string(),
            "uri": s.adapter.uri,
        });
    }
    let request = PublishRequest {
        name: job.adapter_name.clone(),
        source_dir: dir,
        base_model: SourceRef {
            uri: job.base_model_uri.clone(),
            digest: Some(inputs.base_digest.clone()),
        },
        dataset: SourceRef {
            uri: job.dataset.uri.clone(),
            digest: Some(dataset.sha256),
        },
        hyperparameters,
        metrics: kubetune_storage::Metrics {
            train_loss: result.final_train_loss,
            eval_loss: result.final_eval_loss,
            evaluation: result.evaluation.as_ref().map(manifest_evaluation),
            dpo: result.dpo.as_ref().map(|d| kubetune_storage::DpoMetrics {
                train: d.train.as_ref().map(manifest_dpo),
                eval: d.eval.as_ref().map(manifest_dpo),
            }),
        },
        job: Some(JobRef {
            namespace: job.owner.namespace.clone(),
            name: job.owner.name.clone(),
            uid: job.owner.uid.clone(),
        }),
    };
    Ok(registry.publish(&request, None).await?)
}

/// One set of pairs' DPO numbers as the manifest records them.
fn manifest_dpo(s: &crate::dpo::DpoStats) -> kubetune_storage::DpoScores {
    kubetune_storage::DpoScores {
        loss: s.loss,
        rewards_chosen: s.rewards_chosen,
        rewards_rejected: s.rewards_rejected,
        rewards_margins: s.rewards_margins,
        rewards_accuracies: s.rewards_accuracies,
        pairs: s.pairs as u64,
    }
}

/// A run's rewards as the outcome (and so `status.progress.dpo` and `evalDpo`) reports them.
fn run_dpo(s: &crate::dpo::DpoStats) -> DpoRewards {
    DpoRewards {
        chosen: Some(s.rewards_chosen),
        rejected: Some(s.rewards_rejected),
        margins: Some(s.rewards_margins),
        accuracies: Some(s.rewards_accuracies),
    }
}

/// A published version's rewards as the outcome reports them.
fn outcome_dpo(s: &kubetune_storage::DpoScores) -> DpoRewards {
    DpoRewards {
        chosen: Some(s.rewards_chosen),
        rejected: Some(s.rewards_rejected),
        margins: Some(s.rewards_margins),
        accuracies: Some(s.rewards_accuracies),
    }
}

/// The evaluation as the manifest records it, for readers of the registry that do not know the
/// trainer's types.
fn manifest_evaluation(e: &EvaluationResult) -> kubetune_storage::Evaluation {
    let scores = |m: &kubetune_crds::ModelEvaluation| kubetune_storage::ModelScores {
        loss: m.loss,
        score: m.score,
    };
    kubetune_storage::Evaluation {
        metric: e
            .metric
            .and_then(|m| serde_json::to_value(m).ok())
            .and_then(|v| v.as_str().map(str::to_string)),
        examples: e.examples,
        base: scores(&e.base),
        adapter: scores(&e.adapter),
    }
}
