//! Tool calling on the tiny model with a Hermes-format chat template: `required` and named
//! functions are held to a grammar, so even a random model answers with a valid call; `auto`
//! reads the calls the model writes (forced here with a guided regex, since the random model
//! would never write one by itself).

use crate::common::*;
use serde_json::{json, Value};

const TEMPLATE: &str = include_str!("../fixtures/chat_template_hermes.jinja");

async fn tool_server() -> (tempfile::TempDir, TestServer) {
    let model = model_with_template(TEMPLATE);
    let s = server_for_model(model.path(), &[]).await;
    (model, s)
}

fn weather_tool() -> Value {
    json!({
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
                "required": ["city", "unit"],
                "additionalProperties": false,
            },
        },
    })
}

fn time_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_time"}})
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": BASE, "temperature": 0, "max_tokens": 160,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [weather_tool(), time_tool()],
    });
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

fn assert_weather_arguments(arguments: &str) {
    let v: Value = serde_json::from_str(arguments).unwrap_or_else(|e| panic!("{arguments:?}: {e}"));
    assert!(["Paris", "Oslo"].contains(&v["city"].as_str().expect("city")), "{v}");
    assert!(["C", "F"].contains(&v["unit"].as_str().expect("unit")), "{v}");
    assert_eq!(v.as_object().expect("object").len(), 2, "{v}");
}

fn calls(reply: &Reply, choice: usize) -> Vec<Value> {
    assert_eq!(reply.status, 200, "{}", reply.text);
    let v = reply.json();
    v["choices"][choice]["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {v}"))
        .clone()
}

#[tokio::test]
async fn required_answers_with_calls_to_listed_functions_whose_arguments_fit_their_schemas() {
    let (_m, s) = tool_server().await;
    let body = chat(json!({"tool_choice": "required", "n": 2, "temperature": 1.0, "seed": 3}));
    let reply = post(&s.app, "/v1/chat/completions", body).await;
    for choice in 0..2 {
        let v = reply.json();
        assert_eq!(v["choices"][choice]["finish_reason"], "tool_calls", "{v}");
        assert_eq!(v["choices"][choice]["message"]["content"], Value::Null, "{v}");
        let calls = calls(&reply, choice);
        assert!(!calls.is_empty());
        for call in calls {
            assert!(call["id"].as_str().expect("id").starts_with("call_"), "{call}");
            assert_eq!(call["type"], "function");
            match call["function"]["name"].as_str().expect("name") {
                "get_weather" => assert_weather_arguments(call["function"]["arguments"].as_str().expect("text")),
                "get_time" => assert_eq!(call["function"]["arguments"], "{}"),
                other => panic!("`{other}` is not a listed function"),
            }
        }
    }
    let single = chat(json!({"tool_choice": "required", "parallel_tool_calls": false}));
    assert_eq!(calls(&post(&s.app, "/v1/chat/completions", single).await, 0).len(), 1);
}

#[tokio::test]
async fn a_named_function_is_called_with_arguments_that_fit_and_finishes_with_stop() {
    let (_m, s) = tool_server().await;
    let choice = json!({"type": "function", "function": {"name": "get_weather"}});
    let reply = post(&s.app, "/v1/chat/completions", chat(json!({"tool_choice": choice}))).await;
    let calls = calls(&reply, 0);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_weather_arguments(calls[0]["function"]["arguments"].as_str().expect("text"));
    assert_eq!(
        reply.json()["choices"][0]["finish_reason"],
        "stop",
        "as OpenAI reports a named call"
    );
}

/// What the model writes under `auto` when it calls: forced with a regex, since the random
/// model would not by itself.
const HERMES_CALL: &str =
    r#"Checking\.<tool_call>\{"name": "get_weather", "arguments": \{"city": "Oslo", "unit": "C"\}\}</tool_call>"#;

