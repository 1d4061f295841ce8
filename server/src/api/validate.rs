//! Turning a request body into a `ValidGeneration`: everything the engine needs, checked.
//! Nothing past this point looks at client input again.

use super::fields::{kind, parse_body, Fields};
use crate::adapters::{AdapterSet, LoadedAdapter};
use crate::engine::GenerateRequest;
use crate::error::ApiError;
use crate::grammar::{Constraint, GrammarSpec, Grammars};
use crate::metrics::UNKNOWN_MODEL;
use crate::sampling::SamplingParams;
use crate::text::{ChatEncodeError, ChatExtras, ChatMessage, TextCodec, ToolCall};
use crate::tools::{ToolSupport, ValidTools};
use serde_json::value::RawValue;
use serde_json::Value;
use std::sync::Arc;

/// What validation needs to know about the server.
pub struct ValidationContext<'a> {
    pub base_name: &'a str,
    /// Other names the base answers to: `--model` (its storage URI) and `--base-model-alias`,
    /// so that clients written before a served name was set keep working.
    pub base_aliases: &'a [String],
    /// In merged mode, the adapter folded into the base; the base itself is not served.
    pub merged: Option<&'a LoadedAdapter>,
    pub adapters: &'a AdapterSet,
    pub codec: &'a TextCodec,
    pub vocab_size: usize,
    pub max_context: usize,
    pub kv_bytes_per_token: usize,
    pub kv_budget_bytes: usize,
    pub stop_ids: &'a Arc<Vec<u32>>,
    /// Output grammars; Err says why this model's tokenizer cannot have them.
    pub grammars: Result<&'a Grammars, &'a str>,
    /// Sequences the engine holds at once, running and queued: more choices than this could
    /// never be admitted together.
    pub max_sequences: usize,
    /// Whether the chat template shows tools, and the format calls are read in.
    pub tools: &'a ToolSupport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

pub struct ValidGeneration {
    /// The served model id echoed in responses.
    pub model: String,
    pub request: GenerateRequest,
    pub stop: Vec<String>,
    pub stream: bool,
    /// `stream_options.include_usage`: a final chunk with the usage.
    pub include_usage: bool,
    /// Choices to generate, each its own sequence.
    pub n: usize,
    /// The request's tools (chat only): how each choice's text is read for calls.
    pub tools: Option<ValidTools>,
}

/// Most choices one request may ask for: each is a sequence of its own in the batch.
pub const MAX_CHOICES: i64 = 16;

/// The label a request is counted under: a served model, or "unknown".
pub fn model_label(ctx: &ValidationContext, body: &[u8]) -> String {
    let requested = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_string));
    match requested.and_then(|m| resolve_model(ctx, &m).ok()) {
        Some((name, _)) => name,
        None => UNKNOWN_MODEL.to_string(),
    }
}

