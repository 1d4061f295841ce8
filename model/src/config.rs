//! `Config` mirrors the fields of a Hugging Face config.json that Llama, Mistral, Qwen2, Qwen3,
//! Gemma 2, Gemma 3 and Phi-3 share.
//! Unknown fields are ignored (HF configs carry many that do not affect the forward pass), but
//! every field that changes the maths is either honoured or rejected, never silently dropped:
//! transformers 5's `rope_parameters` is read, and [`UNSUPPORTED_KEYS`] are refused by name.
//!
//! Keys read nowhere because they change nothing here: the dropout rates (`attention_dropout`,
//! and Phi-3's `resid_pdrop` and `embd_pdrop`) act only while the whole model trains, and the
//! forward pass here is inference's, the trainer's too (it trains adapters, with their own
//! `lora_dropout`); Phi-3's top-level `original_max_position_embeddings` sizes only longrope's
//! scaling, which is refused.

use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Absent in old Llama configs, which means plain multi-head attention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Some configs (Mistral Nemo, Qwen3-style) set it explicitly instead of hidden/heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama: bias on q, k, v and o. Qwen2 has no such field; it always has q/k/v bias.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// transformers 5 names each layer's attention (`full_attention` or `sliding_attention`);
    /// it decides where the window applies, whatever `use_sliding_window` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Qwen2/3 configs name how many leading layers keep full attention when the window is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Gemma's name for `hidden_act`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    /// Gemma: attention scores are scaled by its inverse square root instead of head_dim's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: the RoPE base of the sliding-window layers (the full layers take `rope_theta`
    /// and `rope_scaling`). transformers 5 writes it as `rope_parameters.sliding_attention`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 2: scores become cap * tanh(scores / cap) before the mask and softmax.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: the logits become cap * tanh(logits / cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    /// EmbeddingGemma's bidirectional attention: refused when true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_bidirectional_attention: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama, Mistral, Qwen).
    Silu,
    /// GeGLU with GELU's tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// `eos_token_id` is a single id in Llama 2 and a list in Llama 3 instruct models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// RoPE frequency scaling. Only the kinds implemented here are accepted; a config asking for
/// another kind (yarn, dynamic, ...) is rejected so the model never runs with wrong positions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// HF wrote `type` before it wrote `rope_type`.
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    4096
}
fn one() -> f64 {
    1.0
}

/// transformers 5 writes RoPE's settings as one object, `rope_parameters: {rope_theta, rope_type,
/// factor, ...}`, where older versions wrote a top-level `rope_theta` and a `rope_scaling`
/// object. Reading only the old names silently ran such a model at theta 10000, and it answered
/// garbage. The object's fields move to the old names here; one that both spell differently is
/// an error. Gemma 3 writes one object per layer type: the full layers' moves as above, the
/// sliding layers' (unscaled) theta to `rope_local_base_freq`, its name before transformers 5.
fn rope_parameters_to_fields(value: &mut serde_json::Value, path: &Path) -> Result<()> {
    let bad = |field: &str, reason: String| ModelError::InvalidConfig {
        path: path.into(),
        field: field.into(),
        reason,
    };
    let Some(obj) = value.as_object_mut() else {
        return Ok(());
    };
    let Some(params) = obj.remove("rope_parameters") else {
        return Ok(());
    };
    let serde_json::Value::Object(mut params) = params else {
        return Err(bad("rope_parameters", "must be an object".into()));
    };
    if params.values().any(|v| v.is_object()) {
        if let Some(theta) = sliding_rope_theta(&mut params, path)? {
            obj.insert("rope_local_base_freq".into(), theta);
        }
        params = match params.remove("full_attention") {
            Some(serde_json::Value::Object(full)) if params.is_empty() => full,
            _ => {
                return Err(bad(
                    "rope_parameters",
                    "settings per layer type must be exactly full_attention and sliding_attention".into(),
                ))
            }
        };
    }
    let theta = params
        .remove("rope_theta")
        .ok_or_else(|| bad("rope_parameters.rope_theta", "missing".into()))?;
    if !theta.is_number() {
        return Err(bad("rope_parameters.rope_theta", format!("{theta} is not a number")));
    }
    if let Some(top) = obj.get("rope_theta").filter(|t| t.as_f64() != theta.as_f64()) {
        return Err(bad(
            "rope_theta",
            format!("{top} disagrees with rope_parameters.rope_theta {theta}"),
        ));
    }
    obj.insert("rope_theta".into(), theta);
    partial_rotary_factor_to_top_level(obj, &mut params, path)?;
    let kind = params.get("rope_type").and_then(|t| t.as_str()).unwrap_or("default");
    if kind == "default" {
        params.remove("rope_type");
        if let Some(key) = params.keys().next() {
            return Err(bad(
                &format!("rope_parameters.{key}"),
                "is not a setting of default RoPE".into(),
            ));
        }
        return Ok(());
    }
    if obj.get("rope_scaling").is_some_and(|s| !s.is_null()) {
        return Err(bad(
            "rope_scaling",
            "given together with a scaled rope_parameters; keep one".into(),
        ));
    }
    obj.insert("rope_scaling".into(), serde_json::Value::Object(params));
    Ok(())
}

