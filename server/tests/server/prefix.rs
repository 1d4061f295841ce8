//! Prefix caching on the real tiny model: requests that share a system prompt give the same
//! greedy tokens with the cache as without it, and the second one does hit.

use crate::common::*;
use serde_json::{json, Value};

const SYSTEM: &str = "You are the help desk of a small bank. Answer in one short sentence, \
    name the form the customer needs, and never ask for a password or a card number.";

fn chat(model: &str, question: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": 12,
        "temperature": 0,
    })
}

/// The two requests' answers from a server started with `flags`, and its prefix cache hits.
async fn answers(flags: &[&str]) -> (Vec<String>, u64) {
    let f = fixture();
    let adapter = adapter_flag("a", &f.adapter_a);
    let mut args = vec!["--adapter", &adapter, "--kv-block-tokens", "8"];
    args.extend_from_slice(flags);
    let s = server(&args).await;
    let mut texts = Vec::new();
    for model in [BASE, "a"] {
        for question in ["How do I close my account?", "Where do I report a lost card?"] {
            let reply = post(&s.app, "/v1/chat/completions", chat(model, question)).await;
            assert_eq!(reply.status, 200, "{}", reply.text);
            let content = &reply.json()["choices"][0]["message"]["content"];
            texts.push(content.as_str().expect("content").to_string());
        }
    }
    (texts, s.state.metrics.vllm.prefix_cache_hits.get())
}

#[tokio::test]
async fn two_requests_sharing_a_system_prompt_answer_the_same_greedy_tokens_with_the_prefix_cache_as_without() {
    let (cached, hits) = answers(&[]).await;
    let (uncached, no_hits) = answers(&["--no-enable-prefix-caching"]).await;
    assert_eq!(cached, uncached);
    assert!(
        hits >= 2 * 8,
        "each second request reused the system prompt's blocks: {hits} tokens"
    );
    assert_eq!(no_hits, 0, "the flag turns the cache off");
    assert_ne!(
        cached[0], cached[2],
        "the adapter changes the answer, or its scope proves nothing"
    );
}
