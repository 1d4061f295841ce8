//! Generated tokens: equal to a reference decode with the model crate, the same in a mixed
//! batch as alone, and the same streamed or not.

use crate::common::*;
use kubetune_model::generate::{greedy, GreedyOptions};
use kubetune_model::{load_model, peft, LoadOptions};
use serde_json::{json, Value};

const PROMPT: [u32; 7] = [0, 57, 80, 120, 301, 44, 9];
const NEW_TOKENS: usize = 12;

/// The tokens of a greedy completion, read back through the tokenizer from the response text.
async fn completion(app: &axum::Router, model: &str, max_tokens: usize) -> Value {
    let reply = post(
        app,
        "/v1/completions",
        json!({"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()
}

fn text(v: &Value) -> &str {
    v["choices"][0]["text"].as_str().expect("text")
}

#[tokio::test]
async fn greedy_output_equals_a_reference_decode_with_the_model_crate() {
    assert_reference_decode(&[]).await;
}

#[tokio::test]
async fn a_prompt_prefilled_in_chunks_into_a_cache_grown_block_by_block_gives_the_reference_decode() {
    // 7 prompt tokens in chunks of 3, and a new 2-position block every other token.
    assert_reference_decode(&["--prefill-chunk-tokens", "3", "--kv-block-tokens", "2"]).await;
}

async fn assert_reference_decode(flags: &[&str]) {
    let f = fixture();
    let adapter_flag = adapter_flag("a", &f.adapter_a);
    let mut args = vec!["--adapter", &adapter_flag];
    args.extend_from_slice(flags);
    let s = server(&args).await;
    let (config, model) = load_model(&f.model, &LoadOptions::default()).expect("reference model");
    let (_, adapter) = peft::load(&f.adapter_a, &config, &candle_core::Device::Cpu).expect("reference adapter");
    let stops = s.state.stop_ids.as_slice();
    let mut outputs = Vec::new();
    for (name, adapter) in [(BASE, None), ("a", Some(&adapter))] {
        let options = GreedyOptions {
            max_new_tokens: NEW_TOKENS,
            stop_tokens: stops,
            adapter,
        };
        let reference = greedy(&model, &PROMPT, &options).expect("reference decode");
        let got = completion(&s.app, name, NEW_TOKENS).await;
        assert_eq!(
            text(&got),
            s.state.codec.decode(&reference).expect("decode"),
            "model {name}"
        );
        assert_eq!(
            got["usage"]["completion_tokens"],
            json!(reference.len()),
            "model {name}"
        );
        assert_eq!(got["usage"]["prompt_tokens"], json!(PROMPT.len()));
        let finish = if reference.len() == NEW_TOKENS {
            "length"
        } else {
            "stop"
        };
        assert_eq!(got["choices"][0]["finish_reason"], json!(finish));
        assert_eq!(got["model"], json!(name));
        outputs.push(reference);
    }
    assert_ne!(
        outputs[0], outputs[1],
        "the adapter must change the output, or this test proves nothing"
    );
}

#[tokio::test]
async fn ignore_eos_generates_exactly_max_tokens() {
    let s = server(&[]).await;
    let body = json!({"model": BASE, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": true});
    let got = post(&s.app, "/v1/completions", body).await.json();
    assert_eq!(got["usage"]["completion_tokens"], 40, "{got}");
    assert_eq!(got["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn different_adapters_in_one_batch_give_the_same_tokens_as_each_alone() {
    let f = fixture();
    let (s, probe) = gated_server(&[
        "--max-batch",
        "4",
        "--adapter",
        &adapter_flag("a", &f.adapter_a),
        "--adapter",
        &adapter_flag("b", &f.adapter_b),
    ])
    .await;
    let models = [BASE, "a", "b"];
    let mut alone = Vec::new();
    for m in models {
        let v = completion(&s.app, m, 16).await;
        assert_eq!(
            v["choices"][0]["finish_reason"], "length",
            "{m} must run all 16 steps so the batch overlaps"
        );
        alone.push(text(&v).to_string());
    }
    assert_eq!(
        probe.max_batch_in_step.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "solo runs decode alone"
    );

    // Hold the engine inside the first request's prefill until all three are queued, so the
    // other two join its batch at the next step.
    let release = probe.arm_prefill();
    let first = tokio::spawn({
        let app = s.app.clone();
        async move { completion(&app, BASE, 16).await }
    });
    wait_until("engine reached the first prefill", || probe.prefill_reached()).await;
    let rest: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|m| {
            let app = s.app.clone();
            tokio::spawn(async move { completion(&app, m, 16).await })
        })
        .collect();
    wait_until("all three requests admitted", || s.state.engine.in_flight() == 3).await;
    release.send(()).expect("engine waits");
    let mut together = vec![text(&first.await.expect("task")).to_string()];
    for t in rest {
        together.push(text(&t.await.expect("task")).to_string());
    }
    assert_eq!(together, alone);
    assert_eq!(
        probe.max_adapters_in_step.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "base, a and b decoded in one step"
    );
    assert!(
        alone[0] != alone[1] && alone[1] != alone[2],
        "adapters must differ for this test to mean anything"
    );
}

/// Concatenates the text of SSE chunks; returns (text, finish_reason, usage). The stream must
/// have been asked for usage: it comes in a final chunk of its own, with no choices.
fn read_stream(reply: &Reply, chat: bool) -> (String, Value, Value) {
    let data = reply.sse_data();
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "stream ends with [DONE]: {}",
        reply.text
    );
    let mut text = String::new();
    let mut finish = Value::Null;
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk is JSON"))
        .collect();
    let (last, choice_chunks) = chunks.split_last().expect("chunks before [DONE]");
    assert_eq!(last["choices"], json!([]), "usage chunk: {last}");
    for v in choice_chunks {
        let c = &v["choices"][0];
        assert!(v["usage"].is_null(), "usage only in the final chunk: {v}");
        let piece = if chat { &c["delta"]["content"] } else { &c["text"] };
        text.push_str(piece.as_str().unwrap_or_default());
        if !c["finish_reason"].is_null() {
            finish = c["finish_reason"].clone();
        }
    }
    (text, finish, last["usage"].clone())
}

#[tokio::test]
async fn streaming_and_non_streaming_agree() {
    let f = fixture();
    let s = server(&["--adapter", &adapter_flag("a", &f.adapter_a)]).await;
    let cases = [
        (
            "/v1/completions",
            json!({"model": "a", "prompt": "The cat sat on", "max_tokens": 20, "temperature": 0}),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "Once upon", "max_tokens": 20, "temperature": 0.9, "seed": 5, "top_p": 0.9}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "a", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 20, "temperature": 0}),
        ),
        // A stop string cuts both the same way.
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "The cat sat on", "max_tokens": 20, "temperature": 0, "stop": ["e"]}),
        ),
    ];
    for (path, body) in cases {
        let chat = path.contains("chat");
        let whole = post(&s.app, path, body.clone()).await;
        assert_eq!(whole.status, 200, "{}", whole.text);
        let whole = whole.json();
        let mut streamed_body = body.clone();
        streamed_body["stream"] = json!(true);
        streamed_body["stream_options"] = json!({"include_usage": true});
        let streamed = post(&s.app, path, streamed_body).await;
        assert_eq!(streamed.status, 200);
        assert!(streamed.headers["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/event-stream"));
        let (text, finish, usage) = read_stream(&streamed, chat);
        let c = &whole["choices"][0];
        let expected = if chat { &c["message"]["content"] } else { &c["text"] };
        assert_eq!(json!(text), *expected, "{body}");
        assert_eq!(finish, c["finish_reason"], "{body}");
        assert_eq!(usage, whole["usage"], "{body}");
        if body.get("stop").is_some() {
            assert!(!text.contains('e'), "stop string removed: {text:?}");
        }
    }
}

