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
//!   full layers with linear RoPE scaling;
//! - phi3: q/k/v and gate/up fused in the checkpoint (split as they load), and a sliding
//!   window shorter than the prompt.
//!
//! Each family also has the adapter kubetune's PEFT writer (the trainer's) made for it, in
//! `adapter/`, loaded by `PeftModel.from_pretrained` with PEFT's logits beside it
//! (`families.py peft`): ours must match them, and what the writer makes today must still be
//! what PEFT loaded. Phi-3's adapter is written on its fused modules, as PEFT targets them.
//!
//! Each family also has a tokenizer and a chat template modelled on the family's own, saved by
//! transformers 5 (tokenizer.json, tokenizer_config.json, and the template in
//! `chat_template.jinja`), with the prompts `apply_chat_template` rendered from them and their
//! token ids in reference.json's `chat` (`families.py chat`): the model crate must render and
//! tokenize the same.

use crate::common::{ids, max_abs_diff, random_adapter};
use candle_core::{Device, Tensor};
use kubetune_model::chat::{ChatMessage, ChatTemplate};
use kubetune_model::checkpointing::LossBatch;
use kubetune_model::generate::{greedy, GreedyOptions};
use kubetune_model::{load_model, peft, ActiveAdapter, BaseFormat, DecodeRow, KvCache, LoadOptions, TargetModule};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
    chat: Option<ChatReference>,
}

#[derive(Deserialize)]
struct ChatReference {
    cases: Vec<ChatCase>,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<Message>,
    add_generation_prompt: bool,
    prompt: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
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

const FAMILIES: &[&str] = &[
    "llama3",
    "llama-bias",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
];

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
        let ids = ids(&case.ids);
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
        let ids = ids(&case.ids);
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
        let ids = ids(prefix);
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

#[test]
fn phi3_fused_projections_match_transformers() {
    check_family("phi3");
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
            let ids = ids(&case.ids);
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

/// Each family's chat_template.jinja, as transformers 5 saves it beside a tokenizer_config.json
/// that no longer holds the template, renders each conversation to the prompt
/// `apply_chat_template` rendered (with the generation prompt and without), and the family's
/// tokenizer.json gives that prompt the same token ids: Llama 3's and Gemma 2's `| trim` in
/// concatenations, Llama 2's system block and `.strip()`, Qwen2's default system turn, Qwen3's
/// namespace, reversed loop and think blocks, Gemma 3's whitespace control and system prefix,
/// Phi-3's EOS at the end of a finished conversation. Made once with
/// `.kubetune/bench/venv/bin/python model/tests/reference/families.py chat model/tests/reference/families`
/// (transformers 5.25, tokenizers 0.23), which leaves the weights and logits as they were.
#[test]
fn each_familys_chat_template_file_renders_and_tokenizes_prompts_as_transformers_apply_chat_template_does() {
    for name in FAMILIES {
        let dir = family_dir(name);
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).expect("tokenizer_config.json")).expect("json");
        assert!(
            config.get("chat_template").is_none() && dir.join("chat_template.jinja").exists(),
            "{name}: the template is in chat_template.jinja only, as transformers 5 saves it"
        );
        let template = ChatTemplate::for_model(&config, &config_path)
            .expect("the template compiles")
            .expect("a template");
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer.json");
        let chat = read_reference(&dir.join("reference.json"))
            .chat
            .expect("chat references");
        for (n, case) in chat.cases.iter().enumerate() {
            let messages: Vec<ChatMessage> = case
                .messages
                .iter()
                .map(|m| ChatMessage::new(&m.role, &m.content))
                .collect();
            let prompt = template.render(&messages, case.add_generation_prompt).expect("render");
            assert_eq!(prompt, case.prompt, "{name} chat {n}: the rendered prompt");
            let ids = tokenizer.encode(prompt.as_str(), false).expect("encode");
            assert_eq!(ids.get_ids(), case.ids, "{name} chat {n}: the prompt's token ids");
        }
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

/// Phi-3 trains by hand (its projections are split from the fused ones as they load, so the
/// hand-written layers apply): the gradients reported for A entries of q_proj and gate_proj,
/// through the sliding window, agree with the loss's finite difference.
#[test]
fn phi3_adapter_gradients_on_the_split_projections_match_finite_differences() {
    check_gradient_by_finite_differences("phi3");
}

/// Also checks that the loss is finite and that every pair gets a finite, non-zero gradient.
fn check_gradient_by_finite_differences(name: &str) {
    let (config, model) =
        load_model(&family_dir(name), &LoadOptions::on(Device::Cpu, BaseFormat::Dense)).expect("load");
    let (adapter, vars) = random_adapter(&config, 2, 4.0, 0.0);
    let input: Vec<u32> = (0..12).map(|i| 4 + (i * 37) % 120).collect();
    let targets: Vec<u32> = input.iter().skip(1).chain([&5]).copied().collect();
    let input = ids(&input);
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
    let (loss, grads) = model.loss_backward(&batch, &active, 1.0, 12).expect("backward");
    assert!(loss.is_finite(), "{name}: loss {loss}");
    for v in &vars {
        let g = grads
            .get(v.var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for {}", v.name));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: {} has gradient norm {norm}",
            v.name
        );
    }
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

/// An adapter as PEFT 0.21.2 writes one for Phi-3 with `target_modules=["qkv_proj"]` (its
/// adapter_config.json as PEFT saved it; the tensors drawn here): q, k and v each get the whole
/// A and their own rows of B, so each one's delta is its rows of PEFT's B A, scaled by
/// lora_alpha / r; no other projection gets a pair.
#[test]
fn a_phi3_adapter_peft_wrote_for_qkv_proj_only_loads_with_each_projections_delta() {
    let (config, _) = load_model(&family_dir("phi3"), &LoadOptions::on(Device::Cpu, BaseFormat::Dense)).expect("load");
    let dir = tempfile::tempdir().expect("dir");
    let peft_config = r#"{"alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null,
        "auto_mapping": {"base_model_class": "Phi3ForCausalLM", "parent_library": "transformers.models.phi3.modeling_phi3"},
        "base_model_name_or_path": "phi3", "bias": "none", "corda_config": null, "ensure_weight_tying": false,
        "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": true,
        "init_lora_weights": true, "kasa_config": null, "layer_replication": null, "layers_pattern": null,
        "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 8, "lora_bias": false, "lora_dropout": 0.0,
        "lora_ga_config": null, "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": null,
        "monteclora_config": null, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 2,
        "rank_pattern": {}, "revision": null, "target_modules": ["qkv_proj"], "target_parameters": null,
        "task_type": null, "trainable_token_indices": null, "use_bdlora": null, "use_dora": false,
        "use_qalora": false, "use_rslora": false, "velora_config": null}"#;
    std::fs::write(dir.path().join(peft::ADAPTER_CONFIG), peft_config).expect("config");
    let values = |rows: usize, cols: usize, phase: f32| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| (i as f32 * 0.37 + phase).sin() * 0.2)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    };
    let key = |layer: usize, which: &str| {
        format!("base_model.model.model.layers.{layer}.self_attn.qkv_proj.lora_{which}.weight")
    };
    let mut fused = std::collections::BTreeMap::new();
    for layer in 0..config.num_hidden_layers {
        fused.insert(key(layer, "A"), values(2, 32, layer as f32));
        fused.insert(key(layer, "B"), values(64, 2, 1.0 + layer as f32));
    }
    kubetune_model::tensors::save(&dir.path().join(peft::ADAPTER_WEIGHTS), &fused).expect("weights");

