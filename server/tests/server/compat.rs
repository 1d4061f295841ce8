//! What the official `openai` Python client relies on beyond generating text: status codes
//! and error shapes, the model objects, request ids, and where streamed usage comes.

use crate::common::*;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// Asserts OpenAI's error object: `{"error": {message, type, param, code}}`.
fn assert_error(reply: &Reply, status: u16, code: &str) -> Value {
    assert_eq!(reply.status, status, "{}", reply.text);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("application/json"),
        "{:?}",
        reply.headers
    );
    let err = reply.json()["error"].clone();
    assert_eq!(err["code"], code, "{err}");
    assert!(err["type"].is_string() && err.get("param").is_some(), "{err}");
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{err}");
    err
}

#[tokio::test]
async fn unknown_models_and_routes_get_404_in_openai_error_shape() {
    let f = fixture();
    let s = server(&["--adapter", &adapter_flag("a", &f.adapter_a)]).await;
    let chat = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    for (path, body) in [
        ("/v1/completions", json!({"model": "no-such-model", "prompt": "hi"})),
        ("/v1/completions", json!({"model": "a@7", "prompt": "hi"})),
        ("/v1/chat/completions", chat("no-such-model")),
    ] {
        let err = assert_error(&post(&s.app, path, body.clone()).await, 404, "model_not_found");
        assert_eq!(err["param"], "model", "{body}");
        assert_eq!(err["type"], "invalid_request_error");
        let message = err["message"].as_str().expect("message");
        assert!(
            !message.contains(&f.adapter_a.display().to_string()),
            "no storage location in client errors: {message}"
        );
    }
    let err = assert_error(&send(&s.app, "GET", "/v1/no/such/route", None).await, 404, "not_found");
    assert!(err["message"].as_str().expect("message").contains("/v1/no/such/route"));
    assert_error(
        &send(&s.app, "GET", "/v1/completions", None).await,
        405,
        "method_not_allowed",
    );
    // Counted under a fixed label, not under whatever the client sent as `model`.
    let metrics = send(&s.app, "GET", "/metrics", None).await.text;
    assert!(
        metrics.contains(r#"kubetune_server_requests_total{model="unknown",status="404"} 3"#),
        "{metrics}"
    );
    assert!(!metrics.contains("no-such-model"));
}

#[tokio::test]
async fn an_oversized_body_gets_413_in_openai_error_shape() {
    let s = server(&[]).await;
    let limit = kubetune_server::api::fields::MAX_BODY_BYTES;
    let huge = json!({"model": BASE, "prompt": "x".repeat(limit)}).to_string();
    for path in ["/v1/completions", "/v1/chat/completions", "/v1/adapters"] {
        let reply = send_with(&s.app, "POST", path, Some(huge.clone()), Some(ADMIN_KEY)).await;
        assert_error(&reply, 413, "request_too_large");
    }
    let metrics = send(&s.app, "GET", "/metrics", None).await.text;
    assert!(
        metrics.contains(r#"kubetune_server_requests_total{model="unknown",status="413"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn models_list_and_retrieve_in_openai_shape_without_storage_locations() {
    let f = fixture();
    let s = server(&["--adapter", &adapter_flag("a", &f.adapter_a)]).await;
    let location = f.adapter_a.display().to_string();
    let list = send(&s.app, "GET", "/v1/models", None).await;
    assert_eq!(list.status, 200);
    assert!(!list.text.contains(&location), "{}", list.text);
    let list = list.json();
    assert_eq!(list["object"], "list");
    let data = list["data"].as_array().expect("data");
    assert_eq!(
        data.iter().map(|m| m["id"].clone()).collect::<Vec<_>>(),
        vec![json!(BASE), json!("a")]
    );
    for m in data {
        assert_eq!(m["object"], "model", "{m}");
        assert!(m["created"].as_u64().is_some_and(|c| c > 1_600_000_000), "{m}");
        assert_eq!(m["owned_by"], "kubetune", "{m}");
        let id = m["id"].as_str().expect("id");
        let one = send(&s.app, "GET", &format!("/v1/models/{id}"), None).await;
        assert_eq!(one.status, 200, "{}", one.text);
        assert_eq!(one.json(), *m, "retrieve returns the listed entry");
    }
    assert_eq!(data[1]["version"], 1, "the version its manifest verified");
    let err = assert_error(
        &send(&s.app, "GET", "/v1/models/no-such-model", None).await,
        404,
        "model_not_found",
    );
    assert_eq!(err["param"], "model");
    // A Hugging Face style id holds a slash; the openai client puts it in the path as is.
    let model = f.model.display().to_string();
    let args = <kubetune_server::server::Args as clap::Parser>::try_parse_from([
        "kubetune-server",
        "--model",
        &model,
        "--served-model-name",
        "org/tiny-chat",
    ])
    .expect("flags");
    let slashed = kubetune_server::api::router(kubetune_server::server::build(&args).await.expect("server builds"));
    let one = send(&slashed, "GET", "/v1/models/org/tiny-chat", None).await;
    assert_eq!(one.status, 200, "{}", one.text);
    assert_eq!(one.json()["id"], "org/tiny-chat");
    // The admin listing still says where each adapter came from.
    let admin = admin_send(&s.app, "GET", "/v1/adapters", None).await.json();
    assert_eq!(admin["data"][1]["source"], json!(location));
}

/// A request with optional `X-Request-Id`; returns the answer and its `X-Request-Id`.
async fn with_request_id(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Value,
    id: Option<&[u8]>,
) -> (Reply, String) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(id) = id {
        req = req.header("x-request-id", id);
    }
    let req = req.body(Body::from(body.to_string())).expect("request");
    let response = app.clone().oneshot(req).await.expect("router never fails");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    let id = headers
        .get("x-request-id")
        .unwrap_or_else(|| panic!("{method} {path} ({status}) has no X-Request-Id"))
        .to_str()
        .expect("visible ASCII")
        .to_string();
    let reply = Reply {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    };
    (reply, id)
}

/// Every log line of this test binary, through a global subscriber installed once. A
/// thread-local one (`set_default`) missed lines when other tests' threads registered the same
/// callsites first: tracing caches a callsite's interest process-wide.
fn captured_logs() -> String {
    static LINES: std::sync::OnceLock<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    let lines = LINES.get_or_init(|| {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || SharedWriter(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber of these tests");
        lines
    });
    String::from_utf8_lossy(&lines.lock().expect("logs")).into_owned()
}

struct SharedWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn each_request_logs_its_end_in_a_span_with_its_id_model_prompt_size_queue_and_total_time() {
    let s = server(&[]).await;
    captured_logs();
    for (id, stream) in [("span-test-whole", false), ("span-test-streamed", true)] {
        let body = json!({"model": BASE, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": true, "stream": stream});
        let (reply, _) = with_request_id(&s.app, "POST", "/v1/completions", body, Some(id.as_bytes())).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let text = captured_logs();
        let line = (text.lines())
            .find(|l| l.contains(&format!("id={id}")) && l.contains("request finished"))
            .unwrap_or_else(|| panic!("no end line for {id} in:\n{text}"));
        for field in [
            "endpoint=completions",
            &format!("model={BASE}"),
            "prompt_tokens=3",
            "completion_tokens=4",
            "queue_s=",
            "total_s=",
        ] {
            assert!(line.contains(field), "{field} missing from {line}");
        }
    }
}

#[tokio::test]
async fn every_response_carries_a_request_id_the_callers_when_it_is_sane() {
    let s = server(&[]).await;
    let gen = json!({"model": BASE, "prompt": "hi", "max_tokens": 2});
    let stream = json!({"model": BASE, "prompt": "hi", "max_tokens": 2, "stream": true});
    let cases = [
        ("POST", "/v1/completions", gen.clone(), 200),
        ("POST", "/v1/completions", stream, 200),
        ("POST", "/v1/completions", json!({"model": BASE}), 400),
        ("POST", "/v1/completions", json!({"model": "nope", "prompt": "hi"}), 404),
        ("GET", "/v1/nowhere", Value::Null, 404),
        ("GET", "/v1/models", Value::Null, 200),
        ("GET", "/health", Value::Null, 200),
        ("GET", "/metrics", Value::Null, 200),
    ];
    for (method, path, body, status) in cases {
        let (reply, id) = with_request_id(&s.app, method, path, body.clone(), Some(b"trace-7f3a:01")).await;
        assert_eq!(reply.status, status, "{method} {path} {body}: {}", reply.text);
        assert_eq!(id, "trace-7f3a:01", "{method} {path}: the caller's id is echoed");
    }
    let (_, first) = with_request_id(&s.app, "POST", "/v1/completions", gen.clone(), None).await;
    let (_, second) = with_request_id(&s.app, "POST", "/v1/completions", gen.clone(), None).await;
    assert_ne!(first, second, "generated ids are unique");
    let too_long = [b'a'; 129];
    for bad in [&too_long[..], b"has space", b"tab\tin", b"\xff\xfe"] {
        let (reply, id) = with_request_id(&s.app, "POST", "/v1/completions", gen.clone(), Some(bad)).await;
        assert_eq!(reply.status, 200, "a bad id does not fail the request");
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{bad:?} replaced by a generated id, got {id}"
        );
    }
}

#[tokio::test]
async fn include_usage_sends_usage_in_a_final_chunk_without_choices() {
    let s = server(&[]).await;
    let bodies = [
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "max_tokens": 6, "temperature": 0}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}),
        ),
    ];
    for (path, body) in bodies {
        let whole = post(&s.app, path, body.clone()).await.json();
        for include in [true, false] {
            let mut streamed = body.clone();
            streamed["stream"] = json!(true);
            streamed["stream_options"] = json!({"include_usage": include});
            let reply = post(&s.app, path, streamed).await;
            assert_eq!(reply.status, 200, "{}", reply.text);
            let data = reply.sse_data();
            assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
            let chunks: Vec<Value> = data[..data.len() - 1]
                .iter()
                .map(|d| serde_json::from_str(d).expect("JSON chunk"))
                .collect();
            let (last, rest) = chunks.split_last().expect("chunks");
            if include {
                assert_eq!(last["choices"], json!([]), "{path}: {last}");
                assert_eq!(last["usage"], whole["usage"], "{path}");
                assert_eq!(last["id"], rest[0]["id"], "{path}: same completion id");
                for c in rest {
                    assert!(c.get("usage").is_some_and(Value::is_null), "{path}: {c}");
                    assert_eq!(c["choices"].as_array().map(Vec::len), Some(1), "{path}: {c}");
                }
            } else {
                for c in &chunks {
                    assert!(c.get("usage").is_none(), "{path}: no usage unless asked: {c}");
                    assert_eq!(c["choices"].as_array().map(Vec::len), Some(1), "{path}: {c}");
                }
            }
        }
    }
}

