//! The FineTuneJob controller: dereference → validate → build → apply → update_status.

pub mod build;
pub mod model_facts;
pub mod progress;
pub mod status;
pub mod validate;

use crate::context::Context;
use crate::error::{Error, Result};
use build::{build_job, FINETUNEJOB_LABEL};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use kubetune_crds::{FineTuneJob, FineTuneJobPhase};
use status::{derive_status, Observed};
use std::sync::Arc;
use std::time::Duration;
use validate::{validate, Facts, Invalid};

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "finetunejob";

/// How often a running job's progress is refreshed.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// How often a pending job is looked at again even without a change event.
const PENDING_INTERVAL: Duration = Duration::from_secs(30);

/// Reconciles one FineTuneJob. Idempotent: every step recomputes from what the API server holds.
pub async fn reconcile(ftj: Arc<FineTuneJob>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let ns = ftj.namespace().ok_or_else(|| Error::MissingField {
        object: ftj.name_any(),
        field: "metadata.namespace",
    })?;
    let key = format!("{ns}/{}", ftj.name_any());
    if ftj.meta().deletion_timestamp.is_some() {
        // The Job and its pods go with the FineTuneJob through their owner references; the
        // published adapter is a product and stays.
        ctx.metrics.set_finetunejob_phase(&key, None);
        return Ok(Action::await_change());
    }

    let facts = dereference(&ftj, &ctx).await?;
    let outcome = match facts {
        Err(invalid) => Err(invalid),
        Ok(facts) => validate(&ftj.spec, &ctx.config, &facts),
    };
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let job = match &outcome {
        Ok(valid) => Some(apply_job(&jobs, &ftj, valid, &ctx).await?),
        Err(_) => jobs.get_opt(&build::job_name(&ftj)).await?,
    };
    let pod = newest_pod(&ctx, &ns, &ftj).await?;
    let progress = match pod
        .as_ref()
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.pod_ip.clone())
    {
        Some(ip) if pod.as_ref().is_some_and(is_running) => {
            ctx.metrics_reader.read(&ip, ctx.config.trainer_metrics_port).await
        }
        _ => None,
    };

    let observed = Observed {
        ftj: &ftj,
        invalid: outcome.as_ref().err(),
        job: job.as_ref(),
        pod: pod.as_ref(),
        progress,
        now: Time(k8s_openapi::jiff::Timestamp::now()),
    };
    let (status, transition) = derive_status(&observed);
    if ftj.status.as_ref() != Some(&status) {
        let patch = serde_json::json!({
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "status": status,
        });
        let api: Api<FineTuneJob> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &ftj.name_any(),
            &PatchParams::apply(crate::FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    if let Some(t) = transition {
        let event = Event {
            type_: if t.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: t.reason,
            note: Some(truncate(&t.message, 1024)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &ftj.object_ref(&())).await {
            tracing::warn!(%key, error = %e, "could not publish event");
        }
    }
    ctx.backoff.succeeded(&key);
    let phase = status.phase.unwrap_or(FineTuneJobPhase::Pending);
    ctx.metrics.set_finetunejob_phase(&key, Some(&format!("{phase:?}")));
    Ok(match phase {
        FineTuneJobPhase::Running => Action::requeue(PROGRESS_INTERVAL),
        FineTuneJobPhase::Pending => Action::requeue(PENDING_INTERVAL),
        // Invalid specs, finished and suspended jobs wait for a change: no hot loop.
        _ => Action::await_change(),
    })
}

/// Gathers what validation needs: that the storage Secret exists, the GPU memory of the nodes
/// the job may land on, and the base model's shape (its config.json, read with the Secret).
async fn dereference(ftj: &FineTuneJob, ctx: &Context) -> Result<Result<Facts, Invalid>> {
    let ns = ftj.namespace().unwrap_or_default();
    let mut secret_data = std::collections::BTreeMap::new();
    if let Some(secret) = &ftj.spec.storage_secret_ref {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let Some(found) = secrets.get_opt(&secret.name).await? else {
            return Ok(Err(Invalid {
                reason: "SecretNotFound",
                message: format!("spec.storageSecretRef.name: Secret {ns}/{} does not exist", secret.name),
            }));
        };
        for (k, v) in found.data.unwrap_or_default() {
            if let Ok(v) = String::from_utf8(v.0) {
                secret_data.insert(k, v);
            }
        }
    }
    let gpu_memory_mib = gpu_memory_mib(ftj, ctx).await?;
    // The model is only read when there is something to compare it with.
    let model = match gpu_memory_mib {
        Some(_) => ctx.model_shapes.get(&ftj.spec.base_model.uri, secret_data).await,
        None => None,
    };
    Ok(Ok(Facts { gpu_memory_mib, model }))
}

/// The largest per-GPU memory among the nodes matching the job's nodeSelector, from the node
/// label; None when no matching node carries the label.
async fn gpu_memory_mib(ftj: &FineTuneJob, ctx: &Context) -> Result<Option<u64>> {
    let selector = ftj
        .spec
        .placement
        .node_selector
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let list = nodes.list_metadata(&ListParams::default().labels(&selector)).await?;
    Ok(list
        .items
        .iter()
        .filter_map(|n| {
            n.metadata
                .labels
                .as_ref()?
                .get(&ctx.config.gpu_memory_label)?
                .parse::<u64>()
                .ok()
        })
        .max())
}

/// Creates the trainer Job, or re-applies it with the pod template it already has: a Job's
/// template is immutable, while suspend and the deadlines may change.
async fn apply_job(
    jobs: &Api<Job>,
    ftj: &FineTuneJob,
    valid: &validate::ValidFineTuneJob,
    ctx: &Context,
) -> Result<Job> {
    let mut desired = build_job(ftj, valid, &ctx.config)?;
    let name = build::job_name(ftj);
    if let Some(existing) = jobs.get_opt(&name).await? {
        if let (Some(d), Some(e)) = (desired.spec.as_mut(), existing.spec.as_ref()) {
            d.template = e.template.clone();
            d.selector = e.selector.clone();
        }
        if !job_needs_update(&existing, &desired) {
            return Ok(existing);
        }
    }
    Ok(jobs
        .patch(
            &name,
            &PatchParams::apply(crate::FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await?)
}

/// Whether the mutable fields we own differ.
fn job_needs_update(existing: &Job, desired: &Job) -> bool {
    let (Some(e), Some(d)) = (existing.spec.as_ref(), desired.spec.as_ref()) else {
        return true;
    };
    e.suspend != d.suspend
        || e.active_deadline_seconds != d.active_deadline_seconds
        || e.ttl_seconds_after_finished != d.ttl_seconds_after_finished
        || e.backoff_limit != d.backoff_limit
}

async fn newest_pod(ctx: &Context, ns: &str, ftj: &FineTuneJob) -> Result<Option<Pod>> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("{FINETUNEJOB_LABEL}={}", ftj.name_any())))
        .await?;
    Ok(list
        .items
        .into_iter()
        .max_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0)))
}

fn is_running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A failed reconcile is retried with exponential backoff per object (5 s doubling to 5 min).
pub fn error_policy(ftj: Arc<FineTuneJob>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", ftj.namespace().unwrap_or_default(), ftj.name_any());
    crate::context::retry_with_backoff(&ctx, CONTROLLER, &key, error)
}