pub fn validate(ctx: &ValidationContext, endpoint: Endpoint, body: &[u8]) -> Result<ValidGeneration, ApiError> {
    let value = parse_body(body)?;
    let f = Fields::new(&value);
    let (model, adapter) = resolve_model(ctx, f.required_string("model")?)?;
    reject_unsupported(&f, endpoint)?;
    let raw = RawFields::of(body)?;
    let tools = match endpoint {
        Endpoint::Chat => crate::tools::validate(
            f.get("tools"),
            raw.tools.map(RawValue::get),
            f.get("tool_choice"),
            f.bool("parallel_tool_calls")?,
            ctx.tools,
        )?,
        Endpoint::Completions => None,
    };
    let extras = ChatExtras {
        tools_json: tools.as_ref().map(|t| t.json.as_str()),
        kwargs_json: chat_template_kwargs(&f, &raw)?,
    };

    let prompt = match endpoint {
        Endpoint::Completions => completion_prompt(ctx, &f)?,
        Endpoint::Chat => ctx.codec.encode_chat(&messages(&f)?, extras).map_err(|e| match e {
            ChatEncodeError::Rejected(m) => ApiError::invalid(
                "messages",
                format!("the model's chat template rejects this conversation: {m}"),
            ),
            ChatEncodeError::Tokenizer(m) => ApiError::Internal(m),
        })?,
    };
    let prompt_param = if endpoint == Endpoint::Chat {
        "messages"
    } else {
        "prompt"
    };
    if prompt.len() >= ctx.max_context {
        return Err(ApiError::invalid_code(
            prompt_param,
            "context_length_exceeded",
            format!(
                "the prompt is {} tokens; the context length is {} and at least one token must be generated",
                prompt.len(),
                ctx.max_context
            ),
        ));
    }
    let room = ctx.max_context - prompt.len();
    let max_tokens = max_tokens(&f, endpoint, ctx.max_context as i64)?;
    let max_tokens = match max_tokens {
        Some(n) if n > room => {
            return Err(ApiError::invalid_code(
                f.get("max_completion_tokens")
                    .map_or("max_tokens", |_| "max_completion_tokens"),
                "context_length_exceeded",
                format!(
                    "the prompt is {} tokens and max_tokens is {n}: together more than the context length {}",
                    prompt.len(),
                    ctx.max_context
                ),
            ))
        }
        Some(n) => n,
        // OpenAI's defaults: 16 for completions, the rest of the context for chat.
        None if endpoint == Endpoint::Completions => room.min(16),
        None => room,
    };
    // KV blocks are allocated as tokens are produced, so only the prompt (and the first token)
    // must fit now; a completion that alone outgrows the budget ends with `length`.
    let kv = (prompt.len() + 1).saturating_mul(ctx.kv_bytes_per_token);
    if kv > ctx.kv_budget_bytes {
        return Err(ApiError::invalid_code(
            prompt_param,
            "context_length_exceeded",
            format!(
                "the prompt is {} tokens and needs {kv} bytes of KV cache, more than the server's budget of {} bytes",
                prompt.len(),
                ctx.kv_budget_bytes
            ),
        ));
    }

    let params = sampling(&f, endpoint, ctx.vocab_size)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let mut include_usage = false;
    if let Some(opts) = f.get("stream_options") {
        if !stream {
            return Err(ApiError::invalid(
                "stream_options",
                "`stream_options` is only allowed with `stream: true`",
            ));
        }
        let o = opts
            .as_object()
            .ok_or_else(|| ApiError::invalid("stream_options", "`stream_options` must be an object"))?;
        match o.get("include_usage") {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => include_usage = *b,
            Some(v) => {
                return Err(ApiError::invalid(
                    "stream_options.include_usage",
                    format!("must be a boolean, got {}", kind(v)),
                ))
            }
        }
    }
    // vLLM's extension: generate exactly max_tokens (benchmarks need fixed-length outputs).
    let stop_ids = if f.bool("ignore_eos")?.unwrap_or(false) {
        Arc::new(Vec::new())
    } else {
        ctx.stop_ids.clone()
    };
    Ok(ValidGeneration {
        model,
        request: GenerateRequest {
            prompt,
            adapter,
            params,
            max_tokens,
            stop_ids,
            constraint: grammar(&f, ctx, tools.as_ref())?,
        },
        stop: stop_strings(&f)?,
        stream,
        include_usage,
        n: f.integer("n", 1, MAX_CHOICES.min(ctx.max_sequences as i64))?
            .unwrap_or(1) as usize,
        tools,
    })
}

/// Fields whose JSON text is kept as the client wrote it: templates show a tool schema's keys
/// in the client's order, which a parsed `Value` does not keep.
#[derive(serde::Deserialize)]
struct RawFields<'a> {
    #[serde(borrow, default)]
    tools: Option<&'a RawValue>,
    #[serde(borrow, default)]
    chat_template_kwargs: Option<&'a RawValue>,
}

