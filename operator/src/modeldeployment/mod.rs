//! The ModelDeployment controller: validate → resolve adapter versions → plan the rollout from
//! what each pod serves → load versions through the pods' admin API → apply the workloads → status.

pub mod build;
pub mod counters;
pub mod resolve;
pub mod rollout;
pub mod status;
pub mod validate;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::tenant_storage::tenant_credentials;
use build::{
    adapters_config_map_name, admin_key_of, admin_key_secret, admin_key_secret_name, build_children, endpoint,
    new_admin_key, selector_labels, Children,
};
use hyper::Method;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use kubetune_crds::server_contract::{AdaptersFile, ModelList, ServedAdapter, ADMIN_PORT, SERVER_PORT};
use kubetune_crds::{ModelDeployment, RolloutState, RolloutStrategy, ServingCounters};
use kubetune_storage::{Registry, Storage};
use resolve::Unresolved;
use rollout::{plan, CanaryPolicy, PodView, Policy, Step};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

pub const CONTROLLER: &str = "modeldeployment";
const DEFAULT_MAX_ATTEMPTS: u32 = 3;

pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let started = std::time::Instant::now();
    let ns = md.namespace().ok_or_else(|| Error::MissingField {
        object: md.name_any(),
        field: "metadata.namespace",
    })?;
    if md.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Backoff keys carry the kind: a FineTuneJob may share the name.
    let key = format!("modeldeployment/{ns}/{}", md.name_any());
    let valid = match validate::validate(&md.spec, &ctx.config) {
        Ok(valid) => valid,
        Err(refused) => {
            let new_status = status::refused_status(&md, &refused, Time(k8s_openapi::jiff::Timestamp::now()));
            return refuse(&md, &ctx, &ns, &key, &refused, new_status).await;
        }
    };
    if let Some(name) = &md.spec.placement.service_account_name {
        let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
        if accounts.get_metadata_opt(name).await?.is_none() {
            let waiting = Unresolved {
                reason: "ServiceAccountNotFound",
                message: crate::workload::service_account_missing(&ns, name),
            };
            let new_status = status::waiting_status(&md, &waiting, Time(k8s_openapi::jiff::Timestamp::now()));
            refuse(&md, &ctx, &ns, &key, &waiting, new_status).await?;
            // Not final, and the ServiceAccount is not watched: look again, as for an adapter
            // that is not there yet.
            return Ok(Action::requeue(Duration::from_secs(15)));
        }
    }

    // Resolve every adapter; an unresolvable one keeps its promoted version serving.
    let registry_uri = match validate::registry_for(&md.spec, &ctx.config, &ns) {
        Ok(uri) => uri,
        Err(refused) => {
            let new_status = status::refused_status(&md, &refused, Time(k8s_openapi::jiff::Timestamp::now()));
            return refuse(&md, &ctx, &ns, &key, &refused, new_status).await;
        }
    };
    let existing_config_map = get_child::<ConfigMap>(&ctx, &ns, &adapters_config_map_name(&md)).await?;
    let promoted = current_promoted(&md, existing_config_map.as_ref());
    let mut desired = Vec::new();
    let mut unresolved = Vec::new();
    match &registry_uri {
        None if !md.spec.adapters.is_empty() => unresolved.push(Unresolved {
            reason: "InvalidSpec",
            message: "spec.registry: not set, and the operator has no default registry (--default-registry)".into(),
        }),
        None => {}
        Some(uri) => {
            let registry = open_registry(&ctx, &ns, &md, uri).await?;
            for source in &md.spec.adapters {
                let outcome = match &registry {
                    Ok(r) => resolve::resolve(source, r, &ctx.client, &ns).await,
                    Err(u) => Err(u.clone()),
                };
                match outcome {
                    Ok(a) => desired.push(a),
                    Err(u) => {
                        desired.extend(promoted.adapters.iter().find(|a| a.name == source.name).cloned());
                        unresolved.push(u);
                    }
                }
            }
        }
    }

    let policy = rollout_policy(&md);
    // Every adapter's own record: one slot would reset the others' attempts and canaries.
    let previous = status::recorded_rollouts(md.status.as_ref());
    // Request counters matter only to a canary under way (or about to start).
    let canary_in_flight = policy.canary.is_some() && desired.iter().any(|a| !promoted.adapters.contains(a));
    // Before the pods are asked anything: the admin API takes only this key.
    let admin = match admin_key(&ctx, &ns, &md).await {
        Ok(admin) => admin,
        Err(Error::Kube(e)) if crate::tenant_storage::is_forbidden(&e) => {
            let waiting = Unresolved {
                reason: "SecretForbidden",
                message: crate::tenant_storage::secret_forbidden("admin key", &ns, &admin_key_secret_name(&md)),
            };
            let new_status = status::waiting_status(&md, &waiting, Time(k8s_openapi::jiff::Timestamp::now()));
            refuse(&md, &ctx, &ns, &key, &waiting, new_status).await?;
            return Ok(Action::requeue(Duration::from_secs(15)));
        }
        Err(e) => return Err(e),
    };
    let pods = pod_views(&ctx, &ns, &md, canary_in_flight, &admin.key).await?;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut the_plan = plan(&desired, &promoted, &pods.views, &previous, &policy, &now);
    for Step::Load { pod, adapter } in the_plan.steps.clone() {
        if let Err(message) = load(&ctx, &pods.ips, &pod, &adapter, &admin.key).await {
            tracing::warn!(modeldeployment = %key, %pod, adapter = %adapter.source, %message, "adapter load failed");
            if let Some(r) = the_plan
                .rollouts
                .iter_mut()
                .find(|r| r.adapter == adapter.name && r.to_version == adapter.version)
            {
                r.failed_attempts = Some(r.failed_attempts.unwrap_or(0) + 1);
                r.message = Some(message);
            }
        }
    }

    // An adapter removed from the spec leaves the running pods too, not only the adapters file.
    let named: BTreeSet<&str> = md.spec.adapters.iter().map(|a| a.name.as_str()).collect();
    for rollout::Unload { pod, adapter } in rollout::unloads(&named, &pods.views) {
        match unload(&ctx, &pods.ips, &pod, &adapter, &admin.key).await {
            Ok(()) => {
                tracing::info!(modeldeployment = %key, %pod, %adapter, "unloaded an adapter no longer in the spec")
            }
            Err(message) => {
                tracing::warn!(modeldeployment = %key, %pod, %adapter, %message, "adapter unload failed")
            }
        }
    }

    let registry_arg = registry_uri.clone().unwrap_or_default();
    let children = build_children(
        &md,
        &valid,
        &ctx.config,
        &registry_arg,
        &the_plan.promoted,
        admin.secret_uid.as_deref(),
    )?;
    let params = PatchParams::apply(crate::FIELD_MANAGER).force();
    let applied = apply_children(&ctx, &ns, &md, &children, existing_config_map, &params).await?;

    let observed = status::ObservedDeployment {
        md: &md,
        desired: &desired,
        unresolved: &unresolved,
        pods: &pods.views,
        plan: &the_plan,
        endpoint: endpoint(&md),
        desired_replicas: status::desired_replicas(&md, applied.deployment.as_ref()),
        not_owned: &applied.not_owned,
        deadline_exceeded: status::deadline_exceeded(applied.deployment.as_ref()),
        now,
    };
    let new_status = status::derive_status(&observed);
    if md.status.as_ref() != Some(&new_status) {
        let patch =
            serde_json::json!({"apiVersion": "kubetune.dev/v1alpha1", "kind": "ModelDeployment", "status": new_status});
        let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(&md.name_any(), &params, &Patch::Apply(&patch)).await?;
    }
    for r in rollouts_changed(&previous, &new_status.rollouts) {
        publish_rollout_event(&ctx, &md, &key, r).await;
    }
    let ready = new_status
        .conditions
        .iter()
        .any(|c| c.type_ == kubetune_crds::conditions::READY && c.status == "True");
    ctx.metrics
        .set_modeldeployment(&ns, &md.name_any(), ready, new_status.rollout.as_ref().map(|r| r.state));
    ctx.backoff.succeeded(&key);
    // A rollout is followed closely; an adapter that is not there yet is looked for again soon;
    // otherwise pod restarts are caught by the periodic check. All at a pace that leaves
    // reconcile slots for new objects (see `crate::pace`).
    let rolling = the_plan
        .rollouts
        .iter()
        .any(|r| matches!(r.state, RolloutState::Progressing | RolloutState::Canary));
    let wanted = Duration::from_secs(match (rolling, unresolved.is_empty()) {
        (true, _) => 3,
        (false, false) => 15,
        (false, true) => 30,
    });
    Ok(Action::requeue(ctx.modeldeployment_pace.next_look(
        &key,
        wanted,
        started.elapsed(),
    )))
}

