//! From records to training sequences: which tokens count in the loss, truncation, packing.

mod common;

use common::*;
use kubetune_trainer::data::batch::{pack, truncate, PrepareStats};
use kubetune_trainer::data::records::parse_line;
use kubetune_trainer::data::render::render;
use kubetune_trainer::data::tokenize::TextTokenizer;
use kubetune_trainer::config::DataFormat;

fn tokenizer() -> (tempfile::TempDir, TextTokenizer) {
    let dir = tempfile::tempdir().expect("dir");
    tiny_model(dir.path());
    let tok = TextTokenizer::load(dir.path(), None).expect("tokenizer");
    (dir, tok)
}

#[test]
fn loss_covers_only_the_response_and_eos() {
    let (_dir, tok) = tokenizer();
    let rec = parse_line(r#"{"instruction": "What does Ann like?", "response": "apples"}"#, DataFormat::Instruction).expect("parse");
    let ex = tok.tokenize(&render(&rec)).expect("tokenize");
    assert_eq!(ex.ids[0], kubetune_model::tiny::BOS_ID, "BOS from tokenizer_config add_bos_token");
    assert_eq!(*ex.ids.last().expect("eos"), tok.eos);
    let trained: Vec<u32> = ex.ids.iter().zip(&ex.trained).filter(|(_, t)| **t).map(|(i, _)| *i).collect();
    let response = tok.encode("apples", false).expect("encode");
    assert_eq!(trained, [response, vec![tok.eos]].concat());
}

#[test]
fn chat_trains_on_assistant_turns_only() {
    let (_dir, tok) = tokenizer();
    let line = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye now"}]}"#;
    let ex = tok.tokenize(&render(&parse_line(line, DataFormat::Chat).expect("parse"))).expect("tokenize");
    let trained: Vec<u32> = ex.ids.iter().zip(&ex.trained).filter(|(_, t)| **t).map(|(i, _)| *i).collect();
    let text = tok.decode(&trained).expect("decode");
    assert_eq!(text.replace('\n', "|"), "Hello|Bye now|", "special tokens are skipped when decoding");
    assert!(!text.contains("Be brief") && !text.contains("Hi"));
}

#[test]
fn truncation_counts_and_packing_fills_sequences() {
    let (_dir, tok) = tokenizer();
    let mk = |response: &str| {
        let line = serde_json::json!({"instruction": "Q", "response": response}).to_string();
        tok.tokenize(&render(&parse_line(&line, DataFormat::Instruction).expect("parse"))).expect("tokenize")
    };
    let long = mk(&"the garden ".repeat(40));
    let short = mk("tea");
    let prompt_len = tok.encode_prompt("### Instruction:\nQ\n\n### Response:\n").expect("p").len();
    let mut stats = PrepareStats::default();
    let out = truncate(vec![long, short.clone(), short.clone()], 32, &mut stats);
    assert_eq!(stats.truncated, 1);
    assert!(out.iter().all(|e| e.ids.len() <= 32));
    // A limit shorter than the prompt leaves nothing to learn: dropped and counted.
    let mut stats = PrepareStats::default();
    assert!(truncate(vec![short.clone()], prompt_len - 1, &mut stats).is_empty());
    assert_eq!(stats.dropped_no_target, 1);

    let packed = pack(vec![short.clone(); 5], short.ids.len() * 2);
    assert_eq!(packed.len(), 3);
    assert_eq!(packed[0].ids.len(), short.ids.len() * 2);
    assert_eq!(packed[0].trained_tokens(), 2 * short.trained_tokens());
}

#[test]
fn a_chat_template_is_refused_rather_than_ignored() {
    let dir = tempfile::tempdir().expect("dir");
    let (model_dir, data, out) = (dir.path().join("model"), dir.path().join("chat.jsonl"), dir.path().join("out"));
    tiny_model(&model_dir);
    let cfg_path = model_dir.join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("r")).expect("json");
    cfg["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}".into();
    std::fs::write(&cfg_path, cfg.to_string()).expect("w");
    std::fs::write(&data, r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#).expect("w");
    let mut config = facts_config(&model_dir, &data, &out);
    config.dataset.format = DataFormat::Chat;
    config.dataset.validation_path = None;
    let err = kubetune_trainer::run(&config, &Default::default()).expect_err("template").to_string();
    assert!(err.contains("chat_template"), "{err}");
}
