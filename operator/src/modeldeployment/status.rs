//! Pure derivation of a ModelDeployment's status.

use super::build::{selector_string, served_model_name};
use super::resolve::Unresolved;
use super::rollout::{Plan, PodProblem, PodView};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::PodStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kubetune_crds::conditions::{condition, set_condition, READY};
use kubetune_crds::server_contract::ServedAdapter;
use kubetune_crds::{
    AdapterStatus, ModelDeployment, ModelDeploymentPhase, ModelDeploymentStatus, RolloutState, RolloutStatus,
};

/// Most rollouts kept in status.rolloutHistory.
const HISTORY: usize = 10;

pub struct ObservedDeployment<'a> {
    pub md: &'a ModelDeployment,
    pub desired: &'a [ServedAdapter],
    pub unresolved: &'a [Unresolved],
    pub pods: &'a [PodView],
    pub plan: &'a Plan,
    pub endpoint: String,
    /// Replicas wanted now: spec.replicas, or the autoscaler's choice (see [`desired_replicas`]).
    pub desired_replicas: i32,
    /// Wanted children that exist and belong to someone else, one line each.
    pub not_owned: &'a [String],
    /// The Deployment's message when it ran past its progress deadline (see [`deadline_exceeded`]).
    pub deadline_exceeded: Option<String>,
    pub now: Time,
}

/// Container waiting reasons that mean the image will not come without a change.
const IMAGE_PULL_REASONS: &[&str] = &[
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "ErrImageNeverPull",
];

/// Why a pod cannot start, from its conditions and container states: the scheduler's
/// Unschedulable, or an image that cannot be pulled (every pull failure reads ImagePullBackOff,
/// the reason kubectl shows once the kubelet backs off), or a container crash-looping.
pub fn pod_problem(status: &PodStatus) -> Option<PodProblem> {
    let unschedulable = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable"));
    if let Some(c) = unschedulable {
        return Some(PodProblem {
            reason: "Unschedulable".into(),
            message: c.message.clone().unwrap_or_default(),
        });
    }
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    containers.into_iter().find_map(|c| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref()?;
        let reason = if IMAGE_PULL_REASONS.contains(&reason) {
            "ImagePullBackOff"
        } else if reason == "CrashLoopBackOff" {
            reason
        } else {
            return None;
        };
        Some(PodProblem {
            reason: reason.into(),
            message: format!("container {}: {}", c.name, waiting.message.clone().unwrap_or_default()),
        })
    })
}

/// The Deployment controller's verdict that the server pods made no progress for
/// progressDeadlineSeconds (condition Progressing=False, reason ProgressDeadlineExceeded).
pub fn deadline_exceeded(deployment: Option<&Deployment>) -> Option<String> {
    deployment?
        .status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| {
            c.type_ == "Progressing" && c.status == "False" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        })
        .map(|c| c.message.clone().unwrap_or_else(|| "progress deadline exceeded".into()))
}

/// The replicas wanted now. Under spec.autoscaling the HPA sets the Deployment's replicas, so
/// they are read from the Deployment (minReplicas until it has any); otherwise spec.replicas.
pub fn desired_replicas(md: &ModelDeployment, deployment: Option<&Deployment>) -> i32 {
    match &md.spec.autoscaling {
        Some(a) => deployment
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.replicas)
            .unwrap_or(a.min_replicas.unwrap_or(1)),
        None => md.spec.replicas.unwrap_or(1),
    }
}

