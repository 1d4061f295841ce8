//! `kubetune-trainer --config train.yaml` (or flags): fine-tunes a LoRA adapter from local files.
//! In a trainer pod (KUBETUNE_TRAINER_JOB set, no --config) it runs the operator's job through
//! object storage instead; see kubetune_trainer::job.
//! Exit codes: 0 done, 2 bad input (config, data, model), 3 loss diverged, 1 anything else.

use clap::Parser;
use kubetune_crds::trainer_contract::{TrainerOutcome, TRAINER_JOB_ENV};
use kubetune_storage::Credentials;
use kubetune_trainer::config::{DataFormat, DatasetConfig, LoraSettings, Method, TrainConfig, TrainingSettings};
use kubetune_trainer::job::{parse_job, run_job, JobError, JobRun};
use kubetune_trainer::metrics::{serve, Metrics};
use kubetune_trainer::progress::TerminalProgress;
use kubetune_trainer::{run, RunOptions, TrainError};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Parser)]
#[command(version, about = "Fine-tune a Llama-family model with LoRA / QLoRA")]
struct Args {
    /// YAML (or JSON) training config; the flags below override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Base model directory in HF layout (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: Option<String>,
    /// Training data (JSONL).
    #[arg(long)]
    data: Option<String>,
    #[arg(long, value_parser = ["instruction", "chat", "text", "preference"])]
    format: Option<String>,
    /// Output directory for the adapter, training_metrics.json and checkpoints.
    #[arg(long)]
    output: Option<String>,
    #[arg(long, value_parser = ["lora", "qlora", "dpo"])]
    method: Option<String>,
    #[arg(long)]
    epochs: Option<u32>,
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long)]
    learning_rate: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Continue from the newest checkpoint in the output directory.
    #[arg(long)]
    resume: bool,
    /// Stop after this many steps with a checkpoint (resume later with --resume).
    #[arg(long)]
    stop_after_steps: Option<u64>,
    /// Serve Prometheus metrics on this address, e.g. 0.0.0.0:9400.
    #[arg(long, env = "KUBETUNE_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Job label of the metrics.
    #[arg(long, env = "KUBETUNE_JOB_NAME", default_value = "local")]
    job_name: String,
    /// File that receives a one-line JSON outcome (the pod's termination message).
    #[arg(long)]
    termination_log: Option<PathBuf>,
    /// Scratch directory in a trainer pod: download cache, output and checkpoints (job mode).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N. auto: CUDA when this binary was built with it and a GPU
    /// opens, else the CPU. An explicit cuda never falls back to the CPU. On a GPU the base is
    /// held in bf16 and the adapter, its gradients and AdamW's moments in f32.
    #[arg(long, env = "KUBETUNE_DEVICE", default_value = "auto", value_parser = kubetune_model::device::parse_flag)]
    device: kubetune_model::DeviceChoice,
}

