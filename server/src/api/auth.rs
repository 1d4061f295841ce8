//! Bearer-key authentication. Two independent, optional key sets:
//! - API keys (`--api-keys-file`) guard inference (completions, chat);
//! - admin keys (`--admin-api-key-file`) guard the adapter admin API, which the operator calls
//!   from inside the cluster with its own credential, not a client's.
//!
//! `GET /v1/models` is open when no API key is configured and otherwise takes either kind of
//! key: clients list models with theirs, the operator checks served versions with its own.
//! Probes and /metrics are outside these layers so the kubelet and Prometheus need no key.

use super::AppState;
use crate::error::{ApiError, StartupError};
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

/// The configured key sets; None means that kind of route needs no key.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    pub api: Option<HashSet<String>>,
    pub admin: Option<HashSet<String>>,
}

impl Keys {
    fn is_api(&self, key: Option<&str>) -> bool {
        matches(self.api.as_ref(), key)
    }

    fn is_admin(&self, key: Option<&str>) -> bool {
        matches(self.admin.as_ref(), key)
    }
}

/// Open when no keys are configured; otherwise the presented key must be one of them.
fn matches(keys: Option<&HashSet<String>>, key: Option<&str>) -> bool {
    match keys {
        None => true,
        Some(keys) => key.is_some_and(|k| keys.contains(k)),
    }
}

fn presented(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

pub async fn inference(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if !state.keys.is_api(presented(&request)) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(request).await
}

pub async fn admin(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if !state.keys.is_admin(presented(&request)) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(request).await
}

/// GET /v1/models: an API key or an admin key. An admin key alone (no API keys configured)
/// leaves the listing open, as it was before admin keys existed.
pub async fn listing(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let key = presented(&request);
    let admin_key = state.keys.admin.is_some() && state.keys.is_admin(key);
    if !(state.keys.is_api(key) || admin_key) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(request).await
}

/// Reads a keys file: one key per line; blank lines and `#` comments ignored. `flag` names the
/// option in errors.
pub fn read_keys(path: &Path, flag: &'static str) -> Result<HashSet<String>, StartupError> {
    let text = std::fs::read_to_string(path).map_err(|e| StartupError::File {
        path: path.into(),
        reason: format!("{flag}: {e}"),
    })?;
    let keys: HashSet<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if keys.is_empty() {
        return Err(StartupError::File {
            path: path.into(),
            reason: format!("{flag}: holds no keys; every request it guards would be refused"),
        });
    }
    Ok(keys)
}
