//! Bad requests get a 400 naming the field; no body, however mangled, crashes the server.

use crate::common::*;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

const CONTEXT: &str = "48";

#[tokio::test]
async fn each_bad_request_gets_a_400_naming_the_field() {
    let f = fixture();
    let s = server(&["--max-context", CONTEXT, "--adapter", &adapter_flag("a", &f.adapter_a)]).await;
    let long = "the cat sat on the mat and ".repeat(20);
    let ok = |extra: Value| {
        let mut v = json!({"model": BASE, "prompt": "hello"});
        for (k, x) in extra.as_object().expect("object") {
            v[k] = x.clone();
        }
        v.to_string()
    };
    let chat = |messages: Value| json!({"model": BASE, "messages": messages}).to_string();
    // (route, body, param, code)
    let table: Vec<(&str, String, Value, &str)> = vec![
        ("completions", "{not json".into(), Value::Null, "invalid_json"),
        ("completions", "[1, 2]".into(), Value::Null, "invalid_json"),
        ("completions", "{}".into(), json!("model"), "missing_field"),
        (
            "completions",
            json!({"model": 5, "prompt": "hi"}).to_string(),
            json!("model"),
            "invalid_value",
        ),
        (
            "completions",
            json!({"model": BASE}).to_string(),
            json!("prompt"),
            "missing_field",
        ),
        (
            "completions",
            ok(json!({"prompt": ""})),
            json!("prompt"),
            "empty_prompt",
        ),
        (
            "completions",
            ok(json!({"prompt": []})),
            json!("prompt"),
            "empty_prompt",
        ),
        (
            "completions",
            ok(json!({"prompt": ["a", "b"]})),
            json!("prompt"),
            "unsupported_parameter",
        ),
        (
            "completions",
            ok(json!({"prompt": [1, 99999]})),
            json!("prompt[1]"),
            "invalid_value",
        ),
        (
            "completions",
            ok(json!({"prompt": long})),
            json!("prompt"),
            "context_length_exceeded",
        ),
        (
            "completions",
            ok(json!({"max_tokens": 100000})),
            json!("max_tokens"),
            "context_length_exceeded",
        ),
        (
            "completions",
            ok(json!({"max_tokens": 47})),
            json!("max_tokens"),
            "context_length_exceeded",
        ),
        (
            "completions",
            ok(json!({"max_tokens": 0})),
            json!("max_tokens"),
            "invalid_value",
        ),
        (
            "completions",
            ok(json!({"ignore_eos": "yes"})),
            json!("ignore_eos"),
            "invalid_value",
        ),
        (
            "completions",
            ok(json!({"max_tokens": 2.5})),
            json!("max_tokens"),
            "invalid_value",
        ),
        (
            "completions",
            ok(json!({"temperature": -0.1})),
            json!("temperature"),
            "invalid_value",
        ),
        (
            "completions",
            ok(json!({"temperature": 2.5})),
            json!("temperature"),
            "invalid_value",
        ),
        (
            "completions",
            ok(json!({"temperature": "hot"})),
            json!("temperature"),
            "invalid_value",
        ),
        ("completions", ok(json!({"top_p": 0})), json!("top_p"), "invalid_value"),
        (
            "completions",
            ok(json!({"top_p": 1.5})),
            json!("top_p"),
            "invalid_value",
        ),
        ("completions", ok(json!({"top_k": -2})), json!("top_k"), "invalid_value"),
        (
            "completions",
            ok(json!({"presence_penalty": 2.5})),
            json!("presence_penalty"),
            "invalid_value",
        ),
        (
            "completions",
            ok(json!({"frequency_penalty": -3})),
            json!("frequency_penalty"),
            "invalid_value",
        ),
        (
            "completions",
            ok(json!({"logprobs": 21})),
            json!("logprobs"),
            "invalid_value",
        ),
        ("completions", ok(json!({"seed": "x"})), json!("seed"), "invalid_value"),
        (
            "completions",
            ok(json!({"stop": ["a", "b", "c", "d", "e"]})),
            json!("stop"),
            "invalid_value",
        ),
        (
            "completions",
            ok(json!({"stop": [""]})),
            json!("stop[0]"),
            "invalid_value",
        ),
        ("completions", ok(json!({"stop": 3})), json!("stop"), "invalid_value"),
        ("completions", ok(json!({"n": 17})), json!("n"), "invalid_value"),
        ("completions", ok(json!({"n": 0})), json!("n"), "invalid_value"),
        (
            "completions",
            ok(json!({"stream": "yes"})),
            json!("stream"),
            "invalid_value",
        ),
        (
            "completions",
            ok(json!({"stream_options": {"include_usage": true}})),
            json!("stream_options"),
            "invalid_value",
        ),
        (
            "chat/completions",
            json!({"model": BASE}).to_string(),
            json!("messages"),
            "missing_field",
        ),
        ("chat/completions", chat(json!([])), json!("messages"), "empty_prompt"),
        (
            "chat/completions",
            chat(json!([{"role": "user", "content": ""}])),
            json!("messages"),
            "empty_prompt",
        ),
        (
            "chat/completions",
            chat(json!([{"role": "robot", "content": "hi"}])),
            json!("messages[0].role"),
            "invalid_value",
        ),
        (
            "chat/completions",
            chat(json!([{"role": "user", "content": 5}])),
            json!("messages[0].content"),
            "invalid_value",
        ),
        (
            "chat/completions",
            chat(json!([{"role": "user", "content": [{"type": "image_url"}]}])),
            json!("messages[0].content[0]"),
            "unsupported_parameter",
        ),
        (
            "chat/completions",
            json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}).to_string(),
            json!("top_logprobs"),
            "invalid_value",
        ),
        (
            "chat/completions",
            json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21})
                .to_string(),
            json!("top_logprobs"),
            "invalid_value",
        ),
        (
            "chat/completions",
            json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "logprobs": 1}).to_string(),
            json!("logprobs"),
            "invalid_value",
        ),
        (
            "chat/completions",
            json!({"model": BASE, "messages": [{"role": "user", "content": long}]}).to_string(),
            json!("messages"),
            "context_length_exceeded",
        ),
    ];
    for (route, body, param, code) in table {
        let reply = send(&s.app, "POST", &format!("/v1/{route}"), Some(body.clone())).await;
        assert_eq!(reply.status, 400, "{route} {body}: {}", reply.text);
        let err = &reply.json()["error"];
        assert_eq!(err["param"], param, "{route} {body}: {err}");
        assert_eq!(err["code"], json!(code), "{route} {body}: {err}");
        assert_eq!(err["type"], "invalid_request_error");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

fn random_value(rng: &mut ChaCha8Rng, depth: u32) -> Value {
    match rng.random_range(0..if depth > 2 { 7 } else { 9 }) {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random_range(-3i64..70)),
        3 => json!(*[i64::MIN, i64::MAX, -1, 0, 1, 1 << 40].choose(rng).expect("non-empty")),
        4 => json!(*[0.0, -0.5, 0.5, 1.0, 1.5, 2.0, 1e300, -1e300, 3.7]
            .choose(rng)
            .expect("non-empty")),
        5 => json!(*[
            "",
            "hi",
            "tiny",
            "a",
            "a@1",
            "a@latest",
            "a@sha256:00",
            "\u{0}",
            "é漢字🙂",
            "system",
            "user"
        ]
        .choose(rng)
        .expect("non-empty")),
        6 => json!("x".repeat(rng.random_range(0..300))),
        7 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let keys = ["role", "content", "type", "text", "include_usage"];
            Value::Object(
                (0..rng.random_range(0..3))
                    .map(|_| (keys.choose(rng).expect("k").to_string(), random_value(rng, depth + 1)))
                    .collect(),
            )
        }
    }
}

