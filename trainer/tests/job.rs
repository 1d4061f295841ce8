//! Job mode through object storage (file:// here; the e2e suite runs it against S3): publish,
//! a second version, idempotent re-runs, a bad dataset named by URI and line, and a stopped run
//! that resumes from the checkpoint it uploaded.

mod common;

use common::*;
use kubetune_crds::trainer_contract::{JobIdentity, TrainerDataset, TrainerJob, TrainerLora, TrainerOutcome, TrainerTraining};
use kubetune_crds::{DatasetFormat, FineTuneMethod, LrScheduler, TargetModule};
use kubetune_storage::{Credentials, Storage};
use kubetune_trainer::job::{run_job, JobError, JobRun};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// A store with the tiny model and the fact dataset, and a job over them.
fn setup(root: &Path) -> TrainerJob {
    tiny_model(&root.join("store/models/tiny"));
    std::fs::create_dir_all(root.join("store/data")).expect("mkdir");
    write_facts(&root.join("store/data/facts.jsonl"));
    TrainerJob {
        owner: JobIdentity { namespace: "ns".into(), name: "facts".into(), uid: "uid-1".into() },
        base_model_uri: uri(&root.join("store/models/tiny")),
        dataset: TrainerDataset {
            uri: uri(&root.join("store/data/facts.jsonl")),
            format: DatasetFormat::Instruction,
            validation_split: None,
            validation_uri: None,
            skip_invalid: false,
        },
        method: FineTuneMethod::Lora,
        lora: TrainerLora { r: 4, alpha: 8.0, dropout: 0.0, target_modules: vec![TargetModule::QProj, TargetModule::VProj] },
        quantization: None,
        training: TrainerTraining {
            epochs: None,
            max_steps: Some(6),
            learning_rate: 1e-2,
            batch_size: 10,
            gradient_accumulation_steps: 1,
            max_seq_length: 64,
            warmup_steps: 0,
            scheduler: LrScheduler::Constant,
            seed: 7,
            checkpoint_steps: Some(2),
        },
        adapter_name: "facts".into(),
        registry: uri(&root.join("store/registry")),
        checkpoint_uri: uri(&root.join("store/checkpoints/ns/facts-uid-1")),
    }
}

fn job_run(job: &TrainerJob, work: &Path, stop: Option<Arc<AtomicBool>>) -> JobRun {
    JobRun { job: job.clone(), work_dir: work.to_path_buf(), credentials: Credentials::none(), metrics: None, stop, device: candle_core::Device::Cpu }
}

fn published(outcome: &TrainerOutcome) -> (u32, String) {
    match outcome {
        TrainerOutcome::Succeeded { adapter, .. } => (adapter.version, adapter.digest.clone()),
        other => panic!("expected success, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_versions_once_per_job() {
    let dir = tempfile::tempdir().expect("dir");
    let job = setup(dir.path());
    let first = run_job(job_run(&job, &dir.path().join("work1"), None)).await.expect("first run");
    let (version, digest) = published(&first);
    assert_eq!(version, 1);
    let TrainerOutcome::Succeeded { adapter, train_loss, resumed_from_step, .. } = &first else { unreachable!() };
    assert_eq!(adapter.reference.as_deref(), Some("facts@1"));
    assert!(train_loss.is_some_and(f64::is_finite));
    assert_eq!(*resumed_from_step, None);
    let config = std::fs::read_to_string(dir.path().join("store/registry/adapters/facts/v1/adapter_config.json")).expect("published config");
    assert!(config.contains(&job.base_model_uri), "base_model_name_or_path is the model URI the server loads: {config}");
    assert!(!dir.path().join("store/checkpoints/ns/facts-uid-1/latest.json").exists(), "checkpoints are removed after publishing");

    // The same job again (a pod that died after publishing): the same version, not a new one.
    let again = run_job(job_run(&job, &dir.path().join("work2"), None)).await.expect("re-run");
    assert_eq!(published(&again), (1, digest));

    // Another job for the same adapter name: the next version.
    let mut second = job.clone();
    second.owner.uid = "uid-2".into();
    second.checkpoint_uri = uri(&dir.path().join("store/checkpoints/ns/facts-uid-2"));
    let next = run_job(job_run(&second, &dir.path().join("work3"), None)).await.expect("second job");
    assert_eq!(published(&next).0, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_line_is_named_by_uri_and_line() {
    let dir = tempfile::tempdir().expect("dir");
    let job = setup(dir.path());
    std::fs::write(dir.path().join("store/data/facts.jsonl"), "{\"instruction\": \"a\", \"response\": \"b\"}\n{\"instruction\": \n").expect("write");
    let err = run_job(job_run(&job, &dir.path().join("work"), None)).await.expect_err("bad dataset");
    assert!(matches!(err, JobError::DataLine { line: 2, .. }), "{err:?}");
    assert_eq!((err.reason(), err.exit_code()), ("DatasetInvalid", 2));
    assert!(err.to_string().starts_with(&format!("{} line 2: ", job.dataset.uri)), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_run_resumes_from_its_uploaded_checkpoint() {
    let dir = tempfile::tempdir().expect("dir");
    let job = setup(dir.path());
    // SIGTERM before the first step ends: checkpoint, upload, stop.
    let stop = Arc::new(AtomicBool::new(true));
    let err = run_job(job_run(&job, &dir.path().join("work1"), Some(stop))).await.expect_err("stopped");
    assert!(matches!(err, JobError::Stopped { step: 1 }), "{err:?}");
    assert_eq!(err.exit_code(), 143);
    assert!(!err.is_final(), "a stop is retried, not reported as a failure");
    let checkpoints = Storage::from_uri(&job.checkpoint_uri, &Credentials::none()).expect("store");
    let pointer = checkpoints.get_bytes("latest.json").await.expect("latest.json");
    assert_eq!(std::str::from_utf8(&pointer).expect("utf8"), r#"{"step":1}"#);

    // A fresh pod (new work directory) resumes from step 1 and publishes.
    let outcome = run_job(job_run(&job, &dir.path().join("work2"), None)).await.expect("resumed run");
    let TrainerOutcome::Succeeded { resumed_from_step, adapter, .. } = outcome else { panic!("not published") };
    assert_eq!((resumed_from_step, adapter.version), (Some(1), 1));
}
