//! The scheduler against a scripted model: KV blocks allocated as tokens come, preemption by
//! recompute, and chunked prefill between decode steps. The script's next token depends only
//! on what its cache holds, so a recomputed or chunk-prefilled sequence must produce exactly
//! the tokens it produces alone, and a write past what the engine reserved is an error.

use super::backend::{Backend, DecodeItem};
use super::{Engine, EngineConfig, Event, FinishReason, GenerateRequest};
use crate::metrics::Metrics;
use crate::sampling::SamplingParams;
use std::sync::{Arc, Mutex};

const VOCAB: usize = 50;
/// The script's answer once its cache holds `stop_at` positions.
const STOP: u32 = 49;

#[derive(Debug, Clone, PartialEq)]
enum Call {
    /// A forward of this many tokens onto a cache that held `after` positions.
    Forward { tokens: usize, after: usize },
    /// A batched decode step of this many sequences.
    Decode { batch: usize },
}

struct Script {
    log: Arc<Mutex<Vec<Call>>>,
    stop_at: usize,
    /// Taken by the first forward, which waits for it: requests submitted meanwhile queue.
    gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl Script {
    fn logits(&self, cached: &[u32]) -> Vec<f32> {
        if cached.len() >= self.stop_at {
            one_hot(STOP)
        } else {
            one_hot(next_token(cached))
        }
    }
}

struct ScriptCache {
    tokens: Vec<u32>,
    capacity: usize,
}

/// The next token: a hash of the cache's length and last tokens (cheap however long it
/// grows), never STOP.
fn next_token(cached: &[u32]) -> u32 {
    let h = cached[cached.len().saturating_sub(8)..]
        .iter()
        .fold(cached.len() as u64, |h, &t| {
            h.wrapping_mul(31).wrapping_add(t as u64 + 1)
        });
    (h % (VOCAB as u64 - 1)) as u32
}

fn one_hot(id: u32) -> Vec<f32> {
    let mut logits = vec![0.0; VOCAB];
    logits[id as usize] = 10.0;
    logits
}

impl Backend for Script {
    type Cache = ScriptCache;

    fn new_cache(&self, positions: usize) -> ScriptCache {
        ScriptCache {
            tokens: Vec::new(),
            capacity: positions,
        }
    }

    fn reserve(&self, cache: &mut ScriptCache, positions: usize) -> Result<(), String> {
        cache.capacity = cache.capacity.max(positions);
        Ok(())
    }

    fn kv_bytes_per_token(&self) -> usize {
        1
    }

    fn forward(
        &self,
        tokens: &[u32],
        cache: &mut ScriptCache,
        _: Option<&kubetune_model::LoraAdapter>,
    ) -> Result<Vec<f32>, String> {
        if let Some(gate) = self.gate.lock().expect("gate").take() {
            let _ = gate.recv();
        }
        self.log.lock().expect("log").push(Call::Forward {
            tokens: tokens.len(),
            after: cache.tokens.len(),
        });
        if cache.tokens.len() + tokens.len() > cache.capacity {
            return Err(format!(
                "write past the reserved cache: {} + {} > {}",
                cache.tokens.len(),
                tokens.len(),
                cache.capacity
            ));
        }
        cache.tokens.extend_from_slice(tokens);
        Ok(self.logits(&cache.tokens))
    }

    fn decode(&self, batch: &mut [DecodeItem<'_, ScriptCache>]) -> Vec<Result<Vec<f32>, String>> {
        self.log.lock().expect("log").push(Call::Decode { batch: batch.len() });
        batch
            .iter_mut()
            .map(|item| {
                let cache = &mut *item.cache;
                if cache.tokens.len() + 1 > cache.capacity {
                    return Err("decode past the reserved cache".into());
                }
                cache.tokens.push(item.token);
                Ok(self.logits(&cache.tokens))
            })
            .collect()
    }
}

struct Harness {
    engine: Engine,
    log: Arc<Mutex<Vec<Call>>>,
    metrics: Arc<Metrics>,
    /// Releases the first forward call.
    gate: std::sync::mpsc::Sender<()>,
}

fn start(config: EngineConfig) -> Harness {
    start_with_stop(config, usize::MAX)
}

fn start_with_stop(config: EngineConfig, stop_at: usize) -> Harness {
    let log = Arc::new(Mutex::new(Vec::new()));
    let metrics = Arc::new(Metrics::new("script"));
    let (gate, held) = std::sync::mpsc::channel();
    let script = Script {
        log: log.clone(),
        stop_at,
        gate: Mutex::new(Some(held)),
    };
    let engine = Engine::start(script, config, metrics.clone());
    Harness {
        engine,
        log,
        metrics,
        gate,
    }
}

impl Harness {
    fn release(&self) {
        let _ = self.gate.send(());
    }

