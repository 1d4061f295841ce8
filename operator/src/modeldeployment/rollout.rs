//! Pure planning of a hot-swap rollout: which pod loads which adapter version next, and when a
//! rollout is promoted or given up. The reconciler carries the plan out and calls again; every
//! decision is made from what the pods say they serve, never from what was sent to them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kubetune_crds::server_contract::{AdaptersFile, ServedAdapter};
use kubetune_crds::{CanaryStatus, RolloutState, RolloutStatus, ServingCounters};
use std::collections::{BTreeMap, BTreeSet};

/// What one server pod reports through `GET /v1/models` (and `/metrics` during a canary).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodView {
    pub name: String,
    /// Ready according to its readiness probe (model and startup adapters loaded).
    pub ready: bool,
    /// Served adapters by name: (version, digest). None when the pod did not answer.
    pub served: Option<BTreeMap<String, (u32, String)>>,
    /// Why the pod cannot start, when Kubernetes says so (unschedulable, image not pulled).
    pub problem: Option<PodProblem>,
    /// Request counters by adapter name; read only while a canary is analysed.
    pub counters: BTreeMap<String, ServingCounters>,
}

/// Why a pod is stuck before it can serve: a condition reason (e.g. Unschedulable, or
/// ImagePullBackOff standing for ErrImagePull too) and Kubernetes' message.
#[derive(Clone, Debug, PartialEq)]
pub struct PodProblem {
    pub reason: String,
    pub message: String,
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

/// How versions reach the pods, from spec.rollout with defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Failed loads of one version before its rollout fails.
    pub max_attempts: u32,
    /// Canary settings; None for hot swap.
    pub canary: Option<CanaryPolicy>,
    /// Hold the rollout where it is.
    pub paused: bool,
    /// Withdraw the new version everywhere.
    pub abort: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CanaryPolicy {
    pub replica_percent: u32,
    pub analysis_seconds: u32,
    pub max_error_rate: f64,
    pub max_p99_latency_ms: Option<u32>,
}

/// Whether `pod` serves exactly `adapter` (same version and digest).
fn serves(pod: &PodView, adapter: &ServedAdapter) -> bool {
    pod.served
        .as_ref()
        .and_then(|s| s.get(&adapter.name))
        .is_some_and(|(v, d)| *v == adapter.version && *d == adapter.digest)
}

fn load_where_missing(pods: &[&PodView], adapter: &ServedAdapter) -> Vec<Step> {
    pods.iter()
        .filter(|p| !serves(p, adapter))
        .map(|p| Step::Load {
            pod: p.name.clone(),
            adapter: adapter.clone(),
        })
        .collect()
}

/// An adapter a pod serves under a name that spec.adapters no longer has.
#[derive(Clone, Debug, PartialEq)]
pub struct Unload {
    pub pod: String,
    pub adapter: String,
}

/// The adapters to unload from running pods: those served under a name `named` no longer holds
/// (removed from spec.adapters). Pods that start later do not load them anyway (the promoted
/// adapters file follows the spec), but running pods keep what they hot-loaded until told.
/// By name, not by version: a version change is a rollout, and an adapter that cannot be
/// resolved keeps serving its promoted version.
pub fn unloads(named: &BTreeSet<&str>, pods: &[PodView]) -> Vec<Unload> {
    pods.iter()
        .filter(|p| p.ready)
        .flat_map(|p| {
            p.served
                .iter()
                .flat_map(|served| served.keys())
                .filter(|name| !named.contains(name.as_str()))
                .map(|name| Unload {
                    pod: p.name.clone(),
                    adapter: name.clone(),
                })
        })
        .collect()
}

/// Plans the next steps towards serving `desired` on every ready pod.
///
/// - `promoted`: what the ConfigMap says now (the versions every pod had when last promoted).
/// - `previous`: the rollouts recorded in status, which carry failed-attempt counts and the canary.
pub fn plan(
    desired: &[ServedAdapter],
    promoted: &AdaptersFile,
    pods: &[PodView],
    previous: &[RolloutStatus],
    policy: &Policy,
    now: &Time,
) -> Plan {
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
            steps.extend(load_where_missing(&ready, want));
            continue;
        }
        let record = previous
            .iter()
            .find(|r| r.adapter == want.name && r.to_digest.as_deref() == Some(want.digest.as_str()));
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
        let ended = record.filter(|r| matches!(r.state, RolloutState::Failed | RolloutState::RolledBack));
        let outcome = if let Some(ended) = ended {
            // A version that failed or was rolled back is not tried again until the spec or
            // the registry points elsewhere.
            Outcome::Withdraw {
                state: ended.state,
                reason: ended.reason.clone(),
                message: ended.message.clone(),
            }
        } else if failed_attempts >= policy.max_attempts {
            Outcome::Withdraw {
                state: RolloutState::Failed,
                reason: Some("AdapterLoadFailed".into()),
                message: record.and_then(|r| r.message.clone()),
            }
        } else if policy.abort && before.is_some() {
            Outcome::Withdraw {
                state: RolloutState::RolledBack,
                reason: Some("Aborted".into()),
                message: Some("spec.rollout.abort is true".into()),
            }
        } else if policy.paused && record.is_some() {
            Outcome::Hold(record.cloned())
        } else if let (Some(canary), Some(_)) = (&policy.canary, before) {
            canary_step(canary, want, &ready, record, now)
        } else {
            Outcome::LoadEverywhere
        };
        match outcome {
            Outcome::Withdraw { state, reason, message } => {
                rollout.state = state;
                rollout.reason = reason;
                rollout.message = message;
                rollout.canary = record.and_then(|r| r.canary.clone());
                if let Some(old) = before {
                    next_promoted.push(old.clone());
                    steps.extend(load_where_missing(&ready, old));
                }
            }
            Outcome::Hold(held) => {
                let held = held.unwrap_or_default();
                rollout.state = held.state;
                rollout.canary = held.canary;
                rollout.reason = Some("Paused".into());
                rollout.message = Some("spec.rollout.paused is true".into());
                next_promoted.extend(before.cloned());
            }
            Outcome::Canary {
                steps: more,
                status,
                message,
            } => {
                rollout.state = RolloutState::Canary;
                rollout.canary = Some(status);
                rollout.message = Some(message);
                steps.extend(more);
                next_promoted.extend(before.cloned());
            }
            Outcome::LoadEverywhere | Outcome::Promote(_) => {
                if let Outcome::Promote(status) = &outcome {
                    rollout.canary = Some(status.clone());
                }
                if !ready.is_empty() && ready.iter().all(|p| serves(p, want)) {
                    rollout.state = RolloutState::Promoted;
                    next_promoted.push(want.clone());
                } else {
                    steps.extend(load_where_missing(&ready, want));
                    match before {
                        Some(old) => next_promoted.push(old.clone()),
                        // A new adapter and no pod yet: pods will load it at start.
                        None if ready.is_empty() => next_promoted.push(want.clone()),
                        None => {}
                    }
                }
            }
            Outcome::RollBack { status, message } => {
                rollout.state = RolloutState::RolledBack;
                rollout.reason = Some("CanaryAnalysisFailed".into());
                rollout.message = Some(message);
                rollout.canary = Some(status);
                if let Some(old) = before {
                    next_promoted.push(old.clone());
                    steps.extend(load_where_missing(&ready, old));
                }
            }
        }
        rollouts.push(rollout);
    }
    Plan {
        steps,
        promoted: AdaptersFile {
            adapters: next_promoted,
        },
        rollouts,
    }
}

