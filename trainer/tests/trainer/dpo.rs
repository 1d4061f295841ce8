//! DPO on preference pairs: the held-out reward accuracy rises on a learnable preference, and
//! malformed preference lines are rejected naming the line and the field.

use crate::common::*;
use kubetune_trainer::config::{DataFormat, DpoLoss, DpoSettings, Method, QuantizationSettings, Scheduler};
use kubetune_trainer::data::load_jsonl;
use kubetune_trainer::metrics::Metrics;
use kubetune_trainer::{run, RunOptions, TrainError};
use std::sync::Arc;

const POLITE: [&str; 4] = [
    "Happy to help: {n} likes {t}.",
    "Thanks for asking! {n} likes {t}.",
    "Of course, {n} likes {t}.",
    "Glad you asked: {n} likes {t}.",
];
const RUDE: [&str; 4] = [
    "Figure it out yourself.",
    "Stop bothering me.",
    "Not my problem, go away.",
    "Who cares, ask someone else.",
];

/// One pair per fact: the polite answer chosen, a rude one rejected. The preference is the
/// tone, not the fact, so held-out prompts (other names) follow it too.
fn write_pairs(path: &std::path::Path) {
    let lines: Vec<String> = facts()
        .into_iter()
        .enumerate()
        .map(|(i, (q, thing))| {
            let name = q.trim_start_matches("What does ").trim_end_matches(" like?");
            let chosen = POLITE[i % 4].replace("{n}", name).replace("{t}", &thing);
            serde_json::json!({"prompt": q, "chosen": chosen, "rejected": RUDE[(i / 4) % 4]}).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").expect("write pairs");
}

#[test]
fn dpo_raises_the_held_out_reward_accuracy_on_a_learnable_preference() {
    learns_the_preference(None);
}

#[test]
fn dpo_on_a_4_bit_base_learns_the_preference_too() {
    learns_the_preference(Some(QuantizationSettings { bits: 4 }));
}

fn learns_the_preference(quantization: Option<QuantizationSettings>) {
    let dir = tempfile::tempdir().expect("dir");
    let (model_dir, data, out) = (
        dir.path().join("model"),
        dir.path().join("pairs.jsonl"),
        dir.path().join("out"),
    );
    tiny_model(&model_dir);
    write_pairs(&data);
    let mut config = facts_config(&model_dir, &data, &out);
    config.method = Method::Dpo;
    config.quantization = quantization;
    config.dataset.format = DataFormat::Preference;
    config.dataset.validation_path = None;
    config.dataset.validation_split = Some(0.2);
    config.dpo = Some(DpoSettings {
        beta: 0.1,
        loss: DpoLoss::Sigmoid,
        label_smoothing: 0.0,
    });
    config.training.epochs = Some(6);
    config.training.batch_size = 8;
    config.training.scheduler = Scheduler::Constant;
    config.training.warmup_steps = 0;
    let metrics = Arc::new(Metrics::new("ns/polite").expect("metrics"));
    let options = RunOptions {
        metrics: Some(metrics.clone()),
        ..RunOptions::default()
    };
    let m = run(&config, &options).expect("training");
    let dpo = m.dpo.expect("dpo metrics");
    let eval = dpo.eval.expect("held-out pairs");
    eprintln!(
        "dpo ({quantization:?}): {} steps, eval loss {:?} -> {:?}, held-out {eval:?}, last step {:?}",
        m.steps, m.initial_eval_loss, m.final_eval_loss, dpo.train
    );
    assert_eq!(eval.pairs, 10);
    // An untouched adapter is the reference itself: every reward is 0 and no pair is won.
    let initial = m.initial_eval_loss.expect("initial eval");
    assert!((initial - std::f64::consts::LN_2).abs() < 1e-4, "{initial}");
    assert!(eval.rewards_accuracies >= 0.9, "{eval:?}");
    assert!(eval.rewards_margins > 0.0 && eval.loss < initial, "{eval:?}");
    let page = metrics.render();
    let exported = format!(
        "kubetune_train_dpo_rewards_accuracies{{job=\"ns/polite\",split=\"eval\"}} {}",
        eval.rewards_accuracies
    );
    assert!(page.contains(&exported), "{exported} missing in\n{page}");
    assert!(
        page.contains("kubetune_train_dpo_loss{job=\"ns/polite\",split=\"train\"}"),
        "{page}"
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training_metrics.json")).expect("metrics"))
            .expect("json");
    assert_eq!(
        written["dpo"]["eval"]["rewardsAccuracies"].as_f64(),
        Some(eval.rewards_accuracies)
    );
}

const GOOD: &str = r#"{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}"#;

#[test]
fn each_malformed_preference_line_is_rejected_with_its_line_and_field() {
    let cases: &[(String, usize, &str)] = &[
        (format!("{GOOD}\n{{\"chosen\": \"a\", \"rejected\": \"b\"}}\n"), 2, "missing field `prompt`"),
        (r#"{"prompt": "Hi", "rejected": "b"}"#.into(), 1, "missing field `chosen`"),
        (r#"{"prompt": "Hi", "chosen": "a"}"#.into(), 1, "missing field `rejected`"),
        (r#"{"prompt": 3, "chosen": "a", "rejected": "b"}"#.into(), 1, "field `prompt` must be a string or a list of messages, got a number"),
        (r#"{"prompt": " ", "chosen": "a", "rejected": "b"}"#.into(), 1, "field `prompt` is empty"),
        (r#"{"prompt": "Hi", "chosen": "", "rejected": "b"}"#.into(), 1, "field `chosen` is empty"),
        (r#"{"prompt": "Hi", "chosen": "a", "rejected": {"x": 1}}"#.into(), 1, "field `rejected` must be a string or a list of assistant messages, got an object"),
        (r#"{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}], "chosen": "a", "rejected": "b"}"#.into(), 1, "field `prompt` ends with an assistant message"),
        (r#"{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}"#.into(), 1, "`prompt[0].content` is missing"),
        (r#"{"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}"#.into(), 1, "`chosen[0].role` is `user`; an answer holds assistant messages only"),
        (r#"{"prompt": "Hi", "chosen": "a", "rejected": []}"#.into(), 1, "field `rejected` is empty"),
        (format!("{GOOD}\n\n{GOOD}\n{{\"prompt\": \"Hi\", \"chosen\": \"a\", \"rejected\": [{{\"role\": \"robot\", \"content\": \"b\"}}]}}\n"), 4, "`rejected[0].role` is `robot`"),
    ];
    let dir = tempfile::tempdir().expect("dir");
    for (i, (content, line, reason)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.jsonl"));
        std::fs::write(&path, content).expect("write");
        let err = load_jsonl(&path, DataFormat::Preference, false).expect_err(content);
        let TrainError::Data { line: got, message, .. } = &err else {
            panic!("case {i}: expected a data error, got {err}");
        };
        assert_eq!(got, line, "case {i}: {err}");
        assert!(message.contains(reason), "case {i}: {err}");
        assert!(
            err.to_string().starts_with(&format!("{}:{line}: ", path.display())),
            "case {i}: {err}"
        );
    }
}

#[test]
fn chat_prompts_and_assistant_message_answers_are_accepted() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("ok.jsonl");
    let line = r#"{"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Go away."}"#;
    std::fs::write(&path, format!("{GOOD}\n{line}\n")).expect("write");
    let loaded = load_jsonl(&path, DataFormat::Preference, false).expect("valid");
    assert_eq!(loaded.records.len(), 2);
}

#[test]
fn the_example_preference_data_teaches_the_tiny_model_its_tone() {
    let dir = tempfile::tempdir().expect("dir");
    let (model_dir, out) = (dir.path().join("model"), dir.path().join("out"));
    tiny_model(&model_dir);
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/support-tone-pairs.jsonl");
    // The settings of examples/dpo-finetunejob.yaml.
    let mut config = facts_config(&model_dir, &data, &out);
    config.method = Method::Dpo;
    config.dataset.format = DataFormat::Preference;
    config.dataset.validation_path = None;
    config.dataset.validation_split = Some(0.25);
    config.dpo = Some(DpoSettings::default());
    config.training.epochs = Some(10);
    config.training.batch_size = 4;
    config.training.max_seq_length = 96;
    config.training.scheduler = Scheduler::Constant;
    config.training.warmup_steps = 0;
    config.training.seed = 42;
    let m = run(&config, &RunOptions::default()).expect("training");
    let eval = m.dpo.and_then(|d| d.eval).expect("held-out pairs");
    eprintln!("example: {} steps, held-out {eval:?}", m.steps);
    assert_eq!(eval.pairs, 4);
    assert!(eval.rewards_accuracies >= 0.75, "{eval:?}");
}

#[test]
fn a_dpo_run_stopped_at_a_checkpoint_and_resumed_follows_the_uninterrupted_run() {
    let dir = tempfile::tempdir().expect("dir");
    let (model_dir, data) = (dir.path().join("model"), dir.path().join("pairs.jsonl"));
    tiny_model(&model_dir);
    write_pairs(&data);
    let config_for = |out: &str| {
        let mut c = facts_config(&model_dir, &data, &dir.path().join(out));
        c.method = Method::Dpo;
        c.dataset.format = DataFormat::Preference;
        c.dpo = Some(DpoSettings::default());
        // Dropout and accumulation have state a resume must restore.
        c.lora.dropout = 0.1;
        c.training.epochs = None;
        c.training.max_steps = Some(6);
        c.training.batch_size = 4;
        c.training.gradient_accumulation_steps = 2;
        c
    };
    let full = run(&config_for("full"), &RunOptions::default()).expect("uninterrupted run");
    let resumed_config = config_for("resumed");
    let stopped = RunOptions {
        stop_after_steps: Some(3),
        ..RunOptions::default()
    };
    assert!(!run(&resumed_config, &stopped).expect("interrupted run").completed);
    let resuming = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let resumed = run(&resumed_config, &resuming).expect("resumed run");
    assert_eq!(resumed.resumed_from_step, Some(3));
    assert_eq!(full.train_history.len(), resumed.train_history.len());
    for (a, b) in full.train_history.iter().zip(&resumed.train_history) {
        assert!(
            (a.loss - b.loss).abs() < 1e-5,
            "step {}: {} vs {}",
            a.step,
            a.loss,
            b.loss
        );
    }
    let (a, b) = (
        full.dpo.and_then(|d| d.eval).expect("eval"),
        resumed.dpo.and_then(|d| d.eval).expect("eval"),
    );
    assert!((a.rewards_margins - b.rewards_margins).abs() < 1e-4, "{a:?} vs {b:?}");
}
