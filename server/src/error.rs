//! Errors of the server. Each variant maps to exactly one HTTP status, one OpenAI error `type`
//! and one metric label, so a client, a dashboard and a log line all say the same thing.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or a value is out of range; `param` names the field.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    /// `model` names nothing this server serves (404, as OpenAI answers an unknown model).
    #[error("{message}")]
    UnknownModel { message: String },
    /// No route has this path.
    #[error("no route {method} {path}")]
    RouteNotFound { method: String, path: String },
    /// The path exists, but not for this method.
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// The body is larger than the server reads.
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("missing or invalid API key; send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// The admin API was asked for, and no admin key is configured: it is off, never open.
    #[error("admin API disabled: start the server with --admin-api-key-file to enable it")]
    AdminDisabled,
    /// The bounded queue is full; the client should retry after `retry_after_s`.
    #[error("the server is at capacity ({capacity} requests running or queued); retry later")]
    Overloaded { capacity: usize, retry_after_s: u64 },
    /// An adapter could not be loaded: bad files, wrong base model, wrong shapes.
    #[error("{message}")]
    AdapterRejected { message: String, param: Option<String> },
    /// A cap on adapters (count, memory) is reached.
    #[error("{0}")]
    AdapterLimit(String),
    #[error("adapter `{0}` is not loaded")]
    AdapterNotFound(String),
    /// Storage (registry, object store) failed while loading an adapter.
    #[error("{0}")]
    Storage(String),
    /// Merged mode serves one adapter fixed at start.
    #[error("{0}")]
    Conflict(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The request ran past the server's per-request deadline (`--request-timeout-s`); what
    /// was generated is dropped and the sequences are cancelled.
    #[error("the request ran past the server's deadline of {seconds} s and was cancelled")]
    DeadlineExceeded { seconds: u64 },
    /// The engine thread has stopped (it panicked); nothing can be generated until the pod
    /// restarts, which the failing /health makes the kubelet do.
    #[error("the generation engine has stopped; the server must be restarted")]
    EngineDown,
    /// The engine failed while generating; the message is for operators, not for fixing input.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
            code: "invalid_value",
        }
    }

    pub fn invalid_code(param: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
            code,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::AdapterRejected { .. } => StatusCode::BAD_REQUEST,
            ApiError::UnknownModel { .. } | ApiError::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::AdminDisabled => StatusCode::FORBIDDEN,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::AdapterLimit(_) | ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::AdapterNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Storage(_) => StatusCode::BAD_GATEWAY,
            ApiError::ShuttingDown | ApiError::EngineDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's error `type`.
    fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. }
            | ApiError::UnknownModel { .. }
            | ApiError::RouteNotFound { .. }
            | ApiError::MethodNotAllowed { .. }
            | ApiError::BodyTooLarge { .. }
            | ApiError::AdapterRejected { .. }
            | ApiError::AdapterLimit(_)
            | ApiError::AdapterNotFound(_)
            | ApiError::Conflict(_) => "invalid_request_error",
            ApiError::Unauthorized => "authentication_error",
            ApiError::AdminDisabled => "permission_error",
            ApiError::Overloaded { .. } => "rate_limit_error",
            ApiError::Storage(_)
            | ApiError::ShuttingDown
            | ApiError::EngineDown
            | ApiError::DeadlineExceeded { .. }
            | ApiError::Internal(_) => "server_error",
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { code, .. } => code,
            ApiError::UnknownModel { .. } => "model_not_found",
            ApiError::RouteNotFound { .. } => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::BodyTooLarge { .. } => "request_too_large",
            ApiError::Unauthorized => "invalid_api_key",
            ApiError::AdminDisabled => "admin_api_disabled",
            ApiError::Overloaded { .. } => "queue_full",
            ApiError::AdapterRejected { .. } => "adapter_rejected",
            ApiError::AdapterLimit(_) => "adapter_limit",
            ApiError::AdapterNotFound(_) => "adapter_not_found",
            ApiError::Storage(_) => "storage_error",
            ApiError::Conflict(_) => "conflict",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::DeadlineExceeded { .. } => "request_timeout",
            ApiError::EngineDown => "engine_stopped",
            ApiError::Internal(_) => "internal_error",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidRequest { param, .. } | ApiError::AdapterRejected { param, .. } => param.as_deref(),
            ApiError::UnknownModel { .. } => Some("model"),
            _ => None,
        }
    }

    /// The OpenAI error body, also sent as the last SSE event when a stream fails.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.to_string(), "type": self.kind(), "param": self.param(), "code": self.code()}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if let ApiError::Overloaded { retry_after_s, .. } = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
        }
        if let ApiError::Unauthorized = &self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Errors of start-up: the model, tokenizer or listed adapters could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("model: {0}")]
    Model(#[from] kubetune_model::ModelError),
    #[error("storage: {0}")]
    Storage(#[from] kubetune_storage::StorageError),
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: std::path::PathBuf, reason: String },
    #[error("adapter `{name}`: {error}")]
    Adapter { name: String, error: ApiError },
    #[error("{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
    #[error("{path}: {reason}")]
    File { path: std::path::PathBuf, reason: String },
    #[error("warm-up: {0}")]
    Warmup(String),
}
