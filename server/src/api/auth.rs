//! Bearer-key authentication. Two independent, optional key sets:
//! - API keys (`--api-keys-file`) guard inference (completions, chat);
//! - admin keys (`--admin-api-key-file`) guard the adapter admin API, which the operator calls
//!   from inside the cluster with its own credential, not a client's. Without admin keys the
//!   admin API is off (403): anyone who can reach the port could otherwise load any source.
//!
//! Keys are compared in constant time against every configured key, so response timing says
//! nothing about how much of a guess was right, and they are never printed (see `Debug`).
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

/// The configured key sets. No API keys: inference is open. No admin keys: the admin API is off.
#[derive(Clone, Default)]
pub struct Keys {
    pub api: Option<HashSet<String>>,
    pub admin: Option<HashSet<String>>,
}

/// Counts only, so that a logged state or error never carries a key.
impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = |k: &Option<HashSet<String>>| k.as_ref().map(HashSet::len);
        f.debug_struct("Keys")
            .field("api", &count(&self.api))
            .field("admin", &count(&self.admin))
            .finish()
    }
}

impl Keys {
    fn is_api(&self, key: Option<&str>) -> bool {
        match &self.api {
            None => true,
            Some(keys) => key.is_some_and(|k| one_of(keys, k)),
        }
    }

    fn is_admin(&self, key: Option<&str>) -> bool {
        self.admin.as_ref().zip(key).is_some_and(|(keys, k)| one_of(keys, k))
    }
}

/// Whether `presented` is one of `keys`, looking at every key whatever matched earlier.
fn one_of(keys: &HashSet<String>, presented: &str) -> bool {
    keys.iter().fold(false, |found, k| {
        found | constant_time_eq(k.as_bytes(), presented.as_bytes())
    })
}

/// Byte equality whose time depends only on the lengths, not on where the first difference is.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(i).copied().unwrap_or(0), b.get(i).copied().unwrap_or(0));
        diff |= usize::from(x ^ y);
    }
    // Keeps the optimiser from turning the loop back into an early exit.
    std::hint::black_box(diff) == 0
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
    if state.keys.admin.is_none() {
        return ApiError::AdminDisabled.into_response();
    }
    if !state.keys.is_admin(presented(&request)) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(request).await
}

/// GET /v1/models: an API key or an admin key. An admin key alone (no API keys configured)
/// leaves the listing open, as it was before admin keys existed.
pub async fn listing(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let key = presented(&request);
    if !(state.keys.is_api(key) || state.keys.is_admin(key)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_equality_is_equality_whatever_the_lengths() {
        assert!(constant_time_eq(b"operator-key", b"operator-key"));
        assert!(!constant_time_eq(b"operator-key", b"operator-kez"));
        assert!(!constant_time_eq(b"operator-key", b"operator-key2"));
        assert!(!constant_time_eq(b"operator-key", b"operator"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn a_key_is_admin_only_when_admin_keys_are_configured_and_it_is_one_of_them() {
        let keys = Keys {
            api: None,
            admin: Some(HashSet::from(["first".to_string(), "second".to_string()])),
        };
        assert!(keys.is_admin(Some("first")) && keys.is_admin(Some("second")));
        assert!(!keys.is_admin(Some("third")) && !keys.is_admin(None));
        assert!(
            !Keys::default().is_admin(Some("first")),
            "no admin keys is no admin access"
        );
        assert!(Keys::default().is_api(None), "no API keys is open inference");
    }

    #[test]
    fn debug_output_counts_keys_and_never_shows_them() {
        let keys = Keys {
            api: Some(HashSet::from(["client-secret".to_string()])),
            admin: Some(HashSet::from(["operator-secret".to_string()])),
        };
        let shown = format!("{keys:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("admin: Some(1)"), "{shown}");
    }
}