impl<'a> RawFields<'a> {
    fn of(body: &'a [u8]) -> Result<Self, ApiError> {
        // The body already parsed as a JSON object, so this cannot fail on a valid request.
        serde_json::from_slice(body).map_err(|e| ApiError::Internal(format!("request body re-read: {e}")))
    }
}

/// Variables that would replace what the server gives the template.
const RESERVED_TEMPLATE_VARIABLES: [&str; 3] = ["messages", "tools", "add_generation_prompt"];

/// vLLM's `chat_template_kwargs`: more variables for the chat template (`enable_thinking`).
fn chat_template_kwargs<'a>(f: &Fields, raw: &RawFields<'a>) -> Result<Option<&'a str>, ApiError> {
    let Some(v) = f.get("chat_template_kwargs") else {
        return Ok(None);
    };
    let o = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("chat_template_kwargs", format!("must be an object, got {}", kind(v))))?;
    if let Some(k) = RESERVED_TEMPLATE_VARIABLES.iter().find(|k| o.contains_key(**k)) {
        return Err(ApiError::invalid(
            format!("chat_template_kwargs.{k}"),
            "is set by the server from the request; send it as its own field",
        ));
    }
    Ok(raw.chat_template_kwargs.map(RawValue::get))
}

/// `model` is the base name, an adapter name, or `name@N` / `name@latest` / `name@sha256:…`,
/// which must match the loaded version.
pub fn resolve_model(ctx: &ValidationContext, model: &str) -> Result<(String, Option<Arc<LoadedAdapter>>), ApiError> {
    let unknown = |message: String| ApiError::UnknownModel { message };
    if model == ctx.base_name || ctx.base_aliases.iter().any(|a| a == model) {
        if let Some(m) = ctx.merged {
            return Err(unknown(format!(
                "this server runs merged: `{}` is folded into the base, which is not served on its own; use model `{}`",
                m.name, m.name
            )));
        }
        return Ok((ctx.base_name.to_string(), None));
    }
    let (name, selector) = match model.split_once('@') {
        Some((n, s)) => (n, Some(s)),
        None => (model, None),
    };
    let (adapter, merged) = match ctx.merged {
        Some(m) if m.name == name => (None, Some(m)),
        Some(_) => (None, None),
        None => (ctx.adapters.get(name), None),
    };
    let Some(found) = adapter.as_deref().or(merged) else {
        return Err(unknown(format!(
            "model `{model}` is not served here; GET /v1/models lists the base `{}` and the loaded adapters",
            ctx.base_name
        )));
    };
    let matches = match selector {
        None | Some("latest") => true,
        Some(s) if s.starts_with("sha256:") => found.digest.as_deref() == Some(s),
        Some(s) => s.parse::<u32>().ok().is_some_and(|v| found.version == Some(v)),
    };
    if !matches {
        let loaded = match (&found.version, &found.digest) {
            (Some(v), Some(d)) => format!("version {v} ({d})"),
            (Some(v), None) => format!("version {v}"),
            _ => "an unversioned copy".to_string(),
        };
        return Err(unknown(format!(
            "model `{model}`: adapter `{name}` is loaded at {loaded}"
        )));
    }
    Ok((name.to_string(), adapter))
}

