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
use k8s_openapi::api::core::v1::{Node, Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use kubetune_crds::{FineTuneJob, FineTuneJobPhase};
use status::{derive_status, is_finished, Observed};
use std::sync::Arc;
use std::time::Duration;
use validate::{validate, Facts, Waiting};

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "finetunejob";

/// How often a running job's progress is refreshed.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// How often a pending job is looked at again even without a change event.
const PENDING_INTERVAL: Duration = Duration::from_secs(30);
/// How often every other job (finished, invalid, suspended) is looked at again: a missed watch
/// event must not leave an object unreconciled for good. Long, so it is no hot loop.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(600);

/// What dereferencing found: the facts to validate with, or something to wait for.
enum Dereferenced {
    Facts(Facts),
    Waiting(Waiting),
}

/// Reconciles one FineTuneJob. Idempotent: every step recomputes from what the API server holds.
pub async fn reconcile(ftj: Arc<FineTuneJob>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let started = std::time::Instant::now();
    let ns = ftj.namespace().ok_or_else(|| Error::MissingField {
        object: ftj.name_any(),
        field: "metadata.namespace",
    })?;
    let key = format!("{ns}/{}", ftj.name_any());
    if ftj.meta().deletion_timestamp.is_some() {
        // The Job and its pods go with the FineTuneJob through their owner references; the
        // published adapter is a product and stays.
        ctx.metrics.set_finetunejob_phase(&key, None);
        ctx.finetunejob_pace.stop(&key);
        return Ok(Action::await_change());
    }

    let (JobState { job, invalid, waiting }, pod) = if is_finished(ftj.status.as_ref()) {
        // Its status says all there is; its Job may be gone (TTL) and is never created again.
        (JobState::default(), None)
    } else {
        let state = ensure_job(&ftj, &ctx, &ns).await?;
        (state, newest_pod(&ctx, &ns, &ftj).await?)
    };
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
        invalid: invalid.as_ref(),
        waiting: waiting.as_ref(),
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
    let phase = status.phase.unwrap_or(FineTuneJobPhase::Pending);
    ctx.metrics.set_finetunejob_phase(&key, Some(&format!("{phase:?}")));
    if waiting.is_some() {
        // Nothing announces the Secret or ServiceAccount (neither is watched): look again,
        // backing off.
        ctx.finetunejob_pace.stop(&key);
        return Ok(Action::requeue(ctx.backoff.failed(&key)));
    }
    ctx.backoff.succeeded(&key);
    // Running and pending jobs are looked at again at a pace that leaves reconcile slots for
    // new jobs (see `crate::pace`).
    let pace = |wanted| Action::requeue(ctx.finetunejob_pace.next_look(&key, wanted, started.elapsed()));
    Ok(match phase {
        FineTuneJobPhase::Running => pace(PROGRESS_INTERVAL),
        FineTuneJobPhase::Pending => pace(PENDING_INTERVAL),
        // Invalid specs, finished and suspended jobs change with their spec or their Job, both
        // watched; the resync is a safety net.
        _ => {
            ctx.finetunejob_pace.stop(&key);
            Action::requeue(RESYNC_INTERVAL)
        }
    })
}

/// The trainer Job after a reconcile looked after it, and why it was left as it is, if so.
#[derive(Default)]
struct JobState {
    job: Option<Job>,
    invalid: Option<validate::Invalid>,
    waiting: Option<Waiting>,
}

/// Creates or updates the trainer Job of a valid FineTuneJob. Of one that is invalid or waits
/// for something, the Job (if any, from before) is only read.
async fn ensure_job(ftj: &FineTuneJob, ctx: &Context, ns: &str) -> Result<JobState> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let (invalid, waiting) = match dereference(ftj, ctx).await? {
        Dereferenced::Facts(facts) => match validate(&ftj.spec, &ctx.config, &facts) {
            Ok(valid) => {
                let job = apply_job(&jobs, ftj, &valid, ctx).await?;
                return Ok(JobState {
                    job: Some(job),
                    ..Default::default()
                });
            }
            Err(invalid) => (Some(invalid), None),
        },
        Dereferenced::Waiting(waiting) => (None, Some(waiting)),
    };
    let job = jobs.get_opt(&build::job_name(ftj)).await?;
    Ok(JobState { job, invalid, waiting })
}

