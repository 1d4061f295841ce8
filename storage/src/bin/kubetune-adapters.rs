//! `kubetune-adapters`: inspect and move adapter versions in a kubetune registry.
//!
//! Credentials come from the environment (AWS_*, GOOGLE_*, AZURE_*) or `--secret-dir`, the
//! same way the operator reads them; nothing prints their values.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kubetune_storage::{AdapterRef, Credentials, Metrics, PublishRequest, Registry, Sha256Digest, SourceRef, Storage};

#[derive(Parser)]
#[command(about = "Inspect and move LoRA adapter versions in a kubetune registry")]
struct Cli {
    /// Registry root, e.g. s3://kubetune/registry or file:///var/lib/kubetune/registry.
    #[arg(long, env = "KUBETUNE_REGISTRY")]
    registry: String,
    /// A mounted Secret directory with credential files (AWS_ACCESS_KEY_ID, ...); its values
    /// take precedence over the environment.
    #[arg(long)]
    secret_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List adapters, or the published versions of one adapter.
    List { name: Option<String> },
    /// Print the model card (README.md) of a version (name, name@latest, name@3,
    /// name@sha256:...); its manifest instead with --manifest or when it has no card.
    Show {
        reference: String,
        #[arg(long)]
        manifest: bool,
    },
    /// Download a version into a new directory, verifying every file.
    Pull { reference: String, dest: PathBuf },
    /// Publish a directory with PEFT output as the next version of NAME.
    Push {
        name: String,
        dir: PathBuf,
        #[arg(long)]
        base_model: String,
        #[arg(long)]
        base_model_digest: Option<String>,
        #[arg(long)]
        dataset: String,
        #[arg(long)]
        dataset_digest: Option<String>,
        /// Hyperparameters as a JSON object.
        #[arg(long, default_value = "{}")]
        hyperparameters: String,
        #[arg(long)]
        train_loss: Option<f64>,
        #[arg(long)]
        eval_loss: Option<f64>,
    },
}

fn digest(field: &'static str, value: Option<String>) -> anyhow::Result<Option<Sha256Digest>> {
    Ok(value.map(|v| Sha256Digest::parse(field, &v)).transpose()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut creds = Credentials::from_env();
    if let Some(dir) = &cli.secret_dir {
        creds = creds.merged(Credentials::from_secret_dir(dir)?);
    }
    let registry = Registry::open(Storage::from_uri(&cli.registry, &creds)?);
    match cli.command {
        Command::List { name: None } => {
            for name in registry.adapters().await? {
                println!("{name}");
            }
        }
        Command::List { name: Some(name) } => {
            println!("VERSION  DIGEST{:65}CREATED", "");
            for v in registry.list(&name).await? {
                println!(
                    "{:<8} {:<71} {}",
                    v.version,
                    v.digest,
                    v.manifest.created_at.to_rfc3339()
                );
            }
        }
        Command::Show { reference, manifest } => {
            let resolved = registry.resolve(&reference.parse::<AdapterRef>()?).await?;
            let card = if manifest {
                None
            } else {
                registry.card(&resolved).await?
            };
            match card {
                // Verbatim on stdout, so `show NAME > README.md` gives back the published card;
                // which version it is goes to stderr.
                Some(card) => {
                    eprintln!("# {}@{} {}", resolved.name, resolved.version, resolved.digest);
                    print!("{card}");
                }
                None => {
                    println!("# {}@{} {}", resolved.name, resolved.version, resolved.digest);
                    println!("{}", String::from_utf8_lossy(&resolved.manifest_bytes));
                }
            }
        }
        Command::Pull { reference, dest } => {
            let resolved = registry.resolve(&reference.parse::<AdapterRef>()?).await?;
            let progress: kubetune_storage::ProgressFn = Arc::new(|e| {
                eprintln!(
                    "{} {}/{} bytes",
                    e.uri,
                    e.bytes_done,
                    e.bytes_total.map_or("?".into(), |t| t.to_string())
                );
            });
            registry.fetch(&resolved, &dest, Some(&progress)).await?;
            println!(
                "{}@{} {} -> {}",
                resolved.name,
                resolved.version,
                resolved.digest,
                dest.display()
            );
        }
        Command::Push {
            name,
            dir,
            base_model,
            base_model_digest,
            dataset,
            dataset_digest,
            hyperparameters,
            train_loss,
            eval_loss,
        } => {
            let hyperparameters: serde_json::Value =
                serde_json::from_str(&hyperparameters).context("--hyperparameters must be a JSON object")?;
            anyhow::ensure!(hyperparameters.is_object(), "--hyperparameters must be a JSON object");
            let req = PublishRequest {
                name,
                source_dir: dir,
                base_model: SourceRef {
                    uri: base_model,
                    digest: digest("--base-model-digest", base_model_digest)?,
                },
                dataset: SourceRef {
                    uri: dataset,
                    digest: digest("--dataset-digest", dataset_digest)?,
                },
                hyperparameters,
                metrics: Metrics {
                    train_loss,
                    eval_loss,
                    evaluation: None,
                    dpo: None,
                },
                job: None,
            };
            let published = registry.publish(&req, None).await?;
            println!("{}@{} {}", published.name, published.version, published.digest);
        }
    }
    Ok(())
}
