//! The scheduler against a scripted model: KV blocks allocated as tokens come, preemption by
//! recompute, and chunked prefill between decode steps. The script's next token depends only
//! on what its cache holds, so a recomputed or chunk-prefilled sequence must produce exactly
//! the tokens it produces alone, and a write past what the engine reserved is an error.
//! Caches and cached prefix blocks count the positions they hold, so a test sees exactly
//! what the engine holds against its budget.

use super::backend::{Backend, DecodeItem};
use super::{Engine, EngineConfig, Event, FinishReason, GenerateRequest};
use crate::metrics::Metrics;
use crate::sampling::SamplingParams;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Cached prefix blocks of this many positions copied into a new sequence's cache.
    Extend { tokens: usize },
}

/// Positions every live cache and cached block holds together, and the most they ever held.
#[derive(Default)]
struct Held {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Held {
    fn add(&self, positions: usize) {
        let now = self.now.fetch_add(positions, Ordering::SeqCst) + positions;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }
}

struct Script {
    log: Arc<Mutex<Vec<Call>>>,
    held: Arc<Held>,
    stop_at: usize,
    /// Taken by the first forward, which waits for it: requests submitted meanwhile queue.
    gate: Arc<Mutex<Option<std::sync::mpsc::Receiver<()>>>>,
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
    held: Arc<Held>,
}

impl ScriptCache {
    fn new(capacity: usize, held: &Arc<Held>) -> Self {
        held.add(capacity);
        Self {
            tokens: Vec::new(),
            capacity,
            held: held.clone(),
        }
    }
}

impl Drop for ScriptCache {
    fn drop(&mut self) {
        self.held.now.fetch_sub(self.capacity, Ordering::SeqCst);
    }
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
        ScriptCache::new(positions, &self.held)
    }

    fn reserve(&self, cache: &mut ScriptCache, positions: usize) -> Result<(), String> {
        self.held.add(positions.saturating_sub(cache.capacity));
        cache.capacity = cache.capacity.max(positions);
        Ok(())
    }

    fn copy_positions(&self, cache: &ScriptCache, start: usize, len: usize) -> Result<ScriptCache, String> {
        let tokens = cache
            .tokens
            .get(start..start + len)
            .ok_or("copy past what the cache holds")?;
        let mut block = ScriptCache::new(len, &self.held);
        block.tokens = tokens.to_vec();
        Ok(block)
    }

    fn extend_from(&self, cache: &mut ScriptCache, blocks: &[&ScriptCache]) -> Result<(), String> {
        let tokens: usize = blocks.iter().map(|b| b.tokens.len()).sum();
        self.log.lock().expect("log").push(Call::Extend { tokens });
        if cache.tokens.len() + tokens > cache.capacity {
            return Err("cached blocks past the reserved cache".into());
        }
        for block in blocks {
            cache.tokens.extend_from_slice(&block.tokens);
        }
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
    held: Arc<Held>,
    metrics: Arc<Metrics>,
    /// Releases the first forward call.
    gate: std::sync::mpsc::Sender<()>,
    /// The script's gate, to hold a later forward call.
    gate_slot: Arc<Mutex<Option<std::sync::mpsc::Receiver<()>>>>,
}

fn start(config: EngineConfig) -> Harness {
    start_with_stop(config, usize::MAX)
}

fn start_with_stop(config: EngineConfig, stop_at: usize) -> Harness {
    let log = Arc::new(Mutex::new(Vec::new()));
    let held = Arc::new(Held::default());
    let metrics = Arc::new(Metrics::new("script"));
    let (gate, gate_held) = std::sync::mpsc::channel();
    let gate_slot = Arc::new(Mutex::new(Some(gate_held)));
    let script = Script {
        log: log.clone(),
        held: held.clone(),
        stop_at,
        gate: gate_slot.clone(),
    };
    let engine = Engine::start(script, config, metrics.clone());
    Harness {
        engine,
        log,
        held,
        metrics,
        gate,
        gate_slot,
    }
}

impl Harness {
    fn release(&self) {
        let _ = self.gate.send(());
    }