/// Gathers what validation needs: that the storage Secret exists, the GPU memory of the nodes
/// the job may land on, and the base model's shape (its config.json, read with the Secret).
async fn dereference(ftj: &FineTuneJob, ctx: &Context) -> Result<Dereferenced> {
    let ns = ftj.namespace().unwrap_or_default();
    let mut secret_data = std::collections::BTreeMap::new();
    if let Some(secret) = &ftj.spec.storage_secret_ref {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let found = match secrets.get_opt(&secret.name).await {
            Ok(found) => found,
            // Not final: the namespace may be added to rbac.secretNamespaces.
            Err(e) if crate::tenant_storage::is_forbidden(&e) => {
                return Ok(Dereferenced::Waiting(Waiting {
                    reason: "SecretForbidden",
                    message: crate::tenant_storage::secret_forbidden("spec.storageSecretRef.name", &ns, &secret.name),
                }))
            }
            Err(e) => return Err(e.into()),
        };
        let Some(found) = found else {
            return Ok(Dereferenced::Waiting(Waiting {
                reason: "SecretNotFound",
                message: format!(
                    "spec.storageSecretRef.name: waiting for Secret {ns}/{} to exist",
                    secret.name
                ),
            }));
        };
        for (k, v) in found.data.unwrap_or_default() {
            if let Ok(v) = String::from_utf8(v.0) {
                secret_data.insert(k, v);
            }
        }
    }
    // Pods run only as a ServiceAccount the spec names and that exists: a Job of a missing
    // one would fail to create pods, over and over, with the reason buried in its events.
    if let Some(name) = &ftj.spec.placement.service_account_name {
        let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
        if accounts.get_metadata_opt(name).await?.is_none() {
            return Ok(Dereferenced::Waiting(Waiting {
                reason: "ServiceAccountNotFound",
                message: crate::workload::service_account_missing(&ns, name),
            }));
        }
    }
    let gpu_memory_mib = gpu_memory_mib(ftj, ctx).await?;
    // The model is only read when there is something to compare it with.
    let model = match gpu_memory_mib {
        Some(_) => {
            let secret = ftj.spec.storage_secret_ref.as_ref().map(|s| format!("{ns}/{}", s.name));
            let allowed = &ctx.config.allowed_storage_endpoints;
            let uri = &ftj.spec.base_model.uri;
            ctx.model_shapes.get(uri, secret.as_deref(), secret_data, allowed).await
        }
        None => None,
    };
    Ok(Dereferenced::Facts(Facts { gpu_memory_mib, model }))
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

/// Creates the trainer Job if it is absent, else updates only its mutable fields.
///
/// A Job's pod template is immutable, so an existing Job is never sent one: re-applying the
/// whole Job failed with "spec.template: field is immutable" whenever the template we build
/// differed from the stored one (defaults, a create racing a re-apply), and kept failing.
async fn apply_job(
    jobs: &Api<Job>,
    ftj: &FineTuneJob,
    valid: &validate::ValidFineTuneJob,
    ctx: &Context,
) -> Result<Job> {
    let desired = build_job(ftj, valid, &ctx.config)?;
    let name = build::job_name(ftj);
    let existing = match jobs.get_opt(&name).await? {
        Some(existing) => existing,
        None => {
            let params = PostParams {
                field_manager: Some(crate::FIELD_MANAGER.into()),
                ..Default::default()
            };
            match jobs.create(&params, &build::job_to_create(ftj, desired.clone())).await {
                Ok(created) => return Ok(created),
                // Created since we looked (a retried create that went through, or another
                // replica during a leader handover): update that one.
                Err(kube::Error::Api(e)) if e.code == 409 => jobs.get(&name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let Some(patch) = mutable_changes(&existing, &desired, build::kueue_queue(ftj).is_some()) else {
        return Ok(existing);
    };
    let params = PatchParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..Default::default()
    };
    // A merge patch of the changed fields alone: an apply that left the template out would
    // release our ownership of it, and the API server would try to remove it.
    Ok(jobs.patch(&name, &params, &Patch::Merge(&patch)).await?)
}

/// A merge patch of the mutable Job fields we set (suspend, deadlines, TTL, backoff limit) that
/// differ between the existing and the desired Job; None when none does. A Job in a Kueue
/// queue is admitted by Kueue unsuspending it: we only ever suspend it (the user's stop wins),
/// never resume it, or we would start it past the queue.
pub fn mutable_changes(existing: &Job, desired: &Job, queued_by_kueue: bool) -> Option<serde_json::Value> {
    let (e, d) = (
        existing.spec.clone().unwrap_or_default(),
        desired.spec.clone().unwrap_or_default(),
    );
    let mut spec = serde_json::Map::new();
    let resumes = d.suspend != Some(true);
    if e.suspend != d.suspend && !(queued_by_kueue && resumes) {
        spec.insert("suspend".into(), d.suspend.into());
    }
    if e.active_deadline_seconds != d.active_deadline_seconds {
        spec.insert("activeDeadlineSeconds".into(), d.active_deadline_seconds.into());
    }
    if e.ttl_seconds_after_finished != d.ttl_seconds_after_finished {
        spec.insert("ttlSecondsAfterFinished".into(), d.ttl_seconds_after_finished.into());
    }
    if e.backoff_limit != d.backoff_limit {
        spec.insert("backoffLimit".into(), d.backoff_limit.into());
    }
    (!spec.is_empty()).then(|| serde_json::json!({ "spec": spec }))
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
