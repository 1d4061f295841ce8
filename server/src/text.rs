//! The tokenizer with tokenizer_config.json's rules: BOS, stop tokens and the chat format.
//!
//! Chat prompts use the model's own Jinja `chat_template` when it has one, rendered by
//! kubetune_model::chat as the trainer renders training data. Without one (the tiny test model
//! has none) they use the trainer's default chat format. Either way an adapter trained on chat
//! data sees at serving time exactly what it saw in training:
//! `<|{role}|>\n{content}<|end|>\n` per message, then `<|assistant|>\n`.

use crate::error::StartupError;
use kubetune_model::chat::{special_token_text, ChatTemplate};
pub use kubetune_model::chat::{ChatExtras, ChatMessage, ToolCall};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub struct TextCodec {
    tokenizer: Tokenizer,
    path: PathBuf,
    bos: Option<(u32, String)>,
    eos_text: String,
    /// Every id that ends a generation: EOS ids and, in the default chat format, `<|end|>`.
    pub stop_ids: Vec<u32>,
    template: Option<ChatTemplate>,
    /// The decoder is byte-level BPE (GPT-2's byte-to-character mapping), so a token's exact
    /// bytes can be read off its piece.
    byte_level: bool,
}

/// Why a chat could not become prompt tokens.
#[derive(Debug)]
pub enum ChatEncodeError {
    /// The model's chat template refused the conversation (a client error).
    Rejected(String),
    /// The tokenizer failed on the rendered text (a server error).
    Tokenizer(String),
}

impl TextCodec {
    /// Loads tokenizer.json and tokenizer_config.json (optional) from a model directory.
    /// `config_eos` are config.json's eos_token_id values.
    pub fn load(dir: &Path, config_eos: &[u32]) -> Result<Self, StartupError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| StartupError::Tokenizer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| StartupError::File {
                path: config_path.clone(),
                reason: e.to_string(),
            })?;
            serde_json::from_str(&text).map_err(|e| StartupError::File {
                path: config_path.clone(),
                reason: e.to_string(),
            })?
        } else {
            Value::Null
        };
        let token = |field: &str| -> Result<Option<(u32, String)>, StartupError> {
            let Some(name) = special_token_text(&config, field) else {
                return Ok(None);
            };
            let id = tokenizer.token_to_id(name).ok_or_else(|| StartupError::Tokenizer {
                path: config_path.clone(),
                reason: format!("`{field}` is `{name}`, which tokenizer.json does not know"),
            })?;
            Ok(Some((id, name.to_string())))
        };
        let eos = token("eos_token")?;
        let add_bos = config.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        // Looked up even when not added: a configured BOS must exist, also where only the
        // template writes it.
        let bos_token = token("bos_token")?;
        let bos = if add_bos { bos_token } else { None };
        let mut stop_ids: Vec<u32> = config_eos.to_vec();
        if let Some((id, _)) = &eos {
            stop_ids.push(*id);
        }
        let template = ChatTemplate::for_model(&config, &config_path)?;
        if template.is_none() {
            // The default format closes each turn with <|end|>; the model must stop there.
            if let Some(end) = tokenizer.token_to_id("<|end|>") {
                stop_ids.push(end);
            }
        }
        if stop_ids.is_empty() {
            return Err(StartupError::Tokenizer {
                path: config_path,
                reason: "no eos_token here and no eos_token_id in config.json: generation could never stop".into(),
            });
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let eos_text = eos.map(|(_, t)| t).unwrap_or_default();
        let byte_level = matches!(tokenizer.get_decoder(), Some(tokenizers::DecoderWrapper::ByteLevel(_)));
        Ok(Self {
            tokenizer,
            path,
            bos,
            eos_text,
            stop_ids,
            template,
            byte_level,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// A completion prompt as the model sees it: the tokenizer's post-processor, then BOS if
    /// tokenizer_config.json asks for it and the post-processor did not add it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = self.encode(text, true)?;
        if let Some((bos, _)) = &self.bos {
            if ids.first() != Some(bos) {
                ids.insert(0, *bos);
            }
        }
        Ok(ids)
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, String> {
        let enc = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Renders and tokenizes a chat. A Jinja template writes BOS itself, so its output is
    /// tokenized without adding special tokens (else BOS would appear twice).
    pub fn encode_chat(&self, messages: &[ChatMessage], extras: ChatExtras) -> Result<Vec<u32>, ChatEncodeError> {
        match &self.template {
            Some(template) => {
                // A template fails on a conversation it does not accept (its raise_exception
                // on roles that do not alternate, say): that is the request's fault.
                let text = template
                    .render_with(messages, true, extras)
                    .map_err(|e| ChatEncodeError::Rejected(e.to_string()))?;
                self.encode(&text, false).map_err(ChatEncodeError::Tokenizer)
            }
            None => {
                let mut text = String::new();
                for m in messages {
                    text.push_str(&format!("<|{}|>\n{}<|end|>\n", m.role, m.content));
                }
                text.push_str("<|assistant|>\n");
                self.encode_prompt(&text).map_err(ChatEncodeError::Tokenizer)
            }
        }
    }

    /// The chat template's text, when the model has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.template.as_ref().map(|t| t.source())
    }

    /// Whether the chat template shows `tools` to the model.
    pub fn chat_template_renders_tools(&self) -> bool {
        self.template.as_ref().is_some_and(|t| t.uses_tools())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }

    /// Text of one token as OpenAI's logprobs list it.
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id]).unwrap_or_default()
    }

    /// The bytes of one token, as OpenAI's chat logprobs list them: exact for byte-level BPE
    /// and `<0xHH>` byte-fallback pieces, where a token can be part of a UTF-8 character that
    /// its text (U+FFFD) cannot show; otherwise the bytes of its text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if let Some(piece) = self.tokenizer.id_to_token(id) {
            if let Some(b) = byte_fallback(&piece) {
                return vec![b];
            }
            if self.byte_level {
                if let Some(bytes) = piece.chars().map(byte_level_byte).collect::<Option<Vec<u8>>>() {
                    return bytes;
                }
            }
        }
        self.token_text(id).into_bytes()
    }

    /// The special tokens (those the tokenizer adds as `special`) by id, with their content:
    /// text no grammar may produce.
    pub fn special_tokens(&self) -> std::collections::HashMap<u32, String> {
        (self.tokenizer.get_added_tokens_decoder().into_iter())
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect()
    }

    /// Whether the tokenizer has `id` at all (a model may pad its embeddings past it).
    pub fn has_token(&self, id: u32) -> bool {
        self.tokenizer.id_to_token(id).is_some()
    }

    pub fn eos_text(&self) -> &str {
        &self.eos_text
    }
}