fn main() -> std::process::ExitCode {
    // Before any thread exists: see kubetune_model::threads.
    kubetune_model::threads::settle_thread_count();
    kubetune_model::malloc::tune();
    let args = Args::parse();
    let progress = init_logging();
    if args.config.is_none() {
        if let Ok(text) = std::env::var(TRAINER_JOB_ENV) {
            return job_main(args, &text);
        }
    }
    let termination_log = args.termination_log.clone();
    match try_main(args, progress) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(reason = e.reason(), error = %e, "training failed");
            if let Some(path) = termination_log {
                let outcome = serde_json::json!({"result": "failed", "reason": e.reason(), "message": e.to_string()});
                if let Err(io) = std::fs::write(&path, outcome.to_string()) {
                    tracing::error!(path = %path.display(), error = %io, "cannot write termination log");
                }
            }
            std::process::ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn try_main(args: Args, progress: Option<Arc<TerminalProgress>>) -> Result<(), TrainError> {
    // First, so the first log line says where the run goes, and a wrong device fails at once.
    let device = device(args.device)?;
    let config = build_config(&args)?;
    let metrics = Arc::new(Metrics::new(&args.job_name)?);
    if let Some(addr) = args.metrics_addr {
        let bound = serve(metrics.clone(), addr)?;
        tracing::info!(addr = %bound, "serving /metrics");
    }
    let options = RunOptions {
        resume: args.resume,
        stop_after_steps: args.stop_after_steps,
        metrics: Some(metrics),
        device,
        progress: progress
            .clone()
            .map(|p| p as Arc<dyn kubetune_trainer::ProgressObserver>),
        ..RunOptions::default()
    };
    let result = run(&config, &options);
    // The bar stays where the run ended; what follows (the summary, an error) prints below it.
    if let Some(p) = &progress {
        p.finish();
    }
    let result = result?;
    tracing::info!(
        steps = result.steps,
        final_train_loss = result.final_train_loss,
        final_eval_loss = result.final_eval_loss,
        tokens_per_second = result.tokens_per_second,
        completed = result.completed,
        "training finished"
    );
    if let Some(path) = &args.termination_log {
        let outcome = serde_json::json!({
            "result": if result.completed { "succeeded" } else { "stopped" },
            "trainLoss": result.final_train_loss, "evalLoss": result.final_eval_loss,
        });
        std::fs::write(path, outcome.to_string()).map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Job mode (a trainer pod): runs the operator's job description through object storage and
/// writes the outcome as the pod's termination message. A SIGTERM stop writes none: the pod
/// is retried and its successor reports.
fn job_main(args: Args, text: &str) -> std::process::ExitCode {
    match job_outcome(&args, text) {
        Ok(outcome) => {
            write_outcome(args.termination_log.as_deref(), &outcome);
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(reason = e.reason(), error = %e, "training failed");
            if e.is_final() {
                let failed = TrainerOutcome::Failed {
                    reason: e.reason().to_string(),
                    message: e.to_string(),
                    evaluation: e.evaluation().cloned(),
                };
                write_outcome(args.termination_log.as_deref(), &failed);
            }
            std::process::ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn job_outcome(args: &Args, text: &str) -> Result<TrainerOutcome, JobError> {
    let device = device(args.device).map_err(JobError::Train)?;
    let job = parse_job(text)?;
    let work_dir = args.work_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| JobError::Internal(format!("starting the async runtime: {e}")))?;
    let metrics =
        Arc::new(Metrics::new(&format!("{}/{}", job.owner.namespace, job.owner.name)).map_err(JobError::Train)?);
    let stop = Arc::new(AtomicBool::new(false));
    runtime.block_on(async move {
        stop_on_sigterm(stop.clone())?;
        if let Some(addr) = args.metrics_addr {
            let bound = serve(metrics.clone(), addr).map_err(JobError::Train)?;
            tracing::info!(addr = %bound, "serving /metrics");
        }
        tracing::info!(job = %format!("{}/{}", job.owner.namespace, job.owner.name), uid = %job.owner.uid, "running the trainer job");
        let credentials = Credentials::from_env();
        run_job(JobRun { job, work_dir, credentials, metrics: Some(metrics), stop: Some(stop), stop_after_steps: None, device }).await
    })
}

/// Asks the run to checkpoint and stop when the pod is deleted or preempted. The handler is
/// registered before this returns, so a SIGTERM from then on never kills the process outright.
fn stop_on_sigterm(stop: Arc<AtomicBool>) -> Result<(), JobError> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term =
            signal(SignalKind::terminate()).map_err(|e| JobError::Internal(format!("SIGTERM handler: {e}")))?;
        tokio::spawn(async move {
            if term.recv().await.is_some() {
                tracing::warn!("SIGTERM: checkpointing after this step, then stopping");
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
    }
    #[cfg(not(unix))]
    let _ = stop;
    Ok(())
}

fn write_outcome(path: Option<&std::path::Path>, outcome: &TrainerOutcome) {
    let Some(path) = path else { return };
    let text = match serde_json::to_string(outcome) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the outcome");
            return;
        }
    };
    if let Err(e) = std::fs::write(path, text + "\n") {
        tracing::error!(path = %path.display(), error = %e, "cannot write termination log");
    }
}

/// Opens `--device` and logs where the trainer runs, and why not on a GPU where auto chose
/// the CPU.
fn device(choice: kubetune_model::DeviceChoice) -> Result<candle_core::Device, TrainError> {
    let (device, cpu_because) =
        kubetune_model::device::open(choice).map_err(|e| config_error("--device", e.to_string()))?;
    let dtype = kubetune_model::device::base_dtype(&device);
    match cpu_because {
        Some(why) => tracing::info!(device = "cpu", ?dtype, asked = ?choice, why = %why, "device chosen"),
        None => tracing::info!(device = %kubetune_model::device::describe(&device), ?dtype, "device chosen"),
    }
    Ok(device)
}

fn config_error(field: &str, message: String) -> TrainError {
    TrainError::Config {
        path: field.into(),
        message,
    }
}

/// The config file with flag overrides, or a config from flags alone.
fn build_config(a: &Args) -> Result<TrainConfig, TrainError> {
    let mut config = match &a.config {
        Some(path) => TrainConfig::from_file(path)?,
        None => {
            let need = |v: &Option<String>, flag: &str| {
                v.clone()
                    .ok_or_else(|| config_error(flag, format!("{flag} is required without --config")))
            };
            TrainConfig {
                model: need(&a.model, "--model")?,
                base_model_name: None,
                dataset: DatasetConfig {
                    path: need(&a.data, "--data")?,
                    format: parse_format(&need(&a.format, "--format")?)?,
                    validation_split: None,
                    validation_path: None,
                    skip_invalid: false,
                },
                method: Method::Lora,
                lora: LoraSettings::default(),
                training: TrainingSettings::default(),
                output: need(&a.output, "--output")?,
                evaluation: None,
                dpo: None,
                quantization: None,
                init_from: None,
            }
        }
    };
    if let Some(v) = &a.model {
        config.model = v.clone();
    }
    if let Some(v) = &a.data {
        config.dataset.path = v.clone();
    }
    if let Some(v) = &a.format {
        config.dataset.format = parse_format(v)?;
    }
    if let Some(v) = &a.output {
        config.output = v.clone();
    }
    if let Some(v) = &a.method {
        config.method = match v.as_str() {
            "qlora" => Method::Qlora,
            "dpo" => Method::Dpo,
            _ => Method::Lora,
        };
    }
    if let Some(v) = a.epochs {
        config.training.epochs = Some(v);
    }
    if let Some(v) = a.max_steps {
        config.training.max_steps = Some(v);
    }
    if let Some(v) = a.learning_rate {
        config.training.learning_rate = v;
    }
    if let Some(v) = a.seed {
        config.training.seed = v;
    }
    config.validate("command line")?;
    Ok(config)
}

fn parse_format(s: &str) -> Result<DataFormat, TrainError> {
    match s {
        "instruction" => Ok(DataFormat::Instruction),
        "chat" => Ok(DataFormat::Chat),
        "text" => Ok(DataFormat::Text),
        "preference" => Ok(DataFormat::Preference),
        other => Err(config_error(
            "--format",
            format!("`{other}` is not instruction, chat, text or preference"),
        )),
    }
}

/// Human-readable lines and a progress bar on a terminal, JSON lines otherwise (pods, CI),
/// all on stderr. Returns the bar when there is one.
fn init_logging() -> Option<Arc<TerminalProgress>> {
    let filter = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(f) => f,
        Err(e) => {
            // Unset RUST_LOG is normal; a set but unparsable one is worth saying.
            if std::env::var_os("RUST_LOG").is_some() {
                eprintln!("warning: ignoring RUST_LOG ({e}); logging at info");
            }
            tracing_subscriber::EnvFilter::new("info")
        }
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if std::io::stderr().is_terminal() {
        let progress = TerminalProgress::stderr();
        builder.with_writer(progress.log_writer()).compact().init();
        Some(progress)
    } else {
        builder.with_writer(std::io::stderr).json().flatten_event(true).init();
        None
    }
}
