//! Parsing JSONL lines into records, with an error per line that says what is wrong.

use crate::config::DataFormat;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Instruction {
        instruction: String,
        context: Option<String>,
        response: String,
    },
    Chat {
        messages: Vec<Message>,
    },
    Text {
        text: String,
    },
    /// One prompt and two answers to it, the chosen one preferred; each answer is one or more
    /// assistant messages that follow the prompt.
    Preference {
        prompt: Vec<Message>,
        chosen: Vec<Message>,
        rejected: Vec<Message>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// Parses one non-blank line; the error is the message without file and line.
pub fn parse_line(line: &str, format: DataFormat) -> Result<Record, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, got {}", kind(&value)))?;
    match format {
        DataFormat::Instruction => Ok(Record::Instruction {
            instruction: required_text(obj, "instruction")?,
            context: optional_text(obj, "context")?,
            response: required_text(obj, "response")?,
        }),
        DataFormat::Text => Ok(Record::Text {
            text: required_text(obj, "text")?,
        }),
        DataFormat::Chat => {
            let list = obj.get("messages").ok_or("missing field `messages`")?;
            let messages = parse_messages(list, "messages")?;
            if !messages.iter().any(|m| m.role == Role::Assistant) {
                return Err("no assistant message: nothing to learn from".into());
            }
            Ok(Record::Chat { messages })
        }
        DataFormat::Preference => Ok(Record::Preference {
            prompt: prompt(obj)?,
            chosen: answer(obj, "chosen")?,
            rejected: answer(obj, "rejected")?,
        }),
    }
}

/// A list of chat messages under `field`, each with a known role and string content.
fn parse_messages(list: &Value, field: &str) -> Result<Vec<Message>, String> {
    let list = list
        .as_array()
        .ok_or_else(|| format!("field `{field}` must be a list, got {}", kind(list)))?;
    if list.is_empty() {
        return Err(format!("field `{field}` is empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| parse_message(m, &format!("{field}[{i}]")))
        .collect()
}

fn parse_message(m: &Value, at: &str) -> Result<Message, String> {
    let m = m
        .as_object()
        .ok_or_else(|| format!("`{at}` must be an object, got {}", kind(m)))?;
    let role = match m.get("role").and_then(Value::as_str) {
        Some("system") => Role::System,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some(other) => return Err(format!("`{at}.role` is `{other}`, expected system, user or assistant")),
        None => return Err(format!("`{at}.role` is missing or not a string")),
    };
    let content = m
        .get("content")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("`{at}.content` is missing or not a string"))?;
    Ok(Message {
        role,
        content: content.to_string(),
    })
}

/// A preference line's prompt: a string (one user message) or chat messages that end before
/// the answer, i.e. not with an assistant message.
fn prompt(obj: &serde_json::Map<String, Value>) -> Result<Vec<Message>, String> {
    match obj.get("prompt") {
        Some(Value::String(_)) => Ok(vec![Message {
            role: Role::User,
            content: required_text(obj, "prompt")?,
        }]),
        Some(list @ Value::Array(_)) => {
            let messages = parse_messages(list, "prompt")?;
            if messages.last().is_some_and(|m| m.role == Role::Assistant) {
                return Err("field `prompt` ends with an assistant message; the answers follow the prompt".into());
            }
            Ok(messages)
        }
        None => Err("missing field `prompt`".into()),
        Some(v) => Err(format!(
            "field `prompt` must be a string or a list of messages, got {}",
            kind(v)
        )),
    }
}

/// A preference line's answer under `field`: a string or assistant messages.
fn answer(obj: &serde_json::Map<String, Value>, field: &str) -> Result<Vec<Message>, String> {
    match obj.get(field) {
        Some(Value::String(_)) => Ok(vec![Message {
            role: Role::Assistant,
            content: required_text(obj, field)?,
        }]),
        Some(list @ Value::Array(_)) => {
            let messages = parse_messages(list, field)?;
            if let Some(i) = messages.iter().position(|m| m.role != Role::Assistant) {
                return Err(format!(
                    "`{field}[{i}].role` is `{}`; an answer holds assistant messages only",
                    messages[i].role.as_str()
                ));
            }
            Ok(messages)
        }
        None => Err(format!("missing field `{field}`")),
        Some(v) => Err(format!(
            "field `{field}` must be a string or a list of assistant messages, got {}",
            kind(v)
        )),
    }
}

fn required_text(obj: &serde_json::Map<String, Value>, field: &str) -> Result<String, String> {
    match obj.get(field) {
        None => Err(format!("missing field `{field}`")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("field `{field}` is empty")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!("field `{field}` must be a string, got {}", kind(v))),
    }
}

fn optional_text(obj: &serde_json::Map<String, Value>, field: &str) -> Result<Option<String>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(format!("field `{field}` must be a string, got {}", kind(v))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
