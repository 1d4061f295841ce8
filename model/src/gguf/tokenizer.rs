//! `tokenizer.ggml.*` as a Hugging Face tokenizer.json and tokenizer_config.json.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`, the Llama 3, Qwen2 and
//! SmolLM families) are built. Their split rules are not in the file: `tokenizer.ggml.pre` names
//! them, and [`pre_tokenizer`] maps each name it knows to the rules of that family's original
//! tokenizer.json. An unknown name is an error, since guessing would cut text differently from
//! the model's training.

use super::Metadata;
use crate::error::Result;
use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Map};

/// GGUF token types (llama.cpp's `llama_token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Llama 3's split rule; Qwen2's differs only in taking digits one at a time.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` names whose rules are known.
const KNOWN_PRE: &[&str] = &["gpt-2", "smollm", "llama-bpe", "qwen2"];

/// The vocabulary and special tokens of a GGUF file.
pub(crate) struct Vocab {
    tokens: Vec<String>,
    types: Vec<i64>,
    merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// End of turn, when a file names one apart from the end of sequence (Llama 3's eot).
    eot_id: Option<u32>,
    unk_id: Option<u32>,
    pad_id: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl Vocab {
    pub fn read(meta: &Metadata) -> Result<Self> {
        let model = meta.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(meta.error(
                "tokenizer.ggml.model",
                format!("`{model}` is not supported; only byte-level BPE (`gpt2`) vocabularies are"),
            ));
        }
        let tokens: Vec<String> = meta
            .strings("tokenizer.ggml.tokens")?
            .into_iter()
            .map(String::from)
            .collect();
        let types = match meta.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(_) => token_types(meta)?,
        };
        if types.len() != tokens.len() {
            return Err(meta.error(
                "tokenizer.ggml.token_type",
                format!("has {} entries for {} tokens", types.len(), tokens.len()),
            ));
        }
        let merges = meta
            .strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(String::from)
            .collect();
        let id = |key: &str| -> Result<Option<u32>> {
            let Some(id) = meta.opt_u64(key)? else {
                return Ok(None);
            };
            if id as usize >= tokens.len() {
                return Err(meta.error(key, format!("{id} is not a token id (vocabulary of {})", tokens.len())));
            }
            Ok(Some(id as u32))
        };
        Ok(Self {
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            eot_id: id("tokenizer.ggml.eot_token_id")?,
            unk_id: id("tokenizer.ggml.unknown_token_id")?,
            pad_id: id("tokenizer.ggml.padding_token_id")?,
            add_bos: meta.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
            chat_template: meta.opt_string("tokenizer.chat_template")?.map(String::from),
            tokens,
            types,
            merges,
        })
    }

    fn text(&self, id: Option<u32>) -> Option<&str> {
        id.map(|id| self.tokens[id as usize].as_str())
    }

    /// The stop tokens: the end of sequence, and the end of turn where the file names one.
    fn eos_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos_id.into_iter().collect();
        ids.extend(self.eot_id.filter(|eot| !ids.contains(eot)));
        ids
    }

    pub fn generation_config(&self) -> serde_json::Value {
        let mut config = json!({});
        if let Some(bos) = self.bos_id {
            config["bos_token_id"] = json!(bos);
        }
        match self.eos_ids().as_slice() {
            [] => {}
            [one] => config["eos_token_id"] = json!(one),
            many => config["eos_token_id"] = json!(many),
        }
        if let Some(pad) = self.pad_id {
            config["pad_token_id"] = json!(pad);
        }
        config
    }

    pub fn tokenizer_config(&self, context_length: usize) -> serde_json::Value {
        let mut config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "model_max_length": context_length,
            "clean_up_tokenization_spaces": false,
        });
        for (field, id) in [
            ("bos_token", self.bos_id),
            ("eos_token", self.eos_id),
            ("unk_token", self.unk_id),
            ("pad_token", self.pad_id),
        ] {
            if let Some(text) = self.text(id) {
                config[field] = json!(text);
            }
        }
        if let Some(template) = &self.chat_template {
            config["chat_template"] = json!(template);
        }
        config
    }

    /// The tokenizer.json of this vocabulary, with the split rules `tokenizer.ggml.pre` names.
    pub fn tokenizer_json(&self, meta: &Metadata) -> Result<serde_json::Value> {
        let mut vocab = Map::new();
        for (id, token) in self.tokens.iter().enumerate() {
            if vocab.insert(token.clone(), json!(id)).is_some() {
                return Err(meta.error(
                    &format!("tokenizer.ggml.tokens[{id}]"),
                    format!("`{token}` appears twice in the vocabulary"),
                ));
            }
        }
        let merges = self
            .merges
            .iter()
            .enumerate()
            .map(|(i, merge)| {
                merge.split_once(' ').map(|(a, b)| json!([a, b])).ok_or_else(|| {
                    meta.error(
                        &format!("tokenizer.ggml.merges[{i}]"),
                        format!("`{merge}` is not a pair"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pre = meta.opt_string("tokenizer.ggml.pre")?.unwrap_or("gpt-2");
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": self.added_tokens(),
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer(pre).ok_or_else(|| meta.error(
                "tokenizer.ggml.pre",
                format!("`{pre}` is not supported (supported: {KNOWN_PRE:?})"),
            ))?,
            "post_processor": self.post_processor(),
            "decoder": byte_level(true, true),
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": pre == "llama-bpe",
                "vocab": vocab,
                "merges": merges,
            },
        }))
    }

    /// Control tokens are special (never produced by splitting text, skipped when decoding for
    /// display); user-defined ones are matched whole in text but decoded as text.
    fn added_tokens(&self) -> Vec<serde_json::Value> {
        self.types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(**t, CONTROL | USER_DEFINED))
            .map(|(id, t)| {
                json!({
                    "id": id,
                    "content": self.tokens[id],
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": *t == CONTROL,
                })
            })
            .collect()
    }

    fn post_processor(&self) -> serde_json::Value {
        let bos = self.text(self.bos_id).filter(|_| self.add_bos);
        let Some(bos) = bos else {
            return byte_level(true, false);
        };
        let special = json!({"SpecialToken": {"id": bos, "type_id": 0}});
        json!({
            "type": "TemplateProcessing",
            "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, special, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [self.bos_id], "tokens": [bos]}},
        })
    }
}

fn token_types(meta: &Metadata) -> Result<Vec<i64>> {
    let key = "tokenizer.ggml.token_type";
    meta.array(key)?
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::I32(t) => Ok(*t as i64),
            Value::U32(t) => Ok(*t as i64),
            v => Err(meta.error(&format!("{key}[{i}]"), format!("{v:?} is not a token type"))),
        })
        .collect()
}

fn byte_level(add_prefix_space: bool, trim_offsets: bool) -> serde_json::Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets, "use_regex": true})
}

/// The pre-tokenizer of the family `pre` names, as its original tokenizer.json has it.
fn pre_tokenizer(pre: &str) -> Option<serde_json::Value> {
    let byte_level_after_split =
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            byte_level_after_split,
        ]})
    };
    match pre {
        "gpt-2" => {
            Some(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}))
        }
        // SmolLM's tokenizer splits every digit off before the GPT-2 rules.
        "smollm" => Some(json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        ]})),
        "llama-bpe" => Some(split(LLAMA3_SPLIT)),
        "qwen2" => Some(split(QWEN2_SPLIT)),
        _ => None,
    }
}
