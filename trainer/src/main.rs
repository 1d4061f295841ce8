//! `kubetune-trainer --config train.yaml` (or flags): fine-tunes a LoRA adapter.
//! Exit codes: 0 done, 2 bad input (config, data, model), 3 loss diverged, 1 anything else.

use clap::Parser;
use kubetune_trainer::config::{DataFormat, DatasetConfig, LoraSettings, Method, TrainConfig, TrainingSettings};
use kubetune_trainer::metrics::{serve, Metrics};
use kubetune_trainer::{run, RunOptions, TrainError};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
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
    #[arg(long, value_parser = ["instruction", "chat", "text"])]
    format: Option<String>,
    /// Output directory for the adapter, training_metrics.json and checkpoints.
    #[arg(long)]
    output: Option<String>,
    #[arg(long, value_parser = ["lora", "qlora"])]
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
    /// Scratch directory in a trainer pod (used once object storage is wired in).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// cpu or cuda.
    #[arg(long, env = "KUBETUNE_DEVICE", default_value = "cpu")]
    device: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging();
    let termination_log = args.termination_log.clone();
    match try_main(args) {
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

fn try_main(args: Args) -> Result<(), TrainError> {
    let config = build_config(&args)?;
    let metrics = Arc::new(Metrics::new(&args.job_name)?);
    if let Some(addr) = args.metrics_addr {
        let bound = serve(metrics.clone(), addr)?;
        tracing::info!(addr = %bound, "serving /metrics");
    }
    let device = match args.device.as_str() {
        "cpu" => candle_core::Device::Cpu,
        "cuda" => candle_core::Device::new_cuda(0)?,
        other => return Err(config_error("--device", format!("`{other}` is not cpu or cuda"))),
    };
    let options = RunOptions { resume: args.resume, stop_after_steps: args.stop_after_steps, metrics: Some(metrics), device };
    let result = run(&config, &options)?;
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
        std::fs::write(path, outcome.to_string()).map_err(|source| TrainError::Io { path: path.clone(), source })?;
    }
    Ok(())
}

fn config_error(field: &str, message: String) -> TrainError {
    TrainError::Config { path: field.into(), message }
}

/// The config file with flag overrides, or a config from flags alone.
fn build_config(a: &Args) -> Result<TrainConfig, TrainError> {
    let mut config = match &a.config {
        Some(path) => TrainConfig::from_file(path)?,
        None => {
            if std::env::var_os("KUBETUNE_TRAINER_JOB").is_some() {
                return Err(config_error(
                    "KUBETUNE_TRAINER_JOB",
                    "running from the operator's job description needs object storage support, which is not built yet; \
                     pass --config"
                        .into(),
                ));
            }
            let need = |v: &Option<String>, flag: &str| {
                v.clone().ok_or_else(|| config_error(flag, format!("{flag} is required without --config")))
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
        config.method = if v == "qlora" { Method::Qlora } else { Method::Lora };
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
        other => Err(config_error("--format", format!("`{other}` is not instruction, chat or text"))),
    }
}

/// Human-readable lines on a terminal, JSON lines otherwise (pods, CI), both on stderr.
fn init_logging() {
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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.compact().init();
    } else {
        builder.json().flatten_event(true).init();
    }
}
