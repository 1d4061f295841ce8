//! Pure derivation of a FineTuneJob's status from what its children say.

use super::validate::{Invalid, Waiting};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kubetune_crds::conditions::{condition, set_condition, READY};
use kubetune_crds::trainer_contract::TrainerOutcome;
use kubetune_crds::{EvaluationResult, FineTuneJob, FineTuneJobPhase, FineTuneJobStatus, TrainingProgress};

pub const RUNNING: &str = "Running";
pub const SUCCEEDED: &str = "Succeeded";
pub const FAILED: &str = "Failed";

/// Everything the status is derived from, gathered by the reconciler.
pub struct Observed<'a> {
    pub ftj: &'a FineTuneJob,
    /// Why the spec cannot run, when validation said so.
    pub invalid: Option<&'a Invalid>,
    /// What the job waits for before its Job can be created, such as a missing Secret.
    pub waiting: Option<&'a Waiting>,
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

/// Whether the job succeeded or failed for good. A finished job never runs again: its Job may
/// be gone (TTL, an operator restart), and must not be created a second time.
pub fn is_finished(status: Option<&FineTuneJobStatus>) -> bool {
    matches!(
        status.and_then(|s| s.phase),
        Some(FineTuneJobPhase::Succeeded | FineTuneJobPhase::Failed)
    )
}

/// The new status, and the transition from the old one if the phase changed.
pub fn derive_status(o: &Observed) -> (FineTuneJobStatus, Option<Transition>) {
    let old = o.ftj.status.clone().unwrap_or_default();
    let generation = o.ftj.metadata.generation;
    // A finished job stays as it finished, also after its Job is garbage-collected by the TTL:
    // nothing observed later changes it, not even timestamps.
    if is_finished(Some(&old)) {
        let status = FineTuneJobStatus {
            observed_generation: generation,
            ..old
        };
        return (status, None);
    }
    let mut status = FineTuneJobStatus {
        observed_generation: generation,
        ..old.clone()
    };
    let (phase, reason, message) = never_backwards(&old, phase_of(o, &mut status));
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
        status.progress = Some(advance(old.progress.as_ref(), p, status.start_time.as_ref(), &o.now));
    }
    if phase != FineTuneJobPhase::Running {
        // An estimate of the time left only means something while the trainer runs.
        if let Some(p) = status.progress.as_mut() {
            p.eta = None;
        }
    }
    status.retries = retries(o.job, phase);

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
        warning: phase == FineTuneJobPhase::Failed || o.waiting.is_some(),
        reason: reason.clone(),
        message: if message.is_empty() {
            format!("FineTuneJob is {phase:?}")
        } else {
            message.clone()
        },
    });
    (status, transition)
}

/// How many times the trainer pod was started again. Every failed pod of a Job that still runs,
/// or went on to succeed, was followed by another; the last failed pod of a job that failed for
/// good was not, whether the Job already counts it or not yet.
fn retries(job: Option<&Job>, phase: FineTuneJobPhase) -> Option<i32> {
    let failed = job.and_then(|j| j.status.as_ref()).and_then(|s| s.failed).unwrap_or(0);
    let retried = if phase == FineTuneJobPhase::Failed {
        failed - 1
    } else {
        failed
    };
    (retried > 0).then_some(retried)
}

/// A phase never goes back from Running to Pending. Between the trainer pod ending and the Job
/// reporting Complete or Failed, and while a retried pod starts, no pod runs, but the job has
/// started: it stays Running, saying what it said, until the Job tells how it ended.
fn never_backwards(
    old: &FineTuneJobStatus,
    (phase, reason, message): (FineTuneJobPhase, String, String),
) -> (FineTuneJobPhase, String, String) {
    if old.phase == Some(FineTuneJobPhase::Running) && phase == FineTuneJobPhase::Pending {
        let c = old.conditions.iter().find(|c| c.type_ == READY);
        return (
            FineTuneJobPhase::Running,
            c.map_or_else(|| "Training".into(), |c| c.reason.clone()),
            c.map(|c| c.message.clone()).unwrap_or_default(),
        );
    }
    (phase, reason, message)
}

