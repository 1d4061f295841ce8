//! Imports of small GGUF files written here: every quantization type the issue names goes
//! through the same path as the real file's Q4_1 and Q8_0, and bad metadata is refused by name.

use super::*;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

const HIDDEN: usize = 256;
const HEADS: usize = 2;
const TOKENS: [&str; 6] = ["<s>", "</s>", "a", "b", "ab", "Ġ"];

fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 1000.0 - 0.5) * 0.2)
        .collect();
    Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
}

/// One layer, each projection in a different GGUF type (K-quants need rows of 256 values).
fn tensors() -> Vec<(String, QTensor)> {
    let q = |t: Tensor, dtype| QTensor::quantize(&t, dtype).unwrap();
    let norm = || {
        q(
            Tensor::ones(HIDDEN, candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
    };
    vec![
        (
            "token_embd.weight".into(),
            q(random(TOKENS.len(), HIDDEN, 1), GgmlDType::Q8_0),
        ),
        ("output_norm.weight".into(), norm()),
        ("blk.0.attn_norm.weight".into(), norm()),
        ("blk.0.ffn_norm.weight".into(), norm()),
        (
            "blk.0.attn_q.weight".into(),
            q(random(HIDDEN, HIDDEN, 2), GgmlDType::Q4_0),
        ),
        (
            "blk.0.attn_k.weight".into(),
            q(random(HIDDEN, HIDDEN, 3), GgmlDType::Q4_1),
        ),
        (
            "blk.0.attn_v.weight".into(),
            q(random(HIDDEN, HIDDEN, 4), GgmlDType::Q4K),
        ),
        (
            "blk.0.attn_output.weight".into(),
            q(random(HIDDEN, HIDDEN, 5), GgmlDType::Q6K),
        ),
        (
            "blk.0.ffn_gate.weight".into(),
            q(random(HIDDEN, HIDDEN, 6), GgmlDType::F16),
        ),
        (
            "blk.0.ffn_up.weight".into(),
            q(random(HIDDEN, HIDDEN, 7), GgmlDType::BF16),
        ),
        (
            "blk.0.ffn_down.weight".into(),
            q(random(HIDDEN, HIDDEN, 8), GgmlDType::F32),
        ),
    ]
}

fn metadata() -> Vec<(String, Value)> {
    let strings = |items: &[&str]| Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect());
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), Value::U32(1)),
        ("llama.context_length".into(), Value::U32(64)),
        ("llama.embedding_length".into(), Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length".into(), Value::U32(HIDDEN as u32)),
        ("llama.attention.head_count".into(), Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv".into(), Value::U32(HEADS as u32)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        ("llama.rope.scaling.type".into(), Value::String("none".into())),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt-2".into())),
        ("tokenizer.ggml.tokens".into(), strings(&TOKENS)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array([3, 3, 1, 1, 1, 1].map(Value::I32).to_vec()),
        ),
        ("tokenizer.ggml.merges".into(), strings(&["a b"])),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        (
            "tokenizer.chat_template".into(),
            Value::String("{{ messages[0]['content'] }}".into()),
        ),
    ]
}

fn write_gguf(dir: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) -> PathBuf {
    let path = dir.join("model.gguf");
    let mut file = File::create(&path).unwrap();
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
    path
}

fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

#[test]
fn every_quantization_type_imports_to_its_dequantized_values_and_the_model_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let tensors = tensors();
    let gguf = write_gguf(tmp.path(), &metadata(), &tensors);
    let dir = model_dir(&gguf).expect("import");
    assert_eq!(dir, tmp.path().join("model.gguf.hf"));
    assert_eq!(model_dir(&gguf).unwrap(), dir, "a second call reuses the import");
    let imported = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    for (gguf_name, quantized) in &tensors {
        let expected = quantized.dequantize(&Device::Cpu).unwrap();
        let expected = match gguf_name.as_str() {
            "blk.0.attn_q.weight" | "blk.0.attn_k.weight" => tensors::unpermute_rows(&expected, HEADS).unwrap(),
            _ => expected,
        };
        let hf = tensors::hf_name(gguf_name).unwrap();
        assert_eq!(max_difference(&imported[&hf], &expected), 0.0, "{gguf_name} as {hf}");
    }
    let (config, model) = crate::load_model(&dir, &crate::LoadOptions::default()).expect("load the import");
    assert!(
        config.tie_word_embeddings,
        "no output.weight: the head is the embedding"
    );
    assert_eq!(config.eos_token_ids(), vec![1]);
    let ids = Tensor::new(&[[0u32, 2, 4]], &Device::Cpu).unwrap();
    let logits = model.forward(&ids, 0, None, None).unwrap();
    assert_eq!(logits.dims(), &[1, 3, TOKENS.len()]);
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let encoded = tokenizer.encode("ab a", true).unwrap();
    assert_eq!(
        encoded.get_ids(),
        &[0, 4, 5, 2],
        "add_bos_token puts <s> first; `ab` is merged"
    );
    let tokenizer_config = std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap();
    assert!(tokenizer_config.contains("messages[0]"), "the chat template is kept");
}

fn import_error(change: impl FnOnce(&mut Vec<(String, Value)>)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut metadata = metadata();
    change(&mut metadata);
    let gguf = write_gguf(tmp.path(), &metadata, &tensors());
    let err = import(&gguf, &tmp.path().join("out")).expect_err("refused").to_string();
    assert!(
        !tmp.path().join("out").exists(),
        "nothing is left under the output name"
    );
    err
}

fn set(metadata: &mut Vec<(String, Value)>, key: &str, value: Value) {
    metadata.retain(|(k, _)| k != key);
    metadata.push((key.into(), value));
}

