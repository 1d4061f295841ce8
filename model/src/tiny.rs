//! A tiny, randomly initialised Llama in HF layout, for tests and demos where no real model can
//! be downloaded. Everything is derived from the seed, so two runs write the same files.

use crate::config::{Config, TokenIds};
use crate::corpus::CORPUS;
use crate::error::{ModelError, Result};
use crate::lora::TargetModule;
use crate::tensors;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Special tokens, in id order. The role markers are used by the default chat format.
pub const SPECIAL_TOKENS: [&str; 7] = [
    "<s>",
    "</s>",
    "<pad>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
];
pub const BOS_ID: u32 = 0;
pub const EOS_ID: u32 = 1;

#[derive(Debug, Clone)]
pub struct TinySpec {
    pub seed: u64,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub max_position_embeddings: usize,
}

impl Default for TinySpec {
    /// Small enough that the trainer's tests run in seconds on two cores, with GQA (4 query
    /// heads sharing 2 KV heads) so that path is exercised.
    fn default() -> Self {
        Self {
            seed: 0,
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 192,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            max_position_embeddings: 512,
        }
    }
}

impl TinySpec {
    pub fn config(&self) -> Config {
        Config {
            model_type: "llama".into(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_layers,
            num_attention_heads: self.num_heads,
            num_key_value_heads: Some(self.num_kv_heads),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            sliding_window: None,
            use_sliding_window: None,
            layer_types: None,
            max_window_layers: None,
            hidden_act: Some("silu".into()),
            hidden_activation: None,
            query_pre_attn_scalar: None,
            rope_local_base_freq: None,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            use_bidirectional_attention: None,
            bos_token_id: Some(BOS_ID),
            eos_token_id: Some(TokenIds::One(EOS_ID)),
            torch_dtype: Some("float32".into()),
        }
    }
}

/// Writes config.json, model.safetensors, tokenizer.json and tokenizer_config.json into `dir`.
/// tokenizer_config.json has no chat template, so chat data uses the default chat format.
pub fn write_tiny_model(dir: &Path, spec: &TinySpec) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(ModelError::io(dir))?;
    let config = spec.config();
    config.validate(Path::new("<tiny spec>"))?;

    let tokenizer = train_tokenizer(spec.vocab_size)?;
    let tok_path = dir.join("tokenizer.json");
    tokenizer.save(&tok_path, false).map_err(|e| ModelError::Tokenizer {
        path: tok_path.clone(),
        reason: e.to_string(),
    })?;
    let tok_config = serde_json::json!({
        "bos_token": SPECIAL_TOKENS[BOS_ID as usize],
        "eos_token": SPECIAL_TOKENS[EOS_ID as usize],
        "pad_token": "<pad>",
        "add_bos_token": true,
        "model_max_length": spec.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    write_json(&dir.join("tokenizer_config.json"), &tok_config)?;
    write_json(&dir.join("config.json"), &config)?;
    tensors::save(&dir.join("model.safetensors"), &random_weights(&config, spec.seed)?)
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| ModelError::Json {
        path: path.into(),
        source,
    })?;
    std::fs::write(path, text).map_err(ModelError::io(path))
}

/// A byte-level BPE (as GPT-2 and Llama 3 use) trained on the built-in corpus.
fn train_tokenizer(vocab_size: usize) -> Result<Tokenizer> {
    let specials = SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()));
    let lines = CORPUS.split(". ").map(|s| format!("{s}. "));
    tokenizer
        .train(&mut trainer, lines)
        .map_err(|e| ModelError::Tokenizer {
            path: "<built-in corpus>".into(),
            reason: e.to_string(),
        })?;
    pad_vocab(&mut tokenizer, vocab_size)?;
    Ok(tokenizer)
}

/// The built-in corpus runs out of merges at about a thousand tokens. A wider model (the
/// server benchmark's has 8192) would then produce ids the tokenizer cannot decode, so the
/// rest of the vocabulary is filled with placeholder tokens that decode to visible text.
/// The default 512-token vocabulary is reached by training alone and is not touched.
fn pad_vocab(tokenizer: &mut Tokenizer, vocab_size: usize) -> Result<()> {
    let have = tokenizer.get_vocab_size(true);
    if have >= vocab_size {
        return Ok(());
    }
    let fillers: Vec<AddedToken> = (have..vocab_size)
        .map(|i| AddedToken::from(format!("<|t{i}|>"), false))
        .collect();
    tokenizer.add_tokens(fillers).map_err(|e| ModelError::Tokenizer {
        path: "<placeholder tokens>".into(),
        reason: e.to_string(),
    })?;
    Ok(())
}

/// Random weights, N(0, 1/fan_in) everywhere (not HF's N(0, 0.02)): at this tiny width 0.02
/// makes every layer nearly the identity, and a LoRA-only fine-tune then has no features to
/// build on. The head's scale lets the final-normed state separate tokens clearly.
pub(crate) fn random_weights(c: &Config, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = BTreeMap::new();
    let mut normal = |name: String, shape: (usize, usize), std: f32| -> Result<()> {
        let values: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| std * standard_normal(&mut rng))
            .collect();
        out.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
        Ok(())
    };
    let h = c.hidden_size;
    normal("model.embed_tokens.weight".into(), (c.vocab_size, h), 1.0)?;
    normal("lm_head.weight".into(), (c.vocab_size, h), 1.0 / (h as f32).sqrt())?;
    for layer in 0..c.num_hidden_layers {
        for m in TargetModule::ALL {
            let (fan_in, fan_out) = m.shape(c);
            let name = format!("model.layers.{layer}.{}.{}.weight", m.parent(), m.name());
            normal(name, (fan_out, fan_in), 1.0 / (fan_in as f32).sqrt())?;
        }
    }
    let ones = Tensor::ones(h, candle_core::DType::F32, &Device::Cpu)?;
    for layer in 0..c.num_hidden_layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            out.insert(format!("model.layers.{layer}.{norm}.weight"), ones.clone());
        }
    }
    out.insert("model.norm.weight".into(), ones);
    Ok(out)
}

/// Box–Muller; rand_distr would be one more dependency for one function.
fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vocabulary_wider_than_the_corpus_is_filled_with_decodable_placeholders() {
        let tokenizer = train_tokenizer(2048).expect("tokenizer");
        assert_eq!(tokenizer.get_vocab_size(true), 2048);
        assert_eq!(tokenizer.decode(&[2047], true).expect("decode"), "<|t2047|>");
        assert_eq!(train_tokenizer(512).expect("tokenizer").get_vocab_size(true), 512);
    }
}
