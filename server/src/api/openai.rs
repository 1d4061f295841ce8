//! POST /v1/completions and /v1/chat/completions, streaming (SSE) or not.

use super::fields::read_body;
use super::generation::{Chunk, Generation, TokenInfo};
use super::request_id::RequestId;
use super::validate::{model_label, validate, Endpoint, ValidGeneration};
use super::{unix_now, AppState};
use crate::engine::FinishReason;
use crate::error::ApiError;
use crate::text::TextCodec;
use crate::tools::{ParsedCall, ToolCallReader, ValidTools};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    // Everything logged about this request carries its id, model and prompt size; the last
    // line says how long it queued and took.
    let span = tracing::info_span!(
        "request",
        id = %request_id.as_ref().map_or("-", |r| r.0.as_str()),
        endpoint = %endpoint_name(endpoint),
        model = tracing::field::Empty,
        prompt_tokens = tracing::field::Empty,
    );
    let body = match read_body(body) {
        Ok(b) => b,
        Err(e) => return refuse(&state, &[], e),
    };
    let adapter_hold = match state.ensure_adapter(&body).await {
        Ok(hold) => hold,
        Err(e) => return refuse(&state, &body, e),
    };
    let valid = match validate(&state.validation(), endpoint, &body) {
        Ok(v) => v,
        Err(e) => return refuse(&state, &body, e),
    };
    // Validation holds the adapter now (in the request).
    drop(adapter_hold);
    let ValidGeneration {
        model,
        request,
        stop,
        stream,
        include_usage,
        n,
        tools,
    } = valid;
    let prompt_tokens = request.prompt.len();
    span.record("model", tracing::field::display(&model));
    span.record("prompt_tokens", prompt_tokens);
    let logprobs = request.params.logprobs.is_some();
    // One sequence per choice. All or none are admitted: a partly admitted request would
    // hold slots for choices that could never be answered.
    let mut generations = Vec::with_capacity(n);
    for i in 0..n {
        let mut choice = request.clone();
        // Seeded requests stay reproducible; the choices still differ from each other.
        choice.params.seed = request.params.seed.map(|s| s.wrapping_add(i as u64));
        match state.engine.submit(choice) {
            Ok(events) => generations.push(Generation::new(
                events,
                state.codec.clone(),
                stop.clone(),
                prompt_tokens,
            )),
            Err(e) => {
                if e.status().is_server_error() {
                    span.in_scope(|| log_failure(request_id.as_ref(), &model, &e));
                }
                return refuse(&state, &body, e);
            }
        }
    }
    let meta = Meta {
        id: new_id(endpoint),
        model,
        created: unix_now(),
        endpoint,
        logprobs,
        include_usage,
        request_id,
        prompt_tokens,
        span,
        tools,
    };
    let deadline = Deadline::of(&state, started);
    if stream {
        state.metrics.request(&meta.model, 200);
        // A stream with nothing to send (a long prefill, a wait in the queue) sends an SSE
        // comment now and then, so that proxies with idle timeouts keep the connection; SSE
        // clients, the official `openai` one among them, skip comments.
        let keep_alive = KeepAlive::new().interval(Duration::from_secs(state.sse_keep_alive_s));
        Sse::new(sse(state, meta, generations, started, deadline))
            .keep_alive(keep_alive)
            .into_response()
    } else {
        let Some(deadline) = deadline else {
            return collect(state, meta, generations, started).await;
        };
        // Past the deadline the collecting future is dropped, and with it the engine's
        // receivers: the sequences are cancelled at the engine's next step.
        let (request_id, model, span) = (meta.request_id.clone(), meta.model.clone(), meta.span.clone());
        match tokio::time::timeout_at(deadline.at, collect(state.clone(), meta, generations, started)).await {
            Ok(response) => response,
            Err(_) => {
                let e = deadline.exceeded();
                span.in_scope(|| log_failure(request_id.as_ref(), &model, &e));
                state.metrics.request(&model, e.status().as_u16());
                e.into_response()
            }
        }
    }
}

/// When a request must be done by (`--request-timeout-s`), counted from its arrival.
#[derive(Clone, Copy)]
struct Deadline {
    at: tokio::time::Instant,
    seconds: u64,
}

impl Deadline {
    fn of(state: &AppState, started: Instant) -> Option<Self> {
        let seconds = state.request_timeout_s?;
        Some(Self {
            at: tokio::time::Instant::from_std(started + Duration::from_secs(seconds)),
            seconds,
        })
    }

