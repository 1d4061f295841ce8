//! Each model family against transformers: tiny random checkpoints saved by transformers 5
//! (`rope_parameters`, generation_config.json with an eos list) and their reference logits,
//! made once by `tests/reference/families.py` (its doc names the command).
//!
//! - llama3: Llama 3's frequency-dependent RoPE scaling;
//! - llama-bias: attention and MLP biases, and a head_dim that is not hidden / heads;
//! - mistral: a sliding window shorter than the prompt;
//! - qwen2: q/k/v biases and tied embeddings.

use candle_core::{Device, Tensor};
use kubetune_model::generate::{greedy, GreedyOptions};
use kubetune_model::{load_model, BaseFormat, LoadOptions};
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

const TOLERANCE: f32 = 1e-4;

fn family_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference/families")
        .join(name)
}

fn check_family(name: &str) {
    let dir = family_dir(name);
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"))
            .expect("parse reference.json");
    let (config, model) = load_model(&dir, &LoadOptions::on(Device::Cpu, BaseFormat::Dense)).expect("load");
    assert_eq!(
        config.eos_token_ids(),
        vec![2, 3],
        "{name}: stop tokens of generation_config.json"
    );
    for (n, case) in reference.cases.iter().enumerate() {
        let ids = Tensor::new(case.ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&ids, 0, None, None).expect("forward");
        let logits: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
        let mut worst = 0f32;
        for (ours, theirs) in logits.iter().flatten().zip(case.logits.iter().flatten()) {
            worst = worst.max((ours - theirs).abs());
        }
        assert!(
            worst < TOLERANCE,
            "{name} case {n}: logits differ from transformers by up to {worst}"
        );
        let options = GreedyOptions {
            max_new_tokens: case.greedy.len(),
            stop_tokens: &[],
            adapter: None,
        };
        let tokens = greedy(&model, &case.ids, &options).expect("greedy");
        assert_eq!(
            tokens, case.greedy,
            "{name} case {n}: greedy tokens (KV-cached decoding)"
        );
    }
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check_family("llama3");
}

#[test]
fn llama_with_biases_and_a_wide_head_dim_matches_transformers() {
    check_family("llama-bias");
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check_family("mistral");
}

#[test]
fn qwen2_biases_and_tied_embeddings_match_transformers() {
    check_family("qwen2");
}
