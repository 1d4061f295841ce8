//! Pure derivation of a FineTuneJob's status from what its children say.

use super::validate::Invalid;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kubetune_crds::conditions::{condition, set_condition, READY};
use kubetune_crds::trainer_contract::TrainerOutcome;
use kubetune_crds::{FineTuneJob, FineTuneJobPhase, FineTuneJobStatus, TrainingProgress};

pub const RUNNING: &str = "Running";
pub const SUCCEEDED: &str = "Succeeded";
pub const FAILED: &str = "Failed";

/// Everything the status is derived from, gathered by the reconciler.
pub struct Observed<'a> {
    pub ftj: &'a FineTuneJob,
    /// Why the spec cannot run, when validation said so.
    pub invalid: Option<&'a Invalid>,
    pub job: Option<&'a Job>,
    /// The newest trainer pod.
    pub pod: Option<&'a Pod>,
    /// Progress read from the running trainer, when it could be read.
    pub progress: Option<TrainingProgress>,
    pub now: Time,
}

/// A transition worth an Event.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// The new status, and the transition from the old one if the phase changed.
pub fn derive_status(o: &Observed) -> (FineTuneJobStatus, Option<Transition>) {
    let old = o.ftj.status.clone().unwrap_or_default();
    let generation = o.ftj.metadata.generation;
    let mut status = FineTuneJobStatus {
        observed_generation: generation,
        ..old.clone()
    };
    let (phase, reason, message) = phase_of(o, &old, &mut status);
    status.phase = Some(phase);

    if matches!(phase, FineTuneJobPhase::Running) && status.start_time.is_none() {
        status.start_time = o
            .job
            .and_then(|j| j.status.as_ref())
            .and_then(|s| s.start_time.clone())
            .or(Some(o.now.clone()));
    }
    if matches!(phase, FineTuneJobPhase::Succeeded | FineTuneJobPhase::Failed) && status.completion_time.is_none() {
        status.completion_time = Some(o.now.clone());
    }
    if let Some(p) = o.progress.clone() {
        status.progress = Some(with_display(with_eta(p, status.start_time.as_ref(), &o.now)));
    }
    status.retries = o
        .job
        .and_then(|j| j.status.as_ref())
        .and_then(|s| s.failed)
        .filter(|n| *n > 0);

    let now = &o.now;
    let is = |p: FineTuneJobPhase| phase == p;
    let ready = is(FineTuneJobPhase::Succeeded) && status.adapter.is_some();
    // Ready and the condition of the current phase carry the reason; the others only say which
    // phase the job is in instead.
    let elsewhere = format!("{phase:?}");
    for (type_, value) in [
        (READY, ready),
        (RUNNING, is(FineTuneJobPhase::Running)),
        (SUCCEEDED, is(FineTuneJobPhase::Succeeded)),
        (FAILED, is(FineTuneJobPhase::Failed)),
    ] {
        let current = type_ == READY || value;
        let (r, m) = if current {
            (reason.as_str(), message.clone())
        } else {
            (elsewhere.as_str(), String::new())
        };
        set_condition(
            &mut status.conditions,
            condition(type_, value, r, m, generation, now.clone()),
        );
    }

    let transition = (old.phase != Some(phase)).then(|| Transition {
        warning: phase == FineTuneJobPhase::Failed,
        reason: reason.clone(),
        message: if message.is_empty() {
            format!("FineTuneJob is {phase:?}")
        } else {
            message.clone()
        },
    });
    (status, transition)
}