const FIELDS: [&str; 20] = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "n",
    "echo",
    "logit_bias",
    "response_format",
    "user",
];

fn mutate(rng: &mut ChaCha8Rng, base: &Value) -> String {
    let mut v = base.clone();
    for _ in 0..rng.random_range(1..4) {
        let key = *FIELDS.choose(rng).expect("non-empty");
        if rng.random_bool(0.2) {
            v.as_object_mut().expect("object").remove(key);
        } else {
            v[key] = random_value(rng, 0);
        }
    }
    let mut bytes = v.to_string().into_bytes();
    // Sometimes damage the JSON text itself.
    if rng.random_bool(0.25) && !bytes.is_empty() {
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..bytes.len());
            match rng.random_range(0..3) {
                0 => bytes[i] = rng.random(),
                1 => bytes.truncate(i),
                _ => bytes.insert(i, *b"{}[]\",:\\0".choose(rng).expect("non-empty")),
            }
            if bytes.is_empty() {
                break;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn fuzzed_bodies_get_json_answers_and_never_crash() {
    let f = fixture();
    let s = server(&[
        "--max-context",
        CONTEXT,
        "--max-queue",
        "512",
        "--adapter",
        &adapter_flag("a", &f.adapter_a),
    ])
    .await;
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let seeds = [
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hello", "max_tokens": 4}),
        ),
        (
            "/v1/completions",
            json!({"model": "a", "prompt": [1, 2, 3], "max_tokens": 3, "logprobs": 2, "stop": ["x"]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
        ),
    ];
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..600 {
        let (path, base) = seeds.choose(&mut rng).expect("non-empty");
        let body = mutate(&mut rng, base);
        let reply = send(&s.app, "POST", path, Some(body.clone())).await;
        *statuses.entry(reply.status.as_u16()).or_insert(0) += 1;
        assert!(
            reply.status == 200 || reply.status == 400 || reply.status == 404,
            "#{i} {path} {body:?}: {} {}",
            reply.status,
            reply.text
        );
        if reply
            .headers
            .get("content-type")
            .is_some_and(|c| c.to_str().unwrap_or_default().starts_with("text/event-stream"))
        {
            assert_eq!(
                reply.sse_data().last().map(String::as_str),
                Some("[DONE]"),
                "#{i} {body:?}"
            );
            continue;
        }
        let v = reply.json();
        if reply.status != 200 {
            assert!(
                v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
                "#{i} {body:?}: {v}"
            );
        } else {
            assert!(v["usage"]["total_tokens"].is_u64(), "#{i} {body:?}: {v}");
        }
    }
    // The generator must exercise both outcomes to mean anything.
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 20 && statuses.get(&400).copied().unwrap_or(0) > 100,
        "{statuses:?}"
    );
    let health = send(&s.app, "GET", "/health", None).await;
    assert_eq!(health.status, 200);
}