/// Fields this server does not implement are refused, naming the field, unless they ask for
/// the default: a client that asked for JSON output or a tool call and silently got free text
/// would find out much later, and in a worse place.
/// The output grammar a request asks for (OpenAI's `response_format`, or one of vLLM's
/// `guided_json`, `guided_regex`, `guided_choice`), compiled; None for free text.
fn grammar(f: &Fields, ctx: &ValidationContext, tools: Option<&ValidTools>) -> Result<Option<Constraint>, ApiError> {
    let mut asked: Vec<(&'static str, GrammarSpec)> = Vec::new();
    if let Some(spec) = tools.and_then(|t| t.grammar.clone()) {
        asked.push(("tool_choice", spec));
    }
    if let Some(v) = f.get("response_format") {
        if let Some(spec) = response_format(v)? {
            asked.push(("response_format", spec));
        }
    }
    if let Some(v) = f.get("guided_json") {
        let schema = match v {
            Value::Object(_) => v.clone(),
            Value::String(s) => serde_json::from_str(s)
                .map_err(|e| ApiError::invalid("guided_json", format!("not a JSON schema: {e}")))?,
            other => {
                return Err(ApiError::invalid(
                    "guided_json",
                    format!(
                        "must be a JSON schema (an object, or a string holding one), got {}",
                        kind(other)
                    ),
                ))
            }
        };
        asked.push(("guided_json", GrammarSpec::JsonSchema(schema)));
    }
    if let Some(v) = f.get("guided_regex") {
        let rx = v
            .as_str()
            .ok_or_else(|| ApiError::invalid("guided_regex", format!("must be a string, got {}", kind(v))))?;
        asked.push(("guided_regex", GrammarSpec::Regex(rx.to_string())));
    }
    if let Some(v) = f.get("guided_choice") {
        let options: Option<Vec<String>> = v
            .as_array()
            .map(|a| a.iter().map(|o| o.as_str().map(str::to_string)).collect())
            .unwrap_or(None);
        match options {
            Some(o) if !o.is_empty() => asked.push(("guided_choice", GrammarSpec::Choice(o))),
            _ => {
                return Err(ApiError::invalid(
                    "guided_choice",
                    "must be a non-empty list of strings",
                ))
            }
        }
    }
    let (param, spec) = match asked.as_slice() {
        [] => return Ok(None),
        [one] => one,
        [first, second, ..] => {
            return Err(ApiError::invalid(
                second.0,
                format!("`{}` and `{}` both constrain the output; send one", first.0, second.0),
            ))
        }
    };
    let grammars = ctx.grammars.map_err(|why| {
        ApiError::invalid_code(
            *param,
            "unsupported_parameter",
            format!("structured output is not available for this model: {why}"),
        )
    })?;
    grammars
        .compile(spec)
        .map(Some)
        .map_err(|e| ApiError::invalid(*param, format!("the output grammar does not compile: {e}")))
}

/// OpenAI's `response_format`: `{type: text}`, `{type: json_object}`, or
/// `{type: json_schema, json_schema: {name, schema, strict}}`.
fn response_format(v: &Value) -> Result<Option<GrammarSpec>, ApiError> {
    let kind_of = v.get("type").and_then(Value::as_str);
    match kind_of {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(GrammarSpec::JsonObject)),
        Some("json_schema") => match v.get("json_schema").and_then(|s| s.get("schema")) {
            Some(schema @ Value::Object(_)) => Ok(Some(GrammarSpec::JsonSchema(schema.clone()))),
            // OpenAI allows a json_schema without a schema: any JSON object then.
            None if v.get("json_schema").is_some_and(Value::is_object) => Ok(Some(GrammarSpec::JsonObject)),
            _ => Err(ApiError::invalid(
                "response_format.json_schema.schema",
                "must be a JSON schema object",
            )),
        },
        _ => Err(ApiError::invalid(
            "response_format.type",
            "must be `text`, `json_object` or `json_schema`",
        )),
    }
}

