//! GET /v1/models and /v1/models/{id}, and the adapter admin API (POST and GET /v1/adapters,
//! DELETE /v1/adapters/{name}).
//! The body of POST is the operator's `ServedAdapter` (name, source, version, digest), with
//! version and digest optional for hand-made requests.

use super::fields::{parse_body, read_body, Fields};
use super::AppState;
use crate::adapters::LoadedAdapter;
use crate::error::ApiError;
use crate::loader::AdapterSpec;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

/// An adapter as clients see it: OpenAI's model object plus what the operator checks (version,
/// digest). No `root`: that would be the storage URI.
fn entry(a: &LoadedAdapter, base: &str) -> Value {
    json!({
        "id": a.name, "object": "model", "created": a.loaded_at, "owned_by": "kubetune", "parent": base,
        "version": a.version, "digest": a.digest, "rank": a.weights.config.r,
    })
}

/// The admin view adds where each adapter came from.
fn admin_entry(a: &LoadedAdapter, base: &str) -> Value {
    let mut e = entry(a, base);
    e["source"] = json!(a.source);
    e
}

fn listing(state: &AppState, each: fn(&LoadedAdapter, &str) -> Value) -> Vec<Value> {
    let mut data = Vec::new();
    match &state.merged {
        Some(m) => data.push(each(m, &state.base_name)),
        None => data.push(json!({
            "id": state.base_name, "object": "model", "created": state.started_at, "owned_by": "kubetune",
        })),
    }
    data.extend(state.adapters.list().iter().map(|a| each(a, &state.base_name)));
    data
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": listing(&state, entry)}))
}

/// GET /v1/models/{id}: one entry of the listing (the openai client's `models.retrieve`).
pub async fn model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match listing(&state, entry).into_iter().find(|e| e["id"] == id.as_str()) {
        Some(e) => Json(e).into_response(),
        None => ApiError::UnknownModel {
            message: format!("model `{id}` is not served here; GET /v1/models lists what is"),
        }
        .into_response(),
    }
}

/// GET /v1/adapters: the listing with each adapter's source, and whether it is pinned (loaded
/// at start or by this API: never evicted) or was loaded on demand, for the operator and admins.
pub async fn adapters(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut data = listing(&state, admin_entry);
    for e in &mut data {
        if let Some(pinned) = e["id"].as_str().and_then(|id| state.adapters.is_pinned(id)) {
            e["pinned"] = json!(pinned);
        }
    }
    Json(json!({"object": "list", "data": data}))
}

pub fn parse_spec(body: &[u8]) -> Result<AdapterSpec, ApiError> {
    let value = parse_body(body)?;
    let f = Fields::new(&value);
    let version = f.integer("version", 1, u32::MAX as i64)?.map(|v| v as u32);
    let digest = f.string("digest")?.map(str::to_string);
    if let Some(d) = &digest {
        if !d.starts_with("sha256:") {
            return Err(ApiError::invalid("digest", "`digest` must look like sha256:<hex>"));
        }
    }
    Ok(AdapterSpec {
        name: f.required_string("name")?.to_string(),
        source: f.required_string("source")?.to_string(),
        version,
        digest,
    })
}

pub async fn load_adapter(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match read_body(body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match load(&state, &body).await {
        Ok(a) => (axum::http::StatusCode::OK, Json(admin_entry(&a, &state.base_name))).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "adapter load refused");
            e.into_response()
        }
    }
}

async fn load(state: &AppState, body: &[u8]) -> Result<Arc<LoadedAdapter>, ApiError> {
    let spec = parse_spec(body)?;
    if state.merged.is_some() {
        return Err(ApiError::Conflict(
            "the server runs with --merge and serves one adapter fixed at start".into(),
        ));
    }
    if spec.name == state.base_name {
        return Err(ApiError::invalid(
            "name",
            format!("`{}` is the base model's name", spec.name),
        ));
    }
    let loader = state
        .loader
        .as_ref()
        .ok_or_else(|| ApiError::Conflict("adapter loading is not configured".into()))?;
    // One load at a time: the caps are checked on the final insert, but two concurrent loads
    // would also double the transient memory.
    let _guard = state.admin_lock.lock().await;
    let loaded = loader.load(&spec, &state.adapters).await?;
    // Pinned: the operator's and admins' adapters are never evicted; on-demand ones make room.
    let (adapter, evicted) = state.adapters.insert_with(loaded, true)?;
    state.metrics.adapter_evictions.inc_by(evicted.len() as u64);
    for e in &evicted {
        tracing::info!(name = %e.name, version = ?e.version, "on-demand adapter evicted for a pinned one");
    }
    state.metrics.loaded_adapters.set(state.adapters.len() as i64);
    tracing::info!(name = %adapter.name, version = ?adapter.version, source = %adapter.source, "adapter loaded");
    Ok(adapter)
}

pub async fn unload_adapter(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    if state.merged.as_ref().is_some_and(|m| m.name == name) {
        return ApiError::Conflict(format!("`{name}` is merged into the base and cannot be unloaded")).into_response();
    }
    match state.adapters.remove(&name) {
        Ok(a) => {
            state.metrics.loaded_adapters.set(state.adapters.len() as i64);
            tracing::info!(%name, "adapter unloaded");
            Json(json!({"id": a.name, "deleted": true})).into_response()
        }
        Err(e) => e.into_response(),
    }
}