    /// Makes the next forward call wait; returns the sender that releases it.
    fn hold_next_forward(&self) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.gate_slot.lock().expect("gate") = Some(rx);
        tx
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
        prefix_caching: false,
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

/// Blocks until `cond` holds (yielding, never sleeping a fixed time); fails after a generous
/// bound so a broken condition shows as a failure instead of a hang.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "condition never held: {what}");
        std::thread::yield_now();
    }
}

fn cached_config(budget_tokens: usize, block: usize) -> EngineConfig {
    EngineConfig {
        prefix_caching: true,
        ..config(budget_tokens, block, 512)
    }
}

fn with_prompt(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        ..request(0, max_tokens, 0)
    }
}

fn adapter(name: &str, digest: Option<&str>) -> Arc<crate::adapters::LoadedAdapter> {
    Arc::new(crate::adapters::LoadedAdapter::empty(name, digest))
}

#[test]
fn a_request_that_ends_lets_go_of_its_adapter_and_then_tells_the_adapters_set() {
    use futures::FutureExt;
    let set = crate::adapters::AdapterSet::new(Default::default());
    let (held, _) = set
        .insert_with(crate::adapters::LoadedAdapter::empty("a", None), false)
        .expect("room");
    let released = set.released();
    let mut told = Box::pin(released.notified());
    told.as_mut().enable();
    let mut req = request(4, 2, 1);
    req.adapter = Some(held);
    let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
    let permits = Arc::new(tokio::sync::Semaphore::new(1));
    let admitted = super::Admitted {
        req,
        events,
        enqueued: std::time::Instant::now(),
        _permit: permits.try_acquire_owned().expect("a permit"),
    };
    assert!(told.as_mut().now_or_never().is_none(), "told while the request runs");
    // What the engine does with a request that finished, failed or was cancelled.
    drop(admitted);
    assert!(told.as_mut().now_or_never().is_some(), "the set was not told");
    let slot = set.get("a").expect("still loaded");
    assert_eq!(Arc::strong_count(&slot), 2, "only the set and this test hold it");
}

impl Harness {
    /// Runs `req` to its end alone and returns its tokens and the model calls it caused.
    fn run(&self, req: GenerateRequest) -> (Vec<u32>, Vec<Call>) {
        let before = self.log.lock().expect("log").len();
        let (tokens, _) = collect(self.engine.submit(req).expect("admitted"));
        let calls = self.log.lock().expect("log")[before..].to_vec();
        (tokens, calls)
    }

    /// Waits until no request is in flight and the engine has reported its cached blocks.
    fn settle(&self) {
        wait_until("the engine is idle", || self.engine.in_flight() == 0);
        wait_until("the cached blocks are reported", || {
            self.held.now.load(Ordering::SeqCst) == self.metrics.prefix_cache_blocks.get() as usize * 4
        });
    }
}

/// The prompt's prefill calls: forwards, and the cached positions copied in.
fn prefill_calls(calls: &[Call]) -> Vec<Call> {
    calls
        .iter()
        .filter(|c| !matches!(c, Call::Decode { .. }))
        .cloned()
        .collect()
}

#[test]
fn a_request_sharing_a_three_block_prefix_prefills_only_its_suffix_and_answers_as_without_the_cache() {
    let shared: Vec<u32> = (0..12).collect();
    let first = with_prompt([shared.clone(), vec![30, 31, 32]].concat(), 5);
    let second = with_prompt([shared, vec![20, 21, 22, 23, 24]].concat(), 5);
    let h = start(cached_config(1 << 20, 4));
    h.release();
    let (_, calls) = h.run(first);
    assert_eq!(prefill_calls(&calls), [Call::Forward { tokens: 15, after: 0 }]);
    let (tokens, calls) = h.run(second.clone());
    assert_eq!(
        prefill_calls(&calls),
        [Call::Extend { tokens: 12 }, Call::Forward { tokens: 5, after: 12 }],
        "three cached blocks copied, the five suffix tokens prefilled"
    );
    assert_eq!(tokens, alone(&second), "the same tokens as a run without the cache");
    assert_eq!(h.metrics.vllm.prefix_cache_queries.get(), 15 + 17);
    assert_eq!(h.metrics.vllm.prefix_cache_hits.get(), 12);
}