fn reject_unsupported(f: &Fields, endpoint: Endpoint) -> Result<(), ApiError> {
    let one = |v: &Value| v.as_i64() == Some(1);
    let never = |_: &Value| false;
    let is_false = |v: &Value| v == &Value::Bool(false);
    let zero = |v: &Value| v.as_f64() == Some(0.0);
    let empty_list = |v: &Value| v.as_array().is_some_and(|a| a.is_empty());
    f.unsupported("best_of", one)?;
    f.unsupported("echo", is_false)?;
    f.unsupported("suffix", |v| v.as_str() == Some(""))?;
    f.unsupported("logit_bias", |v| v.as_object().is_some_and(|o| o.is_empty()))?;
    // The deprecated form of tools; `tools` is read by crate::tools (chat only).
    f.unsupported("functions", empty_list)?;
    f.unsupported("function_call", |v| matches!(v.as_str(), Some("none" | "auto")))?;
    if endpoint == Endpoint::Completions {
        f.unsupported("tools", empty_list)?;
        f.unsupported("tool_choice", |v| matches!(v.as_str(), Some("none" | "auto")))?;
        f.unsupported("parallel_tool_calls", never)?;
        f.unsupported("chat_template_kwargs", never)?;
    }
    // response_format and guided_json/_regex/_choice are read by `grammar`.
    for guided in ["guided_grammar", "structured_outputs"] {
        f.unsupported(guided, never)?;
    }
    // vLLM's sampling extensions that would change the output.
    f.unsupported("min_p", zero)?;
    f.unsupported("repetition_penalty", |v| v.as_f64() == Some(1.0))?;
    f.unsupported("min_tokens", zero)?;
    f.unsupported("use_beam_search", is_false)?;
    f.unsupported("prompt_logprobs", never)?;
    f.unsupported("include_stop_str_in_output", is_false)?;
    if endpoint == Endpoint::Chat {
        f.unsupported("modalities", |v| v == &serde_json::json!(["text"]))?;
        f.unsupported("audio", never)?;
        f.unsupported("prediction", never)?;
    }
    Ok(())
}

fn max_tokens(f: &Fields, endpoint: Endpoint, context: i64) -> Result<Option<usize>, ApiError> {
    let check = |name: &str| -> Result<Option<usize>, ApiError> {
        match f.integer(name, 1, i64::MAX)? {
            Some(n) if n > context => Err(ApiError::invalid_code(
                name,
                "context_length_exceeded",
                format!("`{name}` is {n}, beyond the context length {context}"),
            )),
            n => Ok(n.map(|n| n as usize)),
        }
    };
    let primary = check("max_tokens")?;
    if endpoint == Endpoint::Chat {
        // The newer name wins when both are sent.
        if let Some(n) = check("max_completion_tokens")? {
            return Ok(Some(n));
        }
    }
    Ok(primary)
}

