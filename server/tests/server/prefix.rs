//! Prefix caching on the real tiny model: requests that share a system prompt give the same
//! greedy tokens with the cache as without it, and the second one does hit and says so in
//! `usage.prompt_tokens_details.cached_tokens`.

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

/// What a server started with `flags` answers to two questions after one system prompt, for
/// the base and then an adapter: the answers, each one's cached prompt tokens, and the
/// server's prefix cache hits.
async fn answers(flags: &[&str]) -> (Vec<String>, Vec<u64>, u64) {
    let f = fixture();
    let adapter = adapter_flag("a", &f.adapter_a);
    let mut args = vec!["--adapter", &adapter, "--kv-block-tokens", "8"];
    args.extend_from_slice(flags);
    let s = server(&args).await;
    let (mut texts, mut cached) = (Vec::new(), Vec::new());
    for model in [BASE, "a"] {
        for question in ["How do I close my account?", "Where do I report a lost card?"] {
            let reply = post(&s.app, "/v1/chat/completions", chat(model, question)).await;
            assert_eq!(reply.status, 200, "{}", reply.text);
            let reply = reply.json();
            let content = &reply["choices"][0]["message"]["content"];
            texts.push(content.as_str().expect("content").to_string());
            let details = &reply["usage"]["prompt_tokens_details"];
            cached.push(details["cached_tokens"].as_u64().expect("cached_tokens"));
        }
    }
    (texts, cached, s.state.metrics.vllm.prefix_cache_hits.get())
}

#[tokio::test]
async fn two_requests_sharing_a_system_prompt_answer_the_same_greedy_tokens_with_the_prefix_cache_as_without() {
    let (cached, cached_tokens, hits) = answers(&[]).await;
    let (uncached, no_cached_tokens, no_hits) = answers(&["--no-enable-prefix-caching"]).await;
    assert_eq!(cached, uncached);
    let [base_first, base_second, adapter_first, adapter_second] = cached_tokens[..] else {
        panic!("four requests: {cached_tokens:?}")
    };
    assert_eq!(
        (base_first, adapter_first),
        (0, 0),
        "nothing cached yet, and the base's blocks are out of the adapter's scope"
    );
    assert!(
        base_second >= 2 * 8 && base_second % 8 == 0,
        "the second request reused whole 8-token blocks of the system prompt: {base_second}"
    );
    assert_eq!(
        adapter_second, base_second,
        "the adapter's own blocks of the same prompt"
    );
    assert_eq!(
        hits,
        base_second + adapter_second,
        "usage reports what the counter counts"
    );
    assert_eq!(no_cached_tokens, [0; 4]);
    assert_eq!(no_hits, 0, "the flag turns the cache off");
    assert_ne!(
        cached[0], cached[2],
        "the adapter changes the answer, or its scope proves nothing"
    );
}