#[tokio::test]
async fn completion_text_offsets_count_characters_not_bytes_streamed_or_not() {
    let s = server(&[]).await;
    // Seeded sampling from the tiny model's byte-level vocabulary: non-ASCII tokens come up.
    // Offsets index the tokens' texts joined; one that is part of a character lists as U+FFFD.
    let body = json!({"model": BASE, "prompt": "hi", "max_tokens": 32, "temperature": 1.0, "seed": 11, "logprobs": 1});
    let whole = post(&s.app, "/v1/completions", body.clone()).await.json();
    let logprobs = &whole["choices"][0]["logprobs"];
    let tokens: Vec<&str> = (logprobs["tokens"].as_array().expect("tokens").iter())
        .map(|t| t.as_str().expect("token text"))
        .collect();
    assert!(
        tokens.iter().any(|t| !t.is_ascii()),
        "a non-ASCII token is needed for this test to prove anything: {tokens:?}"
    );
    let mut want = Vec::new();
    let mut offset = 0;
    for t in &tokens {
        want.push(json!(offset));
        offset += t.chars().count();
    }
    assert_eq!(logprobs["text_offset"], json!(want));
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let reply = post(&s.app, "/v1/completions", streamed).await;
    let offsets: Vec<Value> = (reply.sse_data().iter())
        .filter(|d| d.as_str() != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).expect("JSON chunk"))
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["text_offset"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        json!(offsets),
        logprobs["text_offset"],
        "streamed offsets are the whole response's"
    );
}