/// The rollouts whose state or target version differ from the adapter's record before.
fn rollouts_changed<'a>(
    before: &[kubetune_crds::RolloutStatus],
    now: &'a [kubetune_crds::RolloutStatus],
) -> Vec<&'a kubetune_crds::RolloutStatus> {
    now.iter()
        .filter(|r| {
            !before
                .iter()
                .any(|b| b.adapter == r.adapter && b.state == r.state && b.to_version == r.to_version)
        })
        .collect()
}

async fn publish_rollout_event(ctx: &Context, md: &ModelDeployment, key: &str, r: &kubetune_crds::RolloutStatus) {
    let event = Event {
        type_: if r.state == RolloutState::Failed {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: format!("Rollout{:?}", r.state),
        note: Some(format!(
            "{} v{} -> v{}: {:?}{}",
            r.adapter,
            r.from_version.unwrap_or(0),
            r.to_version,
            r.state,
            r.message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()
        )),
        action: "Rollout".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &md.object_ref(&())).await {
        tracing::warn!(modeldeployment = %key, error = %e, "could not publish event");
    }
}

/// A spec the operator refuses changes nothing in the cluster: no adapter is loaded and no child
/// is applied, so the pods of an earlier spec keep serving. Only `new_status` (and an Event) says
/// why, and nothing is retried until the spec changes unless the caller requeues.
async fn refuse(
    md: &ModelDeployment,
    ctx: &Context,
    ns: &str,
    key: &str,
    refused: &Unresolved,
    new_status: kubetune_crds::ModelDeploymentStatus,
) -> Result<Action> {
    if md.status.as_ref() != Some(&new_status) {
        let patch =
            serde_json::json!({"apiVersion": "kubetune.dev/v1alpha1", "kind": "ModelDeployment", "status": new_status});
        let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), ns);
        let params = PatchParams::apply(crate::FIELD_MANAGER).force();
        api.patch_status(&md.name_any(), &params, &Patch::Apply(&patch)).await?;
        let event = Event {
            type_: EventType::Warning,
            reason: refused.reason.into(),
            note: Some(refused.message.clone()),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &md.object_ref(&())).await {
            tracing::warn!(modeldeployment = %key, error = %e, "could not publish event");
        }
    }
    ctx.metrics
        .set_modeldeployment(ns, &md.name_any(), false, new_status.rollout.as_ref().map(|r| r.state));
    ctx.backoff.succeeded(key);
    Ok(Action::await_change())
}

