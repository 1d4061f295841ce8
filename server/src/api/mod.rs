//! The HTTP API: OpenAI routes, the adapter admin API and the operational endpoints.

mod admin;
pub mod fields;
pub mod generation;
mod openai;
mod ops;
pub mod validate;

use crate::adapters::{AdapterSet, LoadedAdapter};
use crate::engine::Engine;
use crate::error::ApiError;
use crate::loader::AdapterLoader;
use crate::metrics::Metrics;
use crate::text::TextCodec;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use validate::ValidationContext;

pub struct AppState {
    pub engine: Engine,
    pub codec: Arc<TextCodec>,
    pub adapters: Arc<AdapterSet>,
    pub metrics: Arc<Metrics>,
    /// The id clients use for the base model.
    pub base_name: String,
    /// Set with --merge: the adapter folded into the base weights.
    pub merged: Option<Arc<LoadedAdapter>>,
    pub vocab_size: usize,
    pub stop_ids: Arc<Vec<u32>>,
    /// Loads adapters for the admin API; None serves only what was loaded at start.
    pub loader: Option<Arc<AdapterLoader>>,
    /// Bearer keys accepted on /v1/*; None means no authentication.
    pub api_keys: Option<HashSet<String>>,
    ready: AtomicBool,
    /// Serialises admin loads so two concurrent loads cannot both pass the caps.
    pub admin_lock: tokio::sync::Mutex<()>,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: Engine,
        codec: Arc<TextCodec>,
        adapters: Arc<AdapterSet>,
        metrics: Arc<Metrics>,
        base_name: String,
        merged: Option<Arc<LoadedAdapter>>,
        vocab_size: usize,
        loader: Option<Arc<AdapterLoader>>,
        api_keys: Option<HashSet<String>>,
    ) -> Self {
        let stop_ids = Arc::new(codec.stop_ids.clone());
        metrics.loaded_adapters.set((adapters.len() + merged.is_some() as usize) as i64);
        Self {
            engine,
            codec,
            adapters,
            metrics,
            base_name,
            merged,
            vocab_size,
            stop_ids,
            loader,
            api_keys,
            ready: AtomicBool::new(false),
            admin_lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn validation(&self) -> ValidationContext<'_> {
        let config = self.engine.config();
        ValidationContext {
            base_name: &self.base_name,
            merged: self.merged.as_deref(),
            adapters: &self.adapters,
            codec: &self.codec,
            vocab_size: self.vocab_size,
            max_context: config.max_context,
            kv_bytes_per_token: self.engine.kv_bytes(1),
            kv_budget_bytes: config.kv_budget_bytes,
            stop_ids: &self.stop_ids,
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(admin::models))
        .route("/v1/adapters", post(admin::load_adapter).get(admin::models))
        .route("/v1/adapters/{name}", delete(admin::unload_adapter))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(v1)
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .fallback(|| async { ApiError::invalid_code("path", "not_found", "no such route").into_response() })
        .with_state(state)
}

/// Checks `Authorization: Bearer <key>` against the keys file. Probes and /metrics stay open
/// (they are outside this layer) so the kubelet and Prometheus need no key.
async fn authenticate(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(keys) = &state.api_keys {
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !presented.is_some_and(|k| keys.contains(k)) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// Reads an API keys file: one key per line; blank lines and `#` comments ignored.
pub fn read_api_keys(path: &std::path::Path) -> Result<HashSet<String>, crate::error::StartupError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| crate::error::StartupError::File { path: path.into(), reason: e.to_string() })?;
    let keys: HashSet<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect();
    if keys.is_empty() {
        return Err(crate::error::StartupError::File {
            path: path.into(),
            reason: "holds no keys; every request would be refused".into(),
        });
    }
    Ok(keys)
}