/// The new status. Ready is true only when every desired replica is ready and serves every
/// desired adapter version, as each pod itself reports.
pub fn derive_status(o: &ObservedDeployment) -> ModelDeploymentStatus {
    let old = o.md.status.clone().unwrap_or_default();
    let generation = o.md.metadata.generation;
    let replicas = o.desired_replicas;
    let serves = |p: &PodView, a: &ServedAdapter| {
        p.served
            .as_ref()
            .and_then(|s| s.get(&a.name))
            .is_some_and(|(v, d)| *v == a.version && *d == a.digest)
    };
    let promoted = |name: &str| o.plan.promoted.adapters.iter().find(|a| a.name == name);
    // Ready replicas serve, for every adapter, the desired version or the promoted one (the
    // previous version during a rollout, or after a failed one): they answer correctly. Ready
    // (the condition) further needs every replica on the desired versions.
    let serves_acceptable = |p: &PodView| {
        o.desired
            .iter()
            .all(|a| serves(p, a) || promoted(&a.name).is_some_and(|old| serves(p, old)))
    };
    let ready_pods: Vec<&PodView> = o.pods.iter().filter(|p| p.ready && p.served.is_some()).collect();
    let ready_replicas = ready_pods.iter().filter(|p| serves_acceptable(p)).count() as i32;
    let current_replicas = ready_pods
        .iter()
        .filter(|p| o.desired.iter().all(|a| serves(p, a)))
        .count() as i32;

    let adapters = o
        .desired
        .iter()
        .map(|a| {
            let versions: Vec<Option<u32>> = ready_pods
                .iter()
                .map(|p| p.served.as_ref().and_then(|s| s.get(&a.name)).map(|(v, _)| *v))
                .collect();
            let serving = match versions.first() {
                Some(Some(v)) if versions.iter().all(|x| *x == Some(*v)) => Some(*v),
                _ => None,
            };
            AdapterStatus {
                name: a.name.clone(),
                desired_version: Some(a.version),
                serving_version: serving,
                digest: Some(a.digest.clone()),
            }
        })
        .collect::<Vec<_>>();

    let failed = o
        .plan
        .rollouts
        .iter()
        .find(|r| matches!(r.state, RolloutState::Failed | RolloutState::RolledBack));
    let progressing = o
        .plan
        .rollouts
        .iter()
        .any(|r| matches!(r.state, RolloutState::Progressing | RolloutState::Canary));
    let all_ready = current_replicas == replicas
        && o.unresolved.is_empty()
        && o.not_owned.is_empty()
        && o.deadline_exceeded.is_none()
        && failed.is_none()
        && !progressing;
    // The first pod that says why it cannot start.
    let stuck = o
        .pods
        .iter()
        .find_map(|p| p.problem.as_ref().map(|problem| (p.name.as_str(), problem)));
    let describe = |(pod, problem): (&str, &PodProblem)| format!("pod {pod}: {}: {}", problem.reason, problem.message);
    let (phase, reason, message) = if !o.not_owned.is_empty() {
        // Nothing of ours can be brought up to date until the other object goes.
        let phase = if ready_pods.is_empty() {
            ModelDeploymentPhase::Failed
        } else {
            ModelDeploymentPhase::Degraded
        };
        (phase, "ChildNotOwned".to_string(), o.not_owned.join("; "))
    } else if let Some(u) = o.unresolved.first() {
        let phase = if ready_pods.is_empty() {
            ModelDeploymentPhase::Pending
        } else {
            ModelDeploymentPhase::Degraded
        };
        (phase, u.reason.to_string(), u.message.clone())
    } else if let Some(f) = failed {
        let verb = if f.state == RolloutState::RolledBack {
            "rolled back"
        } else {
            "failed"
        };
        let message = format!(
            "rollout of {}@{} {verb}: {}",
            f.adapter,
            f.to_version,
            f.message.clone().unwrap_or_default()
        );
        let phase = if ready_pods.is_empty() {
            ModelDeploymentPhase::Failed
        } else {
            ModelDeploymentPhase::Degraded
        };
        let reason = if f.state == RolloutState::RolledBack {
            "RolledBack"
        } else {
            "RolloutFailed"
        };
        (phase, reason.into(), message)
    } else if let Some(deadline) = &o.deadline_exceeded {
        // Waiting stops here: health checks (Argo CD's) report this as degraded, not progressing.
        let phase = if ready_pods.is_empty() {
            ModelDeploymentPhase::Failed
        } else {
            ModelDeploymentPhase::Degraded
        };
        let message = match stuck {
            Some(s) => format!("{deadline}; {}", describe(s)),
            None => deadline.clone(),
        };
        (phase, "ProgressDeadlineExceeded".into(), message)
    } else if progressing {
        let message = o
            .plan
            .rollouts
            .iter()
            .find_map(|r| r.message.clone())
            .unwrap_or_default();
        (ModelDeploymentPhase::Progressing, "RolloutInProgress".into(), message)
    } else if all_ready {
        (ModelDeploymentPhase::Ready, "AllReplicasServing".into(), String::new())
    } else if let Some((pod, problem)) = stuck {
        let phase = if ready_pods.is_empty() {
            ModelDeploymentPhase::Pending
        } else {
            ModelDeploymentPhase::Progressing
        };
        (phase, problem.reason.clone(), describe((pod, problem)))
    } else if ready_pods.is_empty() {
        (
            ModelDeploymentPhase::Pending,
            "WaitingForReplicas".into(),
            format!("0 of {replicas} replicas ready"),
        )
    } else {
        (
            ModelDeploymentPhase::Progressing,
            "ScalingReplicas".into(),
            format!("{ready_replicas} of {replicas} replicas ready"),
        )
    };

    let mut status = ModelDeploymentStatus {
        phase: Some(phase),
        conditions: old.conditions.clone(),
        observed_generation: generation,
        replicas: Some(o.pods.len() as i32),
        selector: Some(selector_string(o.md)),
        served_model_name: Some(served_model_name(o.md)),
        ready_replicas: Some(ready_replicas),
        ready_display: Some(format!("{ready_replicas}/{replicas}")),
        serving_display: Some(
            adapters
                .iter()
                .map(|a| {
                    format!(
                        "{}@{}",
                        a.name,
                        a.serving_version.map_or("-".into(), |v| format!("v{v}"))
                    )
                })
                .collect::<Vec<_>>()
                .join(","),
        ),
        adapters,
        endpoint: Some(o.endpoint.clone()),
        rollout: None,
        rollouts: vec![],
        rollout_history: old.rollout_history.clone(),
    };
    set_condition(
        &mut status.conditions,
        condition(READY, all_ready, &reason, message, generation, o.now.clone()),
    );
    status.rollouts = rollouts(o, &old, &mut status.rollout_history);
    status.rollout = headline(&status.rollouts).or(old.rollout);
    status
}