/// The versions pods load at start, from the adapters ConfigMap (none before the first apply, and
/// none from a ConfigMap of that name that someone else owns).
fn current_promoted(md: &ModelDeployment, cm: Option<&ConfigMap>) -> AdaptersFile {
    let text = cm
        .filter(|c| owned_by(md, *c))
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get("adapters.json"));
    text.and_then(|t| serde_json::from_str(t).ok()).unwrap_or_default()
}

/// What applying the children found.
struct Applied {
    /// The Deployment as the API server returned it (its replicas are the autoscaler's choice).
    deployment: Option<Deployment>,
    /// One line per wanted child that exists and belongs to someone else.
    not_owned: Vec<String>,
}

/// Applies the children the spec wants and deletes the ones it no longer wants (a PDB or HPA
/// switched off). Every child has a fixed name, so the object under that name is the only one
/// that can be ours. An object we do not own (no ownerReference to this ModelDeployment) is never
/// overwritten or deleted: it may be someone's hand-made Service, and the conflict is reported.
async fn apply_children(
    ctx: &Context,
    ns: &str,
    md: &ModelDeployment,
    children: &Children,
    config_map: Option<ConfigMap>,
    params: &PatchParams,
) -> Result<Applied> {
    let mut not_owned = Vec::new();
    let name = md.name_any();
    let cm_name = adapters_config_map_name(md);
    sync_child(
        ctx,
        ns,
        md,
        &cm_name,
        config_map,
        Some(&children.config_map),
        params,
        &mut not_owned,
    )
    .await?;
    let existing: Option<Deployment> = get_child(ctx, ns, &name).await?;
    if md.spec.autoscaling.is_some() {
        if let Some(d) = existing.as_ref().filter(|d| owned_by(md, *d) && applies_replicas(d)) {
            hand_over_replicas(ctx, ns, d).await?;
        }
    }
    let deployment = sync_child(
        ctx,
        ns,
        md,
        &name,
        existing,
        Some(&children.deployment),
        params,
        &mut not_owned,
    )
    .await?;
    let existing = get_child(ctx, ns, &name).await?;
    sync_child(
        ctx,
        ns,
        md,
        &name,
        existing,
        Some(&children.service),
        params,
        &mut not_owned,
    )
    .await?;
    let existing = get_child(ctx, ns, &name).await?;
    sync_child(
        ctx,
        ns,
        md,
        &name,
        existing,
        children.pdb.as_ref(),
        params,
        &mut not_owned,
    )
    .await?;
    let existing = get_child(ctx, ns, &name).await?;
    sync_child(
        ctx,
        ns,
        md,
        &name,
        existing,
        children.hpa.as_ref(),
        params,
        &mut not_owned,
    )
    .await?;
    // Only when the operator is configured for it: without --admin-policy-from nothing is read,
    // so a policy made while it was set stays until the ModelDeployment goes.
    if let Some(policy) = &children.network_policy {
        let existing = get_child(ctx, ns, &name).await?;
        sync_child(ctx, ns, md, &name, existing, Some(policy), params, &mut not_owned).await?;
    }
    Ok(Applied { deployment, not_owned })
}