    fn decode_batches(&self) -> Vec<usize> {
        let log = self.log.lock().expect("log");
        log.iter()
            .filter_map(|c| match c {
                Call::Decode { batch } => Some(*batch),
                _ => None,
            })
            .collect()
    }
}

fn config(budget_tokens: usize, block: usize, chunk: usize) -> EngineConfig {
    EngineConfig {
        max_batch: 8,
        max_queue: 8,
        max_context: 100_000,
        kv_budget_bytes: budget_tokens,
        kv_block_tokens: block,
        prefill_chunk_tokens: chunk,
        retry_after_s: 1,
    }
}

fn request(prompt_len: usize, max_tokens: usize, first: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: (0..prompt_len as u32).map(|i| (first + i) % 40).collect(),
        adapter: None,
        params: SamplingParams::greedy(),
        max_tokens,
        stop_ids: Arc::new(Vec::new()),
        constraint: None,
    }
}

/// Tokens the request produced and why it ended.
fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> (Vec<u32>, FinishReason) {
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv().expect("the engine ends every request with an event") {
            Event::Admitted { .. } => {}
            Event::Token { id, .. } => tokens.push(id),
            Event::Finished(reason) => return (tokens, reason),
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
}

/// What `req` produces alone, with room to spare.
fn alone(req: &GenerateRequest) -> Vec<u32> {
    let h = start(config(1 << 20, 4, 1 << 20));
    h.release();
    collect(h.engine.submit(req.clone()).expect("admitted")).0
}

#[test]
fn requests_that_would_reserve_the_whole_context_run_together_as_blocks_are_held_only_as_used() {
    // Four requests "without max_tokens" (10,000 each) whose answers stop after 6 tokens:
    // reserving prompt + max_tokens, no two of them fit a 64-position budget together.
    let h = start_with_stop(config(64, 4, 512), 11);
    let mut rxs = Vec::new();
    for i in 0..4 {
        let mut req = request(5, 10_000, i * 7);
        req.stop_ids = Arc::new(vec![STOP]);
        rxs.push(h.engine.submit(req).expect("admitted"));
    }
    h.release();
    for rx in rxs {
        let (tokens, reason) = collect(rx);
        assert_eq!((tokens.len(), reason), (6, FinishReason::Stop));
    }
    assert_eq!(h.decode_batches().iter().max(), Some(&4), "all four decoded together");
    assert_eq!(h.metrics.preemptions.get(), 0);
}

#[test]
fn when_blocks_run_out_the_youngest_sequence_is_preempted_and_resumes_with_the_same_tokens() {
    // Two sequences of 4 + 30 positions in a budget of 40: they cannot both finish at once.
    let first = request(4, 30, 1);
    let second = request(4, 30, 20);
    let (want_first, want_second) = (alone(&first), alone(&second));
    let h = start(config(40, 4, 512));
    let rx_first = h.engine.submit(first).expect("admitted");
    let rx_second = h.engine.submit(second).expect("admitted");
    h.release();
    let (got_first, reason_first) = collect(rx_first);
    let (got_second, reason_second) = collect(rx_second);
    assert_eq!(
        (reason_first, reason_second),
        (FinishReason::Length, FinishReason::Length)
    );
    assert_eq!(got_first, want_first, "the oldest sequence ran on undisturbed");
    assert_eq!(
        got_second, want_second,
        "the preempted sequence resumed where it stopped"
    );
    assert!(h.metrics.preemptions.get() >= 1, "the budget forced a preemption");
    assert_eq!(
        h.decode_batches().iter().max(),
        Some(&2),
        "they did run together at first"
    );
    let log = h.log.lock().expect("log").clone();
    assert!(
        log.iter()
            .any(|c| matches!(c, Call::Forward { tokens, after: 0 } if *tokens > 4)),
        "the preempted sequence recomputed prompt + generated tokens: {log:?}"
    );
}

#[test]
fn a_sequence_that_alone_outgrows_the_budget_ends_with_length() {
    // 16 positions: the 4-token prompt, then one position per decode step until the budget is
    // spent; the prefill's token and 12 decoded ones.
    let h = start(config(16, 4, 512));
    h.release();
    let (tokens, reason) = collect(h.engine.submit(request(4, 1000, 3)).expect("admitted"));
    assert_eq!((tokens.len(), reason), (13, FinishReason::Length));
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_between_the_decode_steps_of_a_running_stream() {
    let long = request(40, 3, 5);
    let want_long = alone(&long);
    let h = start(config(1 << 40, 4, 8));
    h.release();
    // A stream that runs until the test drops it.
    let mut running = h.engine.submit(request(4, 1 << 30, 9)).expect("admitted");
    // The stream is running once its first token is out.
    assert!(matches!(running.blocking_recv(), Some(Event::Admitted { .. })));
    assert!(matches!(running.blocking_recv(), Some(Event::Token { .. })));
    let rx_long = h.engine.submit(long).expect("admitted");
    let (got_long, _) = collect(rx_long);
    assert_eq!(
        got_long, want_long,
        "a chunked prefill leaves the same cache as one prefill"
    );
    let log = h.log.lock().expect("log").clone();
    let chunks: Vec<usize> = (log.iter().enumerate())
        .filter(|(_, c)| matches!(c, Call::Forward { tokens: 8, .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(chunks.len(), 5, "40 prompt tokens in chunks of 8: {log:?}");
    for pair in chunks.windows(2) {
        assert_eq!(
            log[pair[0] + 1..pair[1]],
            [Call::Decode { batch: 1 }],
            "one decode step of the running stream between two chunks: {log:?}"
        );
    }
    drop(running);
}
