//! Pure planning of a hot-swap rollout: which pod loads which adapter version next, and when a
//! rollout is promoted or given up. The reconciler carries the plan out and calls again; every
//! decision is made from what the pods say they serve, never from what was sent to them.

use kubetune_crds::server_contract::{AdaptersFile, ServedAdapter};
use kubetune_crds::{RolloutState, RolloutStatus};
use std::collections::BTreeMap;

/// What one server pod reports through `GET /v1/models`.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    pub name: String,
    /// Ready according to its readiness probe (model and startup adapters loaded).
    pub ready: bool,
    /// Served adapters by name: (version, digest). None when the pod did not answer.
    pub served: Option<BTreeMap<String, (u32, String)>>,
}

/// One step for the reconciler to carry out.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Load this adapter version into this pod through its admin API.
    Load { pod: String, adapter: ServedAdapter },
}

/// The outcome of planning.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// What pods should load at start from now on (the adapters ConfigMap).
    pub promoted: AdaptersFile,
    /// The rollout in progress or just finished, if any adapter changed.
    pub rollouts: Vec<RolloutStatus>,
}

/// Whether `pod` serves exactly `adapter` (same version and digest).
fn serves(pod: &PodView, adapter: &ServedAdapter) -> bool {
    pod.served
        .as_ref()
        .and_then(|s| s.get(&adapter.name))
        .is_some_and(|(v, d)| *v == adapter.version && *d == adapter.digest)
}