/// The rollouts a status recorded, per adapter: status.rollouts, or the single status.rollout an
/// operator before per-adapter rollouts wrote.
pub fn recorded_rollouts(status: Option<&ModelDeploymentStatus>) -> Vec<RolloutStatus> {
    match status {
        Some(s) if !s.rollouts.is_empty() => s.rollouts.clone(),
        Some(s) => s.rollout.iter().cloned().collect(),
        None => vec![],
    }
}

/// Each desired adapter's rollout: the plan's (with its start and end times carried over from
/// the record of the same version), else the one recorded before. Newly ended rollouts go to the
/// front of `history`.
fn rollouts(
    o: &ObservedDeployment,
    old: &ModelDeploymentStatus,
    history: &mut Vec<RolloutStatus>,
) -> Vec<RolloutStatus> {
    let recorded = recorded_rollouts(Some(old));
    let planned = |adapter: &str| o.plan.rollouts.iter().any(|r| r.adapter == adapter);
    let desired = |adapter: &str| o.desired.iter().any(|a| a.name == adapter);
    let mut out: Vec<RolloutStatus> = recorded
        .iter()
        .filter(|r| desired(&r.adapter) && !planned(&r.adapter))
        .cloned()
        .collect();
    for r in &o.plan.rollouts {
        let mut r = r.clone();
        let same = recorded
            .iter()
            .find(|p| p.adapter == r.adapter && p.to_digest == r.to_digest);
        r.started_at = same.and_then(|p| p.started_at.clone()).or_else(|| Some(o.now.clone()));
        let finished = matches!(
            r.state,
            RolloutState::Promoted | RolloutState::Failed | RolloutState::RolledBack
        );
        r.finished_at = if finished {
            same.and_then(|p| p.finished_at.clone()).or_else(|| Some(o.now.clone()))
        } else {
            None
        };
        if finished && same.is_none_or(|p| p.state != r.state) {
            history.insert(0, r.clone());
            history.truncate(HISTORY);
        }
        out.push(r);
    }
    out.sort_by(|a, b| a.adapter.cmp(&b.adapter));
    out
}