#[test]
fn a_prompt_of_whole_blocks_still_prefills_its_last_token_from_the_cache_of_the_same_prompt() {
    let prompt: Vec<u32> = (0..12).collect();
    let h = start(cached_config(1 << 20, 4));
    h.release();
    let (want, _) = h.run(with_prompt(prompt.clone(), 4));
    let (got, calls) = h.run(with_prompt(prompt, 4));
    assert_eq!(
        prefill_calls(&calls),
        [Call::Extend { tokens: 8 }, Call::Forward { tokens: 4, after: 8 }],
        "the last block is prefilled, so its last token gives the logits"
    );
    assert_eq!(got, want);
}

#[test]
fn the_same_prompt_under_another_adapter_or_the_base_model_does_not_hit_the_prefix_cache() {
    let prompt: Vec<u32> = (0..13).collect();
    let (a, b) = (adapter("a", Some("sha256:aa")), adapter("b", Some("sha256:bb")));
    let under = |adapter: Option<&Arc<crate::adapters::LoadedAdapter>>| GenerateRequest {
        adapter: adapter.cloned(),
        ..with_prompt(prompt.clone(), 2)
    };
    let h = start(cached_config(1 << 20, 4));
    h.release();
    let whole = [Call::Forward { tokens: 13, after: 0 }];
    let hit = [Call::Extend { tokens: 12 }, Call::Forward { tokens: 1, after: 12 }];
    assert_eq!(prefill_calls(&h.run(under(Some(&a))).1), whole, "nothing cached yet");
    assert_eq!(
        prefill_calls(&h.run(under(None)).1),
        whole,
        "adapter a's blocks are not the base's"
    );
    assert_eq!(prefill_calls(&h.run(under(Some(&b))).1), whole, "nor adapter b's");
    assert_eq!(
        prefill_calls(&h.run(under(Some(&a))).1),
        hit,
        "adapter a's own blocks hit"
    );
    let reloaded = adapter("a", Some("sha256:aa"));
    assert_eq!(
        prefill_calls(&h.run(under(Some(&reloaded))).1),
        hit,
        "a reload of the same registry version (same digest) hits too"
    );
    let (local, swapped) = (adapter("local", None), adapter("local", None));
    assert_eq!(prefill_calls(&h.run(under(Some(&local))).1), whole);
    assert_eq!(
        prefill_calls(&h.run(under(Some(&swapped))).1),
        whole,
        "an adapter without a digest is scoped by its loaded instance: a hot swap under its name misses"
    );
    assert_eq!(h.metrics.vllm.prefix_cache_hits.get(), 24);
}

#[test]
fn cached_blocks_are_evicted_before_a_running_sequence_is_preempted_and_the_budget_holds_exactly() {
    // A 32-position budget. The first request leaves its three prompt blocks (12 positions)
    // cached; then two sequences of 11 + 5 positions (16 each, four blocks) must run together,
    // which they can only if every cached block gives way.
    let h = start(cached_config(32, 4));
    h.release();
    h.run(with_prompt((0..12).collect(), 1));
    h.settle();
    assert_eq!(
        h.metrics.prefix_cache_blocks.get(),
        3,
        "the first prompt's three full blocks"
    );
    assert_eq!(h.held.now.load(Ordering::SeqCst), 12, "held exactly as counted");

    let (x, y) = (request(11, 6, 20), request(11, 6, 33));
    let (want_x, want_y) = (alone(&x), alone(&y));
    // The first one's prefill waits until the second is queued, so they overlap.
    let held = h.hold_next_forward();
    let rx_x = h.engine.submit(x).expect("admitted");
    let rx_y = h.engine.submit(y).expect("admitted");
    let _ = held.send(());
    let (got_x, got_y) = (collect(rx_x).0, collect(rx_y).0);
    assert_eq!((got_x, got_y), (want_x, want_y));
    assert_eq!(h.metrics.preemptions.get(), 0, "cached blocks went first");
    assert_eq!(h.decode_batches().iter().max(), Some(&2), "the two ran together");
    assert!(
        h.held.peak.load(Ordering::SeqCst) <= 32,
        "caches and cached blocks never held more than the budget"
    );
    h.settle();
    assert_eq!(h.metrics.prefix_cache_blocks.get(), 0, "every cached block gave way");
}