/// Plans the next steps towards serving `desired` on every ready pod.
///
/// - `promoted`: what the ConfigMap says now (the versions every pod had when last promoted).
/// - `previous`: the rollouts recorded in status, which carry failed-attempt counts.
/// - `max_attempts`: failed loads of one version before its rollout fails.
pub fn plan(desired: &[ServedAdapter], promoted: &AdaptersFile, pods: &[PodView], previous: &[RolloutStatus], max_attempts: u32) -> Plan {
    let mut steps = Vec::new();
    let mut rollouts = Vec::new();
    let mut next_promoted: Vec<ServedAdapter> = Vec::new();
    let ready: Vec<&PodView> = pods.iter().filter(|p| p.ready && p.served.is_some()).collect();

    for want in desired {
        let before = promoted.adapters.iter().find(|a| a.name == want.name);
        if before == Some(want) {
            // Nothing to roll out; pods that lost it (e.g. restarted before the ConfigMap
            // changed) get it again.
            next_promoted.push(want.clone());
            steps.extend(ready.iter().filter(|p| !serves(p, want)).map(|p| Step::Load { pod: p.name.clone(), adapter: want.clone() }));
            continue;
        }
        let record = previous.iter().find(|r| r.adapter == want.name && r.to_digest.as_deref() == Some(want.digest.as_str()));
        let failed_attempts = record.and_then(|r| r.failed_attempts).unwrap_or(0);
        let mut rollout = RolloutStatus {
            state: RolloutState::Progressing,
            adapter: want.name.clone(),
            from_version: before.map(|b| b.version),
            to_version: want.version,
            to_digest: Some(want.digest.clone()),
            failed_attempts: Some(failed_attempts),
            started_at: record.and_then(|r| r.started_at.clone()),
            ..Default::default()
        };
        let gave_up = record.is_some_and(|r| r.state == RolloutState::Failed);
        if gave_up || failed_attempts >= max_attempts {
            // The previous version keeps serving; pods that did load the new one go back.
            rollout.state = RolloutState::Failed;
            rollout.reason = Some("AdapterLoadFailed".into());
            rollout.message = record.and_then(|r| r.message.clone());
            if let Some(old) = before {
                next_promoted.push(old.clone());
                steps.extend(ready.iter().filter(|p| !serves(p, old)).map(|p| Step::Load { pod: p.name.clone(), adapter: old.clone() }));
            }
        } else if !ready.is_empty() && ready.iter().all(|p| serves(p, want)) {
            rollout.state = RolloutState::Promoted;
            next_promoted.push(want.clone());
        } else {
            steps.extend(ready.iter().filter(|p| !serves(p, want)).map(|p| Step::Load { pod: p.name.clone(), adapter: want.clone() }));
            if let Some(old) = before {
                next_promoted.push(old.clone());
            } else if ready.is_empty() {
                // A new adapter and no pod yet: pods will load it at start.
                next_promoted.push(want.clone());
            }
        }
        rollouts.push(rollout);
    }
    Plan { steps, promoted: AdaptersFile { adapters: next_promoted }, rollouts }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(version: u32) -> ServedAdapter {
        ServedAdapter { name: "bot".into(), source: format!("bot@{version}"), version, digest: format!("sha256:{version}") }
    }

    fn pod(name: &str, served: Option<u32>) -> PodView {
        let served = served.map(|v| BTreeMap::from([("bot".to_string(), (v, format!("sha256:{v}")))]));
        PodView { name: name.into(), ready: true, served: Some(served.unwrap_or_default()) }
    }

    fn file(versions: &[u32]) -> AdaptersFile {
        AdaptersFile { adapters: versions.iter().map(|v| adapter(*v)).collect() }
    }

    #[test]
    fn steady_state_does_nothing() {
        let p = plan(&[adapter(1)], &file(&[1]), &[pod("a", Some(1)), pod("b", Some(1))], &[], 3);
        assert!(p.steps.is_empty());
        assert!(p.rollouts.is_empty());
        assert_eq!(p.promoted, file(&[1]));
    }

    #[test]
    fn a_restarted_pod_gets_the_promoted_version_again() {
        let p = plan(&[adapter(1)], &file(&[1]), &[pod("a", Some(1)), pod("b", None)], &[], 3);
        assert_eq!(p.steps, vec![Step::Load { pod: "b".into(), adapter: adapter(1) }]);
    }

    #[test]
    fn new_version_loads_everywhere_then_promotes() {
        let pods = [pod("a", Some(1)), pod("b", Some(1))];
        let p = plan(&[adapter(2)], &file(&[1]), &pods, &[], 3);
        assert_eq!(p.steps.len(), 2);
        assert_eq!(p.promoted, file(&[1]), "not promoted until every pod serves it");
        assert_eq!(p.rollouts[0].state, RolloutState::Progressing);
        assert_eq!((p.rollouts[0].from_version, p.rollouts[0].to_version), (Some(1), 2));

        let half = [pod("a", Some(2)), pod("b", Some(1))];
        let p = plan(&[adapter(2)], &file(&[1]), &half, &p.rollouts, 3);
        assert_eq!(p.steps, vec![Step::Load { pod: "b".into(), adapter: adapter(2) }]);

        let done = [pod("a", Some(2)), pod("b", Some(2))];
        let p = plan(&[adapter(2)], &file(&[1]), &done, &p.rollouts, 3);
        assert!(p.steps.is_empty());
        assert_eq!(p.rollouts[0].state, RolloutState::Promoted);
        assert_eq!(p.promoted, file(&[2]));
    }

    #[test]
    fn failed_loads_give_up_and_bring_every_pod_back() {
        let previous = vec![RolloutStatus {
            state: RolloutState::Progressing,
            adapter: "bot".into(),
            to_version: 3,
            to_digest: Some("sha256:3".into()),
            failed_attempts: Some(3),
            message: Some("digest mismatch".into()),
            ..Default::default()
        }];
        let pods = [pod("a", Some(3)), pod("b", Some(2))];
        let p = plan(&[adapter(3)], &file(&[2]), &pods, &previous, 3);
        assert_eq!(p.rollouts[0].state, RolloutState::Failed);
        assert_eq!(p.rollouts[0].message.as_deref(), Some("digest mismatch"));
        assert_eq!(p.steps, vec![Step::Load { pod: "a".into(), adapter: adapter(2) }]);
        assert_eq!(p.promoted, file(&[2]), "the previous version keeps serving");

        // Once failed, the same version is not tried again.
        let p2 = plan(&[adapter(3)], &file(&[2]), &[pod("a", Some(2)), pod("b", Some(2))], &p.rollouts, 3);
        assert!(p2.steps.is_empty());
        assert_eq!(p2.rollouts[0].state, RolloutState::Failed);
    }

    #[test]
    fn a_new_adapter_with_no_pods_yet_is_loaded_at_start() {
        let p = plan(&[adapter(1)], &file(&[]), &[], &[], 3);
        assert_eq!(p.promoted, file(&[1]));
        assert!(p.steps.is_empty());
    }

    #[test]
    fn unready_and_silent_pods_are_left_alone() {
        let mut starting = pod("c", None);
        starting.ready = false;
        let silent = PodView { name: "d".into(), ready: true, served: None };
        let p = plan(&[adapter(2)], &file(&[1]), &[pod("a", Some(1)), starting, silent], &[], 3);
        assert_eq!(p.steps, vec![Step::Load { pod: "a".into(), adapter: adapter(2) }]);
    }
}