/// The theta of `rope_parameters.sliding_attention`, which must be unscaled RoPE; the entry is
/// taken out of `params`.
fn sliding_rope_theta(
    params: &mut serde_json::Map<String, serde_json::Value>,
    path: &Path,
) -> Result<Option<serde_json::Value>> {
    let bad = |field: &str, reason: String| ModelError::InvalidConfig {
        path: path.into(),
        field: field.into(),
        reason,
    };
    let Some(sliding) = params.remove("sliding_attention") else {
        return Ok(None);
    };
    let serde_json::Value::Object(mut sliding) = sliding else {
        return Err(bad("rope_parameters.sliding_attention", "must be an object".into()));
    };
    let theta = sliding.remove("rope_theta").filter(|t| t.is_number()).ok_or_else(|| {
        bad(
            "rope_parameters.sliding_attention.rope_theta",
            "missing or not a number".into(),
        )
    })?;
    if let Some(kind) = sliding.remove("rope_type").filter(|k| k != "default") {
        return Err(bad(
            "rope_parameters.sliding_attention.rope_type",
            format!("{kind} is not supported on sliding layers (default only)"),
        ));
    }
    if let Some(key) = sliding.keys().next() {
        return Err(bad(
            &format!("rope_parameters.sliding_attention.{key}"),
            "is not a setting of default RoPE".into(),
        ));
    }
    Ok(Some(theta))
}

/// transformers 5 writes Phi-3's `partial_rotary_factor` (1.0 by default) inside
/// `rope_parameters`; it moves to the top-level key, where [`refuse_unsupported_keys`] accepts
/// only 1. Two values that disagree are an error.
fn partial_rotary_factor_to_top_level(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    params: &mut serde_json::Map<String, serde_json::Value>,
    path: &Path,
) -> Result<()> {
    let Some(factor) = params.remove("partial_rotary_factor") else {
        return Ok(());
    };
    if let Some(top) = obj
        .get("partial_rotary_factor")
        .filter(|t| t.as_f64() != factor.as_f64())
    {
        return Err(ModelError::InvalidConfig {
            path: path.into(),
            field: "partial_rotary_factor".into(),
            reason: format!("{top} disagrees with rope_parameters.partial_rotary_factor {factor}"),
        });
    }
    obj.insert("partial_rotary_factor".into(), factor);
    Ok(())
}

/// Keys that change the maths of families or variants this crate does not implement (partial
/// rotary embeddings, the q/k norm switches of other families; Qwen3's and Gemma 3's q/k norms
/// come with their `model_type`): refused by name when set, rather than ignored. Soft-capping
/// is Gemma's only ([`Config::validate`]).
const UNSUPPORTED_KEYS: &[&str] = &["partial_rotary_factor", "use_qk_norm", "qk_layernorm"];

fn refuse_unsupported_keys(value: &serde_json::Value, path: &Path) -> Result<()> {
    for key in UNSUPPORTED_KEYS {
        let set = match value.get(key) {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
            // A rotary factor of 1 is the plain rotation this crate runs.
            Some(v) if *key == "partial_rotary_factor" => v.as_f64() != Some(1.0),
            Some(_) => true,
        };
        if set {
            return Err(ModelError::InvalidConfig {
                path: path.into(),
                field: (*key).into(),
                reason: format!("{} is not supported", value[key]),
            });
        }
    }
    Ok(())
}

/// The architectures whose weight layout and maths this crate implements.
const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2", "qwen3", GEMMA2, GEMMA3, "phi3"];

/// Gemma 2 (`Gemma2ForCausalLM`).
const GEMMA2: &str = "gemma2";
/// Gemma 3's text model (`Gemma3ForCausalLM`).
const GEMMA3: &str = "gemma3_text";

