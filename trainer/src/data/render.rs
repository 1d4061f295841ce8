//! Turning records into text segments, each marked as trained on or not.
//!
//! Formats (documented defaults; the tiny model's tokenizer has the role markers as special
//! tokens, other models see them as plain text):
//! - instruction: `### Instruction:\n{instruction}\n\n[### Context:\n{context}\n\n]### Response:\n`
//!   then `{response}` + EOS, trained on the response and EOS only;
//! - chat, when tokenizer_config.json has no chat template: per message
//!   `<|{role}|>\n{content}<|end|>\n`, with `<|assistant|>\n` opening each assistant turn; trained
//!   on assistant contents and their `<|end|>\n`, then EOS after the last message;
//! - chat, when it has one: the model's own template (see [`super::template`]), trained on the
//!   same parts: each assistant turn's content and what the template closes it with, then EOS
//!   after the last message unless the template already ends with it;
//! - text: `{text}` + EOS, all trained on;
//! - preference: each answer appended to the prompt's messages and rendered as chat (by the
//!   template or the default format), trained on the answer's turns only: earlier assistant
//!   turns of the prompt are context, as the prompt is in DPO.

use super::records::{Message, Record, Role};

#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub text: String,
    pub trained: bool,
}

fn seg(text: impl Into<String>, trained: bool) -> Segment {
    Segment {
        text: text.into(),
        trained,
    }
}

/// The prompt part of an instruction record, also used to prompt the model at inference.
pub fn instruction_prompt(instruction: &str, context: Option<&str>) -> String {
    match context {
        Some(c) => format!("### Instruction:\n{instruction}\n\n### Context:\n{c}\n\n### Response:\n"),
        None => format!("### Instruction:\n{instruction}\n\n### Response:\n"),
    }
}

/// Segments of one record; EOS is appended by the tokenizer step (trained unless the record
/// ends with untrained text).
pub fn render(record: &Record) -> Vec<Segment> {
    match record {
        Record::Instruction {
            instruction,
            context,
            response,
        } => {
            vec![
                seg(instruction_prompt(instruction, context.as_deref()), false),
                seg(response.clone(), true),
            ]
        }
        Record::Text { text } => vec![seg(text.clone(), true)],
        Record::Chat { messages } => render_conversation(messages, 0),
        // One record is two sequences; this is the chosen one (prepare renders both).
        Record::Preference { prompt, chosen, .. } => render_conversation(&[&prompt[..], chosen].concat(), prompt.len()),
    }
}

/// A conversation in the default chat format, trained on assistant messages from index
/// `first_trained` on.
pub fn render_conversation(messages: &[Message], first_trained: usize) -> Vec<Segment> {
    let mut out = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        out.push(seg(format!("<|{}|>\n", m.role.as_str()), false));
        let trained = m.role == Role::Assistant && i >= first_trained;
        out.push(seg(m.content.clone(), trained));
        out.push(seg("<|end|>\n", trained));
    }
    out
}