    fn exceeded(&self) -> ApiError {
        ApiError::DeadlineExceeded { seconds: self.seconds }
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
    /// Counted once however many choices share the prompt, as OpenAI counts it.
    prompt_tokens: usize,
    span: tracing::Span,
    /// The request's tools: each choice's text is read for calls.
    tools: Option<ValidTools>,
}

impl Meta {
    /// A fresh reader for one choice's text, when the request's tools ask for calls.
    fn tool_reader(&self) -> Option<ToolCallReader> {
        let tools = self.tools.as_ref()?;
        Some(ToolCallReader::new(tools.choice.clone()?, tools.parallel))
    }
}

fn endpoint_name(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Completions => "completions",
        Endpoint::Chat => "chat",
    }
}

/// The request's last log line: its queue time (the longest of its choices'), completion
/// tokens and total time, in its span.
fn log_finished(meta: &Meta, started: Instant, queued_s: Option<f64>, completion_tokens: usize) {
    tracing::info!(
        parent: &meta.span,
        queue_s = queued_s.unwrap_or(0.0),
        completion_tokens,
        total_s = started.elapsed().as_secs_f64(),
        "request finished"
    );
}

fn new_id(endpoint: Endpoint) -> String {
    let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// OpenAI's usage; `cached_tokens`: prompt tokens found in the prefix cache (the most any
/// choice found: the choices share the prompt).
fn usage(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    })
}

/// OpenAI's completions logprobs object for `tokens`, whose text starts at `offset`.
fn logprobs_json(codec: &TextCodec, tokens: &[TokenInfo], mut offset: usize) -> Value {
    let (mut texts, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for t in tokens {
        let text = codec.token_text(t.id);
        offsets.push(offset);
        // Characters, as OpenAI and vLLM count them (Python's len), not UTF-8 bytes.
        offset += text.chars().count();
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

/// One choice, generated to its end.
struct Collected {
    text: String,
    tokens: Vec<TokenInfo>,
    finish: Option<FinishReason>,
    completion_tokens: usize,
    queued_s: Option<f64>,
    cached_tokens: usize,
}

async fn collect_one(mut g: Generation) -> Result<Collected, ApiError> {
    let mut c = Collected {
        text: String::new(),
        tokens: Vec::new(),
        finish: None,
        completion_tokens: 0,
        queued_s: None,
        cached_tokens: 0,
    };
    while let Some(chunk) = g.next().await {
        let chunk = chunk?;
        c.text.push_str(&chunk.text);
        c.tokens.extend(chunk.tokens);
        c.finish = chunk.finish.or(c.finish);
    }
    c.completion_tokens = g.completion_tokens;
    c.queued_s = g.queued_s;
    c.cached_tokens = g.cached_tokens;
    Ok(c)
}

async fn collect(state: Arc<AppState>, meta: Meta, generations: Vec<Generation>, started: Instant) -> Response {
    let results = futures::future::join_all(generations.into_iter().map(collect_one)).await;
    let mut collected = Vec::with_capacity(results.len());
    for result in results {
        match result {
            Ok(c) => collected.push(c),
            Err(e) => {
                meta.span
                    .in_scope(|| log_failure(meta.request_id.as_ref(), &meta.model, &e));
                state.metrics.request(&meta.model, e.status().as_u16());
                return e.into_response();
            }
        }
    }
    let choices: Vec<Value> = collected
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let finish = c.finish.map(|f| f.as_str());
            match meta.endpoint {
                Endpoint::Completions => {
                    let lp = if meta.logprobs {
                        logprobs_json(&state.codec, &c.tokens, 0)
                    } else {
                        Value::Null
                    };
                    json!({"index": index, "text": c.text, "logprobs": lp, "finish_reason": finish})
                }
                Endpoint::Chat => {
                    let lp = if meta.logprobs {
                        chat_logprobs_json(&state.codec, &c.tokens)
                    } else {
                        Value::Null
                    };
                    let (message, finish) = chat_message(&meta, &c.text, c.finish);
                    json!({"index": index, "message": message, "logprobs": lp, "finish_reason": finish})
                }
            }
        })
        .collect();
    let object = if meta.endpoint == Endpoint::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    state.metrics.request(&meta.model, 200);
    state.metrics.finished(&meta.model, started.elapsed().as_secs_f64());
    for c in &collected {
        if let Some(reason) = c.finish {
            state.metrics.choice_finished(reason.as_str());
        }
    }
    let completion_tokens = collected.iter().map(|c| c.completion_tokens).sum();
    let queued_s = collected.iter().filter_map(|c| c.queued_s).reduce(f64::max);
    let cached_tokens = collected.iter().map(|c| c.cached_tokens).max().unwrap_or(0);
    log_finished(&meta, started, queued_s, completion_tokens);
    Json(json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "choices": choices, "usage": usage(meta.prompt_tokens, completion_tokens, cached_tokens),
    }))
    .into_response()
}