/// SentencePiece's byte-fallback piece `<0xHH>`.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// The byte a byte-level BPE character stands for (GPT-2's `bytes_to_unicode`, inverted):
/// printable Latin-1 bytes stand for themselves, the others for 256, 257, ... in byte order.
fn byte_level_byte(c: char) -> Option<u8> {
    let itself = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let c = c as u32;
    if itself(c) {
        return Some(c as u8);
    }
    let n = c.checked_sub(256)? as usize;
    (0u32..=255).filter(|&b| !itself(b)).nth(n).map(|b| b as u8)
}

/// Turns a growing list of token ids into text deltas. Decoding one token at a time garbles
/// multi-byte characters and word-piece spacing, so each step decodes a short window and emits
/// only the new suffix, holding it back while it ends in an incomplete character.
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    pub fn push(&mut self, codec: &TextCodec, id: u32) -> Result<String, String> {
        self.ids.push(id);
        let prefix = codec.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = codec.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubetune_model::tiny::{write_tiny_model, TinySpec};

    fn tiny(chat_template: Option<&str>) -> (tempfile::TempDir, TextCodec) {
        let dir = tempfile::tempdir().expect("temp dir");
        write_tiny_model(dir.path(), &TinySpec::default()).expect("tiny model");
        if let Some(t) = chat_template {
            let path = dir.path().join("tokenizer_config.json");
            let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
            config["chat_template"] = Value::String(t.into());
            std::fs::write(&path, config.to_string()).expect("write");
        }
        let codec = TextCodec::load(dir.path(), &[kubetune_model::tiny::EOS_ID]).expect("codec");
        (dir, codec)
    }

    fn msgs() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "  Be brief.  "),
            ChatMessage::new("user", "Hi"),
        ]
    }

    #[test]
    fn without_a_template_chats_use_the_trainers_format_and_stop_at_end() {
        let (_d, codec) = tiny(None);
        let ids = codec.encode_chat(&msgs(), ChatExtras::default()).expect("encode");
        let expected = codec
            .encode_prompt("<|system|>\n  Be brief.  <|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n")
            .expect("encode");
        assert_eq!(ids, expected);
        assert_eq!(ids[0], kubetune_model::tiny::BOS_ID, "add_bos_token is set");
        let end = codec.tokenizer.token_to_id("<|end|>").expect("special token");
        assert!(codec.stop_ids.contains(&end) && codec.stop_ids.contains(&kubetune_model::tiny::EOS_ID));
    }

    #[test]
    fn a_jinja_template_renders_with_python_string_methods() {
        let template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}]{{ m['content'].strip() }}\n{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}";
        let (_d, codec) = tiny(Some(template));
        let ids = codec.encode_chat(&msgs(), ChatExtras::default()).expect("encode");
        let text = codec.tokenizer.decode(&ids, false).expect("decode");
        assert_eq!(text, "<s>[SYSTEM]Be brief.\n[USER]Hi\n[ASSISTANT]");
        assert_eq!(
            ids.iter().filter(|&&i| i == kubetune_model::tiny::BOS_ID).count(),
            1,
            "BOS once"
        );
    }

    #[test]
    fn a_template_that_raises_is_an_error_not_a_panic() {
        let (_d, codec) = tiny(Some("{{ raise_exception('system messages are not supported') }}"));
        let err = codec.encode_chat(&msgs(), ChatExtras::default()).expect_err("raises");
        assert!(
            matches!(&err, ChatEncodeError::Rejected(m) if m.contains("system messages are not supported")),
            "{err:?}"
        );
    }

    #[test]
    fn token_bytes_spell_the_text_even_where_one_token_is_part_of_a_character() {
        let (_d, codec) = tiny(None);
        let text = "naïve café 漢字 and more words";
        let ids = codec.encode(text, false).expect("encode");
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| codec.token_bytes(id)).collect();
        assert_eq!(String::from_utf8(bytes).expect("utf-8"), text);
        assert!(
            ids.iter().any(|&id| codec.token_text(id).contains('\u{FFFD}')),
            "some token must split a character, or this test proves nothing"
        );
        assert_eq!(byte_fallback("<0x0A>"), Some(b'\n'));
        assert_eq!(byte_fallback("<0x0>"), None);
    }

    #[test]
    fn incremental_decoding_equals_decoding_everything_at_once() {
        let (_d, codec) = tiny(None);
        let ids = codec.encode("naïve café 漢字 and more words", false).expect("encode");
        let mut dec = IncrementalDecoder::new();
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&dec.push(&codec, id).expect("push"));
        }
        assert_eq!(out, codec.decode(&ids).expect("decode"));
    }
}