#[tokio::test]
async fn developer_messages_render_as_system_messages() {
    let s = server(&[]).await;
    let chat = |role: &str| {
        json!({"model": BASE, "temperature": 0, "max_tokens": 8, "messages": [
            {"role": role, "content": "Answer in one word."},
            {"role": "user", "content": "Hello there"},
        ]})
    };
    let developer = post(&s.app, "/v1/chat/completions", chat("developer")).await;
    assert_eq!(developer.status, 200, "{}", developer.text);
    let system = post(&s.app, "/v1/chat/completions", chat("system")).await.json();
    let user = post(&s.app, "/v1/chat/completions", chat("user")).await.json();
    let developer = developer.json();
    assert_eq!(developer["usage"], system["usage"]);
    assert_eq!(developer["choices"][0]["message"], system["choices"][0]["message"]);
    assert_ne!(
        developer["choices"][0]["message"], user["choices"][0]["message"],
        "the role must change the output, or this test proves nothing"
    );
}

#[tokio::test]
async fn chat_logprobs_list_each_token_with_bytes_and_alternatives_streamed_or_not() {
    let s = server(&[]).await;
    let body = json!({
        "model": BASE, "temperature": 0, "max_tokens": 12, "logprobs": true, "top_logprobs": 3,
        "messages": [{"role": "user", "content": "Tell me about cafés"}],
    });
    let whole = post(&s.app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(whole.status, 200, "{}", whole.text);
    let whole = whole.json();
    let choice = &whole["choices"][0];
    let content = choice["logprobs"]["content"].as_array().expect("logprobs.content");
    assert_eq!(
        content.len() as u64,
        whole["usage"]["completion_tokens"].as_u64().expect("usage")
    );
    let mut bytes = Vec::new();
    for t in content {
        assert!(t["token"].is_string(), "{t}");
        let chosen = t["logprob"].as_f64().expect("logprob");
        assert!(chosen <= 0.0, "{t}");
        bytes.extend(
            t["bytes"]
                .as_array()
                .expect("bytes")
                .iter()
                .map(|b| b.as_u64().expect("byte") as u8),
        );
        let top = t["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 3, "{t}");
        let lps: Vec<f64> = top.iter().map(|a| a["logprob"].as_f64().expect("logprob")).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "most likely first: {t}");
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], t["token"], "{t}");
        assert!((lps[0] - chosen).abs() < 1e-5, "{t}");
        assert!(top.iter().all(|a| a["bytes"].is_array()), "{t}");
    }
    // Lossy: the tiny model's random tokens need not form whole characters, and the text
    // shows a broken one as U+FFFD, as decoding the bytes lossily does.
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        choice["message"]["content"].as_str().expect("content"),
        "the tokens' bytes spell the message"
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let reply = post(&s.app, "/v1/chat/completions", streamed).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let data = reply.sse_data();
    let streamed_content: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).expect("JSON chunk"))
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .cloned()
                .expect("every chunk carries logprobs")
        })
        .collect();
    assert_eq!(streamed_content, *content, "streamed logprobs are the same tokens");

    // No alternatives asked: the chosen tokens only; no logprobs asked: null.
    let mut bare = body.clone();
    bare["top_logprobs"] = json!(0);
    let bare = post(&s.app, "/v1/chat/completions", bare).await.json();
    let first = &bare["choices"][0]["logprobs"]["content"][0];
    assert_eq!(first["top_logprobs"], json!([]), "{first}");
    assert_eq!(first["token"], content[0]["token"]);
    let mut none = body;
    none.as_object_mut().expect("object").remove("top_logprobs");
    none["logprobs"] = json!(false);
    let none = post(&s.app, "/v1/chat/completions", none).await.json();
    assert!(none["choices"][0]["logprobs"].is_null(), "{none}");
}

