//! The agent's view of a pod's containers and the PodStatus built from it.
//!
//! Building the status is pure (`build`), so the phase and condition rules kubelet applies are
//! unit-tested here; the pod worker only mutates [`PodRt`] and asks for a rebuild.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, HostIP,
    Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// One container as the agent sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerRt {
    pub name: String,
    pub image: String,
    pub image_id: String,
    pub container_id: Option<String>,
    pub state: ContainerState,
    pub last_state: Option<ContainerState>,
    pub restart_count: i32,
    pub ready: bool,
    pub started: bool,
}

impl ContainerRt {
    pub fn new(name: &str, image: &str, reason: &str) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            image_id: String::new(),
            container_id: None,
            state: waiting(reason, None),
            last_state: None,
            restart_count: 0,
            ready: false,
            started: false,
        }
    }

    pub fn set_waiting(&mut self, reason: &str, message: Option<String>) {
        self.state = waiting(reason, message);
        self.ready = false;
        self.started = false;
    }

    pub fn set_running(&mut self, container_id: String, started_at: Time) {
        self.container_id = Some(container_id);
        self.state = ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(started_at),
            }),
            ..Default::default()
        };
        self.ready = false;
        self.started = false;
    }

    pub fn set_terminated(&mut self, terminated: ContainerStateTerminated) {
        self.state = ContainerState {
            terminated: Some(terminated),
            ..Default::default()
        };
        self.ready = false;
        self.started = false;
    }

    /// Moves the current (terminated) state to `lastState` before the container runs again.
    pub fn prepare_restart(&mut self, reason: &str, message: Option<String>) {
        let previous = std::mem::replace(&mut self.state, waiting(reason, message));
        self.last_state = Some(previous);
        self.restart_count += 1;
        self.ready = false;
        self.started = false;
    }

    pub fn running(&self) -> bool {
        self.state.running.is_some()
    }

    pub fn exit_code(&self) -> Option<i32> {
        self.state.terminated.as_ref().map(|t| t.exit_code)
    }

    fn to_status(&self) -> ContainerStatus {
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: self.image_id.clone(),
            container_id: self.container_id.clone(),
            state: Some(self.state.clone()),
            last_state: Some(self.last_state.clone().unwrap_or_default()),
            restart_count: self.restart_count,
            ready: self.ready,
            started: Some(self.started),
            ..Default::default()
        }
    }
}

pub fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..Default::default()
    }
}

/// The agent's runtime view of one pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodRt {
    pub pod_ip: Option<String>,
    pub host_ip: String,
    pub start_time: Option<Time>,
    /// Pod directory, volumes and IP are in place ("sandbox" in kubelet terms).
    pub sandbox_ready: bool,
    pub restart_policy: String,
    pub init: Vec<ContainerRt>,
    pub containers: Vec<ContainerRt>,
    /// Pod-level failure decided outside the container rules (e.g. lost across an agent restart).
    pub failed: Option<(String, String)>,
}

pub const PENDING: &str = "Pending";
pub const RUNNING: &str = "Running";
pub const SUCCEEDED: &str = "Succeeded";
pub const FAILED: &str = "Failed";

/// The pod phase by kubelet's rules.
pub fn phase(rt: &PodRt) -> &'static str {
    if rt.failed.is_some() {
        return FAILED;
    }
    let never = rt.restart_policy == "Never";
    for init in &rt.init {
        match init.exit_code() {
            Some(0) => {}
            Some(_) if never => return FAILED,
            _ => return PENDING,
        }
    }
    let (mut running, mut waiting, mut failed) = (0, 0, 0);
    for c in &rt.containers {
        if c.running() {
            running += 1;
        } else if let Some(code) = c.exit_code() {
            if code != 0 {
                failed += 1;
            }
        } else if let Some(code) = c
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code)
        {
            // Waiting to restart after a previous run: counts as stopped, not as never started.
            if code != 0 {
                failed += 1;
            }
        } else {
            waiting += 1;
        }
    }
    if waiting > 0 {
        return PENDING;
    }
    if running > 0 || rt.containers.is_empty() {
        return RUNNING;
    }
    match rt.restart_policy.as_str() {
        "Always" => RUNNING,
        "OnFailure" if failed > 0 => RUNNING,
        "Never" if failed > 0 => FAILED,
        _ => SUCCEEDED,
    }
}

