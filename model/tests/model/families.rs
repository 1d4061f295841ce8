//! Each model family against transformers: tiny random checkpoints saved by transformers 5
//! (`rope_parameters`, generation_config.json with an eos list) and their reference logits,
//! made once by `tests/reference/families.py` (its doc names the command).
//!
//! - llama3: Llama 3's frequency-dependent RoPE scaling;
//! - llama-bias: attention and MLP biases, and a head_dim that is not hidden / heads;
//! - mistral: a sliding window shorter than the prompt;
//! - qwen2: q/k/v biases and tied embeddings;
//! - qwen3: RMS norms of each query and key head, and biases by `attention_bias`;
//! - gemma2: soft-capped attention scores and logits, alternating sliding and full layers,
//!   and Gemma's embeddings, norms and GeGLU;
//! - gemma3: Gemma 3's text model: scaled embeddings, (1 + w) norms around attention and MLP,
//!   q/k norms, GeGLU, query_pre_attn_scalar, and sliding layers with a local RoPE base beside
//!   full layers with linear RoPE scaling.
//!
//! Each family also has the adapter kubetune's PEFT writer (the trainer's) made for it, in
//! `adapter/`, loaded by `PeftModel.from_pretrained` with PEFT's logits beside it
//! (`families.py peft`): ours must match them, and what the writer makes today must still be
//! what PEFT loaded.

use crate::common::random_adapter;
use candle_core::{Device, Tensor};
use kubetune_model::checkpointing::LossBatch;
use kubetune_model::generate::{greedy, GreedyOptions};
use kubetune_model::{load_model, peft, ActiveAdapter, BaseFormat, DecodeRow, KvCache, LoadOptions};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    #[serde(default)]
    greedy: Vec<u32>,
}

const TOLERANCE: f32 = 1e-4;

/// bf16 keeps 8 bits of mantissa: logits of these tiny models move by a few hundredths.
const BF16_TOLERANCE: f32 = 0.1;