/// A whole chat choice's message: its text, or with tools its content and calls; and its
/// finish reason.
fn chat_message(meta: &Meta, text: &str, finish: Option<FinishReason>) -> (Value, Option<&'static str>) {
    let Some(mut reader) = meta.tool_reader() else {
        return (
            json!({"role": "assistant", "content": text}),
            finish.map(|f| f.as_str()),
        );
    };
    let mut content = reader.push(text);
    let (finish, rest, calls) = finish_reading(reader, finish);
    content.push_str(&rest);
    let mut message = json!({"role": "assistant", "content": content});
    if !calls.is_empty() {
        if content.trim().is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = calls.iter().map(tool_call_json).collect();
    }
    (message, finish)
}

/// The end of a choice read for calls: its finish reason (`tool_calls` when it made calls,
/// except for a function the client named, as OpenAI reports them), the content still held,
/// and the calls.
fn finish_reading(
    reader: ToolCallReader,
    finish: Option<FinishReason>,
) -> (Option<&'static str>, String, Vec<ParsedCall>) {
    let reports = reader.reports_tool_calls();
    let (rest, calls) = reader.finish();
    let reason = match finish {
        Some(FinishReason::Stop) if reports && !calls.is_empty() => Some("tool_calls"),
        other => other.map(|f| f.as_str()),
    };
    (reason, rest, calls)
}

