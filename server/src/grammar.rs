//! Grammar-constrained decoding for `response_format` (json_object, json_schema) and vLLM's
//! `guided_json`, `guided_regex` and `guided_choice`, with llguidance: before each token the
//! sequence's matcher says which tokens keep the output within the grammar, the others get no
//! probability, and the chosen token advances the matcher. A stop token is allowed only where
//! the grammar may end, and the sequence ends when the grammar does.
//!
//! The token trie is built once from the served tokenizer (each token's bytes, special tokens
//! marked so that no grammar ever produces them as text); each request compiles its grammar
//! once and every choice gets its own copy of the matcher.

use crate::text::TextCodec;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::sync::Arc;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (`response_format: {type: json_object}`).
    JsonObject,
    /// JSON valid against this schema (`json_schema`, `guided_json`).
    JsonSchema(Value),
    /// Text matching this regular expression (`guided_regex`).
    Regex(String),
    /// Exactly one of these strings (`guided_choice`).
    Choice(Vec<String>),
}

/// The served tokenizer as llguidance sees it; built once at start.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// `vocab_size` is the model's (its logits' width), which may exceed the tokenizer's;
    /// `eos` the token that ends a constrained answer.
    pub fn new(codec: &TextCodec, vocab_size: usize, eos: u32) -> Result<Self, String> {
        let special = codec.special_tokens();
        let marked = |name: &str| [&[TokTrie::SPECIAL_TOKEN_MARKER], name.as_bytes()].concat();
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| match special.get(&id) {
                Some(name) => marked(name),
                None if !codec.has_token(id) => marked(&format!("<unused_{id}>")),
                None => codec.token_bytes(id),
            })
            .collect();
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        Ok(Self { factory })
    }

    /// Compiles `spec`; an invalid schema or regex is an error that names what is wrong.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, String> {
        let grammar = match spec {
            GrammarSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            GrammarSpec::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema.clone())),
            GrammarSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GrammarSpec::Choice(options) => {
                let alternatives: Vec<String> = options.iter().map(|o| regex_literal(o)).collect();
                TopLevelGrammar::from_regex(&format!("({})", alternatives.join("|")))
            }
        };
        let parser = self.factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(e),
            None => Ok(Constraint { matcher }),
        }
    }
}

/// JSON as `json.dumps` writes it (`, ` and `: `, no other whitespace) unless the schema says
/// otherwise: llguidance's default allows any run of whitespace between tokens, which a small
/// model fills with newlines until max_tokens.
fn compact(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(
            || serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// `s` as a regular expression that matches exactly it.
fn regex_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One sequence's position in its grammar.
pub struct Constraint {
    matcher: Matcher,
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Gives every token the grammar does not allow next no probability. `stop_ids` are
    /// allowed exactly when the grammar may end here.
    pub fn mask(&mut self, logits: &mut [f32], stop_ids: &[u32]) -> Result<(), String> {
        let allowed = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        let accepting = self.matcher.is_accepting().map_err(|e| e.to_string())?;
        let mut any = false;
        for (id, logit) in logits.iter_mut().enumerate() {
            let id = id as u32;
            let ok = if stop_ids.contains(&id) {
                accepting
            } else {
                allowed.is_allowed(id)
            };
            if ok {
                any = true;
            } else {
                *logit = f32::NEG_INFINITY;
            }
        }
        if !any {
            return Err("the output grammar allows no token here (a stop token is needed to end it)".into());
        }
        Ok(())
    }

    /// Advances past `token`; true when the grammar has ended (nothing may follow).
    pub fn advance(&mut self, token: u32) -> Result<bool, String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())?;
        Ok(self.matcher.is_stopped())
    }
}
