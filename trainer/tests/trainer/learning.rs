//! The tiny model learns 50 facts with LoRA (and with QLoRA): eval loss on the facts at least
//! halves and greedy decoding then gives every trained answer.

use crate::common::*;
use kubetune_crds::EvaluationMetric;
use kubetune_model::generate::{greedy, GreedyOptions};
use kubetune_model::{load_model, peft, BaseFormat, LoadOptions};
use kubetune_trainer::config::{EvaluationSettings, Method};
use kubetune_trainer::data::render::instruction_prompt;
use kubetune_trainer::{run, RunOptions};

fn learns_the_facts(method: Method) {
    let dir = tempfile::tempdir().expect("dir");
    let (model_dir, data, out) = (
        dir.path().join("model"),
        dir.path().join("facts.jsonl"),
        dir.path().join("out"),
    );
    tiny_model(&model_dir);
    write_facts(&data);
    let mut config = facts_config(&model_dir, &data, &out);
    config.method = method;
    config.evaluation = Some(EvaluationSettings {
        metric: Some(EvaluationMetric::ExactMatch),
        max_examples: 50,
        max_new_tokens: 8,
    });
    let m = run(&config, &RunOptions::default()).expect("training");

    let initial = m.initial_eval_loss.expect("initial eval");
    let last = m.final_eval_loss.expect("final eval");
    eprintln!(
        "{method:?}: eval loss {initial:.3} -> {last:.3} in {} steps, {:.0} tokens/s",
        m.steps, m.tokens_per_second
    );
    // For a failure elsewhere: which tokenizer and weights this run had, and the loss curve.
    let digest = |f: &str| {
        kubetune_storage::Sha256Digest::of(&std::fs::read(model_dir.join(f)).expect("model file")).to_string()
    };
    eprintln!(
        "tiny model: tokenizer.json {}, model.safetensors {}",
        digest("tokenizer.json"),
        digest("model.safetensors")
    );
    let curve: Vec<String> = m
        .train_history
        .iter()
        .step_by(25)
        .map(|p| format!("{}:{:.2}", p.step, p.loss))
        .collect();
    eprintln!("train loss: {}", curve.join(" "));
    assert!(last <= initial / 2.0, "eval loss fell from {initial} only to {last}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training_metrics.json")).expect("metrics file"))
            .expect("json");
    let on_disk = written["finalEvalLoss"].as_f64().expect("finalEvalLoss");
    assert!((on_disk - last).abs() < 1e-9, "{on_disk} vs {last}");

    // Decode with the adapter as written to disk, on a freshly loaded base.
    let base = if method == Method::Qlora {
        BaseFormat::Nf4
    } else {
        BaseFormat::Dense
    };
    let (config, model) = load_model(
        &model_dir,
        &LoadOptions {
            base,
            ..LoadOptions::default()
        },
    )
    .expect("model");
    if method == Method::Qlora {
        assert_eq!(
            model.projection_storage().1,
            7 * config.num_hidden_layers,
            "base is NF4 in memory"
        );
        let tables = 1 + usize::from(!config.tie_word_embeddings);
        assert_eq!(
            model.table_storage().1,
            tables,
            "the embedding table and an untied head are NF4 in memory"
        );
    }
    let (_, adapter) = peft::load(&out, &config, model.device()).expect("adapter");
    let tokenizer = kubetune_trainer::train::tokenizer_for(&model_dir, &config).expect("tokenizer");
    let mut wrong = Vec::new();
    for (question, answer) in facts() {
        let prompt = tokenizer
            .encode_prompt(&instruction_prompt(&question, None))
            .expect("prompt");
        let options = GreedyOptions {
            max_new_tokens: 8,
            stop_tokens: &[tokenizer.eos],
            adapter: Some(&adapter),
        };
        let ids = greedy(&model, &prompt, &options).expect("decode");
        let text = tokenizer.decode(&ids).expect("detokenize");
        if text.trim() != answer {
            wrong.push(format!("{question} -> {text:?} (want {answer:?})"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of 50 answers wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // The trainer's own judgement agrees: every fact right with the adapter, none without.
    let e = m.evaluation.expect("evaluation");
    assert_eq!(
        (e.examples, e.base.score, e.adapter.score),
        (50, Some(0.0), Some(1.0)),
        "{e:?}"
    );
    assert!(
        (e.adapter.loss.expect("adapter loss") - last).abs() < 1e-6,
        "the final eval loss, on the same 50"
    );
    assert!(
        (e.base.loss.expect("base loss") - initial).abs() < 1e-6,
        "the untrained adapter is the base"
    );
    assert_eq!(written["evaluation"], serde_json::to_value(&e).expect("json"));
}

#[test]
fn lora_learns_the_facts() {
    learns_the_facts(Method::Lora);
}

#[test]
fn qlora_learns_the_facts() {
    learns_the_facts(Method::Qlora);
}

/// The learning tests depend on the generated model being the same everywhere: the BPE
/// tokenizer is trained at generation time (HashMap-backed, multi-threaded in the tokenizers
/// crate), so check that two generations in one process, with different hash seeds, agree.
#[test]
fn the_tiny_model_generator_is_deterministic() {
    let dir = tempfile::tempdir().expect("dir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    tiny_model(&a);
    tiny_model(&b);
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "model.safetensors",
    ] {
        let read = |d: &std::path::Path| std::fs::read(d.join(file)).expect("model file");
        assert!(read(&a) == read(&b), "{file} differs between two generations");
    }
}
