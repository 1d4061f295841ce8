//! The HTTP API: OpenAI routes, the adapter admin API and the operational endpoints.

mod admin;
pub mod auth;
pub mod fields;
pub mod generation;
mod openai;
mod ops;
pub mod request_id;
pub mod validate;

use crate::adapters::{AdapterSet, LoadedAdapter};
use crate::engine::Engine;
use crate::error::ApiError;
use crate::loader::AdapterLoader;
use crate::metrics::Metrics;
use crate::text::TextCodec;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::Router;
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
    /// Bearer keys for inference and for the admin API (see [`auth`]).
    pub keys: auth::Keys,
    ready: AtomicBool,
    /// Unix seconds when the server started: the base model's `created` in GET /v1/models.
    pub started_at: u64,
    /// Serialises admin loads so two concurrent loads cannot both pass the caps.
    pub admin_lock: tokio::sync::Mutex<()>,
    /// Seconds a generation request may take in all (`--request-timeout-s`); None: no limit.
    pub request_timeout_s: Option<u64>,
    /// Seconds between SSE keep-alive comments (`--sse-keep-alive-s`).
    pub sse_keep_alive_s: u64,
    /// Set with `--adapter-on-demand`: loads registry adapters that requests name.
    pub on_demand: Option<crate::ondemand::OnDemand>,
    /// Output grammars for this model's tokenizer, or why there are none.
    pub grammars: Result<Arc<crate::grammar::Grammars>, String>,
    /// Whether the chat template shows tools, and how calls are read (`--tool-call-parser`).
    pub tools: crate::tools::ToolSupport,
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
        keys: auth::Keys,
    ) -> Self {
        let stop_ids = Arc::new(codec.stop_ids.clone());
        let grammars = grammars(&codec, vocab_size);
        let tools = tool_support(&codec, crate::tools::ToolParserFlag::Auto);
        metrics
            .loaded_adapters
            .set((adapters.len() + merged.is_some() as usize) as i64);
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
            keys,
            ready: AtomicBool::new(false),
            started_at: unix_now(),
            admin_lock: tokio::sync::Mutex::new(()),
            request_timeout_s: None,
            sse_keep_alive_s: 15,
            on_demand: None,
            grammars,
            tools,
        }
    }

    /// Reads tool calls in the format `flag` names (`--tool-call-parser`).
    pub fn with_tool_parser(self, flag: crate::tools::ToolParserFlag) -> Self {
        let tools = tool_support(&self.codec, flag);
        Self { tools, ..self }
    }

    /// Turns on-demand adapter loading on (it also needs a loader with a registry).
    pub fn with_on_demand(self, on_demand: Option<crate::ondemand::OnDemand>) -> Self {
        Self { on_demand, ..self }
    }

    /// Before validation: loads the registry adapter the body's `model` names if it is not
    /// loaded and on-demand loading is on, and returns a hold on it that the caller keeps
    /// until validation has taken the adapter (so that no other load evicts it in between).
    /// Anything it cannot read is left to validation.
    pub async fn ensure_adapter(&self, body: &[u8]) -> Result<Option<Arc<LoadedAdapter>>, ApiError> {
        let (Some(on_demand), Some(loader)) = (&self.on_demand, &self.loader) else {
            return Ok(None);
        };
        #[derive(serde::Deserialize)]
        struct Model {
            model: Option<serde_json::Value>,
        }
        let Ok(Model {
            model: Some(serde_json::Value::String(model)),
        }) = serde_json::from_slice::<Model>(body)
        else {
            return Ok(None);
        };
        let mut base_names = vec![self.base_name.as_str()];
        base_names.extend(loader.base_names.iter().map(String::as_str));
        on_demand
            .ensure(loader, &self.adapters, &self.metrics, &base_names, &model)
            .await
    }

    pub fn with_timeouts(self, request_timeout_s: Option<u64>, sse_keep_alive_s: u64) -> Self {
        Self {
            request_timeout_s,
            sse_keep_alive_s,
            ..self
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
            base_aliases: self.loader.as_deref().map_or(&[], |l| l.base_names.as_slice()),
            merged: self.merged.as_deref(),
            adapters: &self.adapters,
            codec: &self.codec,
            vocab_size: self.vocab_size,
            max_context: config.max_context,
            kv_bytes_per_token: self.engine.kv_bytes(1),
            kv_budget_bytes: config.kv_budget_bytes,
            stop_ids: &self.stop_ids,
            grammars: match &self.grammars {
                Ok(g) => Ok(g),
                Err(why) => Err(why),
            },
            max_sequences: config.max_batch + config.max_queue,
            tools: &self.tools,
        }
    }
}

fn tool_support(codec: &TextCodec, flag: crate::tools::ToolParserFlag) -> crate::tools::ToolSupport {
    crate::tools::ToolSupport {
        template_renders_tools: codec.chat_template_renders_tools(),
        format: flag.resolve(codec.chat_template_source()),
    }
}

/// The token trie output grammars need, built once; a tokenizer it cannot be built from makes
/// structured-output requests a 400 that says why, and everything else works as before.
fn grammars(codec: &TextCodec, vocab_size: usize) -> Result<Arc<crate::grammar::Grammars>, String> {
    let eos = codec.stop_ids.first().copied().unwrap_or(0);
    let built = crate::grammar::Grammars::new(codec, vocab_size, eos).map(Arc::new);
    if let Err(e) = &built {
        tracing::warn!(error = %e, "structured output (response_format, guided_*) is unavailable");
    }
    built
}

/// Seconds since the Unix epoch, as OpenAI's `created` fields count.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A path as error messages quote it: bounded, so a huge URL does not make a huge error body.
fn quoted_path(uri: &Uri) -> String {
    uri.path().chars().take(200).collect()
}

/// Every route on one port: what a server without `--admin-listen` serves.
pub fn router(state: Arc<AppState>) -> Router {
    let routes = public_routes(&state).merge(admin_routes(&state));
    finish(routes, state)
}

/// The routes for the port clients reach, without the admin API: with `--admin-listen` that is
/// served by [`admin_router`] on a port the Service does not expose.
pub fn public_router(state: Arc<AppState>) -> Router {
    let routes = public_routes(&state);
    finish(routes, state)
}

/// The admin API alone, for the `--admin-listen` port.
pub fn admin_router(state: Arc<AppState>) -> Router {
    let routes = admin_routes(&state);
    finish(routes, state)
}

fn public_routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    let inference = Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::inference));
    let listing = Router::new()
        .route("/v1/models", get(admin::models))
        // Wildcard: a base model id such as `org/model` holds slashes.
        .route("/v1/models/{*id}", get(admin::model))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::listing));
    Router::new()
        .merge(inference)
        .merge(listing)
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
}

fn admin_routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/adapters", post(admin::load_adapter).get(admin::adapters))
        .route("/v1/adapters/{name}", delete(admin::unload_adapter))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::admin))
}

/// The answers every port shares: OpenAI-shaped 404 and 405, the body limit, request ids.
fn finish(routes: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    routes
        .fallback(|method: Method, uri: Uri| async move {
            ApiError::RouteNotFound {
                method: method.to_string(),
                path: quoted_path(&uri),
            }
            .into_response()
        })
        // After every route: it applies to the routes present when it is called.
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::MethodNotAllowed {
                method: method.to_string(),
                path: quoted_path(&uri),
            }
            .into_response()
        })
        .layer(DefaultBodyLimit::max(fields::MAX_BODY_BYTES))
        // Outermost, so every answer carries the id, errors of the layers above included.
        .layer(middleware::from_fn(request_id::layer))
        .with_state(state)
}
