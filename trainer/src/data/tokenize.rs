//! From segments to token ids with a per-token "trained" flag, using the model's tokenizer.

use super::render::Segment;
use crate::error::{Result, TrainError};
use kubetune_model::chat::{special_token_text, ChatTemplate};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// One tokenized example: `trained[i]` says whether predicting `ids[i]` counts in the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

impl Example {
    /// Tokens that contribute to the loss (position 0 is never predicted).
    pub fn trained_tokens(&self) -> usize {
        self.trained.iter().skip(1).filter(|t| **t).count()
    }
}

/// The model's tokenizer plus the special-token rules from tokenizer_config.json.
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
    /// Prepended when the tokenizer's own post-processor does not add it.
    bos: Option<u32>,
    pub eos: u32,
    /// tokenizer_config.json's chat template, compiled at load so a syntax error stops the run
    /// before any data is read.
    pub chat_template: Option<ChatTemplate>,
}

/// What the tokenizer step adds around an example's segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// Run the first segment through the tokenizer's post-processor and add BOS as
    /// tokenizer_config.json asks. Off for chat templates, which write BOS themselves.
    pub special_tokens: bool,
    /// Append EOS, trained on or not; None when the text already ends with it.
    pub eos: Option<bool>,
}

impl TextTokenizer {
    /// Loads tokenizer.json and (optionally) tokenizer_config.json from a model directory;
    /// `fallback_eos` is config.json's eos_token_id.
    pub fn load(model_dir: &Path, fallback_eos: Option<u32>) -> Result<Self> {
        let path = model_dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| TrainError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let config_path = model_dir.join("tokenizer_config.json");
        let config: Value = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(TrainError::io(&config_path))?;
            serde_json::from_str(&text).map_err(|e| TrainError::Tokenizer {
                path: config_path.clone(),
                message: e.to_string(),
            })?
        } else {
            Value::Null
        };
        let token_id = |field: &str| -> Result<Option<u32>> {
            let Some(name) = special_token_text(&config, field) else {
                return Ok(None);
            };
            tokenizer
                .token_to_id(name)
                .map(Some)
                .ok_or_else(|| TrainError::Tokenizer {
                    path: config_path.clone(),
                    message: format!("`{field}` is `{name}`, which tokenizer.json does not know"),
                })
        };
        let eos = token_id("eos_token")?
            .or(fallback_eos)
            .ok_or_else(|| TrainError::Tokenizer {
                path: config_path.clone(),
                message: "no eos_token here and no eos_token_id in config.json".into(),
            })?;
        let add_bos = config.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        let bos = if add_bos { token_id("bos_token")? } else { None };
        let chat_template = ChatTemplate::for_model(&config, &config_path)?;
        Ok(Self {
            tokenizer,
            path,
            bos,
            eos,
            chat_template,
        })
    }

    /// An error unless every id this tokenizer can produce has a row in the model's embedding
    /// table of `vocab_size` rows. A larger id would fail the CPU's lookup mid-run, and on a
    /// GPU would read past the table; checked once here, before any data is read.
    pub fn check_fits(&self, vocab_size: usize) -> Result<()> {
        let Some(largest) = self.tokenizer.get_vocab(true).into_values().max() else {
            return Ok(());
        };
        if largest as usize >= vocab_size {
            return Err(TrainError::Tokenizer {
                path: self.path.clone(),
                message: format!(
                    "it has token ids up to {largest}, but the model's config.json has vocab_size {vocab_size}: \
                     the tokenizer does not belong to this model, or its embeddings were not resized"
                ),
            });
        }
        Ok(())
    }

    /// Encodes text without special tokens.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special)
            .map_err(|e| TrainError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| TrainError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }

    /// The prompt as the model sees it at the start of an example (BOS rules included).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text, true)?;
        if let Some(bos) = self.bos {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// EOS as text, to tell whether a chat template already ends a conversation with it.
    pub fn eos_text(&self) -> Option<String> {
        self.tokenizer.id_to_token(self.eos)
    }

    /// Tokenizes segments of the built-in formats into one example ending in EOS, trained on
    /// when the last segment is. The first segment goes through the tokenizer's post-processor
    /// (which adds BOS for Llama-style tokenizers).
    pub fn tokenize(&self, segments: &[Segment]) -> Result<Example> {
        let last_trained = segments.last().is_some_and(|s| s.trained);
        self.tokenize_framed(
            segments,
            Framing {
                special_tokens: true,
                eos: Some(last_trained),
            },
        )
    }

    /// Tokenizes segments into one example, framed as `framing` says.
    pub fn tokenize_framed(&self, segments: &[Segment], framing: Framing) -> Result<Example> {
        let mut ids = Vec::new();
        let mut trained = Vec::new();
        for (i, s) in segments.iter().enumerate() {
            let piece = if i == 0 && framing.special_tokens {
                self.encode_prompt(&s.text)?
            } else {
                self.encode(&s.text, false)?
            };
            trained.extend(std::iter::repeat_n(s.trained, piece.len()));
            ids.extend(piece);
        }
        if let Some(eos_trained) = framing.eos {
            ids.push(self.eos);
            trained.push(eos_trained);
        }
        Ok(Example { ids, trained })
    }
}
