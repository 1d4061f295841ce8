//! Job mode through object storage (file:// here; the e2e suite runs it against S3): publish,
//! a second version, idempotent re-runs, missing inputs, a bad dataset named by URI and line,
//! a preempted run that resumes from the checkpoint it uploaded and ends with the adapter an
//! uninterrupted run makes, and the binary's termination message, exit codes, SIGTERM and
//! its log without a terminal.

use crate::common::*;
use kubetune_crds::trainer_contract::{
    JobIdentity, TrainerDataset, TrainerDpo, TrainerEvaluation, TrainerJob, TrainerLora, TrainerOutcome,
    TrainerTraining, EVALUATION_BELOW_THRESHOLD, EXIT_EVALUATION_BELOW_THRESHOLD, TRAINER_JOB_ENV,
};
use kubetune_crds::{
    DatasetFormat, DpoLossType, EvaluationMetric, EvaluationResult, FineTuneMethod, LrScheduler, TargetModule,
};
use kubetune_storage::{Credentials, Storage};
use kubetune_trainer::job::{run_job, JobError, JobRun};
use kubetune_trainer::metrics::Metrics;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;

fn uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// A store with the tiny model and the fact dataset, and a job over them: 6 steps,
/// checkpoints every 2.
fn setup(root: &Path) -> TrainerJob {
    tiny_model(&root.join("store/models/tiny"));
    std::fs::create_dir_all(root.join("store/data")).expect("mkdir");
    write_facts(&root.join("store/data/facts.jsonl"));
    let mut job = TrainerJob {
        owner: JobIdentity {
            namespace: "ns".into(),
            name: "facts".into(),
            uid: String::new(),
        },
        base_model_uri: uri(&root.join("store/models/tiny")),
        dataset: TrainerDataset {
            uri: uri(&root.join("store/data/facts.jsonl")),
            format: DatasetFormat::Instruction,
            validation_split: None,
            validation_uri: None,
            skip_invalid: false,
        },
        method: FineTuneMethod::Lora,
        lora: TrainerLora {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            target_modules: vec![TargetModule::QProj, TargetModule::VProj],
        },
        quantization: None,
        training: TrainerTraining {
            epochs: None,
            max_steps: Some(6),
            learning_rate: 1e-2,
            batch_size: 10,
            gradient_accumulation_steps: 1,
            max_seq_length: 64,
            warmup_steps: 0,
            scheduler: LrScheduler::Cosine,
            seed: 7,
            checkpoint_steps: Some(2),
            // The job path passes the setting through to a config the trainer accepts.
            gradient_checkpointing: true,
        },
        adapter_name: "facts".into(),
        registry: uri(&root.join("store/registry")),
        checkpoint_uri: String::new(),
        evaluation: None,
        dpo: None,
        init_from: None,
        merge: false,
    };
    set_uid(&mut job, root, "uid-1");
    job
}

/// Another FineTuneJob object: its own uid and, as the operator derives it, checkpoint URI.
fn set_uid(job: &mut TrainerJob, root: &Path, uid: &str) {
    job.owner.uid = uid.into();
    job.checkpoint_uri = uri(&root.join(format!("store/checkpoints/ns/facts-{uid}")));
}

fn job_run(job: &TrainerJob, work: &Path) -> JobRun {
    JobRun {
        job: job.clone(),
        work_dir: work.to_path_buf(),
        credentials: Credentials::none(),
        metrics: None,
        stop: None,
        stop_after_steps: None,
        device: candle_core::Device::Cpu,
    }
}

fn published(outcome: &TrainerOutcome) -> (u32, String) {
    match outcome {
        TrainerOutcome::Succeeded { adapter, .. } => (adapter.version, adapter.digest.clone()),
        other => panic!("expected success, got {other:?}"),
    }
}

/// The job, judged on the first 20 facts held out (the training file again: the tiny model's
/// adapter only gets better on what it saw within 6 steps).
fn with_evaluation(job: &TrainerJob, metric: Option<EvaluationMetric>, min_improvement: Option<f64>) -> TrainerJob {
    let mut job = job.clone();
    job.dataset.validation_uri = Some(job.dataset.uri.clone());
    job.evaluation = Some(TrainerEvaluation {
        metric,
        max_examples: 20,
        max_new_tokens: 4,
        min_improvement,
    });
    job
}