#[test]
fn metadata_that_would_change_the_maths_unseen_is_an_error_naming_the_key() {
    let err = import_error(|m| set(m, "llama.attention.sliding_window", Value::U32(8)));
    assert!(err.contains("llama.attention.sliding_window"), "{err}");
    let err = import_error(|m| set(m, "llama.rope.scaling.type", Value::String("yarn".into())));
    assert!(err.contains("llama.rope.scaling.type"), "{err}");
    let err = import_error(|m| set(m, "llama.rope.dimension_count", Value::U32(32)));
    assert!(
        err.contains("llama.rope.dimension_count") && err.contains("partial"),
        "{err}"
    );
    let err = import_error(|m| set(m, "general.architecture", Value::String("gemma3".into())));
    assert!(err.contains("general.architecture") && err.contains("gemma3"), "{err}");
}

#[test]
fn a_tokenizer_kubetune_cannot_build_exactly_is_an_error_naming_the_key() {
    let err = import_error(|m| set(m, "tokenizer.ggml.model", Value::String("llama".into())));
    assert!(err.contains("tokenizer.ggml.model"), "{err}");
    let err = import_error(|m| set(m, "tokenizer.ggml.pre", Value::String("deepseek-coder".into())));
    assert!(
        err.contains("tokenizer.ggml.pre") && err.contains("deepseek-coder"),
        "{err}"
    );
    let err = import_error(|m| set(m, "tokenizer.ggml.eos_token_id", Value::U32(99)));
    assert!(err.contains("tokenizer.ggml.eos_token_id"), "{err}");
}

/// The GGUF name llama.cpp's converter gives an HF tensor of the Llama-like layout.
fn gguf_name(hf: &str) -> String {
    let global = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, gguf)) = global.iter().find(|(name, _)| *name == hf) {
        return gguf.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").expect("a layer tensor");
    let (layer, rest) = rest.split_once('.').expect("layer index");
    let modules = [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    let (module, param) = rest.rsplit_once('.').expect("param");
    let gguf = modules.iter().find(|(h, _)| *h == module).expect("known module").1;
    format!("blk.{layer}.{gguf}.{param}")
}

/// Qwen3 from GGUF: the tiny Qwen3 checkpoint of the family tests, written as llama.cpp names
/// and keys it (q/k norms, biases, head_dim as key_length), imports to transformers' logits.
#[test]
fn a_qwen3_gguf_imports_with_its_query_and_key_norms_to_transformers_logits() {
    let family = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/families/qwen3");
    let weights = candle_core::safetensors::load(family.join("model.safetensors"), &Device::Cpu).unwrap();
    let tensors: Vec<(String, QTensor)> = weights
        .iter()
        .map(|(name, t)| (gguf_name(name), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let vocab: Vec<String> = (0..128).map(|i| format!("t{i}")).collect();
    let vocab: Vec<&str> = vocab.iter().map(String::as_str).collect();
    let mut metadata: Vec<(String, Value)> = metadata()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("llama.") && !k.starts_with("tokenizer.ggml.token"))
        .collect();
    let strings = |items: &[&str]| Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect());
    for (key, value) in [
        ("general.architecture", Value::String("qwen3".into())),
        ("qwen3.block_count", Value::U32(2)),
        ("qwen3.context_length", Value::U32(256)),
        ("qwen3.embedding_length", Value::U32(32)),
        ("qwen3.feed_forward_length", Value::U32(64)),
        ("qwen3.attention.head_count", Value::U32(4)),
        ("qwen3.attention.head_count_kv", Value::U32(2)),
        ("qwen3.attention.key_length", Value::U32(16)),
        ("qwen3.attention.value_length", Value::U32(16)),
        ("qwen3.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("qwen3.rope.freq_base", Value::F32(1e6)),
        ("tokenizer.ggml.tokens", strings(&vocab)),
        ("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1); 128])),
        ("tokenizer.ggml.merges", strings(&[])),
    ] {
        set(&mut metadata, key, value);
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(&write_gguf(tmp.path(), &metadata, &tensors)).expect("import");
    let (config, model) = crate::load_model(&dir, &crate::LoadOptions::default()).expect("load the import");
    assert!(config.qk_norm() && config.qkv_bias() && config.o_bias() && config.tie_word_embeddings);

    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(family.join("reference.json")).unwrap()).unwrap();
    let case = &reference["cases"][0];
    let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
    let expected: Vec<Vec<f32>> = serde_json::from_value(case["logits"].clone()).unwrap();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits: Vec<Vec<f32>> = model
        .forward(&ids, 0, None, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let worst = logits
        .iter()
        .flatten()
        .zip(expected.iter().flatten())
        .fold(0f32, |w, (a, b)| w.max((a - b).abs()));
    assert!(worst < 1e-4, "logits differ from transformers by up to {worst}");
}

#[test]
fn a_query_norm_in_an_architecture_without_them_is_an_error_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tensors = tensors();
    let ones = Tensor::ones(HIDDEN / HEADS, candle_core::DType::F32, &Device::Cpu).unwrap();
    tensors.push((
        "blk.0.attn_q_norm.weight".into(),
        QTensor::quantize(&ones, GgmlDType::F32).unwrap(),
    ));
    let gguf = write_gguf(tmp.path(), &metadata(), &tensors);
    let err = import(&gguf, &tmp.path().join("out")).expect_err("refused").to_string();
    assert!(
        err.contains("blk.0.attn_q_norm.weight") && err.contains("llama"),
        "{err}"
    );
}