fn sampling(f: &Fields, endpoint: Endpoint, vocab: usize) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    let logprobs = match endpoint {
        Endpoint::Completions => f.integer("logprobs", 0, 20)?.map(|n| n as usize),
        // Chat: `logprobs: true` asks for them, `top_logprobs` for how many alternatives.
        Endpoint::Chat => {
            let wanted = f.bool("logprobs")?.unwrap_or(false);
            match f.integer("top_logprobs", 0, 20)? {
                Some(n) if n > 0 && !wanted => {
                    return Err(ApiError::invalid(
                        "top_logprobs",
                        "`top_logprobs` needs `logprobs: true`",
                    ))
                }
                top => wanted.then_some(top.unwrap_or(0) as usize),
            }
        }
    };
    let top_p = f.number("top_p", 0.0, 1.0)?.unwrap_or(1.0);
    if top_p == 0.0 {
        return Err(ApiError::invalid(
            "top_p",
            "`top_p` is 0; it must be greater than 0 and at most 1",
        ));
    }
    // -1 and 0 both mean "no top-k", as in vLLM.
    let top_k = f.integer("top_k", -1, vocab as i64)?.map_or(0, |k| k.max(0) as usize);
    Ok(SamplingParams {
        temperature: f.number("temperature", 0.0, 2.0)?.map_or(d.temperature, |t| t as f32),
        top_p: top_p as f32,
        top_k,
        presence_penalty: f.number("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32,
        frequency_penalty: f.number("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32,
        // Negative seeds are valid in OpenAI's API; keep their bits.
        seed: f.integer("seed", i64::MIN, i64::MAX)?.map(|s| s as u64),
        logprobs,
    })
}

fn stop_strings(f: &Fields) -> Result<Vec<String>, ApiError> {
    let list: Vec<&Value> = match f.get("stop") {
        None => return Ok(Vec::new()),
        Some(v @ Value::String(_)) => vec![v],
        Some(Value::Array(a)) if a.len() <= 4 => a.iter().collect(),
        Some(Value::Array(_)) => return Err(ApiError::invalid("stop", "`stop` may hold at most 4 sequences")),
        Some(other) => {
            return Err(ApiError::invalid(
                "stop",
                format!("`stop` must be a string or an array of strings, got {}", kind(other)),
            ))
        }
    };
    list.into_iter()
        .enumerate()
        .map(|(i, v)| match v.as_str() {
            Some("") => Err(ApiError::invalid(
                format!("stop[{i}]"),
                "stop sequences must not be empty",
            )),
            Some(s) => Ok(s.to_string()),
            None => Err(ApiError::invalid(
                format!("stop[{i}]"),
                format!("must be a string, got {}", kind(v)),
            )),
        })
        .collect()
}

/// A string, a one-string array, or token ids (flat or one nested list).
fn completion_prompt(ctx: &ValidationContext, f: &Fields) -> Result<Vec<u32>, ApiError> {
    let empty = || ApiError::invalid_code("prompt", "empty_prompt", "`prompt` is empty");
    let v = f
        .get("prompt")
        .ok_or_else(|| ApiError::invalid_code("prompt", "missing_field", "`prompt` is required"))?;
    let text = |s: &str| -> Result<Vec<u32>, ApiError> {
        if s.is_empty() {
            return Err(empty());
        }
        ctx.codec.encode_prompt(s).map_err(ApiError::Internal)
    };
    let ids = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .enumerate()
            .map(|(i, t)| {
                t.as_u64()
                    .filter(|&id| id < ctx.vocab_size as u64)
                    .map(|id| id as u32)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!("prompt[{i}]"),
                            format!("token ids must be integers in 0..{}", ctx.vocab_size),
                        )
                    })
            })
            .collect()
    };
    let tokens = match v {
        Value::String(s) => text(s)?,
        Value::Array(a) if a.is_empty() => return Err(empty()),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => text(a[0].as_str().unwrap_or_default())?,
        Value::Array(a) if a.len() == 1 && a[0].is_array() => {
            ids(a[0].as_array().map(Vec::as_slice).unwrap_or_default())?
        }
        Value::Array(a) if a.iter().all(Value::is_number) => ids(a)?,
        Value::Array(_) => {
            return Err(ApiError::invalid_code(
                "prompt",
                "unsupported_parameter",
                "one prompt per request: a string, or one list of token ids",
            ))
        }
        other => {
            return Err(ApiError::invalid(
                "prompt",
                format!("`prompt` must be a string or token ids, got {}", kind(other)),
            ))
        }
    };
    if tokens.is_empty() {
        return Err(empty());
    }
    Ok(tokens)
}

fn messages(f: &Fields) -> Result<Vec<ChatMessage>, ApiError> {
    let list = match f.get("messages") {
        None => {
            return Err(ApiError::invalid_code(
                "messages",
                "missing_field",
                "`messages` is required",
            ))
        }
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::invalid_code(
                "messages",
                "empty_prompt",
                "`messages` is empty",
            ))
        }
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(ApiError::invalid(
                "messages",
                format!("`messages` must be an array, got {}", kind(other)),
            ))
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        out.push(message(i, m)?);
    }
    if out.iter().all(|m| m.content.is_empty() && m.tool_calls.is_empty()) {
        return Err(ApiError::invalid_code(
            "messages",
            "empty_prompt",
            "every message's content is empty",
        ));
    }
    Ok(out)
}