#[tokio::test]
async fn unimplemented_output_controls_get_a_400_naming_them_instead_of_being_ignored() {
    let s = server(&[]).await;
    let chat = |field: &str, value: Value| {
        let mut v = json!({"model": BASE, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
        v[field] = value;
        v
    };
    // response_format and guided_json/_regex/_choice work: see structured.rs; tools and
    // tool_choice work on chat: see tools.rs.
    let refused = [
        ("guided_grammar", json!("root ::= \"a\"")),
        ("structured_outputs", json!({"json": {"type": "object"}})),
        ("functions", json!([{"name": "f"}])),
        ("function_call", json!({"name": "f"})),
        ("repetition_penalty", json!(1.2)),
        ("min_p", json!(0.1)),
    ];
    for (field, value) in refused {
        for path in ["/v1/chat/completions", "/v1/completions"] {
            let mut body = chat(field, value.clone());
            if path == "/v1/completions" {
                let o = body.as_object_mut().expect("object");
                o.remove("messages");
                o.insert("prompt".into(), json!("hi"));
            }
            let err = assert_error(&post(&s.app, path, body).await, 400, "unsupported_parameter");
            assert_eq!(err["param"], field, "{path} {field}: {err}");
            assert!(
                err["message"]
                    .as_str()
                    .expect("message")
                    .contains(&format!("`{field}`")),
                "{err}"
            );
        }
    }
    // What asks for the default is accepted.
    for (field, value) in [
        ("response_format", json!({"type": "text"})),
        ("tools", json!([])),
        ("tool_choice", json!("none")),
        ("tool_choice", json!("auto")),
        ("n", json!(1)),
        ("guided_json", Value::Null),
    ] {
        let reply = post(&s.app, "/v1/chat/completions", chat(field, value.clone())).await;
        assert_eq!(reply.status, 200, "{field}={value}: {}", reply.text);
    }
}

#[tokio::test]
async fn n_choices_are_generated_each_with_its_index_streamed_or_not() {
    let s = server(&["--max-batch", "2"]).await;
    let requests = [
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "Once upon", "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 3}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 3, "logprobs": true}),
        ),
    ];
    for (path, body) in requests {
        let chat = path.contains("chat");
        let whole = post(&s.app, path, body.clone()).await;
        assert_eq!(whole.status, 200, "{}", whole.text);
        let whole = whole.json();
        let choices = whole["choices"].as_array().expect("choices");
        assert_eq!(choices.len(), 3, "{whole}");
        let texts: Vec<String> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                assert_eq!(c["index"], i, "{c}");
                let t = if chat { &c["message"]["content"] } else { &c["text"] };
                t.as_str().expect("text").to_string()
            })
            .collect();
        assert!(
            texts[0] != texts[1] || texts[1] != texts[2],
            "sampled choices differ: {texts:?}"
        );
        // One prompt, counted once; every choice's tokens counted.
        let usage = &whole["usage"];
        assert_eq!(
            usage["prompt_tokens"],
            post(&s.app, path, {
                let mut one = body.clone();
                one["n"] = json!(1);
                one
            })
            .await
            .json()["usage"]["prompt_tokens"]
        );
        if chat {
            let logprob_tokens: usize = choices
                .iter()
                .map(|c| c["logprobs"]["content"].as_array().expect("logprobs").len())
                .sum();
            assert_eq!(usage["completion_tokens"], logprob_tokens, "{whole}");
        }

        // Streamed, with the same seed: the same text per index, and usage for all.
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let reply = post(&s.app, path, streamed).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let data = reply.sse_data();
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let mut got = vec![String::new(); 3];
        let mut finished = [false; 3];
        let mut final_usage = Value::Null;
        for d in &data[..data.len() - 1] {
            let v: Value = serde_json::from_str(d).expect("JSON chunk");
            let Some(c) = v["choices"].as_array().and_then(|c| c.first()) else {
                final_usage = v["usage"].clone();
                continue;
            };
            let i = c["index"].as_u64().expect("index") as usize;
            let piece = if chat { &c["delta"]["content"] } else { &c["text"] };
            got[i].push_str(piece.as_str().unwrap_or_default());
            finished[i] |= !c["finish_reason"].is_null();
        }
        assert_eq!(got, texts, "{path}");
        assert_eq!(finished, [true; 3], "{path}");
        assert_eq!(final_usage, *usage, "{path}");
    }
    wait_until("every sequence released", || s.state.engine.in_flight() == 0).await;

    // Metrics: one request, three finished sequences.
    let count = |text: &str, series: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = send(&s.app, "GET", "/metrics", None).await.text;
    let body = json!({"model": BASE, "prompt": "hi", "max_tokens": 3, "n": 3});
    assert_eq!(post(&s.app, "/v1/completions", body).await.status, 200);
    let after = send(&s.app, "GET", "/metrics", None).await.text;
    let delta = |series: &str| count(&after, series) - count(&before, series);
    assert_eq!(
        delta(r#"kubetune_server_request_duration_seconds_count{model="tiny"}"#),
        1.0
    );
    assert_eq!(delta("vllm:e2e_request_latency_seconds_count"), 1.0);
    assert_eq!(delta("vllm:request_success_total"), 3.0);
}

#[tokio::test]
async fn the_base_answers_to_its_storage_uri_and_aliases_under_its_served_name() {
    let f = fixture();
    let s = server(&["--base-model-alias", "s3://models/tiny"]).await;
    let model = f.model.display().to_string();
    for name in [BASE, model.as_str(), "s3://models/tiny"] {
        let reply = post(
            &s.app,
            "/v1/completions",
            json!({"model": name, "prompt": "hello", "max_tokens": 2, "temperature": 0}),
        )
        .await;
        assert_eq!(reply.status, 200, "model {name}: {}", reply.text);
        assert_eq!(reply.json()["model"], BASE, "answers name the served model");
    }
    let unknown = post(
        &s.app,
        "/v1/completions",
        json!({"model": "s3://models/other", "prompt": "x"}),
    )
    .await;
    assert_eq!(unknown.status, 404, "{}", unknown.text);
}