const FAMILIES: &[&str] = &["llama3", "llama-bias", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"];

fn read_reference(path: &Path) -> Reference {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The largest difference between two (seq, vocab) logit tables.
fn worst_difference(ours: &[Vec<f32>], theirs: &[Vec<f32>]) -> f32 {
    assert_eq!(ours.len(), theirs.len(), "positions");
    ours.iter()
        .flatten()
        .zip(theirs.iter().flatten())
        .fold(0f32, |worst, (a, b)| worst.max((a - b).abs()))
}

fn family_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference/families")
        .join(name)
}

fn check_family(name: &str) {
    let dir = family_dir(name);
    let reference = read_reference(&dir.join("reference.json"));
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
        let worst = worst_difference(&logits, &case.logits);
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
    check_batched_decode(name, &model, &reference);
    check_unfused_path(name, &dir, &reference);
}

/// The same logits in bf16, where attention takes the path with mask tensors per layer kind
/// (as on a GPU) instead of the fused f32 kernels; within bf16's rounding.
fn check_unfused_path(name: &str, dir: &Path, reference: &Reference) {
    let options = LoadOptions {
        dtype: candle_core::DType::BF16,
        ..LoadOptions::on(Device::Cpu, BaseFormat::Dense)
    };
    let (_, model) = load_model(dir, &options).expect("load in bf16");
    for (n, case) in reference.cases.iter().enumerate() {
        let ids = Tensor::new(case.ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&ids, 0, None, None).expect("forward in bf16");
        let logits = logits.squeeze(0).unwrap().to_dtype(candle_core::DType::F32).unwrap();
        let worst = worst_difference(&logits.to_vec2().unwrap(), &case.logits);
        assert!(
            worst < BF16_TOLERANCE,
            "{name} case {n}: bf16 logits differ from transformers by up to {worst}"
        );
    }
}

/// The server's batched decode step, all cases in one batch: each prompt's last token, after
/// a cached prefill of the rest, gives transformers' logits at that position.
fn check_batched_decode(name: &str, model: &kubetune_model::CausalLm, reference: &Reference) {
    let layers = model.config().num_hidden_layers;
    let mut caches: Vec<KvCache> = reference.cases.iter().map(|_| KvCache::new(layers)).collect();
    for (case, cache) in reference.cases.iter().zip(&mut caches) {
        let prefix = &case.ids[..case.ids.len() - 1];
        let ids = Tensor::new(prefix, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        model.forward(&ids, 0, Some(cache), None).expect("prefill");
    }
    let mut rows: Vec<DecodeRow> = reference
        .cases
        .iter()
        .zip(&mut caches)
        .map(|(case, cache)| DecodeRow {
            token: *case.ids.last().expect("ids"),
            cache,
            adapter: None,
        })
        .collect();
    let logits: Vec<Vec<f32>> = model.decode(&mut rows).expect("decode").to_vec2().unwrap();
    for (n, (ours, case)) in logits.iter().zip(&reference.cases).enumerate() {
        let theirs = case.logits.last().expect("logits");
        let worst = worst_difference(std::slice::from_ref(ours), std::slice::from_ref(theirs));
        assert!(
            worst < TOLERANCE,
            "{name} case {n}: batched decode differs from transformers by up to {worst}"
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

#[test]
fn qwen3_query_and_key_norms_match_transformers() {
    check_family("qwen3");
}

#[test]
fn gemma2_soft_capped_scores_and_logits_match_transformers() {
    check_family("gemma2");
}

#[test]
fn gemma3_sliding_and_full_layers_with_their_own_rope_match_transformers() {
    check_family("gemma3");
}

/// The adapter written for each family, loaded by PEFT, gives PEFT's logits here too; the
/// adapter really moves them (so a PEFT that skipped its tensors could not pass); and the
/// writer still writes the same tensor names and config, so PEFT's check stands for today's
/// adapters.
#[test]
fn the_adapter_written_for_each_family_loads_in_peft_with_the_same_logits() {
    for name in FAMILIES {
        let dir = family_dir(name);
        let adapter_dir = dir.join("adapter");
        let (config, model) = load_model(&dir, &LoadOptions::on(Device::Cpu, BaseFormat::Dense)).expect("load");
        let (_, adapter) = peft::load(&adapter_dir, &config, &Device::Cpu).expect("adapter");
        let active = ActiveAdapter {
            adapter: &adapter,
            dropout_seed: None,
            first_row: 0,
        };
        let base = read_reference(&dir.join("reference.json"));
        let with_peft = read_reference(&adapter_dir.join("reference.json"));
        for (n, (case, base_case)) in with_peft.cases.iter().zip(&base.cases).enumerate() {
            let ids = Tensor::new(case.ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model.forward(&ids, 0, None, Some(&active)).expect("forward");
            let logits: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
            let worst = worst_difference(&logits, &case.logits);
            assert!(
                worst < TOLERANCE,
                "{name} case {n}: logits differ from PEFT's by up to {worst}"
            );
            let moved = worst_difference(&case.logits, &base_case.logits);
            assert!(
                moved > 0.05,
                "{name} case {n}: the adapter moves PEFT's logits by only {moved}"
            );
        }

        let rewritten = tempfile::tempdir().expect("dir");
        peft::save(rewritten.path(), &adapter, &config, name).expect("save");
        let json = |dir: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(peft::ADAPTER_CONFIG)).expect("config"))
                .expect("json")
        };
        assert_eq!(
            json(rewritten.path()),
            json(&adapter_dir),
            "{name}: adapter_config.json"
        );
        let names = |dir: &Path| -> Vec<String> {
            kubetune_model::tensors::load(&dir.join(peft::ADAPTER_WEIGHTS), &Device::Cpu)
                .expect("weights")
                .into_keys()
                .collect()
        };
        assert_eq!(names(rewritten.path()), names(&adapter_dir), "{name}: tensor names");
    }
}

/// Qwen3 and Gemma train through candle's graph (the hand-written layers are Llama's): the
/// gradient reported for A entries of q_proj and gate_proj, whose paths run through the q norm
/// (Qwen3, Gemma 3), the soft-caps (Gemma 2), the norms after attention and MLP and the GeGLU
/// (Gemma), agrees with the loss's finite difference.
#[test]
fn adapter_gradients_of_families_trained_through_the_graph_match_finite_differences() {
    for name in ["qwen3", "gemma2", "gemma3"] {
        check_gradient_by_finite_differences(name);
    }
}

fn check_gradient_by_finite_differences(name: &str) {
    let (config, model) =
        load_model(&family_dir(name), &LoadOptions::on(Device::Cpu, BaseFormat::Dense)).expect("load");
    let (adapter, vars) = random_adapter(&config, 2, 4.0, 0.0);
    let input: Vec<u32> = (0..12).map(|i| 4 + (i * 37) % 120).collect();
    let targets: Vec<u32> = input.iter().skip(1).chain([&5]).copied().collect();
    let input = Tensor::new(input.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
    let weights = Tensor::ones(12, candle_core::DType::F32, &Device::Cpu).unwrap();
    let batch = LossBatch {
        input_ids: &input,
        targets: &targets,
        weights: &weights,
    };
    let active = ActiveAdapter {
        adapter: &adapter,
        dropout_seed: None,
        first_row: 0,
    };
    let (_, grads) = model.loss_backward(&batch, &active, 1.0, 12).expect("backward");
    for module in ["layers.0.self_attn.q_proj.lora_A", "layers.1.mlp.gate_proj.lora_A"] {
        let var = &vars.iter().find(|v| v.name.contains(module)).expect("pair").var;
        let grad: Vec<f32> = grads
            .get(var.as_tensor())
            .expect("gradient")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let original = var.as_tensor().copy().unwrap();
        let values: Vec<f32> = original.flatten_all().unwrap().to_vec1().unwrap();
        let loss_with = |entry: usize, delta: f32| -> f64 {
            let mut changed = values.clone();
            changed[entry] += delta;
            var.set(&Tensor::from_vec(changed, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let (loss, _) = model.loss_backward(&batch, &active, 1.0, 12).expect("loss");
            loss
        };
        let eps = 1e-2;
        for entry in [0, 7, 40] {
            let numeric = (loss_with(entry, eps) - loss_with(entry, -eps)) / (2.0 * eps as f64);
            let reported = grad[entry] as f64;
            assert!(
                (numeric - reported).abs() <= 2e-2 * reported.abs().max(1e-2),
                "{name} {module} entry {entry}: finite difference {numeric}, gradient {reported}"
            );
        }
        var.set(&original).unwrap();
    }
}