/// The rollout status.rollout shows: one under way, else the one that ended last.
fn headline(rollouts: &[RolloutStatus]) -> Option<RolloutStatus> {
    let in_flight = |r: &&RolloutStatus| matches!(r.state, RolloutState::Progressing | RolloutState::Canary);
    rollouts
        .iter()
        .find(in_flight)
        .or_else(|| rollouts.iter().max_by_key(|r| r.finished_at.as_ref().map(|t| t.0)))
        .cloned()
}

/// The status of a spec the operator refuses. Nothing was applied for it, so the pods of an
/// earlier spec, if any, still serve: Degraded while the last observation saw ready replicas,
/// else Failed. Ready is false and says why; the rest is as last observed.
pub fn refused_status(md: &ModelDeployment, refused: &Unresolved, now: Time) -> ModelDeploymentStatus {
    let mut status = md.status.clone().unwrap_or_default();
    let generation = md.metadata.generation;
    status.observed_generation = generation;
    status.phase = Some(if status.ready_replicas.unwrap_or(0) > 0 {
        ModelDeploymentPhase::Degraded
    } else {
        ModelDeploymentPhase::Failed
    });
    set_condition(
        &mut status.conditions,
        condition(READY, false, refused.reason, refused.message.clone(), generation, now),
    );
    status
}