/// Fills in what transformers assumes for a Gemma config that leaves it out, so the model
/// runs as transformers runs it. Gemma 2: sliding and full layers alternate, RoPE base 1e4,
/// soft-capping at 50 (scores) and 30 (logits) unless set to null. Gemma 3: a full layer after
/// every five sliding ones (`sliding_window_pattern`, 6), global RoPE base 1e6, local base 1e4.
/// Both: query scalar 256.
fn gemma_defaults(value: &mut serde_json::Value) {
    let Some(obj) = value.as_object_mut() else {
        return;
    };
    let default_pattern = match obj.get("model_type").and_then(|t| t.as_str()) {
        Some(GEMMA2) => {
            obj.entry("rope_theta").or_insert(10_000.0.into());
            obj.entry("attn_logit_softcapping").or_insert(50.0.into());
            obj.entry("final_logit_softcapping").or_insert(30.0.into());
            2
        }
        Some(GEMMA3) => {
            obj.entry("rope_theta").or_insert(1_000_000.0.into());
            obj.entry("rope_local_base_freq").or_insert(10_000.0.into());
            6
        }
        _ => return,
    };
    obj.entry("query_pre_attn_scalar").or_insert(256.into());
    if obj.get("layer_types").is_none_or(|t| t.is_null()) {
        let pattern = ["sliding_window_pattern", "_sliding_window_pattern"]
            .iter()
            .find_map(|k| obj.get(*k).and_then(|v| v.as_u64()))
            .unwrap_or(default_pattern);
        let layers = obj.get("num_hidden_layers").and_then(|v| v.as_u64()).unwrap_or(0);
        let kind = |i: u64| {
            if pattern != 0 && !i.is_multiple_of(pattern) {
                "sliding_attention"
            } else {
                "full_attention"
            }
        };
        let types: Vec<serde_json::Value> = (1..=layers).map(|i| kind(i).into()).collect();
        obj.insert("layer_types".into(), types.into());
    }
}