fn phase_of(o: &Observed, status: &mut FineTuneJobStatus) -> (FineTuneJobPhase, String, String) {
    use FineTuneJobPhase::*;
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
                    evaluation,
                    dpo,
                    train_dpo,
                    step,
                    total_steps,
                }) => {
                    status.evaluation = evaluation.map(with_evaluation_display).or(status.evaluation.take());
                    let message = format!(
                        "published {}",
                        adapter.reference.clone().unwrap_or_else(|| adapter.uri.clone())
                    );
                    status.adapter = Some(adapter);
                    let progress = status.progress.get_or_insert_with(Default::default);
                    progress.train_loss = train_loss.or(progress.train_loss);
                    progress.eval_loss = eval_loss.or(progress.eval_loss);
                    // The trainer's last held-out evaluation, which a poll may have missed.
                    progress.eval_dpo = dpo.or(progress.eval_dpo.take());
                    progress.dpo = train_dpo.or(progress.dpo.take());
                    progress.resumed_from_step = resumed_from_step.or(progress.resumed_from_step);
                    // The trainer's own count, which a poll may have missed entirely (a short
                    // job that finished between two scrapes) or seen only part of.
                    progress.total_steps = total_steps.unwrap_or(progress.total_steps);
                    progress.step = step.unwrap_or(progress.step);
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
                Some(TrainerOutcome::Failed {
                    reason,
                    message,
                    evaluation,
                }) => {
                    // A job failed by its evaluation shows the numbers that failed it.
                    status.evaluation = evaluation.map(with_evaluation_display).or(status.evaluation.take());
                    (Failed, reason, message)
                }
                _ if o.pod.is_some_and(oom_killed) => (
                    Failed,
                    "OutOfMemory".into(),
                    "the trainer was killed for using too much memory".into(),
                ),
                _ => (Failed, failed.0, with_last_words(failed.1, o.pod)),
            };
        }
        if job.spec.as_ref().and_then(|s| s.suspend) == Some(true) {
            // Suspended by us at the user's word, or held by Kueue until it admits the Job.
            return match crate::finetunejob::build::kueue_queue(o.ftj) {
                Some(queue) if o.ftj.spec.suspend != Some(true) => (
                    Pending,
                    "Queued".into(),
                    format!("waiting for Kueue to admit the Job from queue {queue}"),
                ),
                _ => (Suspended, "Suspended".into(), "spec.suspend is true".into()),
            };
        }
        if o.pod.is_some_and(pod_running) {
            return (Running, "Training".into(), String::new());
        }
    }
    if let Some(waiting) = o.waiting {
        return (Pending, waiting.reason.to_string(), waiting.message.clone());
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

/// The progress just read, stamped with the time its step was first seen: the old stamp while
/// the step stays, so that re-reading an unchanged trainer gives an identical status (and no
/// status write, which would only trigger the next reconcile).
fn advance(
    old: Option<&TrainingProgress>,
    new: TrainingProgress,
    started: Option<&Time>,
    now: &Time,
) -> TrainingProgress {
    let last_progress_time = match old {
        Some(o) if o.step == new.step && o.last_progress_time.is_some() => o.last_progress_time.clone(),
        _ => Some(now.clone()),
    };
    with_display(with_eta(
        TrainingProgress {
            last_progress_time,
            ..new
        },
        started,
    ))
}

/// Estimates the time left from the average step time between the start and the last step
/// seen; from stored timestamps only, never the clock, so it changes when the step does.
pub fn with_eta(mut p: TrainingProgress, started: Option<&Time>) -> TrainingProgress {
    if let (Some(started), Some(last)) = (started, p.last_progress_time.as_ref()) {
        let elapsed = last.0.as_second() - started.0.as_second();
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

/// Adds the printer-column text: the adapter's score against the base's, or, without a
/// metric, its held-out loss against the base's.
pub fn with_evaluation_display(mut e: EvaluationResult) -> EvaluationResult {
    let pair = match (e.metric, e.adapter.score, e.base.score) {
        (Some(_), Some(adapter), Some(base)) => Some(("score", adapter, base)),
        _ => e
            .adapter
            .loss
            .zip(e.base.loss)
            .map(|(adapter, base)| ("loss", adapter, base)),
    };
    e.display = pair.map(|(what, adapter, base)| format!("{what} {adapter:.4} (base {base:.4})"));
    e
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
            waiting: None,
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
            waiting: None,
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
            last_progress_time: Some(at(20)),
            ..Default::default()
        };
        assert_eq!(with_eta(p, Some(&at(0))).eta.as_deref(), Some("1m0s"));
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
        let message = json!({"result": "succeeded", "adapter": {"name": "minimal", "version": 2, "uri": "s3://r/adapters/minimal/v2", "digest": "sha256:ab", "reference": "minimal@v2"}, "trainLoss": 0.5, "resumedFromStep": 40, "dpo": {"accuracies": 0.9}}).to_string();
        let p = pod(
            "Succeeded",
            Some(json!({"exitCode": 0, "reason": "Completed", "message": message})),
        );
        let (s, t) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            waiting: None,
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
        let held_out = s.progress.as_ref().and_then(|p| p.eval_dpo.as_ref());
        assert_eq!(
            held_out.and_then(|d| d.accuracies),
            Some(0.9),
            "a DPO job's held-out rewards"
        );
        assert_eq!(s.progress.and_then(|p| p.resumed_from_step), Some(40));
        assert_eq!(t.map(|t| t.reason), Some("AdapterPublished".into()));
    }

    #[test]
    fn a_job_that_succeeded_before_any_scrape_shows_the_trainers_step_count_as_done() {
        let ftj = finetunejob("minimal.yaml");
        let j = job(json!([{"type": "Complete", "status": "True"}]));
        let message = json!({"result": "succeeded", "adapter": {"name": "m", "version": 1, "uri": "u", "digest": "d"}, "step": 6, "totalSteps": 6, "trainDpo": {"accuracies": 0.75}, "dpo": {"accuracies": 1.0}}).to_string();
        let p = pod(
            "Succeeded",
            Some(json!({"exitCode": 0, "reason": "Completed", "message": message})),
        );
        let (s, _) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            waiting: None,
            job: Some(&j),
            pod: Some(&p),
            progress: None,
            now: at(99),
        });
        assert_eq!(s.phase, Some(FineTuneJobPhase::Succeeded));
        let progress = s.progress.expect("progress");
        assert_eq!((progress.step, progress.total_steps), (6, 6));
        assert_eq!(progress.display.as_deref(), Some("6/6 (100%)"));
        assert_eq!(
            progress.dpo.and_then(|d| d.accuracies),
            Some(0.75),
            "the last step's rewards"
        );
        assert_eq!(
            progress.eval_dpo.and_then(|d| d.accuracies),
            Some(1.0),
            "the held-out rewards"
        );
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
            waiting: None,
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
            waiting: None,
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
            waiting: None,
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
            waiting: None,
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
            waiting: None,
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
            waiting: None,
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
            waiting: None,
            job: Some(&j),
            pod: None,
            progress: None,
            now: at(0),
        });
        assert_eq!(s.phase, Some(FineTuneJobPhase::Suspended));
    }

    /// A Job that Kueue holds is queued, not suspended: the user did not ask for a pause.
    #[test]
    fn a_job_held_by_kueue_is_pending_queued_and_one_the_user_suspended_is_suspended() {
        let mut ftj = finetunejob("minimal.yaml");
        ftj.metadata.labels = Some(
            [(
                crate::finetunejob::build::KUEUE_QUEUE_LABEL.to_string(),
                "team-a".to_string(),
            )]
            .into(),
        );
        let mut j = job(json!([]));
        j.spec.as_mut().expect("spec").suspend = Some(true);
        let observe = |ftj: &FineTuneJob| {
            derive_status(&Observed {
                ftj,
                invalid: None,
                waiting: None,
                job: Some(&j),
                pod: None,
                progress: None,
                now: at(0),
            })
            .0
        };
        let queued = observe(&ftj);
        assert_eq!(queued.phase, Some(FineTuneJobPhase::Pending));
        assert_eq!(cond(&queued, READY).reason, "Queued");
        assert!(cond(&queued, READY).message.contains("team-a"));
        ftj.spec.suspend = Some(true);
        assert_eq!(observe(&ftj).phase, Some(FineTuneJobPhase::Suspended));
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
            waiting: None,
            job: Some(&j),
            pod: Some(&p),
            progress: None,
            now: at(1),
        });
        ftj.status = Some(done.clone());
        let (later, t) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            waiting: None,
            job: None,
            pod: None,
            progress: None,
            now: at(500),
        });
        assert_eq!(later, done, "nothing changes once finished, not even timestamps");
        assert!(t.is_none());
    }

    fn started_job(conditions: serde_json::Value) -> Job {
        let mut j = job(conditions);
        j.status.get_or_insert_with(Default::default).start_time = Some(at(0));
        j
    }

    fn at_step(step: u64) -> TrainingProgress {
        TrainingProgress {
            step,
            total_steps: 100,
            train_loss: Some(1.5),
            ..Default::default()
        }
    }

    fn observed<'a>(
        ftj: &'a FineTuneJob,
        job: &'a Job,
        pod: Option<&'a Pod>,
        progress: Option<TrainingProgress>,
        now: i64,
    ) -> Observed<'a> {
        Observed {
            ftj,
            invalid: None,
            waiting: None,
            job: Some(job),
            pod,
            progress,
            now: at(now),
        }
    }

    /// Derives the status as a reconcile does, and stores it on the FineTuneJob as the next
    /// reconcile will see it.
    fn reconcile_status(
        ftj: &mut FineTuneJob,
        job: &Job,
        pod: Option<&Pod>,
        progress: Option<TrainingProgress>,
        now: i64,
    ) -> (FineTuneJobStatus, Option<Transition>) {
        let snapshot = ftj.clone();
        let (s, t) = derive_status(&observed(&snapshot, job, pod, progress, now));
        ftj.status = Some(s.clone());
        (s, t)
    }

    #[test]
    fn an_unchanged_progress_gives_an_identical_status_however_late_it_is_read() {
        let mut ftj = finetunejob("minimal.yaml");
        let (j, p) = (started_job(json!([])), pod("Running", None));
        let (first, _) = reconcile_status(&mut ftj, &j, Some(&p), Some(at_step(25)), 10);
        let (again, t) = reconcile_status(&mut ftj, &j, Some(&p), Some(at_step(25)), 70);
        assert_eq!(again, first, "no status write while the trainer does not move");
        assert!(t.is_none());
        let progress = first.progress.expect("progress");
        assert_eq!(progress.last_progress_time, Some(at(10)));
        assert_eq!(progress.eta.as_deref(), Some("30s"), "25 steps in 10s, 75 to go");
    }

    #[test]
    fn a_new_step_moves_the_progress_time_and_the_eta() {
        let mut ftj = finetunejob("minimal.yaml");
        let (j, p) = (started_job(json!([])), pod("Running", None));
        reconcile_status(&mut ftj, &j, Some(&p), Some(at_step(25)), 10);
        let (later, _) = reconcile_status(&mut ftj, &j, Some(&p), Some(at_step(50)), 40);
        let progress = later.progress.expect("progress");
        assert_eq!(progress.last_progress_time, Some(at(40)));
        assert_eq!(progress.eta.as_deref(), Some("40s"), "50 steps in 40s, 50 to go");
    }

    #[test]
    fn running_does_not_go_back_to_pending_between_the_pod_ending_and_the_job_completing() {
        let mut ftj = finetunejob("minimal.yaml");
        let running = started_job(json!([]));
        let p = pod("Running", None);
        let (first, _) = reconcile_status(&mut ftj, &running, Some(&p), Some(at_step(90)), 90);
        assert_eq!(first.phase, Some(FineTuneJobPhase::Running));

        // The trainer exited, and the Job controller has not yet marked the Job Complete.
        let message = json!({"result": "succeeded", "adapter": {"name": "m", "version": 1, "uri": "u", "digest": "d"}})
            .to_string();
        let ended = pod(
            "Succeeded",
            Some(json!({"exitCode": 0, "reason": "Completed", "message": message})),
        );
        let (between, t) = reconcile_status(&mut ftj, &running, Some(&ended), None, 95);
        assert_eq!(between.phase, Some(FineTuneJobPhase::Running));
        assert_eq!(cond(&between, RUNNING).status, "True");
        assert!(t.is_none(), "no Pending event in between");

        let complete = started_job(json!([{"type": "Complete", "status": "True"}]));
        let (done, t) = reconcile_status(&mut ftj, &complete, Some(&ended), None, 96);
        assert_eq!(done.phase, Some(FineTuneJobPhase::Succeeded));
        assert_eq!(t.map(|t| t.reason), Some("AdapterPublished".into()));
        let progress = done.progress.expect("progress");
        assert_eq!(progress.eta, None, "a finished job has no time left");
        assert_eq!(progress.display.as_deref(), Some("100/100 (100%)"));
    }

    #[test]
    fn a_retried_pod_starting_keeps_the_job_running() {
        let mut ftj = finetunejob("minimal.yaml");
        let j = started_job(json!([]));
        reconcile_status(&mut ftj, &j, Some(&pod("Running", None)), None, 10);
        let (s, t) = reconcile_status(&mut ftj, &j, Some(&pod("Pending", None)), None, 20);
        assert_eq!(s.phase, Some(FineTuneJobPhase::Running));
        assert!(t.is_none());
    }

    #[test]
    fn a_job_waiting_for_its_secret_is_pending_saying_so_not_failed() {
        let ftj = finetunejob("minimal.yaml");
        let waiting = Waiting {
            reason: "SecretNotFound",
            message: "spec.storageSecretRef.name: waiting for Secret team-a/s3 to exist".into(),
        };
        let (s, t) = derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            waiting: Some(&waiting),
            job: None,
            pod: None,
            progress: None,
            now: at(0),
        });
        assert_eq!(s.phase, Some(FineTuneJobPhase::Pending));
        assert_eq!(cond(&s, READY).reason, "SecretNotFound");
        assert!(t.is_some_and(|t| t.warning && t.reason == "SecretNotFound"));
    }

    #[test]
    fn a_finished_job_stays_finished_whatever_its_job_says_later() {
        let mut ftj = finetunejob("minimal.yaml");
        let failed = job(json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]));
        let (done, _) = reconcile_status(&mut ftj, &failed, None, None, 5);
        assert_eq!(done.phase, Some(FineTuneJobPhase::Failed));
        // A Job of the same name, not finished (made by someone else): the FineTuneJob is done.
        let other = job(json!([]));
        let (later, t) = reconcile_status(&mut ftj, &other, Some(&pod("Running", None)), Some(at_step(3)), 50);
        assert_eq!(later, done);
        assert!(t.is_none());
    }

    fn finished_by(job_conditions: serde_json::Value, exit_code: i32, outcome: serde_json::Value) -> FineTuneJobStatus {
        let ftj = finetunejob("minimal.yaml");
        let j = job(job_conditions);
        let p = pod(
            if exit_code == 0 { "Succeeded" } else { "Failed" },
            Some(json!({"exitCode": exit_code, "reason": "Completed", "message": outcome.to_string()})),
        );
        derive_status(&Observed {
            ftj: &ftj,
            invalid: None,
            waiting: None,
            job: Some(&j),
            pod: Some(&p),
            progress: None,
            now: at(60),
        })
        .0
    }

    fn evaluation_json() -> serde_json::Value {
        json!({"metric": "exactMatch", "base": {"loss": 2.5, "score": 0.25}, "adapter": {"loss": 1.25, "score": 0.5}, "examples": 40})
    }

    #[test]
    fn a_published_adapter_brings_its_evaluation_against_the_base_into_the_status() {
        let s = finished_by(
            json!([{"type": "Complete", "status": "True"}]),
            0,
            json!({"result": "succeeded", "adapter": {"name": "minimal", "version": 3, "uri": "s3://r/adapters/minimal/v3", "digest": "sha256:ab"}, "evaluation": evaluation_json()}),
        );
        assert_eq!(s.phase, Some(FineTuneJobPhase::Succeeded));
        let e = s.evaluation.expect("status.evaluation");
        assert_eq!(e.metric, Some(kubetune_crds::EvaluationMetric::ExactMatch));
        assert_eq!((e.base.loss, e.base.score), (Some(2.5), Some(0.25)));
        assert_eq!((e.adapter.loss, e.adapter.score), (Some(1.25), Some(0.5)));
        assert_eq!(e.examples, 40);
        assert_eq!(e.display.as_deref(), Some("score 0.5000 (base 0.2500)"));
    }

    #[test]
    fn an_adapter_that_did_not_beat_the_base_fails_the_job_with_the_evaluation_that_failed_it() {
        let s = finished_by(
            json!([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]),
            4,
            json!({"result": "failed", "reason": "EvaluationBelowThreshold", "message": "spec.evaluation.minImprovement: the adapter scored 0.5, the base 0.25: +0.25, short of +0.5; nothing was published", "evaluation": evaluation_json()}),
        );
        assert_eq!(s.phase, Some(FineTuneJobPhase::Failed));
        let failed = cond(&s, FAILED);
        assert_eq!(
            (failed.status.as_str(), failed.reason.as_str()),
            ("True", kubetune_crds::trainer_contract::EVALUATION_BELOW_THRESHOLD)
        );
        assert!(failed.message.contains("minImprovement"), "{}", failed.message);
        assert_eq!(cond(&s, READY).status, "False");
        assert_eq!(s.adapter, None, "nothing was published");
        assert!(is_finished(Some(&s)), "final: its Job is never created again");
        assert_eq!(s.evaluation.map(|e| e.adapter.score), Some(Some(0.5)));
    }

    fn with_failed_pods(mut j: Job, failed: i32) -> Job {
        j.status.get_or_insert_with(Default::default).failed = Some(failed);
        j
    }

    #[test]
    fn the_pod_that_failed_a_job_for_good_is_not_counted_as_a_retry() {
        let mut ftj = finetunejob("minimal.yaml");
        let failed = job(json!([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]));
        let (s, _) = reconcile_status(&mut ftj, &with_failed_pods(failed, 1), None, None, 5);
        assert_eq!((s.phase, s.retries), (Some(FineTuneJobPhase::Failed), None));

        let mut ftj = finetunejob("minimal.yaml");
        let exhausted = job(json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]));
        let (s, _) = reconcile_status(&mut ftj, &with_failed_pods(exhausted, 4), None, None, 5);
        assert_eq!(s.retries, Some(3), "four pods failed: the first three were retried");
    }

    #[test]
    fn every_failed_pod_of_a_running_or_succeeded_job_was_retried() {
        let mut ftj = finetunejob("minimal.yaml");
        let running = with_failed_pods(started_job(json!([])), 2);
        let (s, _) = reconcile_status(&mut ftj, &running, Some(&pod("Running", None)), None, 5);
        assert_eq!((s.phase, s.retries), (Some(FineTuneJobPhase::Running), Some(2)));
    }

    #[test]
    fn without_a_metric_the_evaluation_column_compares_losses() {
        let e = with_evaluation_display(EvaluationResult {
            metric: None,
            base: kubetune_crds::ModelEvaluation {
                loss: Some(2.0),
                score: None,
            },
            adapter: kubetune_crds::ModelEvaluation {
                loss: Some(1.23456),
                score: None,
            },
            examples: 7,
            display: None,
        });
        assert_eq!(e.display.as_deref(), Some("loss 1.2346 (base 2.0000)"));
    }
}
