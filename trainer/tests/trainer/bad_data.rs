//! Malformed datasets are rejected before training with file, line and reason; skipInvalid
//! skips and counts; an empty dataset is always an error.

use crate::common::*;
use kubetune_trainer::config::DataFormat;
use kubetune_trainer::data::load_jsonl;
use kubetune_trainer::{run, RunOptions, TrainError};

const GOOD_INSTRUCTION: &str = r#"{"instruction": "Say hi", "response": "hi"}"#;
const GOOD_CHAT: &str =
    r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;

#[test]
fn each_malformed_file_is_rejected_with_its_line_and_reason() {
    let cases: &[(DataFormat, String, usize, &str)] = &[
        (DataFormat::Instruction, format!("{GOOD_INSTRUCTION}\n{{\"instruction\": \"x\", \"response\": }}\n"), 2, "invalid JSON"),
        (DataFormat::Instruction, format!("{GOOD_INSTRUCTION}\n{GOOD_INSTRUCTION}\n{{\"instruction\": \"x\"}}\n"), 3, "missing field `response`"),
        (DataFormat::Instruction, r#"{"instruction": "x", "response": 42}"#.to_string(), 1, "field `response` must be a string, got a number"),
        (DataFormat::Instruction, r#"{"instruction": "  ", "response": "y"}"#.to_string(), 1, "field `instruction` is empty"),
        (DataFormat::Instruction, r#"{"instruction": "x", "context": [1], "response": "y"}"#.to_string(), 1, "field `context` must be a string, got a list"),
        // Blank lines still count in the line numbers, as an editor shows them.
        (DataFormat::Instruction, format!("{GOOD_INSTRUCTION}\n\n[1, 2]\n"), 3, "expected a JSON object, got a list"),
        (DataFormat::Chat, r#"{"messages": "hello"}"#.to_string(), 1, "field `messages` must be a list, got a string"),
        (DataFormat::Chat, r#"{"messages": []}"#.to_string(), 1, "field `messages` is empty"),
        (DataFormat::Chat, format!("{GOOD_CHAT}\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"a\"}}, {{\"role\": \"robot\", \"content\": \"b\"}}]}}\n"), 2, "`messages[1].role` is `robot`"),
        (DataFormat::Chat, r#"{"messages": [{"role": "user"}]}"#.to_string(), 1, "`messages[0].content` is missing"),
        (DataFormat::Chat, r#"{"messages": [{"role": "user", "content": "only a question"}]}"#.to_string(), 1, "no assistant message"),
        (DataFormat::Text, r#"{"txt": "typo"}"#.to_string(), 1, "missing field `text`"),
    ];
    let dir = tempfile::tempdir().expect("dir");
    for (i, (format, content, line, reason)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.jsonl"));
        std::fs::write(&path, content).expect("write");
        let err = load_jsonl(&path, *format, false).expect_err(content);
        match &err {
            TrainError::Data {
                file,
                line: got,
                message,
            } => {
                assert_eq!(file, &path);
                assert_eq!(got, line, "case {i}: {err}");
                assert!(message.contains(reason), "case {i}: {err}");
            }
            other => panic!("case {i}: expected a data error, got {other}"),
        }
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("{}:{line}: ", path.display())),
            "case {i}: {shown}"
        );
        assert_eq!(err.exit_code(), 2);
    }
}

#[test]
fn skip_invalid_counts_and_empty_is_always_an_error() {
    let dir = tempfile::tempdir().expect("dir");
    let mixed = dir.path().join("mixed.jsonl");
    std::fs::write(
        &mixed,
        format!("{GOOD_INSTRUCTION}\nnot json\n{{\"instruction\": 1}}\n{GOOD_INSTRUCTION}\n"),
    )
    .expect("w");
    let loaded = load_jsonl(&mixed, DataFormat::Instruction, true).expect("skips");
    assert_eq!((loaded.records.len(), loaded.skipped), (2, 2));

    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n  \n").expect("w");
    for skip in [false, true] {
        let err = load_jsonl(&empty, DataFormat::Text, skip)
            .expect_err("empty")
            .to_string();
        assert!(err.contains("empty.jsonl") && err.contains("dataset is empty"), "{err}");
    }
    let all_bad = dir.path().join("bad.jsonl");
    std::fs::write(&all_bad, "nope\nnope\n").expect("w");
    let err = load_jsonl(&all_bad, DataFormat::Text, true)
        .expect_err("all skipped")
        .to_string();
    assert!(err.contains("all 2 lines were invalid"), "{err}");
}

#[test]
fn a_bad_line_fails_the_run_before_training() {
    let dir = tempfile::tempdir().expect("dir");
    let (model_dir, data, out) = (
        dir.path().join("model"),
        dir.path().join("d.jsonl"),
        dir.path().join("out"),
    );
    tiny_model(&model_dir);
    std::fs::write(&data, format!("{GOOD_INSTRUCTION}\n{{\"instruction\": \"x\"}}\n")).expect("w");
    let err = run(&facts_config(&model_dir, &data, &out), &RunOptions::default()).expect_err("bad data");
    assert!(err.to_string().contains("d.jsonl:2: missing field `response`"), "{err}");
    assert_eq!(err.reason(), "DatasetInvalid");
    assert!(!out.join("training_metrics.json").exists(), "no training happened");
}

#[test]
fn divergence_stops_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("dir");
    let (model_dir, data, out) = (
        dir.path().join("model"),
        dir.path().join("d.jsonl"),
        dir.path().join("out"),
    );
    tiny_model(&model_dir);
    write_facts(&data);
    let mut config = facts_config(&model_dir, &data, &out);
    config.training.learning_rate = 1e30;
    config.training.max_grad_norm = 0.0;
    config.training.warmup_steps = 0;
    config.training.scheduler = kubetune_trainer::config::Scheduler::Constant;
    config.training.epochs = None;
    config.training.max_steps = Some(10);
    let err = run(&config, &RunOptions::default()).expect_err("diverges");
    assert!(matches!(err, TrainError::Diverged { .. }), "{err}");
    assert!(err.to_string().contains("training stopped"), "{err}");
    assert_eq!(err.exit_code(), 3);
}
