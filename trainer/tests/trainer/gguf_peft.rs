//! An adapter the trainer trained on a GGUF base is an ordinary PEFT adapter: transformers
//! loads the same GGUF file (`from_pretrained(..., gguf_file=...)`), PEFT loads the adapter on
//! it (`PeftModel.from_pretrained`, every tensor landing in a LoRA module of that model), and
//! kubetune's logits with the adapter are PEFT's within 1e-4 (f32).
//!
//! `tests/reference/gguf_peft/` holds the tiny GGUF file (a 2-layer Llama, Q8_0 and F32
//! tensors, a byte-level BPE vocabulary and a ChatML template, about 47 KB), the training data,
//! the adapter the trainer trained on it (`examples/gguf_adapter.rs`) and PEFT's reference.
//! They were made once, by hand, from the repository root (CI needs no PyTorch), with the
//! bench venv (torch 2.15, transformers 5.25, peft 0.21.2, gguf 0.19, tokenizers 0.23):
//!
//! ```sh
//! .kubetune/bench/venv/bin/python trainer/tests/reference/gguf_peft.py base trainer/tests/reference/gguf_peft
//! cargo run -p kubetune-trainer --example gguf_adapter -- trainer/tests/reference/gguf_peft
//! .kubetune/bench/venv/bin/python trainer/tests/reference/gguf_peft.py peft trainer/tests/reference/gguf_peft
//! ```

use crate::gguf_peft_train::train_on_gguf;
use candle_core::{Device, Tensor};
use kubetune_model::chat::{ChatMessage, ChatTemplate};
use kubetune_model::{load_model, peft, ActiveAdapter, BaseFormat, LoadOptions};
use kubetune_trainer::train::tokenizer_for;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct Reference {
    messages: Vec<Message>,
    prompt: String,
    ids: Vec<u32>,
    lora_tensors: Vec<String>,
    base_logits: Vec<Vec<f32>>,
    adapter_logits: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

const TOLERANCE: f32 = 1e-4;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/gguf_peft")
}

fn reference() -> Reference {
    let path = fixture().join("reference.json");
    let text = std::fs::read_to_string(&path).expect("reading the reference");
    serde_json::from_str(&text).expect("parsing the reference")
}

/// A copy of the GGUF file in a scratch directory (the import is written beside it).
fn scratch_copy() -> (tempfile::TempDir, PathBuf) {
    let scratch = tempfile::tempdir().expect("dir");
    let gguf = scratch.path().join("tiny.gguf");
    std::fs::copy(fixture().join("tiny.gguf"), &gguf).expect("copying the GGUF file");
    (scratch, gguf)
}

fn worst_difference(ours: &[Vec<f32>], theirs: &[Vec<f32>]) -> f32 {
    assert_eq!(ours.len(), theirs.len(), "positions");
    ours.iter()
        .flatten()
        .zip(theirs.iter().flatten())
        .fold(0f32, |worst, (a, b)| worst.max((a - b).abs()))
}

#[test]
fn an_adapter_trained_on_a_gguf_base_gives_the_logits_peft_gives_on_transformers_load_of_the_file() {
    let reference = reference();
    let (_scratch, gguf) = scratch_copy();
    let model_dir = kubetune_model::gguf::model_dir(&gguf).expect("importing the GGUF file");
    let (config, model) =
        load_model(&model_dir, &LoadOptions::on(Device::Cpu, BaseFormat::Dense)).expect("loading the import");

    // The prompt and its ids, as transformers' tokenizer built from the same file made them.
    let config_path = model_dir.join("tokenizer_config.json");
    let tokenizer_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("read")).expect("json");
    let template = ChatTemplate::for_model(&tokenizer_config, &config_path)
        .expect("the template compiles")
        .expect("the file has a chat template");
    let messages: Vec<ChatMessage> = reference
        .messages
        .iter()
        .map(|m| ChatMessage::new(&m.role, &m.content))
        .collect();
    let prompt = template.render(&messages, true).expect("render");
    assert_eq!(prompt, reference.prompt, "the chat prompt");
    let tokenizer = tokenizer_for(&model_dir, &config).expect("tokenizer");
    assert_eq!(
        tokenizer.encode(&prompt, false).expect("encode"),
        reference.ids,
        "the prompt's token ids"
    );

    let ids = Tensor::new(reference.ids.as_slice(), &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids");
    let logits = |adapter: Option<&ActiveAdapter>| -> Vec<Vec<f32>> {
        let logits = model.forward(&ids, 0, None, adapter).expect("forward");
        logits.squeeze(0).and_then(|l| l.to_vec2()).expect("logits")
    };
    let base = worst_difference(&logits(None), &reference.base_logits);
    assert!(
        base < TOLERANCE,
        "the base's logits differ from transformers' by up to {base}"
    );

    let (_, adapter) = peft::load(&fixture().join("adapter"), &config, &Device::Cpu).expect("the adapter");
    let active = ActiveAdapter {
        adapter: &adapter,
        dropout_seed: None,
        first_row: 0,
    };
    let with_adapter = worst_difference(&logits(Some(&active)), &reference.adapter_logits);
    assert!(
        with_adapter < TOLERANCE,
        "the logits with the adapter differ from PEFT's by up to {with_adapter}"
    );
    let moved = worst_difference(&reference.adapter_logits, &reference.base_logits);
    assert!(moved > 0.05, "the adapter moves PEFT's logits by only {moved}");
}

/// What PEFT loaded is what the trainer writes today: training again on the same file gives an
/// adapter with the same adapter_config.json and the same tensor names (the HF module names
/// PEFT found in transformers' model), so the check above stands for today's adapters.
#[test]
fn the_trainer_still_writes_the_adapter_names_and_config_that_peft_loaded_on_the_gguf_base() {
    let (scratch, gguf) = scratch_copy();
    let output = scratch.path().join("out");
    let metrics = train_on_gguf(&gguf, &fixture().join("data.jsonl"), &output);
    assert_eq!(metrics.steps, 12);

    let json = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(peft::ADAPTER_CONFIG)).expect("config")).expect("json")
    };
    assert_eq!(json(&output), json(&fixture().join("adapter")), "adapter_config.json");
    let names: Vec<String> = kubetune_model::tensors::load(&output.join(peft::ADAPTER_WEIGHTS), &Device::Cpu)
        .expect("weights")
        .into_keys()
        .collect();
    let mut expected = reference().lora_tensors;
    expected.sort();
    let mut names = names;
    names.sort();
    assert_eq!(names, expected, "the adapter's tensor names, as PEFT loaded them");
}