fn tool_call_json(call: &ParsedCall) -> Value {
    let id = format!("call_{:016x}{:08x}", rand::random::<u64>(), rand::random::<u32>());
    json!({"id": id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
}

/// What one choice's stream yields: its chunks, then how many tokens it generated.
enum Piece {
    Chunk(Result<Chunk, ApiError>),
    Done {
        completion_tokens: usize,
        queued_s: Option<f64>,
        cached_tokens: usize,
    },
}

type ChoiceStream = futures::stream::BoxStream<'static, (usize, Piece)>;

fn choice_stream(index: usize, g: Generation) -> ChoiceStream {
    stream::unfold(Some(g), move |g| async move {
        let mut g = g?;
        match g.next().await {
            Some(chunk) => Some(((index, Piece::Chunk(chunk)), Some(g))),
            None => Some((
                (
                    index,
                    Piece::Done {
                        completion_tokens: g.completion_tokens,
                        queued_s: g.queued_s,
                        cached_tokens: g.cached_tokens,
                    },
                ),
                None,
            )),
        }
    })
    .boxed()
}

/// Server-sent events: one per chunk of any choice (each names its `index`), the last of a
/// choice carrying its finish_reason; with `stream_options.include_usage`, then a chunk with
/// `choices: []` and the usage (OpenAI's shape); then `data: [DONE]`. A failure mid-stream is
/// sent as an OpenAI error object before `[DONE]`, and ends the other choices. When the client
/// disconnects, hyper drops this stream and with it the engine receivers, which cancels the
/// sequences.
fn sse(
    state: Arc<AppState>,
    meta: Meta,
    generations: Vec<Generation>,
    started: Instant,
    deadline: Option<Deadline>,
) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    struct S {
        state: Arc<AppState>,
        meta: Meta,
        choices: stream::SelectAll<ChoiceStream>,
        /// Taken when it passes: the error event is sent once.
        deadline: Option<Deadline>,
        started: Instant,
        sent_role: Vec<bool>,
        text_offset: Vec<usize>,
        /// Per choice, its tool-call reader while it runs (requests with tools).
        readers: Vec<Option<ToolCallReader>>,
        completion_tokens: usize,
        queued_s: Option<f64>,
        cached_tokens: usize,
        /// Choices without a finish_reason yet; the request's duration is taken at 0.
        unfinished: usize,
        failed: bool,
        usage_sent: bool,
        done: bool,
    }
    let n = generations.len();
    let readers = (0..n).map(|_| meta.tool_reader()).collect();
    let init = S {
        state,
        meta,
        choices: stream::select_all(generations.into_iter().enumerate().map(|(i, g)| choice_stream(i, g))),
        deadline,
        started,
        sent_role: vec![false; n],
        text_offset: vec![0; n],
        readers,
        completion_tokens: 0,
        queued_s: None,
        cached_tokens: 0,
        unfinished: n,
        failed: false,
        usage_sent: false,
        done: false,
    };
    let events = stream::unfold(init, |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            let next = match s.deadline {
                None => Ok(s.choices.next().await),
                Some(d) => tokio::select! {
                    next = s.choices.next() => Ok(next),
                    _ = tokio::time::sleep_until(d.at) => Err(d.exceeded()),
                },
            };
            let event = match next {
                Err(e) => {
                    // As a failure mid-stream: the error object, then [DONE].
                    s.meta
                        .span
                        .in_scope(|| log_failure(s.meta.request_id.as_ref(), &s.meta.model, &e));
                    s.deadline = None;
                    s.failed = true;
                    s.choices = stream::select_all(Vec::new());
                    SseEvent::default().data(e.body().to_string())
                }
                Ok(next) => match next {
                    Some((
                        _,
                        Piece::Done {
                            completion_tokens,
                            queued_s,
                            cached_tokens,
                        },
                    )) => {
                        s.completion_tokens += completion_tokens;
                        s.cached_tokens = s.cached_tokens.max(cached_tokens);
                        s.queued_s = s.queued_s.into_iter().chain(queued_s).reduce(f64::max);
                        continue;
                    }
                    None if s.meta.include_usage && !s.failed && !s.usage_sent => {
                        s.usage_sent = true;
                        let object = chunk_object(s.meta.endpoint);
                        let m = &s.meta;
                        let usage = usage(m.prompt_tokens, s.completion_tokens, s.cached_tokens);
                        SseEvent::default().data(
                        json!({"id": m.id, "object": object, "created": m.created, "model": m.model, "choices": [], "usage": usage})
                            .to_string(),
                    )
                    }
                    None => {
                        s.done = true;
                        if !s.failed {
                            log_finished(&s.meta, s.started, s.queued_s, s.completion_tokens);
                        }
                        SseEvent::default().data("[DONE]")
                    }
                    Some((_, Piece::Chunk(Err(e)))) => {
                        s.meta
                            .span
                            .in_scope(|| log_failure(s.meta.request_id.as_ref(), &s.meta.model, &e));
                        s.failed = true;
                        // Dropping the other choices' receivers cancels their sequences.
                        s.choices = stream::select_all(Vec::new());
                        SseEvent::default().data(e.body().to_string())
                    }
                    Some((index, Piece::Chunk(Ok(chunk)))) => {
                        if let Some(reason) = chunk.finish {
                            s.state.metrics.choice_finished(reason.as_str());
                            s.unfinished -= 1;
                            if s.unfinished == 0 {
                                s.state
                                    .metrics
                                    .finished(&s.meta.model, s.started.elapsed().as_secs_f64());
                            }
                        }
                        let value = stream_chunk(
                            &mut s.sent_role[index],
                            &mut s.text_offset[index],
                            &mut s.readers[index],
                            &s.state,
                            &s.meta,
                            index,
                            chunk,
                        );
                        SseEvent::default().data(value.to_string())
                    }
                },
            };
            return Some((event, s));
        }
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

fn stream_chunk(
    sent_role: &mut bool,
    text_offset: &mut usize,
    reader: &mut Option<ToolCallReader>,
    state: &AppState,
    meta: &Meta,
    index: usize,
    chunk: Chunk,
) -> Value {
    let finish = chunk.finish.map(|f| f.as_str());
    let (object, choice) = match meta.endpoint {
        Endpoint::Completions => {
            let lp = if meta.logprobs {
                logprobs_json(&state.codec, &chunk.tokens, *text_offset)
            } else {
                Value::Null
            };
            // Offsets index the listed tokens' texts joined, as the whole response's do: a
            // token that is part of a UTF-8 character lists as U+FFFD, one character.
            *text_offset += (chunk.tokens.iter())
                .map(|t| state.codec.token_text(t.id).chars().count())
                .sum::<usize>();
            (
                "text_completion",
                json!({"index": index, "text": chunk.text, "logprobs": lp, "finish_reason": finish}),
            )
        }
        Endpoint::Chat => {
            let mut delta = json!({});
            if !*sent_role {
                delta["role"] = json!("assistant");
                *sent_role = true;
            }
            // With tools, text that may be calls is held until the choice ends; the calls
            // then go out whole, one entry per call.
            let mut text = match reader.as_mut() {
                Some(r) => r.push(&chunk.text),
                None => chunk.text,
            };
            let mut finish = finish;
            let mut calls = Vec::new();
            if let Some(r) = chunk.finish.and_then(|_| reader.take()) {
                let (reason, rest, parsed) = finish_reading(r, chunk.finish);
                text.push_str(&rest);
                finish = reason;
                calls = parsed;
            }
            if !text.is_empty() || chunk.finish.is_none() {
                delta["content"] = json!(text);
            }
            if !calls.is_empty() {
                let entries = calls.iter().enumerate().map(|(i, c)| {
                    let mut entry = tool_call_json(c);
                    entry["index"] = json!(i);
                    entry
                });
                delta["tool_calls"] = entries.collect();
            }
            let lp = if meta.logprobs {
                chat_logprobs_json(&state.codec, &chunk.tokens)
            } else {
                Value::Null
            };
            (
                "chat.completion.chunk",
                json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}),
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