fn evaluation_of(outcome: &TrainerOutcome) -> &EvaluationResult {
    match outcome {
        TrainerOutcome::Succeeded {
            evaluation: Some(e), ..
        } => e,
        other => panic!("expected a published, judged adapter, got {other:?}"),
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("json")
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_versions_once_per_job() {
    let dir = tempfile::tempdir().expect("dir");
    let job = setup(dir.path());
    let first = run_job(job_run(&job, &dir.path().join("work1")))
        .await
        .expect("first run");
    let (version, digest) = published(&first);
    assert_eq!(version, 1);
    let TrainerOutcome::Succeeded {
        adapter,
        train_loss,
        resumed_from_step,
        step,
        total_steps,
        ..
    } = &first
    else {
        unreachable!()
    };
    assert_eq!(adapter.reference.as_deref(), Some("facts@1"));
    assert!(train_loss.is_some_and(f64::is_finite));
    assert_eq!(*resumed_from_step, None);
    assert_eq!(
        (*step, *total_steps),
        (Some(6), Some(6)),
        "the steps run, for a status that never saw them"
    );
    let v1 = dir.path().join("store/registry/adapters/facts/v1");
    let config = std::fs::read_to_string(v1.join("adapter_config.json")).expect("published config");
    assert!(
        config.contains(&job.base_model_uri),
        "base_model_name_or_path is the model URI the server loads: {config}"
    );
    let manifest = read_json(&v1.join("manifest.json"));
    assert_eq!(
        manifest["job"],
        serde_json::json!({"namespace": "ns", "name": "facts", "uid": "uid-1"}),
        "{manifest}"
    );
    assert!(
        manifest["dataset"]["digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{manifest}"
    );
    assert!(
        !dir.path().join("store/checkpoints/ns/facts-uid-1/latest.json").exists(),
        "checkpoints are removed after publishing"
    );

    // The same job again (a pod that died after publishing): the same version, not a new one.
    let again = run_job(job_run(&job, &dir.path().join("work2"))).await.expect("re-run");
    assert_eq!(published(&again), (1, digest));
    assert!(!dir.path().join("store/registry/adapters/facts/v2").exists());

    // Another job for the same adapter name: the next version.
    let mut second = job.clone();
    set_uid(&mut second, dir.path(), "uid-2");
    let next = run_job(job_run(&second, &dir.path().join("work3")))
        .await
        .expect("second job");
    assert_eq!(published(&next).0, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_line_is_named_by_uri_and_line() {
    let dir = tempfile::tempdir().expect("dir");
    let job = setup(dir.path());
    std::fs::write(
        dir.path().join("store/data/facts.jsonl"),
        "{\"instruction\": \"a\", \"response\": \"b\"}\n{\"instruction\": \n",
    )
    .expect("write");
    let err = run_job(job_run(&job, &dir.path().join("work")))
        .await
        .expect_err("bad dataset");
    assert!(matches!(err, JobError::DataLine { line: 2, .. }), "{err:?}");
    assert_eq!((err.reason(), err.exit_code()), ("DatasetInvalid", 2));
    assert!(
        err.to_string().starts_with(&format!("{} line 2: ", job.dataset.uri)),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_inputs_are_invalid_input_not_storage_trouble() {
    let dir = tempfile::tempdir().expect("dir");
    let job = setup(dir.path());
    let mut no_model = job.clone();
    no_model.base_model_uri = uri(&dir.path().join("store/models/absent"));
    let err = run_job(job_run(&no_model, &dir.path().join("work1")))
        .await
        .expect_err("no model");
    assert_eq!((err.reason(), err.exit_code()), ("ModelInvalid", 2), "{err}");
    assert!(
        err.to_string().starts_with("base model: ") && err.to_string().contains("models/absent"),
        "{err}"
    );

    let mut no_data = job.clone();
    no_data.dataset.uri = uri(&dir.path().join("store/data/absent.jsonl"));
    let err = run_job(job_run(&no_data, &dir.path().join("work2")))
        .await
        .expect_err("no dataset");
    assert_eq!((err.reason(), err.exit_code()), ("DatasetInvalid", 2), "{err}");
    assert!(err.to_string().contains("absent.jsonl"), "{err}");

    let mut bad_uri = job.clone();
    bad_uri.registry = "ftp://registry".into();
    let err = run_job(job_run(&bad_uri, &dir.path().join("work3")))
        .await
        .expect_err("bad registry URI");
    assert_eq!((err.reason(), err.exit_code()), ("InvalidSpec", 2), "{err}");
}

fn adapter_tensors(version_dir: &Path) -> std::collections::BTreeMap<String, candle_core::Tensor> {
    kubetune_model::tensors::load(
        &version_dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("adapter")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_preempted_run_resumes_from_its_uploaded_checkpoint_and_matches_an_uninterrupted_one() {
    let dir = tempfile::tempdir().expect("dir");
    let job = setup(dir.path());

    // Preempted after step 4: checkpoints were uploaded at steps 2 and 4, only 4 is kept.
    let mut run = job_run(&job, &dir.path().join("work1"));
    run.stop_after_steps = Some(4);
    let err = run_job(run).await.expect_err("stopped");
    assert!(matches!(err, JobError::Stopped { step: 4 }), "{err:?}");
    assert_eq!(err.exit_code(), 143);
    assert!(!err.is_final(), "a stop is retried, not reported as a failure");
    let checkpoints = Storage::from_uri(&job.checkpoint_uri, &Credentials::none()).expect("store");
    let pointer = checkpoints.get_bytes("latest.json").await.expect("latest.json");
    assert_eq!(std::str::from_utf8(&pointer).expect("utf8"), r#"{"step":4}"#);
    let mut keys: Vec<String> = checkpoints
        .list("")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "latest.json",
            "step-4/adapter_config.json",
            "step-4/adapter_model.safetensors",
            "step-4/optimizer.safetensors",
            "step-4/trainer_state.json"
        ]
    );

    // A fresh pod (new work directory) resumes from step 4 and publishes.
    let metrics = Arc::new(Metrics::new("ns/facts").expect("metrics"));
    let mut run = job_run(&job, &dir.path().join("work2"));
    run.metrics = Some(metrics.clone());
    let outcome = run_job(run).await.expect("resumed run");
    let TrainerOutcome::Succeeded {
        resumed_from_step,
        adapter,
        ..
    } = outcome
    else {
        panic!("not published")
    };
    assert_eq!((resumed_from_step, adapter.version), (Some(4), 1));
    assert!(
        metrics
            .render()
            .contains("kubetune_train_resumed_from_step{job=\"ns/facts\"} 4"),
        "{}",
        metrics.render()
    );

    // The same job never stopped, published by another FineTuneJob: the same adapter.
    let mut whole = job.clone();
    set_uid(&mut whole, dir.path(), "uid-2");
    let fresh = Arc::new(Metrics::new("ns/facts").expect("metrics"));
    let mut run = job_run(&whole, &dir.path().join("work3"));
    run.metrics = Some(fresh.clone());
    let outcome = run_job(run).await.expect("uninterrupted run");
    assert_eq!(published(&outcome).0, 2);
    assert!(
        fresh
            .render()
            .contains("kubetune_train_resumed_from_step{job=\"ns/facts\"} 0"),
        "{}",
        fresh.render()
    );
    let registry = dir.path().join("store/registry/adapters/facts");
    let (resumed, uninterrupted) = (
        adapter_tensors(&registry.join("v1")),
        adapter_tensors(&registry.join("v2")),
    );
    assert_eq!(
        resumed.keys().collect::<Vec<_>>(),
        uninterrupted.keys().collect::<Vec<_>>()
    );
    for (name, t) in &resumed {
        let diff: f32 = (t - &uninterrupted[name])
            .expect("sub")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar()
            .expect("scalar");
        assert!(diff < 1e-6, "{name} differs by {diff}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unusable_checkpoint_is_dropped_and_the_run_starts_over() {
    let dir = tempfile::tempdir().expect("dir");
    let job = setup(dir.path());
    let checkpoints = Storage::from_uri(&job.checkpoint_uri, &Credentials::none()).expect("store");
    checkpoints
        .put_bytes("step-2/trainer_state.json", "{\"step\": \"two\"}".into())
        .await
        .expect("put");
    checkpoints
        .put_bytes("latest.json", r#"{"step":2}"#.into())
        .await
        .expect("put");
    let outcome = run_job(job_run(&job, &dir.path().join("work"))).await.expect("run");
    let TrainerOutcome::Succeeded { resumed_from_step, .. } = outcome else {
        panic!("not published")
    };
    assert_eq!(resumed_from_step, None);
}

// --- The binary, as the operator's pod runs it. ---

/// Kills the child if a test fails before it exits.
struct Trainer(Child);

impl Drop for Trainer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn trainer(job_json: &str, work: &Path) -> Trainer {
    let child = Command::new(env!("CARGO_BIN_EXE_kubetune-trainer"))
        .args([
            "--work-dir",
            &work.display().to_string(),
            "--termination-log",
            &work.join("termination-log").display().to_string(),
        ])
        .env(TRAINER_JOB_ENV, job_json)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kubetune-trainer");
    Trainer(child)
}

/// Reads the trainer's log until a line contains `needle`; false if it exited first.
fn wait_for_log(t: &mut Trainer, needle: &str, log: &mut Vec<String>) -> bool {
    let Some(stderr) = t.0.stderr.as_mut() else {
        return false;
    };
    for line in std::io::BufReader::new(stderr).lines() {
        let Ok(line) = line else { return false };
        let found = line.contains(needle);
        log.push(line);
        if found {
            return true;
        }
    }
    false
}

fn finish(mut t: Trainer) -> (ExitStatus, Vec<String>) {
    let mut log = Vec::new();
    wait_for_log(&mut t, "\u{0}never", &mut log);
    (t.0.wait().expect("wait"), log)
}

/// The termination message: exactly one JSON line.
fn outcome(work: &Path) -> TrainerOutcome {
    let text = std::fs::read_to_string(work.join("termination-log")).expect("termination log");
    assert!(
        text.ends_with('\n') && text.trim_end().lines().count() == 1,
        "one line: {text:?}"
    );
    serde_json::from_str(&text).expect("outcome JSON")
}

#[test]
fn the_binary_reports_its_outcome_and_exit_code() {
    let dir = tempfile::tempdir().expect("dir");
    let job = setup(dir.path());
    let work = dir.path().join("work-ok");
    let (status, log) = finish(trainer(&serde_json::to_string(&job).expect("json"), &work));
    assert!(status.success(), "{status}\n{}", log.join("\n"));
    let TrainerOutcome::Succeeded {
        adapter, train_loss, ..
    } = outcome(&work)
    else {
        panic!("not succeeded")
    };
    assert_eq!(
        (adapter.name.as_str(), adapter.version, adapter.reference.as_deref()),
        ("facts", 1, Some("facts@1"))
    );
    assert!(
        adapter.uri.ends_with("/adapters/facts/v1") && adapter.digest.starts_with("sha256:"),
        "{adapter:?}"
    );
    assert!(train_loss.is_some());

    // Not JSON: exit 2, and the message names the variable.
    let work = dir.path().join("work-json");
    std::fs::create_dir_all(&work).expect("mkdir");
    let (status, _) = finish(trainer("{\"owner\": ", &work));
    assert_eq!(status.code(), Some(2));
    let TrainerOutcome::Failed { reason, message, .. } = outcome(&work) else {
        panic!("not failed")
    };
    assert_eq!(reason, "InvalidSpec");
    assert!(
        message.starts_with("KUBETUNE_TRAINER_JOB: not a valid trainer job description"),
        "{message}"
    );

    // A bad line: exit 2, DatasetInvalid, the URI and line number in the message.
    let mut bad = job.clone();
    set_uid(&mut bad, dir.path(), "uid-bad");
    std::fs::write(
        dir.path().join("store/data/bad.jsonl"),
        "{\"instruction\": \"a\", \"response\": \"b\"}\n\n{\"instruction\": \"c\"}\n",
    )
    .expect("write");
    bad.dataset.uri = uri(&dir.path().join("store/data/bad.jsonl"));
    let work = dir.path().join("work-bad");
    let (status, _) = finish(trainer(&serde_json::to_string(&bad).expect("json"), &work));
    assert_eq!(status.code(), Some(2));
    let TrainerOutcome::Failed { reason, message, .. } = outcome(&work) else {
        panic!("not failed")
    };
    assert_eq!(reason, "DatasetInvalid");
    assert!(
        message.starts_with(&format!("{} line 3: ", bad.dataset.uri)),
        "{message}"
    );
}

#[test]
fn sigterm_uploads_a_checkpoint_and_exits_143_without_an_outcome() {
    let dir = tempfile::tempdir().expect("dir");
    let mut job = setup(dir.path());
    // Far more steps than the test waits for: it is stopped long before the end.
    job.training.max_steps = Some(1_000_000);
    let work = dir.path().join("work");
    let mut t = trainer(&serde_json::to_string(&job).expect("json"), &work);
    let mut log = Vec::new();
    assert!(
        wait_for_log(&mut t, "checkpoint uploaded", &mut log),
        "no checkpoint upload:\n{}",
        log.join("\n")
    );
    let pid = t.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(killed.success());
    let (status, rest) = finish(t);
    log.extend(rest);
    assert_eq!(status.code(), Some(143), "{}", log.join("\n"));
    assert!(
        !work.join("termination-log").exists(),
        "a stopped pod leaves the outcome to its retry"
    );
    let pointer = read_json(&PathBuf::from(job.checkpoint_uri.trim_start_matches("file://")).join("latest.json"));
    let step = pointer["step"].as_u64().expect("step");
    assert!(step >= 2, "{pointer}");
    assert!(log.iter().any(|l| l.contains("SIGTERM")), "{}", log.join("\n"));
}

/// The operator and these tests parse the log: without a terminal it stays JSON lines, with
/// no progress bar drawn into it (run here in local mode, where a terminal would get one).
#[test]
fn without_a_terminal_the_log_is_json_lines_and_no_progress_bar() {
    let dir = tempfile::tempdir().expect("dir");
    let (model_dir, data, out) = (
        dir.path().join("model"),
        dir.path().join("facts.jsonl"),
        dir.path().join("out"),
    );
    tiny_model(&model_dir);
    write_facts(&data);
    let path = |p: &Path| p.display().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_kubetune-trainer"))
        .args([
            "--model",
            &path(&model_dir),
            "--data",
            &path(&data),
            "--format",
            "instruction",
        ])
        .args(["--output", &path(&out), "--max-steps", "2"])
        .env("RUST_LOG", "info")
        .env_remove(TRAINER_JOB_ENV)
        .stdin(Stdio::null())
        .output()
        .expect("run kubetune-trainer");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{}\n{log}", output.status);
    assert!(
        output.stdout.is_empty() && !log.contains(['\r', '\u{1b}']),
        "nothing but log lines: {log:?}"
    );
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "train" && l["step"] == 1 && l["total_steps"] == 2),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "training finished" && l["steps"] == 2),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_base_model_and_the_adapter_are_judged_and_the_outcome_registry_and_metrics_carry_both() {
    let dir = tempfile::tempdir().expect("dir");
    let job = with_evaluation(&setup(dir.path()), Some(EvaluationMetric::ExactMatch), None);
    let metrics = Arc::new(Metrics::new("ns/facts").expect("metrics"));
    let mut run = job_run(&job, &dir.path().join("work"));
    run.metrics = Some(metrics.clone());
    let outcome = run_job(run).await.expect("judged run");
    let e = evaluation_of(&outcome);
    eprintln!("{e:?}");

    assert_eq!((e.metric, e.examples), (Some(EvaluationMetric::ExactMatch), 20));
    let (base_loss, adapter_loss) = (e.base.loss.expect("base loss"), e.adapter.loss.expect("adapter loss"));
    assert!(base_loss.is_finite() && adapter_loss.is_finite());
    assert!(
        adapter_loss < base_loss,
        "6 steps on these facts lower their loss: {adapter_loss} vs {base_loss}"
    );
    for score in [e.base.score, e.adapter.score] {
        assert!(score.is_some_and(|s| (0.0..=1.0).contains(&s)), "{score:?}");
    }

    let published = read_json(
        &dir.path()
            .join("store/registry/adapters/facts/v1/training_metrics.json"),
    );
    assert_eq!(
        published["evaluation"],
        serde_json::to_value(e).expect("json"),
        "{published}"
    );

    let text = metrics.render();
    for (name, model, value) in [
        ("kubetune_evaluation_loss", "base", e.base.loss),
        ("kubetune_evaluation_loss", "adapter", e.adapter.loss),
        ("kubetune_evaluation_score", "base", e.base.score),
        ("kubetune_evaluation_score", "adapter", e.adapter.score),
    ] {
        let series = format!("{name}{{job=\"ns/facts\",model=\"{model}\"}} {}", value.expect("value"));
        assert!(text.contains(&series), "missing {series} in\n{text}");
    }

    // A pod that finds the version already published reports the evaluation it recorded.
    let again = run_job(job_run(&job, &dir.path().join("work2"))).await.expect("re-run");
    assert_eq!(evaluation_of(&again), e);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adapter_short_of_min_improvement_fails_the_job_and_publishes_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    // A score is a fraction: no adapter gains 1.5 over any base.
    let job = with_evaluation(&setup(dir.path()), Some(EvaluationMetric::ExactMatch), Some(1.5));
    let err = run_job(job_run(&job, &dir.path().join("work")))
        .await
        .expect_err("below the threshold");

    assert_eq!(err.reason(), EVALUATION_BELOW_THRESHOLD);
    assert_eq!(err.exit_code(), EXIT_EVALUATION_BELOW_THRESHOLD);
    assert!(err.is_final());
    let message = err.to_string();
    assert!(
        message.contains("spec.evaluation.minImprovement") && message.contains("nothing was published"),
        "{message}"
    );
    let e = err.evaluation().expect("the evaluation that failed the job");
    assert!(e.base.score.is_some() && e.adapter.score.is_some(), "{e:?}");
    assert!(
        !dir.path().join("store/registry/adapters/facts").exists(),
        "no version may be published"
    );
    assert!(
        !dir.path().join("store/checkpoints/ns/facts-uid-1/latest.json").exists(),
        "a finished job's checkpoints are removed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adapter_that_meets_min_improvement_is_published() {
    let dir = tempfile::tempdir().expect("dir");
    // Without a metric the improvement is the held-out loss decrease; 6 steps make some.
    let job = with_evaluation(&setup(dir.path()), None, Some(0.01));
    let outcome = run_job(job_run(&job, &dir.path().join("work")))
        .await
        .expect("published");
    assert_eq!(published(&outcome).0, 1);
    let e = evaluation_of(&outcome);
    assert_eq!((e.metric, e.base.score, e.adapter.score), (None, None, None));
    let gained = e.base.loss.expect("base") - e.adapter.loss.expect("adapter");
    assert!(gained >= 0.01, "{e:?}");
    assert!(dir
        .path()
        .join("store/registry/adapters/facts/v1/manifest.json")
        .exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_published_version_carries_a_model_card_that_its_manifest_covers() {
    let dir = tempfile::tempdir().expect("dir");
    let job = with_evaluation(&setup(dir.path()), Some(EvaluationMetric::ExactMatch), None);
    let outcome = run_job(job_run(&job, &dir.path().join("work")))
        .await
        .expect("published");
    let e = evaluation_of(&outcome).clone();
    let v1 = dir.path().join("store/registry/adapters/facts/v1");
    let card = std::fs::read(v1.join("README.md")).expect("the version has a README.md");
    let manifest = read_json(&v1.join("manifest.json"));

    let listed = &manifest["files"]["README.md"];
    assert_eq!(
        listed["sha256"],
        kubetune_storage::Sha256Digest::of(&card).to_string(),
        "{manifest}"
    );
    assert_eq!(listed["size"], card.len() as u64);
    let card = String::from_utf8(card).expect("UTF-8");
    assert!(
        card.starts_with("---\n") && card.contains("library_name: peft\n"),
        "{card}"
    );
    let dataset_digest = manifest["dataset"]["digest"].as_str().expect("dataset digest");
    // The base model the trainer loaded, hashed as kubetune_trainer::base_digest defines it.
    let base_digest = kubetune_trainer::base_digest::of_model(&dir.path().join("store/models/tiny"))
        .await
        .expect("base model digest");
    assert_eq!(manifest["base_model"]["digest"], base_digest.to_string(), "{manifest}");
    for needle in [
        format!("- Digest: `{base_digest}`"),
        format!(
            "| train | {} | `{dataset_digest}` | 50 |",
            job.dataset.uri.replace('_', "\\_")
        ),
        format!(
            "| validation | {} | `{dataset_digest}` | 50 |",
            job.dataset.uri.replace('_', "\\_")
        ),
        "| LoRA r | 4 |".to_string(),
        "| Model | Held-out loss | exactMatch |".to_string(),
        format!("| adapter | {:.4} |", e.adapter.loss.expect("loss")),
    ] {
        assert!(card.contains(&needle), "missing {needle:?} in\n{card}");
    }
    let polyline = card.split("points=\"").nth(1).expect("a loss curve");
    let points = polyline[..polyline.find('"').expect("end")].split(' ').count();
    assert_eq!(points, 6, "a point per step of the 6");

    // The manifest carries the evaluation too, for readers that do not parse the metrics file.
    let judged = &manifest["metrics"]["evaluation"];
    assert_eq!(judged["metric"], "exactMatch");
    assert_eq!(judged["examples"], 20);
    assert_eq!(judged["adapter"]["loss"], serde_json::json!(e.adapter.loss));
    assert_eq!(judged["base"]["score"], serde_json::json!(e.base.score));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dpo_job_publishes_an_adapter_whose_manifest_and_metrics_carry_the_dpo_settings_and_rewards() {
    let dir = tempfile::tempdir().expect("dir");
    let mut job = setup(dir.path());
    let pairs = dir.path().join("store/data/pairs.jsonl");
    let lines: Vec<String> = facts()
        .into_iter()
        .map(|(q, a)| serde_json::json!({"prompt": q, "chosen": a, "rejected": "no idea"}).to_string())
        .collect();
    std::fs::write(&pairs, lines.join("\n")).expect("pairs");
    job.method = FineTuneMethod::Dpo;
    job.dataset.uri = uri(&pairs);
    job.dataset.format = DatasetFormat::Preference;
    job.dataset.validation_split = Some(0.2);
    job.dpo = Some(TrainerDpo {
        beta: 0.2,
        loss: DpoLossType::Ipo,
        label_smoothing: 0.0,
    });
    let outcome = run_job(job_run(&job, &dir.path().join("work"))).await.expect("dpo run");
    let TrainerOutcome::Succeeded {
        eval_loss,
        dpo,
        train_dpo,
        step,
        total_steps,
        ..
    } = &outcome
    else {
        panic!("expected a published adapter, got {outcome:?}");
    };
    assert!(eval_loss.is_some_and(f64::is_finite), "{outcome:?}");
    assert!(dpo.as_ref().is_some_and(|d| d.accuracies.is_some()), "{outcome:?}");
    assert!(train_dpo.as_ref().is_some_and(|d| d.margins.is_some()), "{outcome:?}");
    assert_eq!((*step, *total_steps), (Some(6), Some(6)), "{outcome:?}");
    let v1 = dir.path().join("store/registry/adapters/facts/v1");
    let manifest = read_json(&v1.join("manifest.json"));
    assert_eq!(
        manifest["hyperparameters"]["dpo"],
        serde_json::json!({"beta": 0.2, "loss": "ipo", "labelSmoothing": 0.0}),
        "{manifest}"
    );
    let metrics = read_json(&v1.join("training_metrics.json"));
    let eval = &metrics["dpo"]["eval"];
    assert_eq!(eval["pairs"], 10, "{metrics}");
    assert!(eval["rewardsAccuracies"].as_f64().is_some(), "{metrics}");

    // The manifest's own metrics carry the same rewards, for readers of the registry.
    for split in ["train", "eval"] {
        let (file, listed) = (&metrics["dpo"][split], &manifest["metrics"]["dpo"][split]);
        for (ours, theirs) in [
            ("loss", "loss"),
            ("rewards_chosen", "rewardsChosen"),
            ("rewards_rejected", "rewardsRejected"),
            ("rewards_margins", "rewardsMargins"),
            ("rewards_accuracies", "rewardsAccuracies"),
            ("pairs", "pairs"),
        ] {
            assert!(listed[ours].is_number(), "metrics.dpo.{split}.{ours} in {manifest}");
            assert_eq!(listed[ours], file[theirs], "metrics.dpo.{split}.{ours}");
        }
    }
    assert_eq!(manifest["metrics"]["eval_loss"], eval["loss"], "{manifest}");

    // A retried pod that finds the version published reports its held-out rewards from there.
    let again = run_job(job_run(&job, &dir.path().join("work2"))).await.expect("re-run");
    let TrainerOutcome::Succeeded {
        dpo: reported,
        train_dpo: reported_train,
        step: reported_step,
        total_steps: reported_total,
        ..
    } = &again
    else {
        panic!("{again:?}")
    };
    assert_eq!(reported, dpo, "the rewards the first pod reported");
    assert_eq!(
        reported_train, train_dpo,
        "the last step's rewards the first pod reported"
    );
    assert_eq!(
        (*reported_step, *reported_total),
        (Some(6), Some(6)),
        "the steps, from the version's training_metrics.json"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_continued_from_a_published_version_records_it_as_lineage_and_publishes_the_merged_model() {
    let dir = tempfile::tempdir().expect("dir");
    let sft = setup(dir.path());
    let first = run_job(job_run(&sft, &dir.path().join("work1")))
        .await
        .expect("sft job");
    let (_, sft_digest) = published(&first);
    let mut next = sft.clone();
    set_uid(&mut next, dir.path(), "uid-2");
    next.lora.r = 99; // The operator's defaults: under initFrom the adapter's settings win.
    next.init_from = Some(kubetune_crds::trainer_contract::TrainerInitFrom {
        adapter_name: "facts".into(),
        version: 1,
        lora: None,
    });
    next.merge = true;
    let outcome = run_job(job_run(&next, &dir.path().join("work2")))
        .await
        .expect("continued job");
    let TrainerOutcome::Succeeded { adapter, .. } = &outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(adapter.version, 2);
    let v2 = dir.path().join("store/registry/adapters/facts/v2");
    let manifest = read_json(&v2.join("manifest.json"));
    let lineage = &manifest["hyperparameters"]["initFrom"];
    assert_eq!(
        (lineage["adapter"].as_str(), lineage["digest"].as_str()),
        (Some("facts@1"), Some(sft_digest.as_str()))
    );
    assert_eq!(
        manifest["hyperparameters"]["lora"]["r"], 4,
        "the starting adapter's rank, not spec.lora's"
    );
    let card = std::fs::read_to_string(v2.join("README.md")).expect("card");
    assert!(
        card.contains(&format!("- Adapter: facts@1 (manifest digest `{sft_digest}`)")),
        "{card}"
    );
    let merged_uri = adapter.merged_uri.clone().expect("merged model published");
    assert!(merged_uri.ends_with("store/registry/merged/facts/v2"), "{merged_uri}");
    let merged = read_json(&dir.path().join("store/registry/merged/facts/v2/manifest.json"));
    assert_eq!(merged["adapter_digest"].as_str(), Some(adapter.digest.as_str()));
    let base_digest = tiny_base_digest(dir.path()).await;
    assert_eq!(
        merged["base_model"]["digest"].as_str(),
        Some(base_digest.as_str()),
        "the base folded into: {merged}"
    );

    let mut contradicting = next.clone();
    set_uid(&mut contradicting, dir.path(), "uid-3");
    contradicting.init_from.as_mut().expect("initFrom").lora = Some(kubetune_crds::LoraSpec {
        r: 8,
        alpha: 8.0,
        dropout: None,
        target_modules: None,
    });
    let err = run_job(job_run(&contradicting, &dir.path().join("work3")))
        .await
        .expect_err("r 8 against r 4");
    assert!(
        err.to_string()
            .contains("spec.lora.r: 8 differs from the starting adapter's rank 4"),
        "{err}"
    );
    assert_eq!(err.reason(), "InvalidSpec");
    let mut missing = next.clone();
    set_uid(&mut missing, dir.path(), "uid-4");
    missing.init_from.as_mut().expect("initFrom").version = 9;
    let err = run_job(job_run(&missing, &dir.path().join("work4")))
        .await
        .expect_err("no v9");
    assert_eq!(err.reason(), "AdapterNotFound", "{err}");

    // The base model's URI now holds other files than v1 was trained on: continuing is refused.
    let config = dir.path().join("store/models/tiny/config.json");
    let mut text = std::fs::read_to_string(&config).expect("config.json");
    text.push('\n');
    std::fs::write(&config, text).expect("config.json rewritten");
    let mut changed = next.clone();
    set_uid(&mut changed, dir.path(), "uid-5");
    let err = run_job(job_run(&changed, &dir.path().join("work5")))
        .await
        .expect_err("the base changed since v1");
    assert!(
        err.to_string().contains("the base model changed since") && err.to_string().contains("spec.initFrom"),
        "{err}"
    );
    assert_eq!(err.reason(), "InvalidSpec");
}

/// The test base model's digest, as kubetune_trainer::base_digest defines it.
async fn tiny_base_digest(root: &Path) -> String {
    kubetune_trainer::base_digest::of_model(&root.join("store/models/tiny"))
        .await
        .expect("base model digest")
        .to_string()
}

/// Every safetensors file of a model directory, by name, as bytes.
fn weight_files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("model dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("weights"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_the_adapter_was_published_but_not_its_merged_model_merges_the_published_version() {
    let dir = tempfile::tempdir().expect("dir");
    let mut job = setup(dir.path());
    job.merge = true;
    let first = run_job(job_run(&job, &dir.path().join("work1")))
        .await
        .expect("first run");
    let (version, digest) = published(&first);
    let TrainerOutcome::Succeeded { adapter, .. } = &first else {
        unreachable!()
    };
    let merged_uri = adapter.merged_uri.clone().expect("merged model published");
    let merged_dir = dir.path().join("store/registry/merged/facts/v1");
    let merged_then = weight_files(&merged_dir);
    assert!(!merged_then.is_empty(), "the merged model has weights");

    // What a pod leaves that dies after publishing the version and while uploading the merged
    // model: some of its files, no manifest, and the checkpoints not yet removed.
    std::fs::remove_file(merged_dir.join("manifest.json")).expect("no merged manifest");
    for name in merged_then.keys() {
        std::fs::remove_file(merged_dir.join(name)).expect("weights not uploaded");
    }
    let latest = dir.path().join("store/checkpoints/ns/facts-uid-1/latest.json");
    std::fs::create_dir_all(latest.parent().expect("parent")).expect("mkdir");
    std::fs::write(&latest, r#"{"step": 6}"#).expect("leftover checkpoint pointer");

    // The retry, in a fresh pod (an empty work directory): the same version, now merged.
    let retry = run_job(job_run(&job, &dir.path().join("work2"))).await.expect("retry");
    assert_eq!(
        published(&retry),
        (version, digest.clone()),
        "the version already published"
    );
    assert!(
        !dir.path().join("store/registry/adapters/facts/v2").exists(),
        "no second version"
    );
    let TrainerOutcome::Succeeded { adapter, .. } = &retry else {
        unreachable!()
    };
    assert_eq!(adapter.merged_uri.as_deref(), Some(merged_uri.as_str()), "{retry:?}");
    let manifest = read_json(&merged_dir.join("manifest.json"));
    assert_eq!(manifest["adapter_digest"].as_str(), Some(digest.as_str()), "{manifest}");
    assert_eq!(
        manifest["base_model"]["digest"].as_str(),
        Some(tiny_base_digest(dir.path()).await.as_str()),
        "the base the retry hashed and folded into: {manifest}"
    );
    assert_eq!(
        weight_files(&merged_dir),
        merged_then,
        "the published adapter folded into the base gives the weights the first pod merged"
    );
    assert!(!latest.exists(), "the finished job's checkpoints are removed");

    // A later retry finds the merged model whole: it reports it and writes nothing.
    let manifest_bytes = std::fs::read(merged_dir.join("manifest.json")).expect("manifest");
    let again = run_job(job_run(&job, &dir.path().join("work3")))
        .await
        .expect("third run");
    let TrainerOutcome::Succeeded { adapter, .. } = &again else {
        panic!("{again:?}")
    };
    assert_eq!(adapter.merged_uri.as_deref(), Some(merged_uri.as_str()));
    assert_eq!(
        std::fs::read(merged_dir.join("manifest.json")).expect("manifest"),
        manifest_bytes,
        "not merged again"
    );

    // A merged model under that number for another adapter digest is not this job's to replace.
    let mut foreign = manifest.clone();
    foreign["adapter_digest"] = serde_json::json!(format!("sha256:{}", "0".repeat(64)));
    std::fs::write(merged_dir.join("manifest.json"), foreign.to_string()).expect("foreign manifest");
    let err = run_job(job_run(&job, &dir.path().join("work4")))
        .await
        .expect_err("another adapter's merged model");
    assert!(err.to_string().contains("merged/facts/v1"), "{err}");
    assert_eq!(err.reason(), "StorageError");
}
