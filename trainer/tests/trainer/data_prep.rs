//! From records to training sequences: which tokens count in the loss, truncation, packing.

use crate::common::*;
use kubetune_model::chat::ChatMessage;
use kubetune_trainer::config::{DataFormat, TrainConfig};
use kubetune_trainer::data::batch::{pack, truncate, PrepareStats};
use kubetune_trainer::data::records::parse_line;
use kubetune_trainer::data::render::render;
use kubetune_trainer::data::tokenize::TextTokenizer;
use kubetune_trainer::prepare::prepare;
use std::path::Path;

fn tokenizer() -> (tempfile::TempDir, TextTokenizer) {
    let dir = tempfile::tempdir().expect("dir");
    tiny_model(dir.path());
    let tok = TextTokenizer::load(dir.path(), None).expect("tokenizer");
    (dir, tok)
}

#[test]
fn a_tokenizer_with_ids_past_the_models_vocabulary_is_refused_naming_vocab_size() {
    let (dir, tok) = tokenizer();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).expect("config")).expect("json");
    let vocab = config["vocab_size"].as_u64().expect("vocab_size") as usize;
    tok.check_fits(vocab).expect("the tiny model's own tokenizer fits");
    let err = tok.check_fits(vocab / 2).expect_err("half the rows").to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    assert!(err.contains(&format!("vocab_size {}", vocab / 2)), "{err}");
}

#[test]
fn loss_covers_only_the_response_and_eos() {
    let (_dir, tok) = tokenizer();
    let rec = parse_line(
        r#"{"instruction": "What does Ann like?", "response": "apples"}"#,
        DataFormat::Instruction,
    )
    .expect("parse");
    let ex = tok.tokenize(&render(&rec)).expect("tokenize");
    assert_eq!(
        ex.ids[0],
        kubetune_model::tiny::BOS_ID,
        "BOS from tokenizer_config add_bos_token"
    );
    assert_eq!(*ex.ids.last().expect("eos"), tok.eos);
    let trained: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.trained)
        .filter(|(_, t)| **t)
        .map(|(i, _)| *i)
        .collect();
    let response = tok.encode("apples", false).expect("encode");
    assert_eq!(trained, [response, vec![tok.eos]].concat());
}

#[test]
fn chat_trains_on_assistant_turns_only() {
    let (_dir, tok) = tokenizer();
    let line = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye now"}]}"#;
    let ex = tok
        .tokenize(&render(&parse_line(line, DataFormat::Chat).expect("parse")))
        .expect("tokenize");
    let trained: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.trained)
        .filter(|(_, t)| **t)
        .map(|(i, _)| *i)
        .collect();
    let text = tok.decode(&trained).expect("decode");
    assert_eq!(
        text.replace('\n', "|"),
        "Hello|Bye now|",
        "special tokens are skipped when decoding"
    );
    assert!(!text.contains("Be brief") && !text.contains("Hi"));
}

#[test]
fn truncation_counts_and_packing_fills_sequences() {
    let (_dir, tok) = tokenizer();
    let mk = |response: &str| {
        let line = serde_json::json!({"instruction": "Q", "response": response}).to_string();
        tok.tokenize(&render(&parse_line(&line, DataFormat::Instruction).expect("parse")))
            .expect("tokenize")
    };
    let long = mk(&"the garden ".repeat(40));
    let short = mk("tea");
    let prompt_len = tok
        .encode_prompt("### Instruction:\nQ\n\n### Response:\n")
        .expect("p")
        .len();
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

/// A ChatML-style template (Qwen2 and many others ship one like it).
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                      {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A copy of the tiny model whose tokenizer_config.json has `template` as its chat_template.
/// With `chatml_tokens`, tokenizer.json also learns <|im_start|> and <|im_end|> as special
/// tokens, as ChatML models have them (their ids lie past the tiny model's embeddings, so
/// such a copy is for data preparation only).
fn model_with_template(dir: &Path, template: &str, chatml_tokens: bool) {
    tiny_model(dir);
    set_template(dir, template);
    if chatml_tokens {
        let path = dir.join("tokenizer.json");
        let mut tok = tokenizers::Tokenizer::from_file(&path).expect("tokenizer.json");
        let specials = ["<|im_start|>", "<|im_end|>"].map(|t| tokenizers::AddedToken::from(t, true));
        tok.add_special_tokens(specials).expect("add tokens");
        tok.save(&path, false).expect("save");
    }
}

fn set_template(dir: &Path, template: &str) {
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("r")).expect("json");
    cfg["chat_template"] = template.into();
    std::fs::write(&cfg_path, cfg.to_string()).expect("w");
}

fn chat_config(model: &Path, data: &Path, out: &Path) -> TrainConfig {
    let mut config = facts_config(model, data, out);
    config.dataset.format = DataFormat::Chat;
    config.dataset.validation_path = None;
    config
}

#[test]
fn a_chat_template_renders_chat_data_and_only_assistant_turns_are_trained() {
    let dir = tempfile::tempdir().expect("dir");
    let (model_dir, data) = (dir.path().join("model"), dir.path().join("chat.jsonl"));
    model_with_template(&model_dir, CHATML, true);
    let line = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye now"}]}"#;
    std::fs::write(&data, line.replace('\n', "") + "\n").expect("w");
    let tok = TextTokenizer::load(&model_dir, None).expect("tokenizer");
    let prepared = prepare(&chat_config(&model_dir, &data, &dir.path().join("out")), &tok).expect("prepare");
    let ex = &prepared.train[0];

    let expected_text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                         <|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
                         <|im_start|>assistant\nBye now<|im_end|>\n";
    // The template writes no BOS, so none is added; EOS follows, as in the default format.
    assert_eq!(
        ex.ids,
        [tok.encode(expected_text, false).expect("encode"), vec![tok.eos]].concat()
    );
    let im_end = tok.encode("<|im_end|>", false).expect("encode");
    assert_eq!(im_end.len(), 1, "a special token");
    let trained: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.trained)
        .filter(|(_, t)| **t)
        .map(|(i, _)| *i)
        .collect();
    let expected_trained = [
        tok.encode("Hello<|im_end|>\n", false),
        tok.encode("Bye now<|im_end|>\n", false),
    ]
    .map(|ids| ids.expect("encode"))
    .concat();
    assert_eq!(trained, [expected_trained, vec![tok.eos]].concat());

    // The untrained text before each assistant turn is the prompt the server renders for it
    // (kubetune_model::chat, shared): the same tokens the model is prompted with.
    let template = tok.chat_template.as_ref().expect("template");
    let msgs = [("system", "Be brief."), ("user", "Hi")].map(|(r, c)| ChatMessage::new(r, c));
    let prompt = tok
        .encode(&template.render(&msgs, true).expect("render"), false)
        .expect("encode");
    let first_trained = ex.trained.iter().position(|t| *t).expect("trained tokens");
    assert_eq!(ex.ids[..first_trained], prompt[..]);
}