/// Field manager that keeps a Deployment's replicas while an autoscaler takes them over.
const REPLICAS_HANDOVER_MANAGER: &str = "kubetune-operator-replicas-handover";

/// Whether our own applies still set the Deployment's replicas (its managedFields say so).
fn applies_replicas(d: &Deployment) -> bool {
    d.metadata.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() == Some(crate::FIELD_MANAGER)
            && m.operation.as_deref() == Some("Apply")
            && m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0["f:spec"].get("f:replicas").is_some())
    })
}

/// When spec.autoscaling is turned on, our apply stops naming replicas; a field its only owner
/// stops applying is removed, and the Deployment would drop to 1 replica until the HPA acts.
/// A second field manager first claims the current value, as the server-side apply docs'
/// handover to an autoscaler does, so the count stays until the HPA changes it.
async fn hand_over_replicas(ctx: &Context, ns: &str, d: &Deployment) -> Result<()> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let name = d.name_any();
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let claim = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas},
    });
    api.patch(
        &name,
        &PatchParams::apply(REPLICAS_HANDOVER_MANAGER),
        &Patch::Apply(&claim),
    )
    .await?;
    Ok(())
}

/// Whether `obj` has an ownerReference to this ModelDeployment (by uid: a namesake created after
/// a delete is not the owner).
fn owned_by<K: Resource>(md: &ModelDeployment, obj: &K) -> bool {
    let uid = md.meta().uid.as_deref();
    uid.is_some()
        && obj
            .meta()
            .owner_references
            .iter()
            .flatten()
            .any(|o| Some(o.uid.as_str()) == uid)
}