fn phase_of(
    o: &Observed,
    old: &FineTuneJobStatus,
    status: &mut FineTuneJobStatus,
) -> (FineTuneJobPhase, String, String) {
    use FineTuneJobPhase::*;
    // A finished job stays finished, also after its Job is garbage-collected by the TTL.
    if let Some(done @ (Succeeded | Failed)) = old.phase {
        if o.job.is_none() || o.invalid.is_some() {
            let c = old.conditions.iter().find(|c| c.type_ == READY);
            return (
                done,
                c.map(|c| c.reason.clone()).unwrap_or_default(),
                c.map(|c| c.message.clone()).unwrap_or_default(),
            );
        }
    }
    if let Some(invalid) = o.invalid {
        return (Failed, invalid.reason.to_string(), invalid.message.clone());
    }
    let outcome = o.pod.and_then(trainer_outcome);
    if let Some(job) = o.job {
        if job_condition(job, "Complete") || job_condition(job, "SuccessCriteriaMet") {
            return match outcome {
                Some(TrainerOutcome::Succeeded {
                    adapter,
                    train_loss,
                    eval_loss,
                    resumed_from_step,
                }) => {
                    let message = format!(
                        "published {}",
                        adapter.reference.clone().unwrap_or_else(|| adapter.uri.clone())
                    );
                    status.adapter = Some(adapter);
                    let progress = status.progress.get_or_insert_with(Default::default);
                    progress.train_loss = train_loss.or(progress.train_loss);
                    progress.eval_loss = eval_loss.or(progress.eval_loss);
                    progress.resumed_from_step = resumed_from_step.or(progress.resumed_from_step);
                    // The last poll may predate the last steps; a published adapter means all ran.
                    progress.step = progress.step.max(progress.total_steps);
                    *progress = with_display(progress.clone());
                    (Succeeded, "AdapterPublished".into(), message)
                }
                _ if status.adapter.is_some() => (Succeeded, "AdapterPublished".into(), String::new()),
                _ => (
                    Succeeded,
                    "OutcomeUnknown".into(),
                    "the trainer finished but its termination message names no adapter".into(),
                ),
            };
        }
        if let Some(failed) = job_failure(job) {
            return match outcome {
                Some(TrainerOutcome::Failed { reason, message }) => (Failed, reason, message),
                _ if o.pod.is_some_and(oom_killed) => (
                    Failed,
                    "OutOfMemory".into(),
                    "the trainer was killed for using too much memory".into(),
                ),
                _ => (Failed, failed.0, with_last_words(failed.1, o.pod)),
            };
        }
        if job.spec.as_ref().and_then(|s| s.suspend) == Some(true) {
            return (Suspended, "Suspended".into(), "spec.suspend is true".into());
        }
        if o.pod.is_some_and(pod_running) {
            return (Running, "Training".into(), String::new());
        }
    }
    (Pending, "Pending".into(), "waiting for the trainer pod to start".into())
}

fn job_condition(job: &Job, type_: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

/// The Job's own failure reason (BackoffLimitExceeded, DeadlineExceeded, PodFailurePolicy), if it failed.
fn job_failure(job: &Job) -> Option<(String, String)> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let c = conditions
        .iter()
        .find(|c| (c.type_ == "Failed" || c.type_ == "FailureTarget") && c.status == "True")?;
    Some((
        c.reason.clone().unwrap_or_else(|| "JobFailed".into()),
        c.message.clone().unwrap_or_default(),
    ))
}

/// The Job's failure message followed by the last line of the trainer's termination message,
/// when that is no outcome: a trainer that failed before it could write one leaves its log's
/// tail there (FallbackToLogsOnError), and its last line is what the user needs to read.
fn with_last_words(message: String, pod: Option<&Pod>) -> String {
    let last = pod.and_then(|p| {
        terminated_states(p)
            .filter_map(|t| t.message.as_deref())
            .find_map(|m| m.lines().map(str::trim).rfind(|l| !l.is_empty()))
    });
    match last {
        Some(last) if message.is_empty() => last.to_string(),
        Some(last) => format!("{message}: {last}"),
        None => message,
    }
}

fn pod_running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn oom_killed(pod: &Pod) -> bool {
    terminated_states(pod).any(|t| t.reason.as_deref() == Some("OOMKilled") || t.exit_code == 137)
}