fn message(i: usize, m: &Value) -> Result<ChatMessage, ApiError> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let role = match m.get("role").and_then(Value::as_str) {
        Some(r @ ("system" | "user" | "assistant" | "tool")) => r.to_string(),
        // OpenAI's newer name for system instructions; chat templates know only `system`,
        // so it renders as one (as vLLM does).
        Some("developer") => "system".to_string(),
        Some(r) => {
            return Err(ApiError::invalid(
                at("role"),
                format!("role `{r}` is not one of system, developer, user, assistant, tool"),
            ))
        }
        None => return Err(ApiError::invalid(at("role"), "each message needs a string `role`")),
    };
    let tool_calls = match m.get("tool_calls") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) if role == "assistant" => tool_calls(i, v)?,
        Some(_) => {
            return Err(ApiError::invalid(
                at("tool_calls"),
                "only assistant messages make tool calls",
            ))
        }
    };
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => text_parts(i, parts)?,
        // An assistant turn that only calls tools has no content.
        None | Some(Value::Null) if !tool_calls.is_empty() => String::new(),
        Some(other @ (Value::Bool(_) | Value::Number(_) | Value::Object(_))) => {
            return Err(ApiError::invalid(
                at("content"),
                format!("must be a string or text parts, got {}", kind(other)),
            ))
        }
        _ => return Err(ApiError::invalid(at("content"), "each message needs `content`")),
    };
    let (tool_call_id, name) = if role == "tool" {
        let id = m.get("tool_call_id").and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid(at("tool_call_id"), "a tool message needs the id of the call it answers")
        })?;
        let name = match m.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(ApiError::invalid(
                    at("name"),
                    format!("must be a string, got {}", kind(other)),
                ))
            }
        };
        (Some(id.to_string()), name)
    } else {
        (None, None)
    };
    Ok(ChatMessage {
        role,
        content,
        tool_calls,
        tool_call_id,
        name,
    })
}

fn text_parts(i: usize, parts: &[Value]) -> Result<String, ApiError> {
    let mut text = String::new();
    for (j, p) in parts.iter().enumerate() {
        match (
            p.get("type").and_then(Value::as_str),
            p.get("text").and_then(Value::as_str),
        ) {
            (Some("text"), Some(t)) => text.push_str(t),
            _ => {
                return Err(ApiError::invalid_code(
                    format!("messages[{i}].content[{j}]"),
                    "unsupported_parameter",
                    "only {\"type\": \"text\", \"text\": ...} parts are supported",
                ))
            }
        }
    }
    Ok(text)
}

/// An assistant turn's `tool_calls`: `[{id, type: function, function: {name, arguments}}]`,
/// `arguments` being JSON text of an object, as the API returned it.
fn tool_calls(i: usize, v: &Value) -> Result<Vec<ToolCall>, ApiError> {
    let list = v
        .as_array()
        .ok_or_else(|| ApiError::invalid(format!("messages[{i}].tool_calls"), "must be a list"))?;
    let mut calls = Vec::with_capacity(list.len());
    for (j, c) in list.iter().enumerate() {
        let at = |field: &str| format!("messages[{i}].tool_calls[{j}].{field}");
        let string = |field: &str, v: Option<&Value>| -> Result<String, ApiError> {
            v.and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| ApiError::invalid(at(field), "must be a string"))
        };
        if c.get("type").and_then(Value::as_str).is_some_and(|t| t != "function") {
            return Err(ApiError::invalid(at("type"), "must be `function`"));
        }
        let function = c.get("function");
        let arguments = string("function.arguments", function.and_then(|f| f.get("arguments")))?;
        if !serde_json::from_str::<Value>(&arguments).is_ok_and(|a| a.is_object()) {
            return Err(ApiError::invalid(
                at("function.arguments"),
                "must be JSON text of an object",
            ));
        }
        calls.push(ToolCall {
            id: string("id", c.get("id"))?,
            name: string("function.name", function.and_then(|f| f.get("name")))?,
            arguments,
        });
    }
    Ok(calls)
}
