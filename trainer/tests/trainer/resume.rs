//! A run stopped at a checkpoint and resumed follows the uninterrupted run's loss curve and
//! ends with the same adapter, with or without gradient checkpointing; a progress observer
//! follows both runs step by step.

use crate::common::*;
use candle_core::Device;
use kubetune_trainer::{run, ProgressObserver, RunOptions, StepProgress};
use std::sync::{Arc, Mutex};

#[test]
fn resumed_run_matches_uninterrupted_run() {
    let dir = tempfile::tempdir().expect("dir");
    let (model_dir, data) = (dir.path().join("model"), dir.path().join("facts.jsonl"));
    tiny_model(&model_dir);
    write_facts(&data);
    let config_for = |out: &str| {
        let mut c = facts_config(&model_dir, &data, &dir.path().join(out));
        // Dropout, accumulation and a non-trivial schedule all have state a resume must restore.
        c.lora.dropout = 0.1;
        c.training.epochs = None;
        c.training.max_steps = Some(12);
        c.training.batch_size = 4;
        c.training.gradient_accumulation_steps = 2;
        c.training.save_steps = 4;
        c.training.weight_decay = 0.01;
        c
    };

    let full = run(&config_for("full"), &RunOptions::default()).expect("uninterrupted run");

    let resumed_config = config_for("resumed");
    let stopped = run(
        &resumed_config,
        &RunOptions {
            stop_after_steps: Some(6),
            ..RunOptions::default()
        },
    )
    .expect("interrupted run");
    assert!(!stopped.completed && stopped.steps == 6);
    let resumed = run(
        &resumed_config,
        &RunOptions {
            resume: true,
            ..RunOptions::default()
        },
    )
    .expect("resumed run");
    assert_eq!(resumed.resumed_from_step, Some(6));
    assert!(resumed.completed);

    assert_eq!(full.train_history.len(), 12);
    assert_eq!(resumed.train_history.len(), 12);
    for (a, b) in full.train_history.iter().zip(&resumed.train_history) {
        assert_eq!(a.step, b.step);
        assert!(
            (a.loss - b.loss).abs() < 1e-5,
            "step {}: {} vs {}",
            a.step,
            a.loss,
            b.loss
        );
    }
    let load = |out: &str| {
        kubetune_model::tensors::load(&dir.path().join(out).join("adapter_model.safetensors"), &Device::Cpu)
            .expect("adapter")
    };
    let (a, b) = (load("full"), load("resumed"));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in &a {
        let diff: f32 = (t - &b[name])
            .expect("sub")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar()
            .expect("s");
        assert!(diff < 1e-5, "{name} differs by {diff}");
    }

    // Gradient checkpointing recomputes activations but follows the same curve, and may be
    // switched between the interrupted and the resumed run.
    let mut checkpointed = config_for("checkpointed");
    checkpointed.training.gradient_checkpointing = true;
    run(
        &checkpointed,
        &RunOptions {
            stop_after_steps: Some(6),
            ..RunOptions::default()
        },
    )
    .expect("checkpointed run");
    checkpointed.training.gradient_checkpointing = false;
    let mixed = run(
        &checkpointed,
        &RunOptions {
            resume: true,
            ..RunOptions::default()
        },
    )
    .expect("resumed plainly");
    assert_eq!(mixed.resumed_from_step, Some(6));
    for (a, b) in full.train_history.iter().zip(&mixed.train_history) {
        assert!(
            (a.loss - b.loss).abs() < 1e-4,
            "checkpointed step {}: {} vs {}",
            a.step,
            a.loss,
            b.loss
        );
    }
    assert_eq!(mixed.train_history.len(), 12);

    // Changing a setting that shapes the trajectory makes the checkpoint unusable.
    let mut changed = config_for("full");
    changed.training.learning_rate = 0.5;
    let stopped_dir = config_for("changed");
    run(
        &stopped_dir,
        &RunOptions {
            stop_after_steps: Some(4),
            ..RunOptions::default()
        },
    )
    .expect("stop");
    changed.output = stopped_dir.output.clone();
    let err = run(
        &changed,
        &RunOptions {
            resume: true,
            ..RunOptions::default()
        },
    )
    .expect_err("changed settings");
    assert!(err.to_string().contains("training settings differ"), "{err}");
}

/// Records what a progress observer is told.
#[derive(Default)]
struct Recorder {
    starts: Mutex<Vec<(u64, u64)>>,
    steps: Mutex<Vec<StepProgress>>,
}

impl ProgressObserver for Recorder {
    fn start(&self, step: u64, total_steps: u64) {
        self.starts.lock().expect("lock").push((step, total_steps));
    }
    fn step(&self, progress: &StepProgress) {
        self.steps.lock().expect("lock").push(*progress);
    }
}

#[test]
fn a_progress_observer_sees_every_step_also_across_a_resume() {
    let dir = tempfile::tempdir().expect("dir");
    let (model_dir, data) = (dir.path().join("model"), dir.path().join("facts.jsonl"));
    tiny_model(&model_dir);
    write_facts(&data);
    let mut config = facts_config(&model_dir, &data, &dir.path().join("out"));
    config.training.epochs = None;
    config.training.max_steps = Some(5);
    // No evaluation: only the steps matter here.
    config.dataset.validation_path = None;
    let observe = |rec: &Arc<Recorder>, resume: bool, stop: Option<u64>| RunOptions {
        resume,
        stop_after_steps: stop,
        progress: Some(rec.clone() as Arc<dyn ProgressObserver>),
        ..RunOptions::default()
    };

    let first = Arc::new(Recorder::default());
    let stopped = run(&config, &observe(&first, false, Some(2))).expect("stopped run");
    let second = Arc::new(Recorder::default());
    let resumed = run(&config, &observe(&second, true, None)).expect("resumed run");

    assert_eq!(*first.starts.lock().expect("lock"), [(0, 5)]);
    assert_eq!(
        *second.starts.lock().expect("lock"),
        [(2, 5)],
        "a resumed run starts where the checkpoint is"
    );
    let steps: Vec<StepProgress> = [first, second]
        .iter()
        .flat_map(|r| r.steps.lock().expect("lock").clone())
        .collect();
    assert_eq!(steps.iter().map(|p| p.step).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    // The same losses as the run's own history, each with the total and a measured rate.
    let history: Vec<_> = stopped
        .train_history
        .iter()
        .chain(&resumed.train_history[2..])
        .map(|p| p.loss)
        .collect();
    assert_eq!(steps.iter().map(|p| p.loss).collect::<Vec<_>>(), history);
    assert!(
        steps
            .iter()
            .all(|p| p.total_steps == 5 && p.tokens_per_second > 0.0 && p.learning_rate > 0.0),
        "{steps:?}"
    );
}
