//! POST /v1/completions and /v1/chat/completions, streaming (SSE) or not.

use super::fields::read_body;
use super::generation::{Chunk, Generation, TokenInfo};
use super::request_id::RequestId;
use super::validate::{model_label, validate, Endpoint, ValidGeneration};
use super::{unix_now, AppState};
use crate::error::ApiError;
use crate::text::TextCodec;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

type Body = Result<Bytes, BytesRejection>;

pub async fn completions(
    State(state): State<Arc<AppState>>,
    id: Option<axum::Extension<RequestId>>,
    body: Body,
) -> Response {
    handle(state, Endpoint::Completions, id.map(|e| e.0), body).await
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    id: Option<axum::Extension<RequestId>>,
    body: Body,
) -> Response {
    handle(state, Endpoint::Chat, id.map(|e| e.0), body).await
}

async fn handle(state: Arc<AppState>, endpoint: Endpoint, request_id: Option<RequestId>, body: Body) -> Response {
    let started = Instant::now();
    let body = match read_body(body) {
        Ok(b) => b,
        Err(e) => return refuse(&state, &[], e),
    };
    let valid = match validate(&state.validation(), endpoint, &body) {
        Ok(v) => v,
        Err(e) => return refuse(&state, &body, e),
    };
    let ValidGeneration {
        model,
        request,
        stop,
        stream,
        include_usage,
    } = valid;
    let prompt_tokens = request.prompt.len();
    let logprobs = request.params.logprobs.is_some();
    let events = match state.engine.submit(request) {
        Ok(rx) => rx,
        Err(e) => {
            if e.status().is_server_error() {
                log_failure(request_id.as_ref(), &model, &e);
            }
            return refuse(&state, &body, e);
        }
    };
    let generation = Generation::new(events, state.codec.clone(), stop, prompt_tokens);
    let meta = Meta {
        id: new_id(endpoint),
        model,
        created: unix_now(),
        endpoint,
        logprobs,
        include_usage,
        request_id,
    };
    if stream {
        state.metrics.request(&meta.model, 200);
        Sse::new(sse(state, meta, generation, started)).into_response()
    } else {
        collect(state, meta, generation, started).await
    }
}

fn refuse(state: &AppState, body: &[u8], e: ApiError) -> Response {
    state
        .metrics
        .request(&model_label(&state.validation(), body), e.status().as_u16());
    e.into_response()
}

struct Meta {
    id: String,
    model: String,
    created: u64,
    endpoint: Endpoint,
    logprobs: bool,
    /// Streaming: send usage in a chunk of its own after the last choice chunk.
    include_usage: bool,
    request_id: Option<RequestId>,
}