/// What to do with one changed adapter.
enum Outcome {
    /// Bring every pod back to the previous version and end the rollout in `state`.
    Withdraw {
        state: RolloutState,
        reason: Option<String>,
        message: Option<String>,
    },
    /// Paused: no steps; keep the recorded rollout as it is.
    Hold(Option<RolloutStatus>),
    /// Hot swap, or a canary that passed: load everywhere, promote when all serve it.
    LoadEverywhere,
    Promote(CanaryStatus),
    /// Canary in progress: load into the canary pods, then analyse.
    Canary {
        steps: Vec<Step>,
        status: CanaryStatus,
        message: String,
    },
    /// The canary's analysis failed.
    RollBack {
        status: CanaryStatus,
        message: String,
    },
}

/// The canary's next move: pick pods, load them, open the analysis window, then judge.
fn canary_step(
    policy: &CanaryPolicy,
    want: &ServedAdapter,
    ready: &[&PodView],
    record: Option<&RolloutStatus>,
    now: &Time,
) -> Outcome {
    let mut status = record.and_then(|r| r.canary.clone()).unwrap_or_default();
    if status.passed {
        return Outcome::Promote(status);
    }
    // Keep the chosen pods while they are ready; choose again if one went away.
    if status.pods.is_empty() || !status.pods.iter().all(|n| ready.iter().any(|p| &p.name == n)) {
        let mut names: Vec<String> = ready.iter().map(|p| p.name.clone()).collect();
        names.sort();
        let count = (names.len() * policy.replica_percent as usize).div_ceil(100).max(1);
        names.truncate(count);
        status = CanaryStatus {
            pods: names,
            ..Default::default()
        };
    }
    let canary: Vec<&PodView> = ready
        .iter()
        .filter(|p| status.pods.contains(&p.name))
        .copied()
        .collect();
    if canary.is_empty() {
        return Outcome::Canary {
            steps: vec![],
            status,
            message: "waiting for a ready replica".into(),
        };
    }
    let loading = load_where_missing(&canary, want);
    if !loading.is_empty() {
        status.analysis_started_at = None;
        status.baseline.clear();
        let message = format!("loading v{} into {} canary replica(s)", want.version, canary.len());
        return Outcome::Canary {
            steps: loading,
            status,
            message,
        };
    }
    let Some(started) = status.analysis_started_at.clone() else {
        status.analysis_started_at = Some(now.clone());
        status.baseline = canary.iter().map(|p| counters(p, &want.name)).collect();
        let message = format!(
            "{} of {} replicas serve v{}; analysing for {}s",
            canary.len(),
            ready.len(),
            want.version,
            policy.analysis_seconds
        );
        return Outcome::Canary {
            steps: vec![],
            status,
            message,
        };
    };
    let elapsed = now.0.duration_since(started.0).as_secs_f64();
    if elapsed < f64::from(policy.analysis_seconds) {
        let message = format!(
            "{} of {} replicas serve v{}; analysing for {}s",
            canary.len(),
            ready.len(),
            want.version,
            policy.analysis_seconds
        );
        return Outcome::Canary {
            steps: vec![],
            status,
            message,
        };
    }
    let current: Vec<ServingCounters> = canary.iter().map(|p| counters(p, &want.name)).collect();
    match judge(policy, &status.baseline, &current) {
        Ok(_) => {
            status.passed = true;
            Outcome::Promote(status)
        }
        Err(message) => Outcome::RollBack { status, message },
    }
}