fn terminated_states(pod: &Pod) -> impl Iterator<Item = &k8s_openapi::api::core::v1::ContainerStateTerminated> {
    pod.status
        .iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .filter_map(|c| c.state.as_ref().and_then(|s| s.terminated.as_ref()))
}

/// The trainer's outcome from its termination message; None when it wrote none (or something
/// else, e.g. the log tail of a crash).
pub fn trainer_outcome(pod: &Pod) -> Option<TrainerOutcome> {
    terminated_states(pod)
        .filter_map(|t| t.message.as_deref())
        .find_map(|m| serde_json::from_str(m.trim()).ok())
}

/// Estimates the time left from the average step time since the trainer started.
pub fn with_eta(mut p: TrainingProgress, started: Option<&Time>, now: &Time) -> TrainingProgress {
    if let Some(started) = started {
        let elapsed = now.0.as_second() - started.0.as_second();
        if p.step > 0 && p.total_steps > p.step && elapsed > 0 {
            let left = elapsed as u64 * (p.total_steps - p.step) / p.step;
            p.eta = Some(super::progress::format_duration(left));
        }
    }
    p
}

/// Adds the "step/total (pct%)" printer-column text.
pub fn with_display(mut p: TrainingProgress) -> TrainingProgress {
    let pct = (p.step * 100).checked_div(p.total_steps).unwrap_or(0);
    p.display = Some(format!("{}/{} ({pct}%)", p.step, p.total_steps));
    // Four decimals are what a person reads in `kubectl get`; Prometheus has the full values.
    let round = |v: f64, places: i32| (v * 10f64.powi(places)).round() / 10f64.powi(places);
    p.train_loss = p.train_loss.map(|l| round(l, 4));
    p.eval_loss = p.eval_loss.map(|l| round(l, 4));
    p.tokens_per_second = p.tokens_per_second.map(|t| round(t, 1));
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::finetunejob;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + secs).expect("valid"))
    }

    fn job(conditions: serde_json::Value) -> Job {
        serde_json::from_value(
            json!({"metadata": {"name": "x"}, "spec": {"template": {}}, "status": {"conditions": conditions}}),
        )
        .expect("job")
    }

    fn pod(phase: &str, terminated: Option<serde_json::Value>) -> Pod {
        let state = terminated
            .map(|t| json!({"terminated": t}))
            .unwrap_or(json!({"running": {}}));
        serde_json::from_value(json!({
            "metadata": {"name": "x-abc"},
            "status": {"phase": phase, "podIP": "127.0.1.2", "containerStatuses": [{
                "name": "trainer", "image": "i", "imageID": "", "ready": true, "restartCount": 0, "state": state
            }]}
        }))
        .expect("pod")
    }

    fn cond<'a>(s: &'a FineTuneJobStatus, t: &str) -> &'a kubetune_crds::conditions::Condition {
        s.conditions.iter().find(|c| c.type_ == t).expect("condition present")
    }

    #[test]
    fn no_job_yet_is_pending() {
        let ftj = finetunejob("minimal.yaml");
        let (s, t) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            job: None,
            pod: None,
            progress: None,
            now: at(0),
        });
        assert_eq!(s.phase, Some(FineTuneJobPhase::Pending));
        assert_eq!(s.observed_generation, Some(1));
        assert_eq!(cond(&s, READY).status, "False");
        assert!(t.is_some(), "first status is a transition");
    }

    #[test]
    fn running_pod_with_progress() {
        let ftj = finetunejob("minimal.yaml");
        let j = job(json!([]));
        let p = pod("Running", None);
        let progress = TrainingProgress {
            step: 25,
            total_steps: 100,
            train_loss: Some(1.5),
            ..Default::default()
        };
        let (s, _) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            job: Some(&j),
            pod: Some(&p),
            progress: Some(progress),
            now: at(10),
        });
        assert_eq!(s.phase, Some(FineTuneJobPhase::Running));
        assert_eq!(cond(&s, RUNNING).status, "True");
        assert_eq!(
            (cond(&s, FAILED).status.as_str(), cond(&s, FAILED).reason.as_str()),
            ("False", "Running")
        );
        let p = s.progress.expect("progress");
        assert_eq!(p.display.as_deref(), Some("25/100 (25%)"));
        assert_eq!(s.start_time, Some(at(10)));
    }

    #[test]
    fn eta_from_average_step_time() {
        let p = TrainingProgress {
            step: 10,
            total_steps: 40,
            ..Default::default()
        };
        assert_eq!(with_eta(p, Some(&at(0)), &at(20)).eta.as_deref(), Some("1m0s"));
    }

    #[test]
    fn display_rounds_for_people() {
        let p = with_display(TrainingProgress {
            step: 50,
            total_steps: 200,
            train_loss: Some(0.346804816),
            tokens_per_second: Some(5589.4290),
            ..Default::default()
        });
        assert_eq!(
            (p.display.as_deref(), p.train_loss, p.tokens_per_second),
            (Some("50/200 (25%)"), Some(0.3468), Some(5589.4))
        );
    }

    #[test]
    fn success_records_the_published_adapter() {
        let ftj = finetunejob("minimal.yaml");
        let j = job(json!([{"type": "Complete", "status": "True"}]));
        let message = json!({"result": "succeeded", "adapter": {"name": "minimal", "version": 2, "uri": "s3://r/adapters/minimal/v2", "digest": "sha256:ab", "reference": "minimal@v2"}, "trainLoss": 0.5, "resumedFromStep": 40}).to_string();
        let p = pod(
            "Succeeded",
            Some(json!({"exitCode": 0, "reason": "Completed", "message": message})),
        );
        let (s, t) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            job: Some(&j),
            pod: Some(&p),
            progress: None,
            now: at(99),
        });
        assert_eq!(s.phase, Some(FineTuneJobPhase::Succeeded));
        assert_eq!(s.adapter.as_ref().map(|a| a.version), Some(2));
        assert_eq!(cond(&s, READY).status, "True");
        assert_eq!(s.completion_time, Some(at(99)));
        assert_eq!(s.progress.as_ref().and_then(|p| p.train_loss), Some(0.5));
        assert_eq!(s.progress.and_then(|p| p.resumed_from_step), Some(40));
        assert_eq!(t.map(|t| t.reason), Some("AdapterPublished".into()));
    }

    #[test]
    fn trainer_failure_reason_wins_over_the_jobs() {
        let ftj = finetunejob("minimal.yaml");
        let j = job(json!([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]));
        let message = json!({"result": "failed", "reason": "DatasetInvalid", "message": "s3://d/train.jsonl line 7: missing field response"}).to_string();
        let p = pod(
            "Failed",
            Some(json!({"exitCode": 2, "reason": "Error", "message": message})),
        );
        let (s, t) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            job: Some(&j),
            pod: Some(&p),
            progress: None,
            now: at(5),
        });
        assert_eq!(s.phase, Some(FineTuneJobPhase::Failed));
        let failed = cond(&s, FAILED);
        assert_eq!(
            (failed.status.as_str(), failed.reason.as_str()),
            ("True", "DatasetInvalid")
        );
        assert!(failed.message.contains("line 7"));
        assert!(t.is_some_and(|t| t.warning));
    }

    #[test]
    fn a_trainer_built_without_cuda_fails_the_job_saying_so() {
        let ftj = finetunejob("minimal.yaml");
        // The trainer exits 2 (bad input), which the Job's pod failure policy fails at once.
        let j = job(json!([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]));
        let said = "--device cuda: this kubetune-trainer was built without CUDA support (build with --features cuda)";
        let message = json!({"result": "failed", "reason": "InvalidSpec", "message": said}).to_string();
        let p = pod(
            "Failed",
            Some(json!({"exitCode": 2, "reason": "Error", "message": message})),
        );
        let (s, t) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            job: Some(&j),
            pod: Some(&p),
            progress: None,
            now: at(5),
        });
        assert_eq!(s.phase, Some(FineTuneJobPhase::Failed));
        let failed = cond(&s, FAILED);
        assert_eq!(
            (failed.status.as_str(), failed.reason.as_str(), failed.message.as_str()),
            ("True", "InvalidSpec", said)
        );
        assert_eq!(cond(&s, READY).message, said);
        assert!(t.is_some_and(|t| t.warning && t.message == said));
    }

    #[test]
    fn a_trainer_that_wrote_no_outcome_leaves_its_last_log_line_in_the_condition() {
        let ftj = finetunejob("minimal.yaml");
        let j = job(
            json!([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "Container trainer for pod team-a/x-abc failed with exit code 2 matching FailJob rule at index 0"}]),
        );
        let tail = "INFO starting\nERROR --device cuda: this kubetune-trainer was built without CUDA support\n\n";
        let p = pod(
            "Failed",
            Some(json!({"exitCode": 2, "reason": "Error", "message": tail})),
        );
        let (s, _) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            job: Some(&j),
            pod: Some(&p),
            progress: None,
            now: at(5),
        });
        let failed = cond(&s, FAILED);
        assert_eq!(failed.reason, "PodFailurePolicy");
        assert_eq!(
            failed.message,
            "Container trainer for pod team-a/x-abc failed with exit code 2 matching FailJob rule at index 0: ERROR --device cuda: this kubetune-trainer was built without CUDA support"
        );
    }

    #[test]
    fn job_reasons_and_oom_when_the_trainer_said_nothing() {
        let ftj = finetunejob("minimal.yaml");
        let j = job(
            json!([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}]),
        );
        let (s, _) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            job: Some(&j),
            pod: None,
            progress: None,
            now: at(5),
        });
        assert_eq!(cond(&s, FAILED).reason, "DeadlineExceeded");

        let j = job(json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]));
        let p = pod("Failed", Some(json!({"exitCode": 137, "reason": "OOMKilled"})));
        let (s, _) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            job: Some(&j),
            pod: Some(&p),
            progress: None,
            now: at(5),
        });
        assert_eq!(cond(&s, FAILED).reason, "OutOfMemory");
    }

    #[test]
    fn invalid_spec_fails_with_its_reason() {
        let ftj = finetunejob("minimal.yaml");
        let invalid = Invalid {
            reason: "InsufficientGPUMemory",
            message: "needs more".into(),
        };
        let (s, _) = derive_status(&Observed {
            ftj: &ftj,
            invalid: Some(&invalid),
            job: None,
            pod: None,
            progress: None,
            now: at(0),
        });
        assert_eq!(s.phase, Some(FineTuneJobPhase::Failed));
        assert_eq!(cond(&s, READY).reason, "InsufficientGPUMemory");
    }

    #[test]
    fn suspended_job_is_suspended() {
        let ftj = finetunejob("minimal.yaml");
        let mut j = job(json!([]));
        j.spec.as_mut().expect("spec").suspend = Some(true);
        let (s, _) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            job: Some(&j),
            pod: None,
            progress: None,
            now: at(0),
        });
        assert_eq!(s.phase, Some(FineTuneJobPhase::Suspended));
    }

    #[test]
    fn finished_status_survives_the_job_ttl_and_is_stable() {
        let mut ftj = finetunejob("minimal.yaml");
        let j = job(json!([{"type": "Complete", "status": "True"}]));
        let message = json!({"result": "succeeded", "adapter": {"name": "m", "version": 1, "uri": "u", "digest": "d"}})
            .to_string();
        let p = pod("Succeeded", Some(json!({"exitCode": 0, "message": message})));
        let (done, _) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            job: Some(&j),
            pod: Some(&p),
            progress: None,
            now: at(1),
        });
        ftj.status = Some(done.clone());
        let (later, t) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            job: None,
            pod: None,
            progress: None,
            now: at(500),
        });
        assert_eq!(later, done, "nothing changes once finished, not even timestamps");
        assert!(t.is_none());
    }
}