fn new_id(endpoint: Endpoint) -> String {
    let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

fn usage(g: &Generation) -> Value {
    json!({"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens, "total_tokens": g.prompt_tokens + g.completion_tokens})
}

/// OpenAI's completions logprobs object for `tokens`, whose text starts at `offset`.
fn logprobs_json(codec: &TextCodec, tokens: &[TokenInfo], mut offset: usize) -> Value {
    let (mut texts, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for t in tokens {
        let text = codec.token_text(t.id);
        offsets.push(offset);
        offset += text.len();
        texts.push(text);
        let lp = t.logprob.as_ref();
        lps.push(lp.map(|l| l.logprob));
        // Keyed by text as OpenAI does; two ids with the same text keep the likelier one.
        let mut top = serde_json::Map::new();
        for (id, p) in lp.map(|l| l.top.as_slice()).unwrap_or_default() {
            top.entry(codec.token_text(*id)).or_insert(json!(p));
        }
        tops.push(Value::Object(top));
    }
    json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// OpenAI's chat logprobs object for `tokens`: per token its text, log-probability, bytes and
/// the most likely alternatives.
fn chat_logprobs_json(codec: &TextCodec, tokens: &[TokenInfo]) -> Value {
    let entry = |id: u32, logprob: Option<f32>| json!({"token": codec.token_text(id), "logprob": logprob, "bytes": codec.token_bytes(id)});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let lp = t.logprob.as_ref();
            let mut e = entry(t.id, lp.map(|l| l.logprob));
            let top: Vec<Value> = lp
                .map(|l| l.top.iter().map(|&(id, p)| entry(id, Some(p))).collect())
                .unwrap_or_default();
            e["top_logprobs"] = Value::Array(top);
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

async fn collect(state: Arc<AppState>, meta: Meta, mut g: Generation, started: Instant) -> Response {
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut finish = None;
    while let Some(chunk) = g.next().await {
        match chunk {
            Ok(Chunk {
                text: t,
                tokens: ts,
                finish: f,
            }) => {
                text.push_str(&t);
                tokens.extend(ts);
                finish = f.or(finish);
            }
            Err(e) => {
                log_failure(meta.request_id.as_ref(), &meta.model, &e);
                state.metrics.request(&meta.model, e.status().as_u16());
                return e.into_response();
            }
        }
    }
    let finish = finish.map(|f| f.as_str());
    let choice = match meta.endpoint {
        Endpoint::Completions => {
            let lp = if meta.logprobs {
                logprobs_json(&state.codec, &tokens, 0)
            } else {
                Value::Null
            };
            json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": finish})
        }
        Endpoint::Chat => {
            let lp = if meta.logprobs {
                chat_logprobs_json(&state.codec, &tokens)
            } else {
                Value::Null
            };
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": finish})
        }
    };
    let object = if meta.endpoint == Endpoint::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    state.metrics.request(&meta.model, 200);
    if let Some(reason) = finish {
        state
            .metrics
            .finished(&meta.model, reason, started.elapsed().as_secs_f64());
    }
    Json(json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "choices": [choice], "usage": usage(&g),
    }))
    .into_response()
}

/// Server-sent events: one per chunk, the last one carrying finish_reason; with
/// `stream_options.include_usage`, then a chunk with `choices: []` and the usage (OpenAI's
/// shape); then `data: [DONE]`. A failure mid-stream is sent as an OpenAI error object before
/// `[DONE]`. When the client disconnects, hyper drops this stream and with it the engine
/// receiver, which cancels the sequence.
fn sse(
    state: Arc<AppState>,
    meta: Meta,
    g: Generation,
    started: Instant,
) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    struct S {
        state: Arc<AppState>,
        meta: Meta,
        g: Generation,
        started: Instant,
        sent_role: bool,
        text_offset: usize,
        /// The usage chunk is still to be sent (set once the generation finished well).
        usage_due: bool,
        done: bool,
    }
    let init = S {
        state,
        meta,
        g,
        started,
        sent_role: false,
        text_offset: 0,
        usage_due: false,
        done: false,
    };
    let events = stream::unfold(init, |mut s| async move {
        if s.done {
            return None;
        }
        let event = match s.g.next().await {
            None if s.usage_due => {
                s.usage_due = false;
                let object = chunk_object(s.meta.endpoint);
                let m = &s.meta;
                SseEvent::default().data(
                    json!({"id": m.id, "object": object, "created": m.created, "model": m.model, "choices": [], "usage": usage(&s.g)})
                        .to_string(),
                )
            }
            None => {
                s.done = true;
                return Some((SseEvent::default().data("[DONE]"), s));
            }
            Some(Err(e)) => {
                log_failure(s.meta.request_id.as_ref(), &s.meta.model, &e);
                SseEvent::default().data(e.body().to_string())
            }
            Some(Ok(chunk)) => {
                if let Some(reason) = chunk.finish {
                    let seconds = s.started.elapsed().as_secs_f64();
                    s.state.metrics.finished(&s.meta.model, reason.as_str(), seconds);
                    s.usage_due = s.meta.include_usage;
                }
                SseEvent::default()
                    .data(stream_chunk(&mut s.sent_role, &mut s.text_offset, &s.state, &s.meta, chunk).to_string())
            }
        };
        Some((event, s))
    });
    events.map(Ok)
}

fn chunk_object(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::Chat => "chat.completion.chunk",
    }
}

/// Engine failures are the server's fault: logged with what an operator needs to find the
/// request the client reports.
fn log_failure(request_id: Option<&RequestId>, model: &str, e: &ApiError) {
    let request_id = request_id.map(|r| r.0.as_str()).unwrap_or("-");
    tracing::error!(request_id, model, error = %e, "generation failed");
}

fn stream_chunk(sent_role: &mut bool, text_offset: &mut usize, state: &AppState, meta: &Meta, chunk: Chunk) -> Value {
    let finish = chunk.finish.map(|f| f.as_str());
    let (object, choice) = match meta.endpoint {
        Endpoint::Completions => {
            let lp = if meta.logprobs {
                logprobs_json(&state.codec, &chunk.tokens, *text_offset)
            } else {
                Value::Null
            };
            *text_offset += chunk.text.len();
            (
                "text_completion",
                json!({"index": 0, "text": chunk.text, "logprobs": lp, "finish_reason": finish}),
            )
        }
        Endpoint::Chat => {
            let mut delta = json!({});
            if !*sent_role {
                delta["role"] = json!("assistant");
                *sent_role = true;
            }
            if !chunk.text.is_empty() || chunk.finish.is_none() {
                delta["content"] = json!(chunk.text);
            }
            let lp = if meta.logprobs {
                chat_logprobs_json(&state.codec, &chunk.tokens)
            } else {
                Value::Null
            };
            (
                "chat.completion.chunk",
                json!({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}),
            )
        }
    };
    let mut out =
        json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model, "choices": [choice]});
    if meta.include_usage {
        // OpenAI's chunks all carry the field; only the final, choice-less one fills it.
        out["usage"] = Value::Null;
    }
    out
}