/// The phase of a pod whose containers were stopped because it was deleted.
pub fn terminal_phase(rt: &PodRt) -> &'static str {
    if rt.failed.is_none() && !rt.containers.is_empty() && rt.containers.iter().all(|c| c.exit_code() == Some(0)) {
        SUCCEEDED
    } else {
        FAILED
    }
}

fn condition(type_: &str, ok: bool, reason: Option<&str>, message: Option<String>) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: if ok { None } else { reason.map(Into::into) },
        message: if ok { None } else { message },
        ..Default::default()
    }
}

/// Builds the status to report. `previous` (what was last reported) keeps condition transition
/// times stable while a condition's status does not change.
pub fn build(pod: &Pod, rt: &PodRt, previous: Option<&PodStatus>, now: &Time) -> PodStatus {
    let phase = phase(rt);
    let terminal = phase == SUCCEEDED || phase == FAILED;
    let initialized = rt.init.iter().all(|c| c.exit_code() == Some(0));
    let unready: Vec<&str> = rt
        .containers
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    let unready_message = format!("containers with unready status: [{}]", unready.join(" "));
    let containers_ready = unready.is_empty() && !terminal;
    // Readiness gates are set by other controllers; the pod is Ready only when they are True too.
    let gates_ok = pod
        .spec
        .iter()
        .flat_map(|s| s.readiness_gates.iter().flatten())
        .all(|gate| {
            pod.status
                .iter()
                .flat_map(|s| s.conditions.iter().flatten())
                .any(|c| c.type_ == gate.condition_type && c.status == "True")
        });
    let not_ready_reason = if terminal { "PodCompleted" } else { "ContainersNotReady" };
    let mut conditions = vec![
        condition("PodReadyToStartContainers", rt.sandbox_ready, None, None),
        condition(
            "Initialized",
            initialized,
            Some("ContainersNotInitialized"),
            Some(format!(
                "containers with incomplete status: [{}]",
                rt.init
                    .iter()
                    .filter(|c| c.exit_code() != Some(0))
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
        ),
        condition(
            "Ready",
            containers_ready && gates_ok,
            Some(not_ready_reason),
            Some(unready_message.clone()),
        ),
        condition(
            "ContainersReady",
            containers_ready,
            Some(not_ready_reason),
            Some(unready_message),
        ),
        condition("PodScheduled", true, None, None),
    ];
    if terminal {
        // Kubelet reports PodCompleted without a container list once a pod is done.
        for c in conditions
            .iter_mut()
            .filter(|c| c.type_ == "Ready" || c.type_ == "ContainersReady")
        {
            c.message = None;
        }
    }
    for c in &mut conditions {
        let kept = previous
            .and_then(|p| p.conditions.as_ref())
            .and_then(|list| list.iter().find(|old| old.type_ == c.type_ && old.status == c.status))
            .and_then(|old| old.last_transition_time.clone());
        c.last_transition_time = Some(kept.unwrap_or_else(|| now.clone()));
    }
    let (reason, message) = match &rt.failed {
        Some((reason, message)) => (Some(reason.clone()), Some(message.clone())),
        None => (None, None),
    };
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        host_ip: Some(rt.host_ip.clone()),
        host_ips: Some(vec![HostIP { ip: rt.host_ip.clone() }]),
        pod_ip: rt.pod_ip.clone(),
        pod_ips: rt.pod_ip.as_ref().map(|ip| vec![PodIP { ip: ip.clone() }]),
        start_time: rt.start_time.clone(),
        init_container_statuses: (!rt.init.is_empty()).then(|| rt.init.iter().map(ContainerRt::to_status).collect()),
        container_statuses: Some(rt.containers.iter().map(ContainerRt::to_status).collect()),
        reason,
        message,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn time(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid time"))
    }

    fn terminated(code: i32) -> ContainerStateTerminated {
        ContainerStateTerminated {
            exit_code: code,
            reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
            ..Default::default()
        }
    }

    fn rt(policy: &str, containers: Vec<ContainerRt>) -> PodRt {
        PodRt {
            pod_ip: Some("127.0.0.2".into()),
            host_ip: "127.0.0.1".into(),
            start_time: Some(time(1)),
            sandbox_ready: true,
            restart_policy: policy.into(),
            init: vec![],
            containers,
            failed: None,
        }
    }

    fn container(name: &str) -> ContainerRt {
        ContainerRt::new(name, "img", "ContainerCreating")
    }

    #[test]
    fn phases_follow_restart_policy() {
        let mut a = container("a");
        assert_eq!(phase(&rt("Never", vec![a.clone()])), PENDING);
        a.set_running("kubetune://1".into(), time(2));
        assert_eq!(phase(&rt("Never", vec![a.clone()])), RUNNING);
        let mut done = a.clone();
        done.set_terminated(terminated(0));
        let mut failed = a.clone();
        failed.set_terminated(terminated(3));
        assert_eq!(phase(&rt("Never", vec![done.clone()])), SUCCEEDED);
        assert_eq!(phase(&rt("Never", vec![failed.clone()])), FAILED);
        assert_eq!(phase(&rt("Never", vec![done.clone(), a.clone()])), RUNNING);
        assert_eq!(phase(&rt("OnFailure", vec![done.clone()])), SUCCEEDED);
        assert_eq!(phase(&rt("Always", vec![done.clone()])), RUNNING);
        // A container in back-off after a failure keeps an OnFailure pod Running.
        let mut backing_off = failed.clone();
        backing_off.prepare_restart("CrashLoopBackOff", None);
        assert_eq!(backing_off.restart_count, 1);
        assert_eq!(phase(&rt("OnFailure", vec![backing_off])), RUNNING);
    }

    #[test]
    fn deleted_pods_end_failed_unless_every_container_exited_zero() {
        let mut killed = container("a");
        killed.set_terminated(terminated(143));
        assert_eq!(terminal_phase(&rt("Always", vec![killed])), FAILED);
        let mut done = container("a");
        done.set_terminated(terminated(0));
        assert_eq!(terminal_phase(&rt("Never", vec![done])), SUCCEEDED);
        assert_eq!(terminal_phase(&rt("Never", vec![container("never-started")])), FAILED);
    }

    #[test]
    fn init_containers_gate_the_phase() {
        let mut pod_rt = rt("Never", vec![container("main")]);
        let mut init = container("init");
        pod_rt.init = vec![init.clone()];
        assert_eq!(phase(&pod_rt), PENDING);
        init.set_terminated(terminated(1));
        pod_rt.init = vec![init.clone()];
        assert_eq!(phase(&pod_rt), FAILED);
        pod_rt.restart_policy = "Always".into();
        assert_eq!(phase(&pod_rt), PENDING);
    }

    #[test]
    fn status_reports_readiness_ips_and_stable_transition_times() {
        let pod = Pod::default();
        let mut a = container("a");
        a.set_running("kubetune://42".into(), time(2));
        let mut pod_rt = rt("Always", vec![a]);
        let first = build(&pod, &pod_rt, None, &time(10));
        let cond = |s: &PodStatus, t: &str| {
            s.conditions
                .as_ref()
                .and_then(|c| c.iter().find(|c| c.type_ == t))
                .cloned()
                .expect("condition present")
        };
        assert_eq!(first.phase.as_deref(), Some(RUNNING));
        assert_eq!(first.pod_ip.as_deref(), Some("127.0.0.2"));
        assert_eq!(first.pod_ips.as_ref().map(|v| v[0].ip.as_str()), Some("127.0.0.2"));
        assert_eq!(cond(&first, "Ready").status, "False");
        assert_eq!(
            cond(&first, "Ready").message.as_deref(),
            Some("containers with unready status: [a]")
        );
        let statuses = first.container_statuses.clone().expect("container statuses");
        assert_eq!(statuses[0].container_id.as_deref(), Some("kubetune://42"));

        pod_rt.containers[0].ready = true;
        pod_rt.containers[0].started = true;
        let second = build(&pod, &pod_rt, Some(&first), &time(20));
        assert_eq!(cond(&second, "Ready").status, "True");
        assert_eq!(cond(&second, "Ready").last_transition_time, Some(time(20)));
        assert_eq!(cond(&second, "Initialized").last_transition_time, Some(time(10)));
    }

    #[test]
    fn completed_pods_are_not_ready() {
        let mut a = container("a");
        a.set_terminated(terminated(0));
        let status = build(&Pod::default(), &rt("Never", vec![a]), None, &time(5));
        assert_eq!(status.phase.as_deref(), Some(SUCCEEDED));
        let ready = status
            .conditions
            .expect("conditions")
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some("PodCompleted"))
        );
    }
}
