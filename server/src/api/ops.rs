//! Liveness, readiness and metrics.

use super::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Alive while the engine thread runs (the HTTP side answering proves little: the engine
/// thread does not block the runtime). A dead engine fails it, so the kubelet restarts the pod.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.engine.is_alive() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "engine stopped").into_response()
    }
}

/// 200 once the model and the listed adapters are loaded and warmed and while the engine runs;
/// 503 before that, while shutting down, and once the engine has died, so the Service stops
/// routing here.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if !state.engine.is_alive() {
        (StatusCode::SERVICE_UNAVAILABLE, "engine stopped").into_response()
    } else if state.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
