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
            let list = list
                .as_array()
                .ok_or_else(|| format!("field `messages` must be a list, got {}", kind(list)))?;
            if list.is_empty() {
                return Err("field `messages` is empty".into());
            }
            let mut messages = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let m = m
                    .as_object()
                    .ok_or_else(|| format!("`messages[{i}]` must be an object, got {}", kind(m)))?;
                let role = match m.get("role").and_then(Value::as_str) {
                    Some("system") => Role::System,
                    Some("user") => Role::User,
                    Some("assistant") => Role::Assistant,
                    Some(other) => {
                        return Err(format!(
                            "`messages[{i}].role` is `{other}`, expected system, user or assistant"
                        ))
                    }
                    None => return Err(format!("`messages[{i}].role` is missing or not a string")),
                };
                let content = m
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("`messages[{i}].content` is missing or not a string"))?;
                messages.push(Message {
                    role,
                    content: content.to_string(),
                });
            }
            if !messages.iter().any(|m| m.role == Role::Assistant) {
                return Err("no assistant message: nothing to learn from".into());
            }
            Ok(Record::Chat { messages })
        }
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