/// The status of a ModelDeployment that waits for something it names to exist (its
/// ServiceAccount): not ready, saying why, but Pending rather than Failed while nothing serves,
/// as it runs by itself once the object appears.
pub fn waiting_status(md: &ModelDeployment, waiting: &Unresolved, now: Time) -> ModelDeploymentStatus {
    let mut status = refused_status(md, waiting, now);
    if status.phase == Some(ModelDeploymentPhase::Failed) {
        status.phase = Some(ModelDeploymentPhase::Pending);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::modeldeployment;
    use crate::modeldeployment::rollout::plan;
    use k8s_openapi::jiff::Timestamp;
    use kubetune_crds::server_contract::AdaptersFile;
    use std::collections::BTreeMap;

    fn adapter(version: u32) -> ServedAdapter {
        ServedAdapter {
            name: "support-bot".into(),
            source: format!("support-bot@{version}"),
            version,
            digest: format!("sha256:{version}"),
        }
    }

    fn pod(name: &str, version: Option<u32>) -> PodView {
        let served = version
            .map(|v| ("support-bot".to_string(), (v, format!("sha256:{v}"))))
            .into_iter()
            .collect::<BTreeMap<_, _>>();
        PodView {
            name: name.into(),
            ready: true,
            served: Some(served),
            ..Default::default()
        }
    }

    fn now() -> Time {
        Time(Timestamp::from_second(1_800_000_000).expect("valid"))
    }

    fn derive(
        md: &ModelDeployment,
        desired: &[ServedAdapter],
        promoted: &[ServedAdapter],
        pods: &[PodView],
        unresolved: &[Unresolved],
    ) -> ModelDeploymentStatus {
        let policy = crate::modeldeployment::rollout::Policy {
            max_attempts: 3,
            canary: None,
            paused: false,
            abort: false,
        };
        let p = plan(
            desired,
            &AdaptersFile {
                adapters: promoted.to_vec(),
            },
            pods,
            &[],
            &policy,
            &now(),
        );
        derive_status(&ObservedDeployment {
            md,
            desired,
            unresolved,
            pods,
            plan: &p,
            endpoint: "http://e".into(),
            desired_replicas: desired_replicas(md, None),
            not_owned: &[],
            deadline_exceeded: None,
            now: now(),
        })
    }

    fn ready(s: &ModelDeploymentStatus) -> bool {
        s.conditions.iter().any(|c| c.type_ == READY && c.status == "True")
    }

    #[test]
    fn ready_only_when_every_replica_serves_the_desired_version() {
        let md = modeldeployment("modeldeployment.yaml");
        let s = derive(&md, &[adapter(1)], &[adapter(1)], &[pod("a", Some(1))], &[]);
        assert!(ready(&s));
        assert_eq!(s.phase, Some(ModelDeploymentPhase::Ready));
        assert_eq!(
            (s.ready_display.as_deref(), s.serving_display.as_deref()),
            (Some("1/1"), Some("support-bot@v1"))
        );

        let s = derive(&md, &[adapter(2)], &[adapter(1)], &[pod("a", Some(1))], &[]);
        assert!(!ready(&s));
        assert_eq!(s.phase, Some(ModelDeploymentPhase::Progressing));
        assert_eq!(s.adapters[0].desired_version, Some(2));
        assert_eq!(s.adapters[0].serving_version, Some(1));
    }

    #[test]
    fn replicas_disagreeing_have_no_serving_version() {
        let mut md = modeldeployment("modeldeployment.yaml");
        md.spec.replicas = Some(2);
        let s = derive(
            &md,
            &[adapter(2)],
            &[adapter(1)],
            &[pod("a", Some(2)), pod("b", Some(1))],
            &[],
        );
        assert_eq!(s.adapters[0].serving_version, None);
        // Both answer with an acceptable version mid-rollout, but the rollout is not done.
        assert_eq!(s.ready_replicas, Some(2));
        assert!(!ready(&s));

        let s = derive(
            &md,
            &[adapter(2)],
            &[adapter(1)],
            &[pod("a", Some(3)), pod("b", Some(1))],
            &[],
        );
        assert_eq!(s.ready_replicas, Some(1), "a pod serving neither version is not ready");
    }

    #[test]
    fn a_refused_spec_is_failed_with_the_refusal_as_ready_condition() {
        let md = modeldeployment("modeldeployment.yaml");
        let refused = Unresolved {
            reason: "InvalidSpec",
            message: r#"spec.resources.limits["nvidia.com/gpu"]: 2 GPUs requested, but one GPU per pod is supported"#
                .into(),
        };
        let s = refused_status(&md, &refused, now());
        assert_eq!(s.phase, Some(ModelDeploymentPhase::Failed));
        assert_eq!(s.observed_generation, Some(1));
        let c = s.conditions.iter().find(|c| c.type_ == READY).expect("Ready");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "InvalidSpec"));
        assert_eq!(c.message, refused.message);
    }

    #[test]
    fn a_refused_spec_whose_earlier_pods_still_serve_is_degraded() {
        let mut md = modeldeployment("modeldeployment.yaml");
        md.status = Some(derive(&md, &[adapter(1)], &[adapter(1)], &[pod("a", Some(1))], &[]));
        md.metadata.generation = Some(2);
        let refused = Unresolved {
            reason: "InvalidSpec",
            message: "two GPUs".into(),
        };
        let s = refused_status(&md, &refused, now());
        assert_eq!(s.phase, Some(ModelDeploymentPhase::Degraded));
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.serving_display.as_deref(), Some("support-bot@v1"), "as last observed");
        assert!(!ready(&s));
    }

    #[test]
    fn a_deployment_waiting_for_its_service_account_is_pending_not_failed() {
        let md = modeldeployment("modeldeployment.yaml");
        let waiting = Unresolved {
            reason: "ServiceAccountNotFound",
            message: crate::workload::service_account_missing("team-a", "server"),
        };
        let s = waiting_status(&md, &waiting, now());
        assert_eq!(s.phase, Some(ModelDeploymentPhase::Pending));
        let c = s.conditions.iter().find(|c| c.type_ == READY).expect("Ready");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ServiceAccountNotFound")
        );
        assert_eq!(
            c.message,
            "spec.serviceAccountName: waiting for ServiceAccount team-a/server to exist"
        );
    }

    #[test]
    fn unresolved_adapter_is_not_ready_and_says_why() {
        let md = modeldeployment("modeldeployment.yaml");
        let missing = Unresolved {
            reason: "AdapterNotFound",
            message: "spec.adapters[support-bot]: no versions".into(),
        };
        let s = derive(&md, &[], &[], &[], &[missing]);
        assert_eq!(s.phase, Some(ModelDeploymentPhase::Pending));
        let c = s.conditions.iter().find(|c| c.type_ == READY).expect("Ready");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "AdapterNotFound"));
        assert_eq!(s.endpoint.as_deref(), Some("http://e"));
    }

    fn derive_with(
        md: &ModelDeployment,
        pods: &[PodView],
        desired_replicas: i32,
        not_owned: &[String],
    ) -> ModelDeploymentStatus {
        let policy = crate::modeldeployment::rollout::Policy {
            max_attempts: 3,
            canary: None,
            paused: false,
            abort: false,
        };
        let p = plan(
            &[adapter(1)],
            &AdaptersFile {
                adapters: vec![adapter(1)],
            },
            pods,
            &[],
            &policy,
            &now(),
        );
        derive_status(&ObservedDeployment {
            md,
            desired: &[adapter(1)],
            unresolved: &[],
            pods,
            plan: &p,
            endpoint: "http://e".into(),
            desired_replicas,
            not_owned,
            deadline_exceeded: None,
            now: now(),
        })
    }

    #[test]
    fn status_reports_the_pods_observed_their_selector_and_the_served_model_name() {
        let mut md = modeldeployment("modeldeployment.yaml");
        md.spec.replicas = Some(3);
        let mut starting = pod("c", None);
        starting.ready = false;
        starting.served = None;
        let s = derive_with(&md, &[pod("a", Some(1)), pod("b", Some(1)), starting], 3, &[]);
        assert_eq!(s.replicas, Some(3), "observed pods, the ready and the starting");
        assert_eq!(s.ready_replicas, Some(2));
        assert_eq!(
            s.selector.as_deref(),
            Some("app.kubernetes.io/name=kubetune-server,kubetune.dev/modeldeployment=support")
        );
        assert_eq!(s.served_model_name.as_deref(), Some("tiny-llama"));
    }

    #[test]
    fn under_autoscaling_ready_compares_with_the_replicas_the_autoscaler_chose() {
        let mut md = modeldeployment("modeldeployment.yaml");
        md.spec.replicas = Some(5);
        md.spec.autoscaling =
            Some(serde_json::from_value(serde_json::json!({"minReplicas": 2, "maxReplicas": 4})).expect("autoscaling"));
        let deployment: Deployment =
            serde_json::from_value(serde_json::json!({"spec": {"replicas": 2, "selector": {}, "template": {}}}))
                .expect("deployment");
        assert_eq!(
            desired_replicas(&md, Some(&deployment)),
            2,
            "the HPA's choice, not spec.replicas"
        );
        assert_eq!(
            desired_replicas(&md, None),
            2,
            "minReplicas before the Deployment exists"
        );
        let s = derive_with(&md, &[pod("a", Some(1)), pod("b", Some(1))], 2, &[]);
        assert!(ready(&s));
        assert_eq!(s.ready_display.as_deref(), Some("2/2"));
    }

    #[test]
    fn a_child_someone_else_owns_makes_ready_false_with_reason_child_not_owned() {
        let md = modeldeployment("modeldeployment.yaml");
        let line = "Service team-a/support exists and is not owned by this ModelDeployment".to_string();
        let s = derive_with(&md, &[pod("a", Some(1))], 1, std::slice::from_ref(&line));
        assert!(!ready(&s));
        let c = s.conditions.iter().find(|c| c.type_ == READY).expect("Ready");
        assert_eq!(
            (c.reason.as_str(), c.message.as_str()),
            ("ChildNotOwned", line.as_str())
        );
        assert_eq!(s.phase, Some(ModelDeploymentPhase::Degraded), "its pods still serve");
    }

    fn named(name: &str, version: u32) -> ServedAdapter {
        ServedAdapter {
            name: name.into(),
            source: format!("{name}@{version}"),
            version,
            digest: format!("sha256:{name}{version}"),
        }
    }

    /// A ready pod serving bot-a and bot-b at these versions.
    fn pod_serving(name: &str, a: u32, b: u32) -> PodView {
        let served = [named("bot-a", a), named("bot-b", b)]
            .into_iter()
            .map(|x| (x.name, (x.version, x.digest)))
            .collect();
        PodView {
            name: name.into(),
            ready: true,
            served: Some(served),
            ..Default::default()
        }
    }

    /// One reconcile as mod.rs runs it: plan from the recorded rollouts, count `failing`'s loads
    /// as failed (the pod answered 500), derive the status.
    fn reconcile_once(md: &mut ModelDeployment, pods: &[PodView], failing: &str, second: i64) {
        let desired = [named("bot-a", 2), named("bot-b", 2)];
        let promoted = AdaptersFile {
            adapters: vec![named("bot-a", 1), named("bot-b", 1)],
        };
        let policy = crate::modeldeployment::rollout::Policy {
            max_attempts: 3,
            canary: None,
            paused: false,
            abort: false,
        };
        let now = Time(Timestamp::from_second(1_800_000_000 + second).expect("valid"));
        let previous = recorded_rollouts(md.status.as_ref());
        let mut p = plan(&desired, &promoted, pods, &previous, &policy, &now);
        for step in p.steps.clone() {
            let crate::modeldeployment::rollout::Step::Load { adapter, .. } = step;
            if adapter.name == failing && adapter.version == 2 {
                let r = p.rollouts.iter_mut().find(|r| r.adapter == failing).expect("rollout");
                r.failed_attempts = Some(r.failed_attempts.unwrap_or(0) + 1);
                r.message = Some("pod answered HTTP 500".into());
            }
        }
        md.status = Some(derive_status(&ObservedDeployment {
            md,
            desired: &desired,
            unresolved: &[],
            pods,
            plan: &p,
            endpoint: "http://e".into(),
            desired_replicas: 2,
            not_owned: &[],
            deadline_exceeded: None,
            now,
        }));
    }

    #[test]
    fn two_adapters_rolling_out_together_keep_their_own_records_one_fails_and_one_is_promoted() {
        let mut md = modeldeployment("modeldeployment.yaml");
        md.spec.replicas = Some(2);
        // bot-a's loads fail on both pods every time; bot-b's succeed.
        reconcile_once(&mut md, &[pod_serving("p1", 1, 1), pod_serving("p2", 1, 1)], "bot-a", 0);
        let after_b = [pod_serving("p1", 1, 2), pod_serving("p2", 1, 2)];
        reconcile_once(&mut md, &after_b, "bot-a", 3);
        reconcile_once(&mut md, &after_b, "bot-a", 6);

        let s = md.status.clone().expect("status");
        let state = |name: &str| {
            let r = s.rollouts.iter().find(|r| r.adapter == name).expect("rollout");
            (r.state, r.failed_attempts)
        };
        assert_eq!(
            state("bot-a"),
            (RolloutState::Failed, Some(4)),
            "bot-a's failed attempts add up over reconciles although bot-b rolls out too"
        );
        assert_eq!(state("bot-b").0, RolloutState::Promoted);
        let a = s.rollouts.iter().find(|r| r.adapter == "bot-a").expect("bot-a");
        assert_eq!(
            a.started_at,
            Some(Time(Timestamp::from_second(1_800_000_000).expect("valid")))
        );
        assert_eq!(s.phase, Some(ModelDeploymentPhase::Degraded));
        assert_eq!(
            s.rollout_history
                .iter()
                .map(|r| (r.adapter.as_str(), r.state))
                .collect::<Vec<_>>(),
            [("bot-a", RolloutState::Failed), ("bot-b", RolloutState::Promoted)]
        );
    }

    #[test]
    fn a_status_from_before_per_adapter_rollouts_is_read_through_its_single_rollout() {
        let mut old = ModelDeploymentStatus::default();
        let r = kubetune_crds::RolloutStatus {
            adapter: "bot-a".into(),
            to_version: 2,
            failed_attempts: Some(2),
            ..Default::default()
        };
        old.rollout = Some(r.clone());
        assert_eq!(recorded_rollouts(Some(&old)), [r]);
    }

    fn pod_status(value: serde_json::Value) -> PodStatus {
        serde_json::from_value(value).expect("pod status")
    }

    /// A pod that is not ready and says why.
    fn stuck_pod(name: &str, status: serde_json::Value) -> PodView {
        PodView {
            name: name.into(),
            problem: pod_problem(&pod_status(status)),
            ..Default::default()
        }
    }

    fn unschedulable() -> serde_json::Value {
        serde_json::json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]})
    }

    fn observe(md: &ModelDeployment, pods: &[PodView], deadline_exceeded: Option<String>) -> ModelDeploymentStatus {
        let policy = crate::modeldeployment::rollout::Policy {
            max_attempts: 3,
            canary: None,
            paused: false,
            abort: false,
        };
        let desired = [adapter(1)];
        let promoted = AdaptersFile {
            adapters: vec![adapter(1)],
        };
        let p = plan(&desired, &promoted, pods, &[], &policy, &now());
        derive_status(&ObservedDeployment {
            md,
            desired: &desired,
            unresolved: &[],
            pods,
            plan: &p,
            endpoint: "http://e".into(),
            desired_replicas: desired_replicas(md, None),
            not_owned: &[],
            deadline_exceeded,
            now: now(),
        })
    }

    fn ready_reason(s: &ModelDeploymentStatus) -> (String, String, String) {
        let c = s.conditions.iter().find(|c| c.type_ == READY).expect("Ready");
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    #[test]
    fn an_unschedulable_pod_shows_as_ready_false_reason_unschedulable_with_the_schedulers_message() {
        let md = modeldeployment("modeldeployment.yaml");
        let s = observe(&md, &[stuck_pod("support-x", unschedulable())], None);
        assert_eq!(s.phase, Some(ModelDeploymentPhase::Pending));
        assert_eq!(
            ready_reason(&s),
            (
                "False".into(),
                "Unschedulable".into(),
                "pod support-x: Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".into()
            )
        );
    }

    #[test]
    fn an_image_that_cannot_be_pulled_shows_as_image_pull_back_off_whichever_pull_error_the_kubelet_reports() {
        let md = modeldeployment("modeldeployment.yaml");
        for reason in ["ErrImagePull", "ImagePullBackOff"] {
            let status = serde_json::json!({"phase": "Pending", "containerStatuses": [{
                "name": "server", "image": "kubetune/server:nope", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": "manifest unknown"}},
            }]});
            let s = observe(&md, &[stuck_pod("support-x", status)], None);
            let (ready, got, message) = ready_reason(&s);
            assert_eq!(
                (ready.as_str(), got.as_str()),
                ("False", "ImagePullBackOff"),
                "{reason}"
            );
            assert_eq!(
                message,
                "pod support-x: ImagePullBackOff: container server: manifest unknown"
            );
        }
    }

    #[test]
    fn past_the_deployments_progress_deadline_the_reason_is_progress_deadline_exceeded_and_waiting_ends() {
        let md = modeldeployment("modeldeployment.yaml");
        let deployment: Deployment = serde_json::from_value(serde_json::json!({
            "spec": {"selector": {}, "template": {}},
            "status": {"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet \"support-5d4\" has timed out progressing."}]},
        }))
        .expect("deployment");
        let exceeded = deadline_exceeded(Some(&deployment));
        assert!(exceeded.is_some());
        let s = observe(&md, &[stuck_pod("support-x", unschedulable())], exceeded);
        assert_eq!(
            s.phase,
            Some(ModelDeploymentPhase::Failed),
            "nothing serves, and nothing will by waiting"
        );
        let (ready, reason, message) = ready_reason(&s);
        assert_eq!((ready.as_str(), reason.as_str()), ("False", "ProgressDeadlineExceeded"));
        assert!(
            message.starts_with(
                "ReplicaSet \"support-5d4\" has timed out progressing.; pod support-x: Unschedulable: 0/3"
            ),
            "{message}"
        );

        // Replicas of the previous template still serve: degraded, not failed.
        let s = observe(
            &md,
            &[pod("a", Some(1)), stuck_pod("support-x", unschedulable())],
            deadline_exceeded(Some(&deployment)),
        );
        assert_eq!(s.phase, Some(ModelDeploymentPhase::Degraded));
        assert_eq!(ready_reason(&s).1, "ProgressDeadlineExceeded");
    }

    #[test]
    fn a_deployment_still_progressing_or_done_is_not_past_its_deadline() {
        for reason in ["ReplicaSetUpdated", "NewReplicaSetAvailable"] {
            let deployment: Deployment = serde_json::from_value(serde_json::json!({
                "spec": {"selector": {}, "template": {}},
                "status": {"conditions": [{"type": "Progressing", "status": "True", "reason": reason}]},
            }))
            .expect("deployment");
            assert_eq!(deadline_exceeded(Some(&deployment)), None);
        }
        assert_eq!(deadline_exceeded(None), None);
    }
}
