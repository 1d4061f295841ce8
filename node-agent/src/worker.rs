//! One task per pod: sets the pod up, runs its containers, reports status, and tears it down
//! on deletion.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, FAKE_EXIT_CODE, FAKE_RUN_SECONDS};
use crate::container::{self, ContainerCtx, Fake, Outcome, Runner, Shared, Slot};
use crate::setup;
use crate::status::{self, ContainerRt, PodRt};

/// Why the pod's processes are being stopped.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ending {
    /// deletionTimestamp set: stop gracefully, then remove the object.
    Deleted,
    /// The object is gone (or no longer ours): just stop the processes.
    Vanished,
    /// The agent is exiting: stop the processes, touch nothing in the API.
    Shutdown,
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some(status::SUCCEEDED | status::FAILED)
    )
}

fn grace_of(pod: &Pod) -> Duration {
    let seconds = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
        .unwrap_or(30);
    Duration::from_secs(seconds.max(0) as u64)
}

/// The runtime state to start from. A pod this agent (or a previous run of it) already
/// started keeps its restart counts; a `Never` pod whose processes were lost fails, since
/// running its containers twice is exactly what `Never` forbids.
pub fn initial_rt(pod: &Pod, ip: &str, fake: bool) -> PodRt {
    let spec = pod.spec.clone().unwrap_or_default();
    let previous = pod.status.clone().unwrap_or_default();
    let policy = spec.restart_policy.clone().unwrap_or_else(|| "Always".into());
    let has_init = spec.init_containers.as_ref().is_some_and(|i| !i.is_empty());
    let mut lost = false;
    let mut restore =
        |name: &str, image: &str, reason: &str, old: Option<&k8s_openapi::api::core::v1::ContainerStatus>| {
            let mut c = ContainerRt::new(name, image, reason);
            if let Some(old) = old {
                let state = old.state.clone().unwrap_or_default();
                c.restart_count = old.restart_count;
                c.last_state = old.last_state.clone();
                c.container_id = old.container_id.clone();
                c.image_id = old.image_id.clone();
                if state.terminated.is_some() {
                    c.state = state;
                } else if state.running.is_some() {
                    lost = true;
                    c.last_state = Some(k8s_openapi::api::core::v1::ContainerState {
                        terminated: Some(k8s_openapi::api::core::v1::ContainerStateTerminated {
                            exit_code: 137,
                            reason: Some("Error".into()),
                            message: Some("the node agent restarted and lost this process".into()),
                            started_at: state.running.and_then(|r| r.started_at),
                            // When we noticed: the real end is unknown.
                            finished_at: Some(Time(Timestamp::now())),
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
                    if policy == "Never" {
                        c.state = c.last_state.take().unwrap_or_default();
                    } else {
                        c.restart_count += 1;
                    }
                }
            }
            c
        };
    let find = |list: &Option<Vec<k8s_openapi::api::core::v1::ContainerStatus>>, name: &str| {
        list.as_ref().and_then(|l| l.iter().find(|s| s.name == name)).cloned()
    };
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| {
            restore(
                &c.name,
                c.image.as_deref().unwrap_or(""),
                "PodInitializing",
                find(&previous.init_container_statuses, &c.name).as_ref(),
            )
        })
        .collect();
    let main_reason = if has_init {
        "PodInitializing"
    } else {
        "ContainerCreating"
    };
    let containers = spec
        .containers
        .iter()
        .map(|c| {
            restore(
                &c.name,
                c.image.as_deref().unwrap_or(""),
                main_reason,
                find(&previous.container_statuses, &c.name).as_ref(),
            )
        })
        .collect();
    PodRt {
        pod_ip: Some(ip.into()),
        host_ip: "127.0.0.1".into(),
        start_time: previous.start_time.or_else(|| Some(Time(Timestamp::now()))),
        sandbox_ready: fake,
        restart_policy: policy.clone(),
        init,
        containers,
        failed: (lost && policy == "Never").then(|| {
            (
                "NodeAgentRestarted".into(),
                "the node agent restarted and this pod's processes were lost".into(),
            )
        }),
    }
}

/// Runs one pod until it is deleted, vanishes, or the agent shuts down.
pub async fn run(agent: Arc<Agent>, mut pods: watch::Receiver<Option<Pod>>) {
    let Some(pod) = pods.borrow().clone() else {
        return;
    };
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let key = format!("{namespace}/{name}");
    let api: Api<Pod> = Api::namespaced(agent.client.clone(), &namespace);
    let old_ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());

    let stop = agent.shutdown.child_token();
    let ending = Arc::new(Mutex::new(None::<Ending>));
    let grace = Arc::new(Mutex::new(grace_of(&pod).min(Duration::from_secs(5))));
    let watch_task = tokio::spawn(watch_ending(
        pods.clone(),
        agent.shutdown.clone(),
        stop.clone(),
        ending.clone(),
        grace.clone(),
    ));

    let ip = match allocate(&agent, old_ip.as_deref(), &stop, &key).await {
        Some(ip) => ip,
        None => return finish(&agent, &api, &key, &pod, None, &ending, watch_task).await,
    };
    if is_terminal(&pod) {
        // Done before we saw it (e.g. across an agent restart): keep its IP until it is deleted.
        stop.cancelled().await;
        return finish(&agent, &api, &key, &pod, Some(ip), &ending, watch_task).await;
    }

    let rt = initial_rt(&pod, &ip.to_string(), agent.fake);
    let already_failed = rt.failed.is_some();
    let shared = Arc::new(Shared::new(rt));
    shared.dirty.notify_one();
    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(status_writer(
        api.clone(),
        name.clone(),
        shared.clone(),
        pods.clone(),
        writer_stop.clone(),
    ));
    let ctx = Arc::new(ContainerCtx {
        shared: shared.clone(),
        pod_name: key.clone(),
        stop: stop.clone(),
        grace: grace.clone(),
        backoff_base: agent.backoff_base,
        backoff_max: agent.backoff_max,
    });

    if !already_failed {
        run_containers(&agent, &pod, &ip.to_string(), &shared, &ctx, &stop, &mut pods).await;
    }
    // Finished or stopped: keep reporting until the pod is deleted or vanishes.
    stop.cancelled().await;
    writer_stop.cancel();
    let _ = writer.await;
    let end = *ending.lock().unwrap_or_else(|e| e.into_inner());
    if end == Some(Ending::Deleted) {
        // As kubelet does, a deleted pod ends in a terminal phase with its containers' final
        // states before the object goes: the Job controller counts the pod (and removes its
        // tracking finalizer) only once it sees Failed or Succeeded.
        report_terminal_status(&api, &name, &shared, &pods).await;
    }
    finish(&agent, &api, &key, &pod, Some(ip), &ending, watch_task).await
}

async fn allocate(agent: &Agent, wanted: Option<&str>, stop: &CancellationToken, key: &str) -> Option<Ipv4Addr> {
    loop {
        match agent.allocate_ip(wanted) {
            Ok(ip) => return Some(ip),
            Err(e) => tracing::error!(pod = %key, error = %e, "cannot allocate a pod IP; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.cancelled() => return None,
        }
    }
}

async fn run_containers(
    agent: &Arc<Agent>,
    pod: &Pod,
    ip: &str,
    shared: &Arc<Shared>,
    ctx: &Arc<ContainerCtx>,
    stop: &CancellationToken,
    pods: &mut watch::Receiver<Option<Pod>>,
) {
    let spec = pod.spec.clone().unwrap_or_default();
    let policy = spec.restart_policy.clone().unwrap_or_else(|| "Always".into());
    let dir = crate::volumes::pod_dir(&agent.state_dir, pod);
    let (init, main): (Vec<Runner>, Vec<Runner>) = if agent.fake {
        let exit = fake_exit(pod);
        (
            spec.init_containers
                .iter()
                .flatten()
                .map(|_| {
                    Runner::Fake(Fake {
                        exit: Some((0, Duration::ZERO)),
                    })
                })
                .collect(),
            spec.containers.iter().map(|_| Runner::Fake(Fake { exit })).collect(),
        )
    } else {
        let Some(prepared) = prepare_until_ready(agent, &ctx.pod_name, pod, ip, &dir, shared, stop).await else {
            return;
        };
        if let (Some(file), Some(ttl)) = (prepared.token_file.clone(), prepared.token_expires_in) {
            tokio::spawn(refresh_token(agent.clone(), pods.clone(), file, ttl, stop.clone()));
        }
        (
            prepared.init.into_iter().map(|l| Runner::Real(Box::new(l))).collect(),
            prepared
                .containers
                .into_iter()
                .map(|l| Runner::Real(Box::new(l)))
                .collect(),
        )
    };
    shared.update(|rt| rt.sandbox_ready = true);

    let init_policy = if policy == "Never" { "Never" } else { "OnFailure" };
    let init_done = shared.snapshot().init.iter().all(|c| c.exit_code() == Some(0));
    if !init_done {
        for (i, runner) in init.into_iter().enumerate() {
            if container::supervise(ctx.clone(), Slot::Init(i), runner, init_policy).await != Outcome::Succeeded {
                return;
            }
        }
    }
    let current = shared.snapshot();
    let mut running = Vec::new();
    for (i, runner) in main.into_iter().enumerate() {
        // Containers that already finished for good (before an agent restart) stay finished.
        let finished = current.containers[i]
            .exit_code()
            .is_some_and(|code| policy == "Never" || (code == 0 && policy == "OnFailure"));
        if finished {
            continue;
        }
        shared.update(|rt| rt.containers[i].set_waiting("ContainerCreating", None));
        running.push(container::supervise(ctx.clone(), Slot::Main(i), runner, &policy));
    }
    futures::future::join_all(running).await;
}

fn fake_exit(pod: &Pod) -> Option<(i32, Duration)> {
    let annotations = pod.metadata.annotations.as_ref()?;
    let code = annotations.get(FAKE_EXIT_CODE)?.trim().parse().ok()?;
    let seconds: f64 = annotations
        .get(FAKE_RUN_SECONDS)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0.0);
    Some((code, Duration::from_secs_f64(seconds.max(0.0))))
}

/// Retries setup with back-off, showing why it waits in the container statuses.
async fn prepare_until_ready(
    agent: &Agent,
    key: &str,
    pod: &Pod,
    ip: &str,
    dir: &std::path::Path,
    shared: &Shared,
    stop: &CancellationToken,
) -> Option<setup::Prepared> {
    let mut delay = Duration::from_secs(1);
    loop {
        match setup::prepare(agent, pod, ip, dir).await {
            Ok(prepared) => return Some(prepared),
            Err(failure) => {
                tracing::warn!(pod = %key, reason = failure.reason, message = %failure.message, "pod not ready to start");
                shared.update(|rt| {
                    for c in rt.init.iter_mut().chain(rt.containers.iter_mut()) {
                        if failure.container.as_deref().is_none_or(|n| n == c.name) {
                            c.set_waiting(failure.reason, Some(failure.message.clone()));
                        }
                    }
                });
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Re-requests the kubeconfig's token at 80% of its lifetime (kube clients re-read the file).
async fn refresh_token(
    agent: Arc<Agent>,
    pods: watch::Receiver<Option<Pod>>,
    file: std::path::PathBuf,
    mut ttl: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ttl.mul_f64(0.8)) => {}
            _ = stop.cancelled() => return,
        }
        let Some(pod) = pods.borrow().clone() else {
            return;
        };
        match setup::request_token(&agent, &pod, "").await {
            Ok((token, expires)) => {
                if let Err(e) = std::fs::write(&file, token) {
                    tracing::warn!(file = %file.display(), error = %e, "cannot write refreshed token");
                }
                ttl = expires.unwrap_or(ttl);
            }
            Err(e) => {
                tracing::warn!(message = %e.message, "token refresh failed; retrying in a minute");
                ttl = Duration::from_secs(75);
            }
        }
    }
}

/// Turns pod updates into an [`Ending`] and fires `stop` once.
async fn watch_ending(
    mut pods: watch::Receiver<Option<Pod>>,
    shutdown: CancellationToken,
    stop: CancellationToken,
    ending: Arc<Mutex<Option<Ending>>>,
    grace: Arc<Mutex<Duration>>,
) {
    loop {
        let observed = {
            let pod = pods.borrow_and_update();
            match pod.as_ref() {
                None => Some((Ending::Vanished, Duration::from_secs(2))),
                Some(p) if p.metadata.deletion_timestamp.is_some() => Some((Ending::Deleted, grace_of(p))),
                Some(_) => None,
            }
        };
        if let Some((end, period)) = observed {
            *grace.lock().unwrap_or_else(|e| e.into_inner()) = period;
            *ending.lock().unwrap_or_else(|e| e.into_inner()) = Some(end);
            stop.cancel();
            return;
        }
        tokio::select! {
            changed = pods.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => {
                *ending.lock().unwrap_or_else(|e| e.into_inner()) = Some(Ending::Shutdown);
                stop.cancel();
                return;
            }
        }
    }
}

async fn finish(
    agent: &Agent,
    api: &Api<Pod>,
    key: &str,
    pod: &Pod,
    ip: Option<Ipv4Addr>,
    ending: &Mutex<Option<Ending>>,
    watch_task: tokio::task::JoinHandle<()>,
) {
    watch_task.abort();
    let end = *ending.lock().unwrap_or_else(|e| e.into_inner());
    if end == Some(Ending::Deleted) {
        // As kubelet does: once the processes are gone, remove the object for good.
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api
            .delete(pod.metadata.name.as_deref().unwrap_or_default(), &params)
            .await
        {
            Ok(_) => tracing::info!(pod = %key, "pod deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => tracing::warn!(pod = %key, error = %e, "final pod deletion failed"),
        }
    }
    if end != Some(Ending::Shutdown) {
        if let Some(ip) = ip {
            agent.release_ip(ip);
        }
    }
}

/// Writes the deleted pod's last status, phase Succeeded when every container exited 0 and
/// Failed otherwise, retrying a few times with back-off.
async fn report_terminal_status(api: &Api<Pod>, name: &str, shared: &Shared, pods: &watch::Receiver<Option<Pod>>) {
    let Some(pod) = pods.borrow().clone() else {
        return;
    };
    let rt = shared.snapshot();
    let mut status = status::build(&pod, &rt, pod.status.as_ref(), &Time(Timestamp::now()));
    status.phase = Some(status::terminal_phase(&rt).into());
    let patch = serde_json::json!({ "status": status });
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=4 {
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 404 => return,
            Err(e) if attempt == 4 => tracing::warn!(pod = %name, error = %e, "could not report the final status"),
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

/// Reports the pod's status whenever the runtime state changes, retrying on API errors.
async fn status_writer(
    api: Api<Pod>,
    name: String,
    shared: Arc<Shared>,
    pods: watch::Receiver<Option<Pod>>,
    stop: CancellationToken,
) {
    let mut sent: Option<PodStatus> = None;
    loop {
        tokio::select! {
            _ = shared.dirty.notified() => {}
            _ = stop.cancelled() => return,
        }
        // Coalesce bursts of changes (e.g. every container starting) into one write.
        tokio::time::sleep(Duration::from_millis(50)).await;
        loop {
            let Some(pod) = pods.borrow().clone() else {
                return;
            };
            let rt = shared.snapshot();
            let status = status::build(
                &pod,
                &rt,
                sent.as_ref().or(pod.status.as_ref()),
                &Time(Timestamp::now()),
            );
            if sent.as_ref() == Some(&status) {
                break;
            }
            let patch = serde_json::json!({ "status": status });
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
            {
                Ok(_) => {
                    tracing::debug!(pod = %name, phase = ?status.phase, "status reported");
                    sent = Some(status);
                    break;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => return,
                Err(e) => tracing::warn!(pod = %name, error = %e, "status update failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerState, ContainerStateRunning, ContainerStatus, PodSpec};

    fn pod(policy: &str, state: ContainerState) -> Pod {
        Pod {
            spec: Some(PodSpec {
                restart_policy: Some(policy.into()),
                containers: vec![Container {
                    name: "main".into(),
                    image: Some("img".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: "main".into(),
                    restart_count: 2,
                    state: Some(state),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn running() -> ContainerState {
        ContainerState {
            running: Some(ContainerStateRunning { started_at: None }),
            ..Default::default()
        }
    }

    #[test]
    fn lost_never_pods_fail_and_others_restart_counting() {
        let never = initial_rt(&pod("Never", running()), "127.0.0.9", false);
        assert!(never.failed.is_some());
        assert_eq!(status::phase(&never), status::FAILED);
        assert_eq!(never.containers[0].exit_code(), Some(137));

        let always = initial_rt(&pod("Always", running()), "127.0.0.9", false);
        assert!(always.failed.is_none());
        assert_eq!(always.containers[0].restart_count, 3);
        assert!(always.containers[0]
            .last_state
            .as_ref()
            .is_some_and(|s| s.terminated.is_some()));
    }

    #[test]
    fn fresh_pods_start_pending() {
        let mut p = pod("Never", ContainerState::default());
        p.status = None;
        let rt = initial_rt(&p, "127.0.0.9", false);
        assert_eq!(status::phase(&rt), status::PENDING);
        assert_eq!(rt.pod_ip.as_deref(), Some("127.0.0.9"));
    }
}
