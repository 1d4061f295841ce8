//! Resolves a ModelDeployment's adapters to exact registry versions (number and digest).

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::Api;
use kube::Client;
use kubetune_crds::server_contract::ServedAdapter;
use kubetune_crds::{AdapterSource, FineTuneJob};
use kubetune_storage::{AdapterRef, Registry, StorageError, VersionSelector};

/// Why an adapter cannot be resolved now; the condition reason and message.
#[derive(Clone, Debug, PartialEq)]
pub struct Unresolved {
    pub reason: &'static str,
    pub message: String,
}

/// The registry reference a source names, or what FineTuneJob it waits for.
pub enum Wanted {
    Registry(AdapterRef),
    FineTuneJob(String),
}

/// Pure: what an adapter source asks for.
pub fn wanted(source: &AdapterSource) -> Result<Wanted, Unresolved> {
    if let Some(job) = &source.from_fine_tune_job {
        return Ok(Wanted::FineTuneJob(job.clone()));
    }
    let version = match &source.version {
        Some(IntOrString::Int(n)) if *n >= 1 => VersionSelector::Number(*n as u32),
        Some(IntOrString::String(s)) if s == "latest" => VersionSelector::Latest,
        other => {
            return Err(Unresolved {
                reason: "InvalidSpec",
                message: format!(
                    "spec.adapters[{}].version: {other:?} is neither a number >= 1 nor latest",
                    source.name
                ),
            })
        }
    };
    Ok(Wanted::Registry(AdapterRef {
        name: source.name.clone(),
        version,
    }))
}

/// Resolves one source against the registry (and, for fromFineTuneJob, the job's status).
pub async fn resolve(
    source: &AdapterSource,
    registry: &Registry,
    client: &Client,
    namespace: &str,
) -> Result<ServedAdapter, Unresolved> {
    let reference = match wanted(source)? {
        Wanted::Registry(r) => r,
        Wanted::FineTuneJob(job) => {
            let api: Api<FineTuneJob> = Api::namespaced(client.clone(), namespace);
            let ftj = api.get_opt(&job).await.map_err(|e| Unresolved {
                reason: "FineTuneJobUnreadable",
                message: format!("FineTuneJob {job}: {e}"),
            })?;
            let published = ftj.and_then(|f| f.status).and_then(|s| s.adapter).ok_or_else(|| Unresolved {
                reason: "WaitingForFineTuneJob",
                message: format!("spec.adapters[{}].fromFineTuneJob: FineTuneJob {namespace}/{job} has not published an adapter yet", source.name),
            })?;
            AdapterRef {
                name: published.name,
                version: VersionSelector::Number(published.version),
            }
        }
    };
    let resolved = registry.resolve(&reference).await.map_err(|e| Unresolved {
        reason: if matches!(e, StorageError::AdapterNotFound { .. }) {
            "AdapterNotFound"
        } else {
            "RegistryUnavailable"
        },
        message: format!("spec.adapters[{}]: {e}", source.name),
    })?;
    Ok(ServedAdapter {
        name: source.name.clone(),
        source: format!("{}@{}", resolved.name, resolved.version),
        version: resolved.version,
        digest: resolved.digest.to_string(),
    })
}