#[tokio::test]
async fn auto_reads_the_calls_the_model_writes_and_a_stream_sends_the_same_answer() {
    let (_m, s) = tool_server().await;
    let reply = post(
        &s.app,
        "/v1/chat/completions",
        chat(json!({"guided_regex": HERMES_CALL})),
    )
    .await;
    let v = reply.json();
    assert_eq!(v["choices"][0]["message"]["content"], "Checking.", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let calls = calls(&reply, 0);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["arguments"], r#"{"city":"Oslo","unit":"C"}"#);

    let streamed = post(
        &s.app,
        "/v1/chat/completions",
        chat(json!({"guided_regex": HERMES_CALL, "stream": true})),
    )
    .await;
    let mut content = String::new();
    let mut streamed_calls = Vec::new();
    let mut finish = Value::Null;
    for data in streamed.sse_data().iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(data).expect("chunk");
        let choice = &chunk["choices"][0];
        content.push_str(choice["delta"]["content"].as_str().unwrap_or_default());
        assert!(
            !content.contains("<tool"),
            "call text is never sent as content: {content:?}"
        );
        if let Some(c) = choice["delta"]["tool_calls"].as_array() {
            streamed_calls.extend(c.iter().cloned());
        }
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    assert_eq!(content, "Checking.");
    assert_eq!(finish, "tool_calls");
    assert_eq!(streamed_calls.len(), 1);
    assert_eq!(streamed_calls[0]["index"], 0);
    assert_eq!(streamed_calls[0]["function"], calls[0]["function"]);
}

#[tokio::test]
async fn tool_choice_none_reads_no_calls_and_a_tool_result_conversation_is_accepted() {
    let (_m, s) = tool_server().await;
    let none = chat(json!({"tool_choice": "none", "guided_regex": HERMES_CALL}));
    let v = post(&s.app, "/v1/chat/completions", none).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .expect("text")
        .contains("<tool_call>"));

    let messages = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"C\"}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18"},
    ]);
    let with_result = chat(json!({"messages": messages, "max_tokens": 2}));
    let reply = post(&s.app, "/v1/chat/completions", with_result).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let without_tools = json!({"model": BASE, "max_tokens": 2, "messages": messages});
    let shorter = post(&s.app, "/v1/chat/completions", without_tools).await;
    assert!(
        reply.json()["usage"]["prompt_tokens"].as_u64() > shorter.json()["usage"]["prompt_tokens"].as_u64(),
        "the tools are in the prompt"
    );
}

#[tokio::test]
async fn bad_tool_requests_are_refused_naming_the_field() {
    let (_m, s) = tool_server().await;
    let bad_call = json!([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}]}]);
    let cases = [
        (
            chat(json!({"tools": [{"type": "function", "function": {"name": "a b"}}]})),
            "tools[0].function.name",
        ),
        (
            chat(json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}})),
            "tool_choice.function.name",
        ),
        (
            chat(json!({"tool_choice": "required", "response_format": {"type": "json_object"}})),
            "response_format",
        ),
        (
            chat(json!({"messages": [{"role": "tool", "content": "18"}]})),
            "messages[0].tool_call_id",
        ),
        (
            chat(json!({"messages": bad_call})),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            chat(json!({"chat_template_kwargs": {"tools": []}})),
            "chat_template_kwargs.tools",
        ),
    ];
    for (body, param) in cases {
        let reply = post(&s.app, "/v1/chat/completions", body).await;
        assert_eq!(reply.status, 400, "{param}: {}", reply.text);
        assert_eq!(reply.json()["error"]["param"], param, "{}", reply.text);
    }
    let completion = json!({"model": BASE, "prompt": "hi", "tools": [time_tool()]});
    let reply = post(&s.app, "/v1/completions", completion).await;
    assert_eq!(reply.json()["error"]["param"], "tools", "{}", reply.text);
}

#[tokio::test]
async fn a_model_whose_template_does_not_show_tools_refuses_them() {
    // The fixture's tiny model has no chat template: tools could never reach the model.
    let s = server(&[]).await;
    let reply = post(&s.app, "/v1/chat/completions", chat(json!({"tool_choice": "required"}))).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.json()["error"]["param"], "tools");
}

/// Llama 3.1's way, in short: tools as JSON in the user turn, calls as a bare JSON object.
const LLAMA3_TEMPLATE: &str = "{% for m in messages %}<|start|>{{ m.role }}\n\
    {% if tools and m.role == 'user' %}{% for t in tools %}{{ t | tojson(indent=4) }}\n{% endfor %}\
    Respond with {\"name\": function name, \"parameters\": dictionary of argument name and its value}.\n{% endif %}\
    {{ m.content }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}";

#[tokio::test]
async fn a_llama3_template_makes_auto_read_a_bare_json_call() {
    let model = model_with_template(LLAMA3_TEMPLATE);
    let s = server_for_model(model.path(), &[]).await;
    let regex = r#"\{"name": "get_time", "parameters": \{\}\}"#;
    let body = chat(json!({"tools": [time_tool()], "guided_regex": regex}));
    let reply = post(&s.app, "/v1/chat/completions", body).await;
    let calls = calls(&reply, 0);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "get_time");
    assert_eq!(calls[0]["function"]["arguments"], "{}");
    assert_eq!(reply.json()["choices"][0]["finish_reason"], "tool_calls");
    // An answer that is not JSON is content, whatever the format.
    let plain = chat(json!({"tools": [time_tool()], "guided_regex": "It is noon\\."}));
    let v = post(&s.app, "/v1/chat/completions", plain).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], "It is noon.", "{v}");
    assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
}