#[test]
fn a_template_that_ends_conversations_with_eos_gets_no_second_one() {
    let dir = tempfile::tempdir().expect("dir");
    let (model_dir, data) = (dir.path().join("model"), dir.path().join("chat.jsonl"));
    // Llama-2 style: BOS opens and EOS closes each exchange, in the template.
    let template = "{% for m in messages %}{% if m.role == 'user' %}{{ bos_token }}[INST] {{ m.content }} [/INST]\
                    {% else %} {{ m.content }} {{ eos_token }}{% endif %}{% endfor %}";
    model_with_template(&model_dir, template, false);
    std::fs::write(
        &data,
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#,
    )
    .expect("w");
    let tok = TextTokenizer::load(&model_dir, None).expect("tokenizer");
    let prepared = prepare(&chat_config(&model_dir, &data, &dir.path().join("out")), &tok).expect("prepare");
    let ex = &prepared.train[0];
    assert_eq!(
        ex.ids,
        tok.encode("<s>[INST] Hi [/INST] Hello </s>", false).expect("encode")
    );
    assert_eq!(
        ex.ids.iter().filter(|&&i| i == kubetune_model::tiny::BOS_ID).count(),
        1,
        "BOS once, from the template"
    );
    let trained: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.trained)
        .filter(|(_, t)| **t)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(trained, tok.encode(" Hello </s>", false).expect("encode"));
}

#[test]
fn template_errors_name_tokenizer_config_or_the_dataset_line() {
    let dir = tempfile::tempdir().expect("dir");
    let (model_dir, data) = (dir.path().join("model"), dir.path().join("chat.jsonl"));
    let raising =
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}\
                   {% endif %}{{ m.content }}{% endfor %}";
    model_with_template(&model_dir, raising, false);
    let good = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
    let with_system = r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
    std::fs::write(&data, format!("{good}\n\n{with_system}\n")).expect("w");
    let tok = TextTokenizer::load(&model_dir, None).expect("tokenizer");
    let err = prepare(&chat_config(&model_dir, &data, &dir.path().join("out")), &tok)
        .err()
        .expect("raises");
    let shown = err.to_string();
    assert!(shown.starts_with(&format!("{}:3: ", data.display())), "{shown}");
    assert!(
        shown.contains("System role not supported") && shown.contains("tokenizer_config.json"),
        "{shown}"
    );
    assert_eq!((err.reason(), err.exit_code()), ("DatasetInvalid", 2));

    // A syntax error stops loading the model, naming the file and the template's line.
    set_template(&model_dir, "{% for m in messages %}\n{{ m.content }\n{% endfor %}");
    let err = TextTokenizer::load(&model_dir, None).err().expect("syntax error");
    let shown = err.to_string();
    assert!(
        shown.contains("tokenizer_config.json: chat_template: syntax error") && shown.contains("chat_template:2"),
        "{shown}"
    );
    assert_eq!(err.reason(), "ModelInvalid");
}

#[test]
fn a_run_trains_on_chat_data_with_the_models_template() {
    let dir = tempfile::tempdir().expect("dir");
    let (model_dir, data, out) = (
        dir.path().join("model"),
        dir.path().join("chat.jsonl"),
        dir.path().join("out"),
    );
    // The tiny model's own role tokens, so every id is within its embeddings.
    let template = "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}\
                    {% if add_generation_prompt %}<|assistant|>{% endif %}";
    model_with_template(&model_dir, template, false);
    let lines: Vec<String> = facts()
        .into_iter()
        .map(|(q, a)| {
            serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).expect("w");
    let mut config = chat_config(&model_dir, &data, &out);
    config.training.epochs = None;
    config.training.max_steps = Some(2);
    let metrics = kubetune_trainer::run(&config, &Default::default()).expect("trains");
    assert!(
        metrics.completed && metrics.final_train_loss.is_some_and(f64::is_finite),
        "{metrics:?}"
    );
}