#[tokio::test]
async fn merged_mode_serves_the_adapter_with_the_same_greedy_tokens() {
    let f = fixture();
    let unmerged = server(&["--adapter", &adapter_flag("a", &f.adapter_a)]).await;
    let merged = server(&["--merge", "--adapter", &adapter_flag("a", &f.adapter_a)]).await;
    let want = completion(&unmerged.app, "a", NEW_TOKENS).await;
    let got = completion(&merged.app, "a", NEW_TOKENS).await;
    assert_eq!(text(&got), text(&want));
    let base = post(&merged.app, "/v1/completions", json!({"model": BASE, "prompt": "hi"})).await;
    assert_eq!(base.status, 404);
    assert_eq!(base.json()["error"]["param"], "model");
    let models = send(&merged.app, "GET", "/v1/models", None).await.json();
    assert_eq!(models["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(models["data"][0]["id"], "a");
}

/// `--quantize int8` serves what the model crate's int8 model computes: loaded int8 for the
/// base and an unmerged adapter, and merged before rounding with `--merge`.
#[tokio::test]
async fn int8_serving_equals_a_reference_decode_with_the_int8_model() {
    let f = fixture();
    let s = server(&["--quantize", "int8", "--adapter", &adapter_flag("a", &f.adapter_a)]).await;
    let merged = server(&[
        "--quantize",
        "int8",
        "--merge",
        "--adapter",
        &adapter_flag("a", &f.adapter_a),
    ])
    .await;
    let options = LoadOptions {
        base: kubetune_model::BaseFormat::Int8,
        ..LoadOptions::default()
    };
    let (config, int8) = load_model(&f.model, &options).expect("reference int8 model");
    let (_, dense) = load_model(&f.model, &LoadOptions::default()).expect("reference f32 model");
    let (_, adapter) = peft::load(&f.adapter_a, &config, &candle_core::Device::Cpu).expect("reference adapter");
    let merged_reference = dense
        .merged(&adapter)
        .and_then(|m| m.quantize_int8())
        .expect("merge, then round");
    let stops = s.state.stop_ids.as_slice();
    let cases = [
        (&s, BASE, &int8, None),
        (&s, "a", &int8, Some(&adapter)),
        (&merged, "a", &merged_reference, None),
    ];
    for (server, name, model, adapter) in cases {
        let options = GreedyOptions {
            max_new_tokens: NEW_TOKENS,
            stop_tokens: stops,
            adapter,
        };
        let reference = greedy(model, &PROMPT, &options).expect("reference decode");
        let got = completion(&server.app, name, NEW_TOKENS).await;
        assert_eq!(
            text(&got),
            server.state.codec.decode(&reference).expect("decode"),
            "model {name}"
        );
    }
}

#[tokio::test]
async fn completions_logprobs_list_each_token_with_alternatives() {
    let s = server(&[]).await;
    let v = post(
        &s.app,
        "/v1/completions",
        json!({"model": BASE, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 3}),
    )
    .await
    .json();
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().expect("tokens");
    assert_eq!(
        tokens.len(),
        v["usage"]["completion_tokens"].as_u64().expect("usage") as usize
    );
    for (i, top) in lp["top_logprobs"].as_array().expect("top").iter().enumerate() {
        let top = top.as_object().expect("object");
        assert!(!top.is_empty() && top.len() <= 3);
        let chosen = lp["token_logprobs"][i].as_f64().expect("logprob");
        assert!(chosen <= 0.0);
        // Greedy: the chosen token is the most likely one.
        let best = top.values().filter_map(Value::as_f64).fold(f64::NEG_INFINITY, f64::max);
        assert!((best - chosen).abs() < 1e-5, "greedy picks the top token");
    }
}
