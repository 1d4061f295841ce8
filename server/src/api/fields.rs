//! Typed reads of a JSON request object, each error naming the field. Requests are parsed from
//! `serde_json::Value` by hand rather than derived structs because serde's messages say
//! "invalid type ... at line 1 column 57", which does not tell a client which field to fix.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde_json::{Map, Value};

/// The largest request body read (axum's default, stated here so the 413 can name it). A
/// prompt filling a long context is well below it.
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// The body, or the error answer for one that is too large or could not be read. Handlers
/// take the extractor's `Result` so these answers are OpenAI error objects, not axum's text.
pub fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge { limit: MAX_BODY_BYTES }
        } else {
            ApiError::InvalidRequest {
                message: format!("the request body could not be read: {e}"),
                param: None,
                code: "invalid_body",
            }
        }
    })
}

pub struct Fields<'a> {
    map: &'a Map<String, Value>,
}

/// Parses the body as a JSON object.
pub fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest {
        message: format!("request body is not valid JSON: {e}"),
        param: None,
        code: "invalid_json",
    })?;
    if !value.is_object() {
        return Err(ApiError::InvalidRequest {
            message: "request body must be a JSON object".into(),
            param: None,
            code: "invalid_json",
        });
    }
    Ok(value)
}

fn null_is_absent(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null())
}

impl<'a> Fields<'a> {
    pub fn new(value: &'a Value) -> Self {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        Self {
            map: value.as_object().unwrap_or_else(|| EMPTY.get_or_init(Map::new)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&'a Value> {
        null_is_absent(self.map.get(name))
    }

    pub fn string(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(ApiError::invalid(
                name,
                format!("`{name}` must be a string, got {}", kind(other)),
            )),
        }
    }

    pub fn required_string(&self, name: &str) -> Result<&'a str, ApiError> {
        self.string(name)?
            .ok_or_else(|| ApiError::invalid_code(name, "missing_field", format!("`{name}` is required")))
    }

    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(ApiError::invalid(
                name,
                format!("`{name}` must be a boolean, got {}", kind(other)),
            )),
        }
    }

    /// A number within `[min, max]`.
    pub fn number(&self, name: &str, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| ApiError::invalid(name, format!("`{name}` is not a finite number")))?;
                if x < min || x > max {
                    return Err(ApiError::invalid(
                        name,
                        format!("`{name}` is {x}; it must be between {min} and {max}"),
                    ));
                }
                Ok(Some(x))
            }
            Some(other) => Err(ApiError::invalid(
                name,
                format!("`{name}` must be a number, got {}", kind(other)),
            )),
        }
    }

    /// An integer within `[min, max]`.
    pub fn integer(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_i64().ok_or_else(|| {
                    ApiError::invalid(
                        name,
                        format!("`{name}` must be an integer between {min} and {max}, got {n}"),
                    )
                })?;
                if x < min || x > max {
                    return Err(ApiError::invalid(
                        name,
                        format!("`{name}` is {x}; it must be between {min} and {max}"),
                    ));
                }
                Ok(Some(x))
            }
            Some(other) => Err(ApiError::invalid(
                name,
                format!("`{name}` must be an integer, got {}", kind(other)),
            )),
        }
    }

    /// Rejects a field this server does not implement when it asks for something other than
    /// the default, instead of silently ignoring it.
    pub fn unsupported(&self, name: &str, is_default: impl Fn(&Value) -> bool) -> Result<(), ApiError> {
        match self.get(name) {
            Some(v) if !is_default(v) => Err(ApiError::invalid_code(
                name,
                "unsupported_parameter",
                format!("`{name}` is not supported by this server"),
            )),
            _ => Ok(()),
        }
    }
}

/// JSON type name for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