fn counters(pod: &PodView, adapter: &str) -> ServingCounters {
    let mut c = pod.counters.get(adapter).cloned().unwrap_or_default();
    c.pod = pod.name.clone();
    c
}

/// Compares the canary's counters now with the baseline: Err says which limit it broke.
pub fn judge(
    policy: &CanaryPolicy,
    baseline: &[ServingCounters],
    current: &[ServingCounters],
) -> Result<String, String> {
    let before = |pod: &str| baseline.iter().find(|b| b.pod == pod).cloned().unwrap_or_default();
    let (mut requests, mut errors) = (0.0, 0.0);
    let mut buckets: BTreeMap<String, (Option<f64>, f64)> = BTreeMap::new();
    for now in current {
        let then = before(&now.pod);
        // A restarted pod's counters start again from zero: count from there.
        let restarted = now.requests < then.requests;
        let (r0, e0) = if restarted {
            (0.0, 0.0)
        } else {
            (then.requests, then.errors)
        };
        requests += now.requests - r0;
        errors += now.errors - e0;
        for b in &now.latency {
            let old = if restarted {
                0.0
            } else {
                then.latency.iter().find(|x| x.le == b.le).map_or(0.0, |x| x.count)
            };
            let key = b.le.map_or("+Inf".to_string(), |le| format!("{le:020.6}"));
            buckets.entry(key).or_insert((b.le, 0.0)).1 += b.count - old;
        }
    }
    if requests <= 0.0 {
        return Ok("no canary traffic during the analysis; the version loaded cleanly".into());
    }
    let error_rate = errors / requests;
    if error_rate > policy.max_error_rate {
        return Err(format!(
            "error rate {:.1}% over {requests} requests exceeds {:.1}%",
            error_rate * 100.0,
            policy.max_error_rate * 100.0
        ));
    }
    if let Some(limit_ms) = policy.max_p99_latency_ms {
        let mut sorted: Vec<(Option<f64>, f64)> = buckets.into_values().collect();
        sorted.sort_by(|a, b| a.0.unwrap_or(f64::INFINITY).total_cmp(&b.0.unwrap_or(f64::INFINITY)));
        let p99 = sorted
            .iter()
            .find(|(_, count)| *count >= 0.99 * requests)
            .and_then(|(le, _)| *le)
            .unwrap_or(f64::INFINITY);
        if p99 * 1000.0 > f64::from(limit_ms) {
            return Err(format!(
                "p99 latency {:.0} ms (histogram bound) exceeds {limit_ms} ms",
                p99 * 1000.0
            ));
        }
    }
    Ok(format!(
        "error rate {:.1}% over {requests} requests",
        error_rate * 100.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(version: u32) -> ServedAdapter {
        ServedAdapter {
            name: "bot".into(),
            source: format!("bot@{version}"),
            version,
            digest: format!("sha256:{version}"),
        }
    }

    fn pod(name: &str, served: Option<u32>) -> PodView {
        let served = served.map(|v| BTreeMap::from([("bot".to_string(), (v, format!("sha256:{v}")))]));
        PodView {
            name: name.into(),
            ready: true,
            served: Some(served.unwrap_or_default()),
            ..Default::default()
        }
    }

    #[test]
    fn an_adapter_removed_from_the_spec_is_unloaded_from_every_ready_pod_and_the_others_stay() {
        let mut both = pod("p1", Some(2));
        both.served
            .get_or_insert_with(Default::default)
            .insert("old".into(), (1, "sha256:1".into()));
        let starting = PodView {
            ready: false,
            ..both.clone()
        };
        let silent = PodView {
            served: None,
            ..pod("p3", None)
        };
        let pods = [both, pod("p2", Some(1)), starting, silent];
        assert_eq!(
            unloads(&BTreeSet::from(["bot"]), &pods),
            [Unload {
                pod: "p1".into(),
                adapter: "old".into()
            }],
            "only `old` is gone from the spec; a pod not ready or not answering is left alone"
        );
        assert_eq!(
            unloads(&BTreeSet::new(), &pods)
                .iter()
                .map(|u| (u.pod.as_str(), u.adapter.as_str()))
                .collect::<Vec<_>>(),
            [("p1", "bot"), ("p1", "old"), ("p2", "bot")]
        );
    }

    fn hot(max_attempts: u32) -> Policy {
        Policy {
            max_attempts,
            canary: None,
            paused: false,
            abort: false,
        }
    }

    fn at(second: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + second).expect("valid"))
    }

    fn file(versions: &[u32]) -> AdaptersFile {
        AdaptersFile {
            adapters: versions.iter().map(|v| adapter(*v)).collect(),
        }
    }

    #[test]
    fn steady_state_does_nothing() {
        let p = plan(
            &[adapter(1)],
            &file(&[1]),
            &[pod("a", Some(1)), pod("b", Some(1))],
            &[],
            &hot(3),
            &at(0),
        );
        assert!(p.steps.is_empty());
        assert!(p.rollouts.is_empty());
        assert_eq!(p.promoted, file(&[1]));
    }

    #[test]
    fn a_restarted_pod_gets_the_promoted_version_again() {
        let p = plan(
            &[adapter(1)],
            &file(&[1]),
            &[pod("a", Some(1)), pod("b", None)],
            &[],
            &hot(3),
            &at(0),
        );
        assert_eq!(
            p.steps,
            vec![Step::Load {
                pod: "b".into(),
                adapter: adapter(1)
            }]
        );
    }

    #[test]
    fn new_version_loads_everywhere_then_promotes() {
        let pods = [pod("a", Some(1)), pod("b", Some(1))];
        let p = plan(&[adapter(2)], &file(&[1]), &pods, &[], &hot(3), &at(0));
        assert_eq!(p.steps.len(), 2);
        assert_eq!(p.promoted, file(&[1]), "not promoted until every pod serves it");
        assert_eq!(p.rollouts[0].state, RolloutState::Progressing);
        assert_eq!((p.rollouts[0].from_version, p.rollouts[0].to_version), (Some(1), 2));

        let half = [pod("a", Some(2)), pod("b", Some(1))];
        let p = plan(&[adapter(2)], &file(&[1]), &half, &p.rollouts, &hot(3), &at(0));
        assert_eq!(
            p.steps,
            vec![Step::Load {
                pod: "b".into(),
                adapter: adapter(2)
            }]
        );

        let done = [pod("a", Some(2)), pod("b", Some(2))];
        let p = plan(&[adapter(2)], &file(&[1]), &done, &p.rollouts, &hot(3), &at(0));
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
        let p = plan(&[adapter(3)], &file(&[2]), &pods, &previous, &hot(3), &at(0));
        assert_eq!(p.rollouts[0].state, RolloutState::Failed);
        assert_eq!(p.rollouts[0].message.as_deref(), Some("digest mismatch"));
        assert_eq!(
            p.steps,
            vec![Step::Load {
                pod: "a".into(),
                adapter: adapter(2)
            }]
        );
        assert_eq!(p.promoted, file(&[2]), "the previous version keeps serving");

        // Once failed, the same version is not tried again.
        let p2 = plan(
            &[adapter(3)],
            &file(&[2]),
            &[pod("a", Some(2)), pod("b", Some(2))],
            &p.rollouts,
            &hot(3),
            &at(0),
        );
        assert!(p2.steps.is_empty());
        assert_eq!(p2.rollouts[0].state, RolloutState::Failed);
    }

    #[test]
    fn a_new_adapter_with_no_pods_yet_is_loaded_at_start() {
        let p = plan(&[adapter(1)], &file(&[]), &[], &[], &hot(3), &at(0));
        assert_eq!(p.promoted, file(&[1]));
        assert!(p.steps.is_empty());
    }

    #[test]
    fn unready_and_silent_pods_are_left_alone() {
        let mut starting = pod("c", None);
        starting.ready = false;
        let silent = PodView {
            name: "d".into(),
            ready: true,
            served: None,
            ..Default::default()
        };
        let p = plan(
            &[adapter(2)],
            &file(&[1]),
            &[pod("a", Some(1)), starting, silent],
            &[],
            &hot(3),
            &at(0),
        );
        assert_eq!(
            p.steps,
            vec![Step::Load {
                pod: "a".into(),
                adapter: adapter(2)
            }]
        );
    }

    fn canary(analysis_seconds: u32) -> Policy {
        let canary = CanaryPolicy {
            replica_percent: 25,
            analysis_seconds,
            max_error_rate: 0.05,
            max_p99_latency_ms: Some(2000),
        };
        Policy {
            canary: Some(canary),
            ..hot(3)
        }
    }

    fn with_counters(mut pod: PodView, requests: f64, errors: f64, slow: f64) -> PodView {
        let latency = vec![
            kubetune_crds::LatencyBucket {
                le: Some(1.0),
                count: requests - slow,
            },
            kubetune_crds::LatencyBucket {
                le: Some(5.0),
                count: requests,
            },
            kubetune_crds::LatencyBucket {
                le: None,
                count: requests,
            },
        ];
        pod.counters.insert(
            "bot".into(),
            ServingCounters {
                pod: pod.name.clone(),
                requests,
                errors,
                latency,
            },
        );
        pod
    }

    /// Drives a canary over four pods to the analysis; returns the rollout record at that point.
    fn canary_under_analysis() -> Vec<RolloutStatus> {
        let pods = [
            pod("d", Some(1)),
            pod("c", Some(1)),
            pod("b", Some(1)),
            pod("a", Some(1)),
        ];
        let p = plan(&[adapter(2)], &file(&[1]), &pods, &[], &canary(60), &at(0));
        assert_eq!(
            p.steps,
            vec![Step::Load {
                pod: "a".into(),
                adapter: adapter(2)
            }],
            "25% of 4 replicas, first by name"
        );
        assert_eq!(p.rollouts[0].state, RolloutState::Canary);
        assert_eq!(p.promoted, file(&[1]));

        let pods = [
            with_counters(pod("a", Some(2)), 10.0, 0.0, 0.0),
            pod("b", Some(1)),
            pod("c", Some(1)),
            pod("d", Some(1)),
        ];
        let p = plan(&[adapter(2)], &file(&[1]), &pods, &p.rollouts, &canary(60), &at(5));
        assert!(p.steps.is_empty(), "only the canary serves v2 while it is analysed");
        let status = p.rollouts[0].canary.clone().expect("canary");
        assert_eq!(
            (status.analysis_started_at, status.baseline[0].requests),
            (Some(at(5)), 10.0)
        );
        p.rollouts
    }

    #[test]
    fn a_healthy_canary_is_promoted_after_its_window() {
        let record = canary_under_analysis();
        let pods = |v: u32| {
            [
                with_counters(pod("a", Some(2)), 110.0, 1.0, 0.0),
                pod("b", Some(v)),
                pod("c", Some(v)),
                pod("d", Some(v)),
            ]
        };
        let early = plan(&[adapter(2)], &file(&[1]), &pods(1), &record, &canary(60), &at(30));
        assert!(early.steps.is_empty());
        assert_eq!(early.rollouts[0].state, RolloutState::Canary);

        let judged = plan(
            &[adapter(2)],
            &file(&[1]),
            &pods(1),
            &early.rollouts,
            &canary(60),
            &at(66),
        );
        assert_eq!(judged.steps.len(), 3, "1% errors is within 5%: load the rest");
        assert!(judged.rollouts[0].canary.as_ref().is_some_and(|c| c.passed));

        let done = plan(
            &[adapter(2)],
            &file(&[1]),
            &pods(2),
            &judged.rollouts,
            &canary(60),
            &at(70),
        );
        assert_eq!(done.rollouts[0].state, RolloutState::Promoted);
        assert_eq!(done.promoted, file(&[2]));
    }

    #[test]
    fn a_failing_canary_is_rolled_back_and_not_retried() {
        let record = canary_under_analysis();
        let pods = [
            with_counters(pod("a", Some(2)), 30.0, 6.0, 0.0),
            pod("b", Some(1)),
            pod("c", Some(1)),
            pod("d", Some(1)),
        ];
        let p = plan(&[adapter(2)], &file(&[1]), &pods, &record, &canary(60), &at(70));
        assert_eq!(p.rollouts[0].state, RolloutState::RolledBack);
        assert_eq!(p.rollouts[0].reason.as_deref(), Some("CanaryAnalysisFailed"));
        assert!(
            p.rollouts[0]
                .message
                .as_deref()
                .is_some_and(|m| m.contains("error rate 30.0%")),
            "{:?}",
            p.rollouts[0].message
        );
        assert_eq!(
            p.steps,
            vec![Step::Load {
                pod: "a".into(),
                adapter: adapter(1)
            }]
        );
        assert_eq!(p.promoted, file(&[1]));

        let back = [
            pod("a", Some(1)),
            pod("b", Some(1)),
            pod("c", Some(1)),
            pod("d", Some(1)),
        ];
        let again = plan(&[adapter(2)], &file(&[1]), &back, &p.rollouts, &canary(60), &at(80));
        assert!(again.steps.is_empty());
        assert_eq!(again.rollouts[0].state, RolloutState::RolledBack);
    }

    #[test]
    fn a_slow_canary_is_rolled_back() {
        let record = canary_under_analysis();
        let pods = [
            with_counters(pod("a", Some(2)), 110.0, 0.0, 50.0),
            pod("b", Some(1)),
            pod("c", Some(1)),
            pod("d", Some(1)),
        ];
        let p = plan(&[adapter(2)], &file(&[1]), &pods, &record, &canary(60), &at(70));
        assert_eq!(p.rollouts[0].state, RolloutState::RolledBack);
        assert!(
            p.rollouts[0]
                .message
                .as_deref()
                .is_some_and(|m| m.contains("p99 latency 5000 ms")),
            "{:?}",
            p.rollouts[0].message
        );
    }

    #[test]
    fn pause_holds_and_abort_withdraws() {
        let record = canary_under_analysis();
        let pods = [pod("a", Some(2)), pod("b", Some(1))];
        let paused = Policy {
            paused: true,
            ..canary(60)
        };
        let p = plan(&[adapter(2)], &file(&[1]), &pods, &record, &paused, &at(500));
        assert!(p.steps.is_empty());
        assert_eq!(
            (p.rollouts[0].state, p.rollouts[0].reason.as_deref()),
            (RolloutState::Canary, Some("Paused"))
        );

        let abort = Policy {
            abort: true,
            ..canary(60)
        };
        let p = plan(&[adapter(2)], &file(&[1]), &pods, &record, &abort, &at(500));
        assert_eq!(
            (p.rollouts[0].state, p.rollouts[0].reason.as_deref()),
            (RolloutState::RolledBack, Some("Aborted"))
        );
        assert_eq!(
            p.steps,
            vec![Step::Load {
                pod: "a".into(),
                adapter: adapter(1)
            }]
        );
    }

    #[test]
    fn a_restarted_canary_pod_counts_from_zero() {
        let policy = CanaryPolicy {
            replica_percent: 50,
            analysis_seconds: 1,
            max_error_rate: 0.1,
            max_p99_latency_ms: None,
        };
        let baseline = vec![ServingCounters {
            pod: "a".into(),
            requests: 100.0,
            errors: 0.0,
            latency: vec![],
        }];
        let now = vec![ServingCounters {
            pod: "a".into(),
            requests: 10.0,
            errors: 5.0,
            latency: vec![],
        }];
        assert!(judge(&policy, &baseline, &now).is_err_and(|m| m.contains("50.0%")));
    }
}