impl Config {
    /// Reads and validates config.json.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(ModelError::io(path))?;
        Self::from_json(&text, path)
    }

    /// Reads a model directory's config.json, with the stop tokens of its generation_config.json
    /// (when there is one) added to `eos_token_id`: instruct models list their end-of-turn tokens
    /// there (Llama 3: `[128001, 128008, 128009]` where config.json names only 128001), and
    /// generation that ignored them would run past the end of every answer.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let mut config = Self::from_file(&dir.join("config.json"))?;
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(config);
        }
        let text = std::fs::read_to_string(&path).map_err(ModelError::io(&path))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.clone(),
            source,
        })?;
        let extra = match value.get("eos_token_id") {
            None | Some(serde_json::Value::Null) => return Ok(config),
            Some(ids) => serde_json::from_value::<TokenIds>(ids.clone()).map_err(|_| ModelError::InvalidConfig {
                path: path.clone(),
                field: "eos_token_id".into(),
                reason: format!("{ids} is neither a token id nor a list of them"),
            })?,
        };
        let mut ids = config.eos_token_ids();
        for id in extra.to_vec() {
            if id as usize >= config.vocab_size {
                return Err(ModelError::InvalidConfig {
                    path,
                    field: "eos_token_id".into(),
                    reason: format!("{id} is not below vocab_size {}", config.vocab_size),
                });
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        config.eos_token_id = Some(if ids.len() == 1 {
            TokenIds::One(ids[0])
        } else {
            TokenIds::Many(ids)
        });
        Ok(config)
    }

    /// Parses and validates the text of a config.json; `path` only labels errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let json = |source| ModelError::Json {
            path: path.into(),
            source,
        };
        let mut value: serde_json::Value = serde_json::from_str(text).map_err(json)?;
        rope_parameters_to_fields(&mut value, path)?;
        gemma_defaults(&mut value);
        refuse_unsupported_keys(&value, path)?;
        let config: Config = serde_json::from_value(value).map_err(json)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks the invariants the forward pass relies on; `path` only labels the error.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, reason: String| ModelError::InvalidConfig {
            path: path.into(),
            field: field.into(),
            reason,
        };
        if !SUPPORTED.contains(&self.model_type.as_str()) {
            return Err(bad(
                "model_type",
                format!("`{}` is not one of {SUPPORTED:?}", self.model_type),
            ));
        }
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ] {
            if value == 0 {
                return Err(bad(field, "must be positive".into()));
            }
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(bad(
                "num_key_value_heads",
                format!("{kv} does not divide num_attention_heads {}", self.num_attention_heads),
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("{} is odd; RoPE needs an even head size", self.head_dim()),
            ));
        }
        self.validate_layer_types(path)?;
        self.validate_phi3(path)?;
        self.activation(path)?;
        if self.use_bidirectional_attention == Some(true) {
            return Err(bad(
                "use_bidirectional_attention",
                "bidirectional attention (an embedding model) is not supported".into(),
            ));
        }
        if !self.gemma_norms() {
            for (field, set) in [
                ("query_pre_attn_scalar", self.query_pre_attn_scalar.is_some()),
                ("rope_local_base_freq", self.rope_local_base_freq.is_some()),
                ("attn_logit_softcapping", self.attn_logit_softcapping.is_some()),
                ("final_logit_softcapping", self.final_logit_softcapping.is_some()),
            ] {
                if set {
                    return Err(bad(
                        field,
                        format!("is a Gemma setting, not one of `{}`", self.model_type),
                    ));
                }
            }
        }
        for (field, value) in [
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if let Some(v) = value.filter(|v| v.is_nan() || *v <= 0.0) {
                return Err(bad(field, format!("{v} must be positive")));
            }
        }
        if let Some(scaling) = &self.rope_scaling {
            match scaling.rope_type.as_str() {
                "default" | "linear" => {}
                "llama3" => {
                    if scaling.low_freq_factor.is_none()
                        || scaling.high_freq_factor.is_none()
                        || scaling.original_max_position_embeddings.is_none()
                    {
                        return Err(bad(
                            "rope_scaling",
                            "llama3 scaling needs low_freq_factor, high_freq_factor and original_max_position_embeddings".into(),
                        ));
                    }
                }
                // Phi-3's long-context RoPE (128k models, Phi-3.5), which older configs call su.
                kind @ ("longrope" | "su") => {
                    return Err(bad(
                        "rope_scaling.rope_type",
                        format!("`{kind}` (longrope: short and long factors per frequency) is not supported (default, linear, llama3)"),
                    ))
                }
                other => {
                    return Err(bad(
                        "rope_scaling.rope_type",
                        format!("`{other}` is not supported (default, linear, llama3)"),
                    ))
                }
            }
            // Written so that NaN is rejected too.
            if scaling.factor.is_nan() || scaling.factor <= 0.0 {
                return Err(bad(
                    "rope_scaling.factor",
                    format!("{} must be positive", scaling.factor),
                ));
            }
        }
        Ok(())
    }

    /// `layer_types`, when given, has one known entry per layer, and a sliding one needs a
    /// window.
    fn validate_layer_types(&self, path: &Path) -> Result<()> {
        let Some(types) = &self.layer_types else {
            return Ok(());
        };
        let bad = |reason: String| ModelError::InvalidConfig {
            path: path.into(),
            field: "layer_types".into(),
            reason,
        };
        if types.len() != self.num_hidden_layers {
            return Err(bad(format!(
                "has {} entries for {} layers",
                types.len(),
                self.num_hidden_layers
            )));
        }
        if let Some(other) = types
            .iter()
            .find(|t| !["full_attention", "sliding_attention"].contains(&t.as_str()))
        {
            return Err(bad(format!(
                "`{other}` is not supported (full_attention, sliding_attention)"
            )));
        }
        if types.iter().any(|t| t == "sliding_attention") && self.sliding_window.is_none() {
            return Err(bad(
                "names sliding_attention layers but sliding_window is not set".into()
            ));
        }
        Ok(())
    }

    /// Phi-3's projections have no biases: transformers' Phi3 reads neither switch, so a config
    /// that sets one describes weights it would drop. Refused by name rather than guessed at.
    fn validate_phi3(&self, path: &Path) -> Result<()> {
        if self.model_type != "phi3" {
            return Ok(());
        }
        for (field, set) in [("attention_bias", self.attention_bias), ("mlp_bias", self.mlp_bias)] {
            if set {
                return Err(ModelError::InvalidConfig {
                    path: path.into(),
                    field: field.into(),
                    reason: "is true, but Phi-3's projections have no biases".into(),
                });
            }
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Whether q/k/v carry a bias: always for Qwen2, by `attention_bias` for Llama and Qwen3.
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }

    /// Whether each query and key head is RMS-normed (over head_dim, before RoPE): Qwen3's
    /// and Gemma 3's `q_norm` and `k_norm`.
    pub fn qk_norm(&self) -> bool {
        self.model_type == "qwen3" || self.model_type == GEMMA3
    }

    /// Gemma's norms multiply by (1 + w), and each layer norms the outputs of attention and
    /// of the MLP as well as their inputs (four norms a layer).
    pub fn gemma_norms(&self) -> bool {
        self.model_type == GEMMA2 || self.model_type == GEMMA3
    }

    /// Gemma scales the embeddings by sqrt(hidden_size), rounded to the weights' dtype.
    pub fn embedding_scale(&self) -> Option<f64> {
        self.gemma_norms().then(|| (self.hidden_size as f64).sqrt())
    }

    /// The factor on attention scores: 1 / sqrt(query_pre_attn_scalar) (Gemma), else
    /// 1 / sqrt(head_dim).
    pub fn attention_scale(&self) -> f64 {
        1.0 / self.query_pre_attn_scalar.unwrap_or(self.head_dim() as f64).sqrt()
    }

    /// The MLP's gate activation, from `hidden_act` or Gemma's `hidden_activation`; another
    /// function than these two is an error naming the key.
    pub fn activation(&self, path: &Path) -> Result<Activation> {
        let (field, name) = match (&self.hidden_activation, &self.hidden_act) {
            (Some(name), _) => ("hidden_activation", name.as_str()),
            (None, Some(name)) => ("hidden_act", name.as_str()),
            (None, None) if self.gemma_norms() => return Ok(Activation::GeluTanh),
            (None, None) => return Ok(Activation::Silu),
        };
        match name {
            "silu" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            other => Err(ModelError::InvalidConfig {
                path: path.into(),
                field: field.into(),
                reason: format!("`{other}` is not supported (silu, gelu_pytorch_tanh)"),
            }),
        }
    }

    /// The attention window of layer `layer`: Phi-3's on every layer (it reads no
    /// `layer_types`); by `layer_types` when given; else Qwen's `max_window_layers` leading
    /// layers keep full attention when the window is on; else [`Config::attention_window`].
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        if self.model_type == "phi3" {
            return self.sliding_window;
        }
        if let Some(types) = &self.layer_types {
            return (types.get(layer)? == "sliding_attention").then_some(self.sliding_window?);
        }
        if self.model_type.starts_with("qwen") {
            let leading_full = self.max_window_layers.unwrap_or(28); // transformers' default
            return self.attention_window().filter(|_| layer >= leading_full);
        }
        self.attention_window()
    }

    /// Whether layer `layer` rotates with the local RoPE base (Gemma 3's sliding layers).
    pub fn local_rope(&self, layer: usize) -> bool {
        self.rope_local_base_freq.is_some() && self.layer_window(layer).is_some()
    }

    /// Whether the CPU training path written out by hand (`layer_grad`) computes this family:
    /// the Llama layer (Llama, Mistral, Qwen2) with one window for all layers. The others
    /// train through candle's graph.
    pub fn llama_layers(&self) -> bool {
        let one_window = (0..self.num_hidden_layers).all(|l| self.layer_window(l) == self.attention_window());
        !self.qk_norm() && !self.gemma_norms() && one_window
    }

    /// Whether o_proj carries a bias (Qwen2's does not).
    pub fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias
    }

    /// The window of a model whose layers all have the same: Phi-3 applies `sliding_window`
    /// whenever it is set (Phi3Model picks its mask on that key alone; Phi-3-mini-4k sets 2047).
    /// Qwen configs list a window but switch it off with `use_sliding_window: false`; Mistral's
    /// has no switch and means it. With `layer_types`, the first sliding layer's. See
    /// [`Config::layer_window`] for a given layer's.
    pub fn attention_window(&self) -> Option<usize> {
        if self.model_type == "phi3" {
            return self.sliding_window;
        }
        if self.layer_types.is_some() {
            return (0..self.num_hidden_layers).find_map(|l| self.layer_window(l));
        }
        let default_on = !self.model_type.starts_with("qwen");
        if self.use_sliding_window.unwrap_or(default_on) {
            self.sliding_window
        } else {
            None
        }
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config> {
        Config::from_json(json, Path::new("config.json"))
    }

    fn model_dir(config: &str, generation: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        if let Some(generation) = generation {
            std::fs::write(dir.path().join("generation_config.json"), generation).unwrap();
        }
        dir
    }

    const SMALL: &str = r#""model_type":"llama","vocab_size":200,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2"#;

    #[test]
    fn stop_tokens_of_generation_config_join_those_of_config_json() {
        let dir = model_dir(
            &format!(r#"{{{SMALL},"eos_token_id":128}}"#),
            Some(r#"{"eos_token_id":[128,130,131]}"#),
        );
        assert_eq!(
            Config::from_model_dir(dir.path()).unwrap().eos_token_ids(),
            vec![128, 130, 131]
        );
        let without = model_dir(&format!(r#"{{{SMALL},"eos_token_id":128}}"#), None);
        assert_eq!(
            Config::from_model_dir(without.path()).unwrap().eos_token_ids(),
            vec![128]
        );
    }

    #[test]
    fn a_bad_stop_token_in_generation_config_is_an_error_naming_the_file_and_field() {
        for bad in [r#"{"eos_token_id":"two"}"#, r#"{"eos_token_id":[900]}"#] {
            let dir = model_dir(&format!("{{{SMALL}}}"), Some(bad));
            let err = Config::from_model_dir(dir.path()).unwrap_err().to_string();
            assert!(
                err.contains("generation_config.json") && err.contains("eos_token_id"),
                "{err}"
            );
        }
    }

    /// SmolLM2's config as transformers 5 writes it: theta 1e5 inside rope_parameters.
    #[test]
    fn rope_parameters_of_transformers_5_set_theta_and_scaling() {
        let base = r#""model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2"#;
        let c = parse(&format!(
            r#"{{{base},"rope_parameters":{{"rope_theta":100000.0,"rope_type":"default"}}}}"#
        ))
        .expect("default rope_parameters");
        assert_eq!(c.rope_theta, 100000.0);
        assert_eq!(c.rope_scaling, None);
        let c = parse(&format!(
            r#"{{{base},"rope_parameters":{{"rope_theta":500000.0,"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}}}"#
        ))
        .expect("llama3 rope_parameters");
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling.as_ref().map(|s| (s.rope_type.as_str(), s.factor)),
            Some(("llama3", 8.0))
        );
    }

    #[test]
    fn rope_parameters_that_conflict_or_cannot_be_run_are_errors_naming_the_field() {
        let base = r#""model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2"#;
        let cases = [
            (
                r#""rope_theta":10000.0,"rope_parameters":{"rope_theta":100000.0}"#,
                "field `rope_theta`",
            ),
            (
                r#""rope_parameters":{"rope_type":"default"}"#,
                "field `rope_parameters.rope_theta`",
            ),
            (
                r#""rope_parameters":{"rope_theta":1e4,"rope_type":"yarn","factor":4.0}"#,
                "field `rope_scaling.rope_type`",
            ),
            (
                r#""rope_parameters":{"rope_theta":1e4,"factor":4.0}"#,
                "field `rope_parameters.factor`",
            ),
            (
                r#""rope_parameters":{"full_attention":{"rope_theta":1e6},"sliding_attention":{"rope_theta":1e4}}"#,
                "field `rope_local_base_freq`",
            ),
            (r#""final_logit_softcapping":30.0"#, "field `final_logit_softcapping`"),
            (r#""partial_rotary_factor":0.5"#, "field `partial_rotary_factor`"),
        ];
        for (extra, expected) in cases {
            let json = format!("{{{base},{extra}}}");
            let err = parse(&json).expect_err(&json).to_string();
            assert!(err.contains("config.json") && err.contains(expected), "{json}: {err}");
        }
        parse(&format!(
            r#"{{{base},"partial_rotary_factor":1.0,"final_logit_softcapping":null}}"#
        ))
        .expect("a factor of 1 and a null soft-cap are the plain model");
    }

    #[test]
    fn reads_llama3_style_config() {
        let c = parse(
            r#"{"model_type":"llama","vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"rope_theta":500000.0,
            "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"},"eos_token_id":[128001,128008,128009],
            "architectures":["LlamaForCausalLM"]}"#,
        )
        .expect("valid config");
        assert_eq!(c.num_kv_heads(), 8);
        assert_eq!(c.head_dim(), 128);
        assert_eq!(c.eos_token_ids(), vec![128001, 128008, 128009]);
        assert!(!c.qkv_bias());
    }

    #[test]
    fn qwen2_has_qkv_bias_and_no_window_by_default() {
        let c = parse(
            r#"{"model_type":"qwen2","vocab_size":151936,"hidden_size":896,"intermediate_size":4864,
            "num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,"sliding_window":32768,
            "use_sliding_window":false,"tie_word_embeddings":true,"eos_token_id":151643}"#,
        )
        .expect("valid config");
        assert!(c.qkv_bias() && !c.o_bias() && c.tie_word_embeddings);
        assert_eq!(c.attention_window(), None);
    }

    #[test]
    fn qwen3_norms_queries_and_keys_and_takes_its_biases_from_attention_bias() {
        let c = parse(
            r#"{"model_type":"qwen3","vocab_size":151936,"hidden_size":1024,"intermediate_size":3072,
            "num_hidden_layers":2,"num_attention_heads":16,"num_key_value_heads":8,"head_dim":128,
            "attention_bias":false,"sliding_window":null,"use_sliding_window":false,
            "layer_types":["full_attention","full_attention"],"tie_word_embeddings":true}"#,
        )
        .expect("valid config");
        assert!(c.qk_norm() && !c.qkv_bias() && !c.o_bias());
        assert_eq!(c.head_dim(), 128);
        assert_eq!(c.attention_window(), None);
    }

    /// Phi-3-mini-4k-instruct's config.json as published (transformers 4 wrote it): its window
    /// of 2047 applies with no switch, and the dropout rates and original context are accepted.
    #[test]
    fn phi3_mini_config_reads_with_its_window_and_no_biases() {
        let c = parse(
            r#"{"architectures":["Phi3ForCausalLM"],"attention_dropout":0.0,"bos_token_id":1,"embd_pdrop":0.0,
            "eos_token_id":32000,"hidden_act":"silu","hidden_size":3072,"initializer_range":0.02,
            "intermediate_size":8192,"max_position_embeddings":4096,"model_type":"phi3","num_attention_heads":32,
            "num_hidden_layers":32,"num_key_value_heads":32,"original_max_position_embeddings":4096,
            "pad_token_id":32000,"resid_pdrop":0.0,"rms_norm_eps":1e-05,"rope_scaling":null,"rope_theta":10000.0,
            "sliding_window":2047,"tie_word_embeddings":false,"torch_dtype":"bfloat16","use_cache":true,
            "vocab_size":32064}"#,
        )
        .expect("valid config");
        assert_eq!(c.attention_window(), Some(2047));
        assert!(!c.qkv_bias() && !c.o_bias() && !c.mlp_bias && !c.qk_norm());
        assert_eq!((c.num_kv_heads(), c.head_dim()), (32, 96));
    }

    /// transformers 5 writes Phi-3's rotary factor inside rope_parameters: 1 is the plain
    /// rotation; Phi-4-mini's 0.75, longrope (Phi-3-mini-128k, Phi-3.5) and biases are refused
    /// by name.
    #[test]
    fn phi3_rotary_factor_longrope_and_biases_are_read_or_refused_by_name() {
        let base = r#""model_type":"phi3","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"sliding_window":4"#;
        let c = parse(&format!(
            r#"{{{base},"rope_parameters":{{"partial_rotary_factor":1.0,"rope_theta":10000.0,"rope_type":"default"}}}}"#
        ))
        .expect("a factor of 1 inside rope_parameters");
        assert_eq!((c.rope_theta, c.attention_window()), (10000.0, Some(4)));
        let factors = r#""short_factor":[1.0,1.0],"long_factor":[2.0,3.0]"#;
        let cases = [
            (
                r#""rope_parameters":{"partial_rotary_factor":0.75,"rope_theta":10000.0}"#.to_string(),
                "field `partial_rotary_factor`",
            ),
            (
                r#""partial_rotary_factor":1.0,"rope_parameters":{"partial_rotary_factor":0.5,"rope_theta":1e4}"#
                    .into(),
                "field `partial_rotary_factor`",
            ),
            (
                format!(r#""rope_scaling":{{"type":"longrope",{factors}}}"#),
                "`longrope`",
            ),
            (format!(r#""rope_scaling":{{"type":"su",{factors}}}"#), "`su`"),
            (
                format!(r#""rope_parameters":{{"rope_type":"longrope","rope_theta":1e4,{factors}}}"#),
                "`longrope`",
            ),
            (r#""attention_bias":true"#.into(), "field `attention_bias`"),
            (r#""mlp_bias":true"#.into(), "field `mlp_bias`"),
        ];
        for (extra, expected) in cases {
            let json = format!("{{{base},{extra}}}");
            let err = parse(&json).expect_err(&json).to_string();
            assert!(err.contains("config.json") && err.contains(expected), "{json}: {err}");
            if expected.starts_with('`') {
                assert!(err.contains("field `rope_scaling.rope_type`"), "{json}: {err}");
            }
        }
    }

    #[test]
    fn layer_types_decide_each_layers_window_and_unknown_ones_are_refused_by_name() {
        let base = r#""model_type":"qwen2","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2,"sliding_window":4"#;
        let mixed = parse(&format!(
            r#"{{{base},"layer_types":["full_attention","sliding_attention"]}}"#
        ))
        .expect("mixed");
        assert_eq!((mixed.layer_window(0), mixed.layer_window(1)), (None, Some(4)));
        let full = parse(&format!(
            r#"{{{base},"use_sliding_window":true,"layer_types":["full_attention","full_attention"]}}"#
        ))
        .expect("all full");
        assert_eq!(full.attention_window(), None);
        let by_leading_layers = parse(&format!(
            r#"{{{base},"use_sliding_window":true,"max_window_layers":1}}"#
        ))
        .expect("max_window_layers");
        assert_eq!(
            (by_leading_layers.layer_window(0), by_leading_layers.layer_window(1)),
            (None, Some(4))
        );
        for extra in [
            r#""layer_types":["full_attention"]"#,
            r#""layer_types":["chunked_attention","chunked_attention"]"#,
            r#""sliding_window":null,"layer_types":["sliding_attention","sliding_attention"]"#,
        ] {
            let json = format!("{{{base},{extra}}}");
            let err = parse(&json).expect_err(&json).to_string();
            assert!(err.contains("field `layer_types`"), "{json}: {err}");
        }
    }

    const GEMMA3: &str = r#""model_type":"gemma3_text","vocab_size":10,"hidden_size":16,"intermediate_size":16,"num_hidden_layers":7,"num_attention_heads":2,"head_dim":8,"sliding_window":4"#;

    /// Gemma 3 as transformers 5 writes it and as older hub configs have it (a pattern, a
    /// local base and a top-level theta) read the same.
    #[test]
    fn gemma3_configs_old_and_new_give_the_same_layers() {
        let new = parse(&format!(
            r#"{{{GEMMA3},"query_pre_attn_scalar":256,"hidden_activation":"gelu_pytorch_tanh",
            "layer_types":["sliding_attention","sliding_attention","sliding_attention","sliding_attention","sliding_attention","full_attention","sliding_attention"],
            "rope_parameters":{{"full_attention":{{"rope_type":"linear","factor":8.0,"rope_theta":1000000.0}},
            "sliding_attention":{{"rope_type":"default","rope_theta":10000.0}}}}}}"#
        ))
        .expect("transformers 5 config");
        let old = parse(&format!(
            r#"{{{GEMMA3},"sliding_window_pattern":6,"rope_theta":1000000.0,"rope_local_base_freq":10000.0,
            "rope_scaling":{{"rope_type":"linear","factor":8.0}}}}"#
        ))
        .expect("older config");
        for c in [&new, &old] {
            let windows: Vec<Option<usize>> = (0..7).map(|l| c.layer_window(l)).collect();
            assert_eq!(windows, [Some(4), Some(4), Some(4), Some(4), Some(4), None, Some(4)]);
            assert!(c.local_rope(0) && !c.local_rope(5));
            assert_eq!((c.rope_theta, c.rope_local_base_freq), (1e6, Some(1e4)));
            assert_eq!(c.rope_scaling.as_ref().map(|s| s.factor), Some(8.0));
            assert_eq!(c.attention_scale(), 1.0 / 16.0);
            assert_eq!(c.activation(Path::new("c")).unwrap(), Activation::GeluTanh);
            assert!(c.qk_norm() && c.gemma_norms() && !c.llama_layers());
            assert_eq!(c.embedding_scale(), Some(4.0));
        }
    }

    /// Gemma 2 configs that leave the caps out are capped as transformers caps them; null
    /// switches a cap off.
    #[test]
    fn gemma2_takes_transformers_defaults_for_what_its_config_leaves_out() {
        let base = r#""model_type":"gemma2","vocab_size":10,"hidden_size":16,"intermediate_size":16,"num_hidden_layers":4,"num_attention_heads":2,"head_dim":8,"sliding_window":4"#;
        let c = parse(&format!("{{{base}}}")).expect("gemma2");
        assert_eq!(
            (c.attn_logit_softcapping, c.final_logit_softcapping),
            (Some(50.0), Some(30.0))
        );
        let windows: Vec<Option<usize>> = (0..4).map(|l| c.layer_window(l)).collect();
        assert_eq!(windows, [Some(4), None, Some(4), None]);
        assert_eq!((c.rope_theta, c.attention_scale()), (10_000.0, 1.0 / 16.0));
        assert!(c.gemma_norms() && !c.qk_norm() && !c.local_rope(0));
        let uncapped = parse(&format!(
            r#"{{{base},"attn_logit_softcapping":null,"final_logit_softcapping":null}}"#
        ))
        .expect("gemma2 without caps");
        assert_eq!(
            (uncapped.attn_logit_softcapping, uncapped.final_logit_softcapping),
            (None, None)
        );
        let err = parse(&format!(r#"{{{base},"final_logit_softcapping":0.0}}"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("field `final_logit_softcapping`"), "{err}");
    }

    #[test]
    fn what_gemma_runs_elsewhere_or_cannot_be_run_is_refused_by_name() {
        let llama = r#""model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2"#;
        let cases = [
            (
                format!(r#"{{{GEMMA3},"use_bidirectional_attention":true}}"#),
                "field `use_bidirectional_attention`",
            ),
            (
                format!(r#"{{{llama},"final_logit_softcapping":30.0}}"#),
                "field `final_logit_softcapping`",
            ),
            (
                format!(r#"{{{GEMMA3},"hidden_activation":"gelu"}}"#),
                "field `hidden_activation`",
            ),
            (
                format!(
                    r#"{{{GEMMA3},"rope_parameters":{{"full_attention":{{"rope_theta":1e6}},"sliding_attention":{{"rope_theta":1e4,"rope_type":"linear","factor":2.0}}}}}}"#
                ),
                "field `rope_parameters.sliding_attention.rope_type`",
            ),
            (
                format!(r#"{{{GEMMA3},"rope_parameters":{{"chunked_attention":{{"rope_theta":1e6}}}}}}"#),
                "field `rope_parameters`",
            ),
            (
                format!(r#"{{{llama},"query_pre_attn_scalar":256}}"#),
                "field `query_pre_attn_scalar`",
            ),
            (
                format!(r#"{{{llama},"rope_local_base_freq":10000.0}}"#),
                "field `rope_local_base_freq`",
            ),
        ];
        for (json, expected) in cases {
            let err = parse(&json).expect_err(&json).to_string();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn mistral_window_is_on_without_a_switch() {
        let c = parse(
            r#"{"model_type":"mistral","vocab_size":32000,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"sliding_window":4096}"#,
        )
        .expect("valid config");
        assert_eq!(c.attention_window(), Some(4096));
    }

    #[test]
    fn rejects_what_it_cannot_compute() {
        let base =
            r#""vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2"#;
        let cases = [
            (format!(r#"{{"model_type":"gpt2",{base}}}"#), "field `model_type`"),
            (
                format!(r#"{{"model_type":"llama",{base},"num_key_value_heads":3}}"#),
                "field `num_key_value_heads`",
            ),
            (
                format!(r#"{{"model_type":"llama",{base},"rope_scaling":{{"rope_type":"yarn","factor":4.0}}}}"#),
                "field `rope_scaling.rope_type`",
            ),
            (
                format!(r#"{{"model_type":"llama",{base},"hidden_act":"gelu"}}"#),
                "field `hidden_act`",
            ),
        ];
        for (json, expected) in cases {
            let err = parse(&json).expect_err(&json).to_string();
            assert!(err.contains("config.json") && err.contains(expected), "{json}: {err}");
        }
    }
}
