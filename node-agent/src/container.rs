//! Supervising one container: start, probe, collect the exit, restart with back-off.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ContainerStateTerminated;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::probes::{self, ProbeEvent};
use crate::process::{self, Exit};
use crate::setup::Launch;
use crate::status::{ContainerRt, PodRt};

/// The pod's runtime state plus a doorbell for the status writer.
pub struct Shared {
    rt: Mutex<PodRt>,
    pub dirty: Notify,
}

impl Shared {
    pub fn new(rt: PodRt) -> Self {
        Self {
            rt: Mutex::new(rt),
            dirty: Notify::new(),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut PodRt)) {
        f(&mut self.rt.lock().unwrap_or_else(|e| e.into_inner()));
        self.dirty.notify_one();
    }

    pub fn snapshot(&self) -> PodRt {
        self.rt.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Slot {
    Init(usize),
    Main(usize),
}

impl Slot {
    pub fn get(self, rt: &mut PodRt) -> Option<&mut ContainerRt> {
        match self {
            Slot::Init(i) => rt.init.get_mut(i),
            Slot::Main(i) => rt.containers.get_mut(i),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Stopped,
}

/// What the supervisor needs from its pod.
pub struct ContainerCtx {
    pub shared: Arc<Shared>,
    pub pod_name: String,
    pub stop: CancellationToken,
    /// Grace period to use when `stop` fires (set by whoever cancels).
    pub grace: Arc<Mutex<Duration>>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// A fake container's behaviour (`--fake` mode).
#[derive(Debug, Clone, Copy)]
pub struct Fake {
    /// Exit code and run time, or run forever.
    pub exit: Option<(i32, Duration)>,
}

pub enum Runner {
    Real(Box<Launch>),
    Fake(Fake),
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Runs the container under `policy` ("Always", "OnFailure" or "Never") until it is done for
/// good or `ctx.stop` fires.
pub async fn supervise(ctx: Arc<ContainerCtx>, slot: Slot, runner: Runner, policy: &str) -> Outcome {
    let mut backoff = ctx.backoff_base;
    let name = ctx.shared.snapshot_name(slot);
    loop {
        if ctx.stop.is_cancelled() {
            return Outcome::Stopped;
        }
        let started_at = now();
        let began = Instant::now();
        let (exit, message) = match &runner {
            Runner::Fake(fake) => run_fake(&ctx, slot, *fake, started_at.clone()).await,
            Runner::Real(launch) => run_real(&ctx, slot, launch, started_at.clone()).await,
        };
        let Some(exit) = exit else {
            return Outcome::Stopped;
        };
        let reason = match (&message, exit.code) {
            (Some(m), 128) if m.starts_with("StartError: ") => "StartError",
            (_, 0) => "Completed",
            _ => "Error",
        };
        let message = message.map(|m| m.trim_start_matches("StartError: ").to_owned());
        tracing::info!(pod = %ctx.pod_name, container = %name, exit_code = exit.code, reason, "container exited");
        ctx.shared.update(|rt| {
            if let Some(c) = slot.get(rt) {
                let id = c.container_id.clone();
                c.set_terminated(ContainerStateTerminated {
                    exit_code: exit.code,
                    signal: exit.signal,
                    reason: Some(reason.into()),
                    message: message.filter(|m| !m.is_empty()),
                    started_at: Some(started_at),
                    finished_at: Some(now()),
                    container_id: id,
                });
            }
        });
        let restart = match policy {
            "Always" => true,
            "OnFailure" => exit.code != 0,
            _ => false,
        };
        if !restart || ctx.stop.is_cancelled() {
            return if exit.code == 0 {
                Outcome::Succeeded
            } else {
                Outcome::Failed
            };
        }
        // Like kubelet: a container that ran for a good while starts over with a short delay.
        if began.elapsed() > Duration::from_secs(600) {
            backoff = ctx.backoff_base;
        }
        let wait_message = format!(
            "back-off {}s restarting failed container={name} pod={}",
            backoff.as_secs(),
            ctx.pod_name
        );
        ctx.shared.update(|rt| {
            if let Some(c) = slot.get(rt) {
                c.prepare_restart("CrashLoopBackOff", Some(wait_message));
            }
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = ctx.stop.cancelled() => return Outcome::Stopped,
        }
        backoff = (backoff * 2).min(ctx.backoff_max);
    }
}

impl Shared {
    fn snapshot_name(&self, slot: Slot) -> String {
        let mut rt = self.rt.lock().unwrap_or_else(|e| e.into_inner());
        slot.get(&mut rt).map(|c| c.name.clone()).unwrap_or_default()
    }
}

fn grace(ctx: &ContainerCtx) -> Duration {
    *ctx.grace.lock().unwrap_or_else(|e| e.into_inner())
}

/// One run of a real process. Returns `(None, _)` when stopped by the pod ending, otherwise
/// the exit and the termination message.
async fn run_real(ctx: &ContainerCtx, slot: Slot, launch: &Launch, started_at: Time) -> (Option<Exit>, Option<String>) {
    let mut running = match process::spawn(&launch.spec) {
        Ok(running) => running,
        Err(e) => {
            tracing::warn!(pod = %ctx.pod_name, container = %launch.container.name, error = %e, "container failed to start");
            return (
                Some(Exit {
                    code: 128,
                    signal: None,
                }),
                Some(format!("StartError: {e}")),
            );
        }
    };
    tracing::info!(
        pod = %ctx.pod_name, container = %launch.container.name, pid = running.pid,
        log = %launch.spec.log.display(), "container started"
    );
    ctx.shared.update(|rt| {
        if let Some(c) = slot.get(rt) {
            c.set_running(format!("kubetune://{}", running.pid), started_at);
            c.image_id = launch.image_id.clone();
        }
    });
    let (tx, mut rx) = mpsc::channel(8);
    let probe_task = tokio::spawn(probes::run(
        launch.container.clone(),
        launch.probe_target.clone(),
        Instant::now(),
        tx,
    ));
    let mut unhealthy = None;
    let exit = loop {
        tokio::select! {
            exit = running.wait() => break exit,
            Some(event) = rx.recv() => match event {
                ProbeEvent::Started => ctx.shared.update(|rt| if let Some(c) = slot.get(rt) { c.started = true }),
                ProbeEvent::Ready(ready) => ctx.shared.update(|rt| if let Some(c) = slot.get(rt) { c.ready = ready && c.started }),
                ProbeEvent::Unhealthy(message) => {
                    tracing::warn!(pod = %ctx.pod_name, container = %launch.container.name, %message, "container unhealthy, killing it");
                    let grace = launch.container.liveness_probe.as_ref()
                        .and_then(|p| p.termination_grace_period_seconds)
                        .map_or_else(|| grace(ctx), |s| Duration::from_secs(s.max(0) as u64));
                    unhealthy = Some(message);
                    break running.stop(grace).await;
                }
            },
            _ = ctx.stop.cancelled() => {
                let exit = running.stop(grace(ctx)).await;
                tracing::info!(pod = %ctx.pod_name, container = %launch.container.name, exit_code = exit.code, "container stopped");
                probe_task.abort();
                return (None, None);
            }
        }
    };
    probe_task.abort();
    (
        Some(exit),
        unhealthy.or_else(|| termination_message(launch, running.log_offset, exit.code)),
    )
}

/// terminationMessagePath's contents if written, else (with FallbackToLogsOnError and a
/// failure) the tail of this run's log.
fn termination_message(launch: &Launch, log_offset: u64, code: i32) -> Option<String> {
    if let Some(path) = &launch.termination_path {
        if let Ok(bytes) = std::fs::read(path) {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]).into_owned();
            if !text.is_empty() {
                return Some(text);
            }
        }
    }
    let fallback = launch.container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
    (fallback && code != 0).then(|| process::log_tail(&launch.spec.log, log_offset, 80, 2048))
}

async fn run_fake(ctx: &ContainerCtx, slot: Slot, fake: Fake, started_at: Time) -> (Option<Exit>, Option<String>) {
    ctx.shared.update(|rt| {
        if let Some(c) = slot.get(rt) {
            c.set_running("kubetune://fake".into(), started_at);
            c.image_id = "local://fake".into();
            c.started = true;
            c.ready = true;
        }
    });
    let finish = async {
        match fake.exit {
            Some((code, after)) => {
                tokio::time::sleep(after).await;
                Exit { code, signal: None }
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        exit = finish => (Some(exit), None),
        _ = ctx.stop.cancelled() => (None, None),
    }
}