    let (_, adapter) = peft::load(dir.path(), &config, &Device::Cpu).expect("load the adapter");
    assert_eq!(
        adapter.config.target_modules,
        [TargetModule::QProj, TargetModule::KProj, TargetModule::VProj]
    );
    assert_eq!((adapter.config.r, adapter.config.scale()), (2, 4.0));
    // 4 query heads and 2 key/value heads of 8: q's rows, then k's, then v's.
    let parts = [
        (TargetModule::QProj, 0, 32),
        (TargetModule::KProj, 32, 16),
        (TargetModule::VProj, 48, 16),
    ];
    for layer in 0..config.num_hidden_layers {
        let whole = fused[&key(layer, "B")].matmul(&fused[&key(layer, "A")]).unwrap();
        for (part, start, rows) in parts {
            let pair = adapter.get(layer, part).expect("pair");
            let diff = max_abs_diff(&pair.b.matmul(&pair.a).unwrap(), &whole.narrow(0, start, rows).unwrap());
            assert!(diff < 1e-6, "layer {layer} {part:?}: delta differs by {diff}");
        }
        for other in [
            TargetModule::OProj,
            TargetModule::GateProj,
            TargetModule::UpProj,
            TargetModule::DownProj,
        ] {
            assert!(
                adapter.get(layer, other).is_none(),
                "layer {layer}: {other:?} has a pair"
            );
        }
    }
}
