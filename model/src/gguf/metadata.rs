//! `general.architecture` and the `<arch>.*` keys of a GGUF file, as an HF config.json.
//!
//! Every `<arch>.*` key is either read here or refused by name: a GGUF key this module does not
//! know may change the maths (sliding windows, experts, scaled RoPE, soft-capping), and running
//! the model without it would answer garbage without a word.

use super::tokenizer::Vocab;
use super::Metadata;
use crate::error::Result;
use candle_core::quantized::gguf_file::Value;
use serde_json::json;

/// The GGUF architectures this crate runs, with the HF `model_type` each becomes.
const ARCHITECTURES: &[(&str, &str)] = &[("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")];

/// The `<arch>.` keys read here (the suffix after the architecture's name).
const KNOWN_KEYS: &[&str] = &[
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "attention.key_length",
    "attention.value_length",
    "rope.freq_base",
    "rope.dimension_count",
    "vocab_size",
];

/// What the metadata and the tensor list say about the model's shape.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub architecture: String,
    pub model_type: &'static str,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub context_length: usize,
    pub tied_embeddings: bool,
    pub attention_bias: bool,
}

impl Layout {
    /// llama.cpp's converter permutes the q and k rows of Llama-architecture models from HF's
    /// half-split RoPE layout to its interleaved one; other architectures are stored as HF has them.
    pub fn permutes_qk(&self) -> bool {
        self.architecture == "llama"
    }

    pub fn config_json(&self, vocab: &Vocab) -> serde_json::Value {
        let mut config = json!({
            "architectures": [architecture_class(self.model_type)],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.context_length,
            "tie_word_embeddings": self.tied_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        // Qwen2's q/k/v always carry a bias; Llama's and Qwen3's by this flag.
        if self.model_type != "qwen2" {
            config["attention_bias"] = json!(self.attention_bias);
        }
        if self.model_type == "llama" {
            config["mlp_bias"] = json!(false);
        }
        if let Some(bos) = vocab.bos_id {
            config["bos_token_id"] = json!(bos);
        }
        if let Some(eos) = vocab.eos_id {
            config["eos_token_id"] = json!(eos);
        }
        config
    }
}

fn architecture_class(model_type: &str) -> &'static str {
    match model_type {
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        _ => "LlamaForCausalLM",
    }
}

/// Reads the model's shape from the metadata; `tensors` are the file's tensor names (whether
/// `output.weight` exists says whether the embeddings are tied).
pub(crate) fn layout(meta: &Metadata, tensors: &[&str]) -> Result<Layout> {
    let architecture = meta.string("general.architecture")?;
    let model_type = ARCHITECTURES
        .iter()
        .find(|(arch, _)| *arch == architecture)
        .map(|(_, model_type)| *model_type)
        .ok_or_else(|| {
            let known: Vec<&str> = ARCHITECTURES.iter().map(|(a, _)| *a).collect();
            meta.error(
                "general.architecture",
                format!("`{architecture}` is not supported (supported: {known:?})"),
            )
        })?;
    refuse_unknown_keys(meta, architecture)?;
    let key = |suffix: &str| format!("{architecture}.{suffix}");
    let usize_of = |suffix: &str| meta.u64(&key(suffix)).map(|v| v as usize);
    let hidden_size = usize_of("embedding_length")?;
    let heads = usize_of("attention.head_count")?;
    let kv_heads = meta
        .opt_u64(&key("attention.head_count_kv"))?
        .map_or(heads, |v| v as usize);
    if heads == 0 || kv_heads == 0 {
        return Err(meta.error(&key("attention.head_count"), "must be positive"));
    }
    let head_dim = match meta.opt_u64(&key("attention.key_length"))? {
        Some(k) => k as usize,
        None => hidden_size / heads,
    };
    if let Some(v) = meta.opt_u64(&key("attention.value_length"))? {
        if v as usize != head_dim {
            return Err(meta.error(
                &key("attention.value_length"),
                format!("{v} differs from the key length {head_dim}; not supported"),
            ));
        }
    }
    if let Some(rotary) = meta.opt_u64(&key("rope.dimension_count"))? {
        if rotary as usize != head_dim {
            return Err(meta.error(
                &key("rope.dimension_count"),
                format!("{rotary} rotates part of the head ({head_dim}); partial RoPE is not supported"),
            ));
        }
    }
    if tensors.contains(&"rope_freqs.weight") {
        return Err(meta.error(
            "rope_freqs.weight",
            "per-frequency RoPE scaling (Llama 3.1's) from GGUF is not supported yet",
        ));
    }
    let vocab_size = match meta.opt_u64(&key("vocab_size"))? {
        Some(v) => v as usize,
        None => meta.array("tokenizer.ggml.tokens")?.len(),
    };
    Ok(Layout {
        architecture: architecture.to_string(),
        model_type,
        vocab_size,
        hidden_size,
        intermediate_size: usize_of("feed_forward_length")?,
        layers: usize_of("block_count")?,
        heads,
        kv_heads,
        head_dim,
        rms_norm_eps: meta
            .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| meta.error(&key("attention.layer_norm_rms_epsilon"), "missing"))?,
        rope_theta: meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        context_length: usize_of("context_length")?,
        tied_embeddings: !tensors.contains(&"output.weight"),
        attention_bias: tensors.iter().any(|t| t.ends_with(".attn_q.bias")),
    })
}

/// Keys some converters write with a value that changes nothing: no RoPE scaling, no experts.
fn neutral(suffix: &str, value: Option<&Value>) -> bool {
    match (suffix, value) {
        ("rope.scaling.type", Some(Value::String(kind))) => kind == "none",
        ("expert_count" | "expert_used_count", Some(v)) => v.to_u64().is_ok_and(|n| n == 0),
        _ => false,
    }
}

fn refuse_unknown_keys(meta: &Metadata, architecture: &str) -> Result<()> {
    let prefix = format!("{architecture}.");
    let mut unknown: Vec<&str> = meta
        .keys()
        .filter(|k| {
            k.strip_prefix(&prefix)
                .is_some_and(|rest| !KNOWN_KEYS.contains(&rest) && !neutral(rest, meta.get(k)))
        })
        .collect();
    unknown.sort_unstable();
    match unknown.first() {
        None => Ok(()),
        Some(first) => Err(meta.error(
            first,
            format!("is not understood by kubetune and may change the model's maths (all such keys: {unknown:?})"),
        )),
    }
}