async fn get_child<K>(ctx: &Context, ns: &str, name: &str) -> Result<Option<K>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    <K as Resource>::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api.get_opt(name).await?)
}

/// Brings one child to what is wanted: applied when wanted, deleted when not and ours, and left
/// alone (with a line in `not_owned` when wanted) when someone else's. Returns the applied object.
#[allow(clippy::too_many_arguments)]
async fn sync_child<K>(
    ctx: &Context,
    ns: &str,
    md: &ModelDeployment,
    name: &str,
    existing: Option<K>,
    wanted: Option<&K>,
    params: &PatchParams,
    not_owned: &mut Vec<String>,
) -> Result<Option<K>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + Serialize
        + serde::de::DeserializeOwned,
    <K as Resource>::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let kind = K::kind(&Default::default()).to_string();
    match (existing, wanted) {
        (Some(found), Some(_)) if !owned_by(md, &found) => {
            not_owned.push(format!(
                "{kind} {ns}/{name} exists and is not owned by this ModelDeployment; delete it or rename the ModelDeployment"
            ));
            Ok(None)
        }
        (_, Some(obj)) => Ok(Some(api.patch(name, params, &Patch::Apply(obj)).await?)),
        (Some(found), None) if owned_by(md, &found) => {
            // The uid precondition: never a namesake created since the read.
            let uid = found.meta().uid.clone();
            let delete = DeleteParams::default().preconditions(Preconditions {
                uid,
                resource_version: None,
            });
            match api.delete(name, &delete).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// An admin key and the uid of the Secret that holds it.
struct AdminKey {
    key: String,
    secret_uid: Option<String>,
}

/// The ModelDeployment's admin key: read from its Secret, or generated into a new Secret when
/// there is none. Never rewritten, so pods started with a key keep accepting the operator's.
/// A Secret of that name that someone else owns is not used: its key is not ours to trust.
async fn admin_key(ctx: &Context, ns: &str, md: &ModelDeployment) -> Result<AdminKey> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = admin_key_secret_name(md);
    let existing = match api.get_opt(&name).await? {
        Some(found) => Some(found),
        None => {
            let key = new_admin_key().map_err(|source| Error::Generate {
                what: "an admin key",
                source,
            })?;
            match api.create(&PostParams::default(), &admin_key_secret(md, &key)?).await {
                Ok(created) => {
                    return Ok(AdminKey {
                        key,
                        secret_uid: created.metadata.uid,
                    })
                }
                // Another reconcile created it since the read: use that one.
                Err(kube::Error::Api(e)) if e.code == 409 => api.get_opt(&name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let secret = existing
        .filter(|s| owned_by(md, s))
        .ok_or_else(|| Error::NotOwned(format!("Secret {ns}/{name}")))?;
    // Emptied by hand: not replaced here; deleting the Secret makes a new one, and its new uid
    // in the pod template rolls the pods onto the new key.
    let key = admin_key_of(&secret).ok_or_else(|| Error::MissingField {
        object: format!("Secret {ns}/{name}"),
        field: "data.key",
    })?;
    Ok(AdminKey {
        key,
        secret_uid: secret.metadata.uid,
    })
}

async fn open_registry(
    ctx: &Context,
    ns: &str,
    md: &ModelDeployment,
    uri: &str,
) -> Result<Result<Registry, Unresolved>> {
    let mut vars = BTreeMap::new();
    if let Some(secret) = &md.spec.storage_secret_ref {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        let found = match api.get_opt(&secret.name).await {
            Ok(found) => found,
            Err(e) if crate::tenant_storage::is_forbidden(&e) => {
                return Ok(Err(Unresolved {
                    reason: "SecretForbidden",
                    message: crate::tenant_storage::secret_forbidden("spec.storageSecretRef.name", ns, &secret.name),
                }))
            }
            Err(e) => return Err(e.into()),
        };
        let Some(found) = found else {
            return Ok(Err(Unresolved {
                reason: "SecretNotFound",
                message: format!("spec.storageSecretRef.name: Secret {ns}/{} does not exist", secret.name),
            }));
        };
        for (k, v) in found.data.unwrap_or_default() {
            if let Ok(v) = String::from_utf8(v.0) {
                vars.insert(k, v);
            }
        }
    }
    let secret = md.spec.storage_secret_ref.as_ref().map(|s| format!("{ns}/{}", s.name));
    let allowed = &ctx.config.allowed_storage_endpoints;
    let credentials = match tenant_credentials(uri, "spec.registry", secret.as_deref(), vars, allowed) {
        Ok(c) => c,
        Err(message) => {
            return Ok(Err(Unresolved {
                reason: "StorageEndpointNotAllowed",
                message,
            }))
        }
    };
    Ok(Storage::from_uri(uri, &credentials)
        .map(Registry::open)
        .map_err(|e| Unresolved {
            reason: "InvalidSpec",
            message: format!("spec.registry: {e}"),
        }))
}

struct Pods {
    views: Vec<PodView>,
    ips: BTreeMap<String, String>,
}

/// What each server pod serves, asked of the pod itself.
async fn pod_views(ctx: &Context, ns: &str, md: &ModelDeployment, with_counters: bool, key: &str) -> Result<Pods> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let selector = selector_labels(md)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut views = Vec::new();
    let mut ips = BTreeMap::new();
    for pod in api.list(&ListParams::default().labels(&selector)).await?.items {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = pod.name_any();
        let status = pod.status.unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let served = match (&status.pod_ip, ready) {
            (Some(ip), true) => {
                ips.insert(name.clone(), ip.clone());
                served_by(ctx, ip, key).await
            }
            _ => None,
        };
        let counters = match (&status.pod_ip, ready && with_counters) {
            (Some(ip), true) => serving_counters(ctx, ip, &name).await,
            _ => BTreeMap::new(),
        };
        views.push(PodView {
            name,
            ready,
            served,
            problem: status::pod_problem(&status),
            counters,
        });
    }
    Ok(Pods { views, ips })
}

/// The adapters a pod serves that are the operator's: the admin listing, less those the
/// server loaded on demand (spec.server.onDemandAdapters), which it evicts by itself and which
/// no rollout or unload concerns.
async fn served_by(ctx: &Context, ip: &str, key: &str) -> Option<BTreeMap<String, (u32, String)>> {
    let reply = ctx
        .pod_http
        .send_with_key(Method::GET, ip, ADMIN_PORT, "/v1/adapters", None, Some(key))
        .await
        .ok()?;
    let list: ModelList = serde_json::from_slice(&reply.body)
        .ok()
        .filter(|_| reply.status == 200)?;
    Some(operator_adapters(list))
}

fn operator_adapters(list: ModelList) -> BTreeMap<String, (u32, String)> {
    list.data
        .into_iter()
        .filter(|m| m.pinned != Some(false))
        .filter_map(|m| Some((m.id, (m.version?, m.digest?))))
        .collect()
}

/// A pod's request counters per adapter, from its /metrics; empty when it does not answer
/// (the canary analysis then sees no traffic from it rather than failing on a scrape).
async fn serving_counters(ctx: &Context, ip: &str, pod: &str) -> BTreeMap<String, ServingCounters> {
    match ctx.pod_http.send(Method::GET, ip, SERVER_PORT, "/metrics", None).await {
        Ok(reply) if reply.status == 200 => counters::parse(&String::from_utf8_lossy(&reply.body), pod),
        _ => BTreeMap::new(),
    }
}

/// spec.rollout with its defaults.
fn rollout_policy(md: &ModelDeployment) -> Policy {
    let spec = md.spec.rollout.clone().unwrap_or_default();
    let canary = (spec.strategy == Some(RolloutStrategy::Canary)).then(|| {
        let c = spec.canary.clone().unwrap_or_default();
        CanaryPolicy {
            replica_percent: c.replica_percent.unwrap_or(25),
            analysis_seconds: c.analysis_seconds.unwrap_or(60),
            max_error_rate: c.max_error_rate.unwrap_or(0.01),
            max_p99_latency_ms: c.max_p99_latency_ms,
        }
    });
    Policy {
        max_attempts: spec.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
        canary,
        paused: spec.paused.unwrap_or(false),
        abort: spec.abort.unwrap_or(false),
    }
}

/// Asks one pod to load an adapter version; Err carries the server's own explanation.
async fn load(
    ctx: &Context,
    ips: &BTreeMap<String, String>,
    pod: &str,
    adapter: &ServedAdapter,
    key: &str,
) -> Result<(), String> {
    let ip = ips.get(pod).ok_or_else(|| format!("pod {pod} has no IP"))?;
    let body = serde_json::to_vec(adapter).map_err(|e| e.to_string())?;
    let reply = ctx
        .pod_http
        .send_with_key(Method::POST, ip, ADMIN_PORT, "/v1/adapters", Some(body), Some(key))
        .await?;
    if (200..300).contains(&reply.status) {
        Ok(())
    } else {
        Err(format!(
            "pod {pod} answered HTTP {}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        ))
    }
}

/// Asks one pod to stop serving an adapter; Err carries the server's own explanation.
async fn unload(
    ctx: &Context,
    ips: &BTreeMap<String, String>,
    pod: &str,
    adapter: &str,
    key: &str,
) -> Result<(), String> {
    let ip = ips.get(pod).ok_or_else(|| format!("pod {pod} has no IP"))?;
    let path = format!("/v1/adapters/{adapter}");
    let reply = ctx
        .pod_http
        .send_with_key(Method::DELETE, ip, ADMIN_PORT, &path, None, Some(key))
        .await?;
    if (200..300).contains(&reply.status) {
        Ok(())
    } else {
        Err(format!(
            "pod {pod} answered HTTP {}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        ))
    }
}

/// A failed reconcile is retried with exponential backoff per object.
pub fn error_policy(md: Arc<ModelDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!(
        "modeldeployment/{}/{}",
        md.namespace().unwrap_or_default(),
        md.name_any()
    );
    crate::context::retry_with_backoff(&ctx, CONTROLLER, &key, error)
}

#[cfg(test)]
mod tests {
    use super::operator_adapters;
    use kubetune_crds::server_contract::{ModelEntry, ModelList};

    fn entry(id: &str, version: Option<u32>, pinned: Option<bool>) -> ModelEntry {
        ModelEntry {
            id: id.into(),
            version,
            digest: version.map(|v| format!("sha256:{v}")),
            pinned,
        }
    }

    #[test]
    fn adapters_the_server_loaded_on_demand_are_not_the_operators_to_roll_out_or_unload() {
        let list = ModelList {
            data: vec![
                entry("base", None, None),
                entry("bot", Some(3), Some(true)),
                entry("visitor", Some(1), Some(false)),
                entry("older-server", Some(2), None),
            ],
        };
        let got = operator_adapters(list);
        let names: Vec<&str> = got.keys().map(String::as_str).collect();
        assert_eq!(names, ["bot", "older-server"]);
        assert_eq!(got["bot"], (3, "sha256:3".to_string()));
    }
}
