//! Output grammars: OpenAI's `response_format` and vLLM's `guided_*`, decoded under an
//! llguidance mask, so even the tiny random model answers within them.

use crate::common::*;
use serde_json::{json, Value};

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": BASE, "temperature": 0, "max_tokens": 64,
        "messages": [{"role": "user", "content": "Is the sky green? Answer in JSON."}],
    });
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

fn content(reply: &Reply, choice: usize) -> String {
    assert_eq!(reply.status, 200, "{}", reply.text);
    let v = reply.json();
    assert_eq!(
        v["choices"][choice]["finish_reason"], "stop",
        "the grammar ended the answer: {v}"
    );
    v["choices"][choice]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no"]},
            "colour": {"enum": ["red", "green", "blue"]},
        },
        "required": ["answer", "colour"],
        "additionalProperties": false,
    })
}

fn assert_fits_schema(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
    let o = v.as_object().expect("an object");
    assert_eq!(o.len(), 2, "{v}");
    assert!(["yes", "no"].contains(&o["answer"].as_str().expect("answer")), "{v}");
    assert!(
        ["red", "green", "blue"].contains(&o["colour"].as_str().expect("colour")),
        "{v}"
    );
}

#[tokio::test]
async fn a_json_schema_response_format_gives_json_that_fits_the_schema_for_every_choice() {
    let s = server(&[]).await;
    let format = json!({"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema(), "strict": true}});
    let reply = post(&s.app, "/v1/chat/completions", chat(json!({"response_format": format}))).await;
    assert_fits_schema(&content(&reply, 0));
    // Two sampled choices, each with a matcher of its own.
    let two = chat(json!({"response_format": format, "n": 2, "temperature": 1.0, "seed": 4}));
    let reply = post(&s.app, "/v1/chat/completions", two).await;
    assert_fits_schema(&content(&reply, 0));
    assert_fits_schema(&content(&reply, 1));
}

#[tokio::test]
async fn a_streamed_answer_under_guided_json_is_the_same_json() {
    let s = server(&[]).await;
    let whole = content(
        &post(&s.app, "/v1/chat/completions", chat(json!({"guided_json": schema()}))).await,
        0,
    );
    assert_fits_schema(&whole);
    let reply = post(
        &s.app,
        "/v1/chat/completions",
        chat(json!({"guided_json": schema(), "stream": true})),
    )
    .await;
    let streamed: String = (reply.sse_data().iter())
        .filter(|d| d.as_str() != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).expect("chunk"))
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, whole);
}

#[tokio::test]
async fn guided_choice_answers_one_of_the_choices_and_guided_regex_matches_the_regex() {
    let s = server(&[]).await;
    let reply = post(
        &s.app,
        "/v1/chat/completions",
        chat(json!({"guided_choice": ["maybe (later)", "never"]})),
    )
    .await;
    let answer = content(&reply, 0);
    assert!(["maybe (later)", "never"].contains(&answer.as_str()), "{answer:?}");
    let reply = post(
        &s.app,
        "/v1/chat/completions",
        chat(json!({"guided_regex": "[0-9]{3}-[a-z]{2}"})),
    )
    .await;
    let answer = content(&reply, 0);
    let b = answer.as_bytes();
    assert!(
        b.len() == 6
            && b[..3].iter().all(u8::is_ascii_digit)
            && b[3] == b'-'
            && b[4..].iter().all(u8::is_ascii_lowercase),
        "{answer:?}"
    );
    // Completions take them too.
    let body = json!({"model": BASE, "prompt": "Pick:", "max_tokens": 16, "temperature": 0, "guided_choice": ["left", "right"]});
    let v = post(&s.app, "/v1/completions", body).await.json();
    assert!(
        ["left", "right"].contains(&v["choices"][0]["text"].as_str().expect("text")),
        "{v}"
    );
}

#[tokio::test]
async fn a_json_object_response_format_gives_an_object_when_it_ends() {
    let s = server(&[]).await;
    let body = chat(json!({"response_format": {"type": "json_object"}, "max_tokens": 200}));
    let v = post(&s.app, "/v1/chat/completions", body).await.json();
    let text = v["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(text.starts_with('{'), "{text:?}");
    if v["choices"][0]["finish_reason"] == "stop" {
        let parsed: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(parsed.is_object(), "{parsed}");
    }
}

#[tokio::test]
async fn bad_or_conflicting_grammars_get_a_400_naming_the_field() {
    let s = server(&[]).await;
    let cases = [
        (json!({"response_format": {"type": "xml"}}), "response_format.type"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}}),
            "response_format.json_schema.schema",
        ),
        (json!({"guided_json": {"type": 5}}), "guided_json"),
        (json!({"guided_json": "{not json"}), "guided_json"),
        (json!({"guided_regex": "([a-z"}), "guided_regex"),
        (json!({"guided_choice": []}), "guided_choice"),
        (json!({"guided_choice": ["a", 1]}), "guided_choice"),
        (
            json!({"response_format": {"type": "json_object"}, "guided_regex": "a+"}),
            "guided_regex",
        ),
    ];
    for (extra, param) in cases {
        let reply = post(&s.app, "/v1/chat/completions", chat(extra.clone())).await;
        assert_eq!(reply.status, 400, "{extra}: {}", reply.text);
        assert_eq!(reply.json()["error"]["param"], param, "{extra}: {}", reply.text);
    }
}
