//! The engine loop (continuous batching). Each iteration:
//! 1. takes newly submitted requests into the waiting queue and drops cancelled ones;
//! 2. admits waiting requests in arrival order while a batch slot and the KV blocks for their
//!    prompt are free;
//! 3. prefills at most `prefill_chunk_tokens` prompt tokens: short prompts whole and batched,
//!    a long prompt one chunk per iteration, so that it never stalls the running streams for
//!    longer than one chunk and its attention scores stay within chunk x context;
//! 4. gives every sequence that was already decoding one more KV block when it needs one,
//!    preempting the youngest sequence when the budget is spent, and runs one decode step.
//!
//! KV memory is allocated in blocks of `kv_block_tokens` positions as tokens are produced, and
//! the budget counts exactly the blocks held (vLLM's design). Reserving prompt + max_tokens up
//! front instead made a request without `max_tokens` hold the whole context, so a long-context
//! model served one such request at a time. A preempted sequence keeps its request, sampler
//! and generated tokens, goes back to the head of the queue, and on readmission recomputes its
//! cache from prompt + generated tokens (vLLM's recompute preemption); the client only sees a
//! pause. A sequence that alone outgrows the whole budget ends with `length`.
//!
//! With prefix caching, full prompt blocks are copied into the prefix cache once their prompt
//! is prefilled, and a new sequence starts from the longest chain of them that begins its
//! context. Cached blocks count against the budget, but only in what running sequences leave
//! free: they are evicted before a sequence is admitted short of room or preempted, so they
//! never refuse or stall a request.

use super::backend::{Backend, DecodeItem, PrefillItem};
use super::prefix::{PrefixCache, Scope};
use super::{Admitted, EngineConfig, Event, FinishReason, GenerateRequest};
use crate::grammar::Constraint;
use crate::metrics::Metrics;
use crate::sampling::Sampler;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// A request that is not running: new, or preempted with what it had generated.
struct Waiting {
    request: Admitted,
    sampler: Sampler,
    constraint: Option<Constraint>,
    generated: Vec<u32>,
    /// Whether the handler was told of its admission (it is told once).
    announced: bool,
}

impl Waiting {
    fn new(mut request: Admitted) -> Self {
        let sampler = Sampler::new(request.req.params.clone());
        let constraint = request.req.constraint.take();
        Self {
            request,
            sampler,
            constraint,
            generated: Vec::new(),
            announced: false,
        }
    }

    /// Tokens the cache must hold before the next token can be sampled.
    fn context_len(&self) -> usize {
        self.request.req.prompt.len() + self.generated.len()
    }
}

struct Sequence<C> {
    request: Admitted,
    cache: C,
    sampler: Sampler,
    /// Where the output stands in its grammar, when it has one.
    constraint: Option<Constraint>,
    /// What the cache must hold before decoding: the prompt, or after a preemption the prompt
    /// followed by every token generated so far.
    context: Vec<u32>,
    /// Positions the cache holds.
    cached: usize,
    /// Positions allocated for the cache, a whole number of blocks: what the budget counts.
    kv_positions: usize,
    generated: Vec<u32>,
    last_emit: Instant,
    /// Admission order: the youngest sequence is preempted first.
    admitted: u64,
    /// Whether it takes part in this iteration's decode step: its context was complete when
    /// the iteration began. One whose prompt completes during the iteration has just sampled
    /// its first token and decodes from the next one.
    decoding: bool,
    done: bool,
}

/// The adapter a request names, if any (for vllm:lora_requests_info).
fn adapter_name(r: &GenerateRequest) -> Option<&str> {
    r.adapter.as_ref().map(|a| a.name.as_str())
}

impl<C> Sequence<C> {
    fn prefilled(&self) -> bool {
        self.cached >= self.context.len()
    }

    fn fail(&mut self, error: String) {
        let _ = self.request.events.send(Event::Failed(error));
        self.done = true;
    }
}

pub(super) fn run<B: Backend>(
    backend: B,
    mut rx: mpsc::UnboundedReceiver<Admitted>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) {
    let mut engine = Loop {
        kv_bytes_per_token: backend.kv_bytes_per_token().max(1),
        backend,
        metrics,
        prefix: config.prefix_caching.then(|| PrefixCache::new(config.kv_block_tokens)),
        config,
        waiting: VecDeque::new(),
        running: Vec::new(),
        admissions: 0,
    };
    loop {
        if engine.waiting.is_empty() && engine.running.is_empty() {
            engine.metrics.engine_state(0, 0, 0.0);
            match rx.blocking_recv() {
                Some(r) => engine.waiting.push_back(Waiting::new(r)),
                // Every handle is gone and nothing is left to finish.
                None => return,
            }
        }
        while let Ok(r) = rx.try_recv() {
            engine.waiting.push_back(Waiting::new(r));
        }
        engine.step();
    }
}

struct Loop<B: Backend> {
    backend: B,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    kv_bytes_per_token: usize,
    waiting: VecDeque<Waiting>,
    running: Vec<Sequence<B::Cache>>,
    /// Full prompt blocks kept for later prompts; None when prefix caching is off.
    prefix: Option<PrefixCache<B::Cache>>,
    admissions: u64,
}

impl<B: Backend> Loop<B> {
    fn step(&mut self) {
        self.waiting.retain(|w| !w.request.events.is_closed());
        self.admit();
        self.report();
        for s in self.running.iter_mut() {
            s.decoding = s.prefilled();
        }
        self.prefill_chunk();
        self.make_room();
        self.decode_step();
        self.running.retain(|s| !s.done && !s.request.events.is_closed());
        self.report();
    }

    /// The KV share reported is the running sequences' (as vLLM's, where cached blocks that
    /// no sequence uses count as free): cached blocks give way to any request.
    fn report(&self) {
        let share = self.running_used() as f64 / self.config.kv_budget_bytes.max(1) as f64;
        self.metrics.engine_state(self.waiting.len(), self.running.len(), share);
        let running: Vec<&str> = self
            .running
            .iter()
            .filter_map(|s| adapter_name(&s.request.req))
            .collect();
        let waiting: Vec<&str> = self
            .waiting
            .iter()
            .filter_map(|w| adapter_name(&w.request.req))
            .collect();
        self.metrics.lora_requests(&running, &waiting);
        let cached = self.prefix.as_ref().map_or(0, |p| p.len());
        self.metrics.prefix_cache_blocks.set(cached as i64);
    }

    fn block(&self) -> usize {
        self.config.kv_block_tokens.max(1)
    }

    /// Positions, rounded up to whole blocks, for `tokens`.
    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block()) * self.block()
    }

    /// KV bytes the running sequences hold.
    fn running_used(&self) -> usize {
        let positions: usize = self.running.iter().map(|s| s.kv_positions).sum();
        positions.saturating_mul(self.kv_bytes_per_token)
    }

    /// KV bytes held in all: running sequences and cached prefix blocks.
    fn kv_used(&self) -> usize {
        let cached = self.prefix.as_ref().map_or(0, |p| p.len()) * self.block();
        self.running_used() + cached.saturating_mul(self.kv_bytes_per_token)
    }

    /// Evicts cached prefix blocks, least recently used first, until `extra` more bytes fit
    /// in the budget; false when none is left and they still do not.
    fn evict_cached_for(&mut self, extra: usize) -> bool {
        while self.kv_used() + extra > self.config.kv_budget_bytes {
            if !self.prefix.as_mut().is_some_and(|p| p.evict_one()) {
                return false;
            }
        }
        true
    }

    /// Admits waiting requests in order while a batch slot and the blocks for their context
    /// (and the first generated token) are free once cached prefix blocks are evicted. An
    /// empty batch always admits, so one oversized request cannot wedge the queue (validation
    /// keeps prompts within the budget; this is the backstop).
    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch {
            let Some(front) = self.waiting.front() else { break };
            let positions = self.blocks_for(front.context_len() + 1);
            let need = positions.saturating_mul(self.kv_bytes_per_token);
            if self.running_used() + need > self.config.kv_budget_bytes && !self.running.is_empty() {
                break;
            }
            let Some(w) = self.waiting.pop_front() else { break };
            let mut context = w.request.req.prompt.clone();
            context.extend_from_slice(&w.generated);
            let scope = Scope::of(w.request.req.adapter.as_ref());
            let hit = self.lookup_prefix(&scope, &context);
            self.evict_cached_for(need);
            let (cache, cached) = self.start_cache(positions, &hit);
            if self.prefix.is_some() {
                self.metrics.prefix_lookup(context.len(), cached);
            }
            if !w.announced {
                let queued_s = w.request.enqueued.elapsed().as_secs_f64();
                let _ = w.request.events.send(Event::Admitted {
                    queued_s,
                    cached_tokens: cached,
                });
            }
            self.admissions += 1;
            self.running.push(Sequence {
                cache,
                request: w.request,
                sampler: w.sampler,
                constraint: w.constraint,
                context,
                cached,
                kv_positions: positions,
                generated: w.generated,
                last_emit: Instant::now(),
                admitted: self.admissions,
                decoding: false,
                done: false,
            });
        }
    }

    /// The keys of the cached blocks that begin `context`, leaving at least its last token to
    /// prefill: its logits give the next token.
    fn lookup_prefix(&mut self, scope: &Scope, context: &[u32]) -> Vec<u64> {
        let max_blocks = context.len().saturating_sub(1) / self.block();
        match self.prefix.as_mut() {
            Some(prefix) => prefix.lookup(scope, context, max_blocks),
            None => Vec::new(),
        }
    }

    /// A new sequence's cache of `positions`, holding the cached blocks under `hit` that are
    /// still held, and how many positions those are. If copying fails the sequence starts
    /// empty and prefills everything.
    fn start_cache(&self, positions: usize, hit: &[u64]) -> (B::Cache, usize) {
        let mut cache = self.backend.new_cache(positions);
        let blocks = self.prefix.as_ref().map(|p| p.blocks(hit)).unwrap_or_default();
        if blocks.is_empty() {
            return (cache, 0);
        }
        match self.backend.extend_from(&mut cache, &blocks) {
            Ok(()) => (cache, blocks.len() * self.block()),
            Err(e) => {
                tracing::warn!(error = %e, "copying cached prefix blocks failed; prefilling the whole prompt");
                (self.backend.new_cache(positions), 0)
            }
        }
    }

    /// Runs at most `prefill_chunk_tokens` context tokens, oldest sequences first: contexts
    /// that fit whole and start empty go through one batched prefill; the rest (a long
    /// prompt, or the tail of one) run one chunk each after what their cache holds. A
    /// sequence whose context is complete samples its next token.
    fn prefill_chunk(&mut self) {
        let mut budget = self.config.prefill_chunk_tokens.max(1);
        let mut whole = Vec::new();
        let mut partial = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            if s.prefilled() {
                continue;
            }
            if budget == 0 {
                break;
            }
            let remaining = s.context.len() - s.cached;
            let take = remaining.min(budget);
            budget -= take;
            if s.cached == 0 && take == remaining {
                whole.push(i);
            } else {
                partial.push((i, take));
            }
        }
        let whole_results = self.prefill_whole(&whole);
        for (i, result) in whole.into_iter().zip(whole_results) {
            let len = self.running[i].context.len();
            self.record_prefill(i, len, result);
        }
        for (i, take) in partial {
            let s = &mut self.running[i];
            let chunk = &s.context[s.cached..s.cached + take];
            let adapter = s.request.req.adapter.as_ref().map(|a| &a.weights);
            let result = self.backend.forward(chunk, &mut s.cache, adapter);
            self.record_prefill(i, take, result);
        }
    }

    fn prefill_whole(&mut self, indices: &[usize]) -> Vec<Result<Vec<f32>, String>> {
        if indices.is_empty() {
            return Vec::new();
        }
        let mut items: Vec<PrefillItem<'_, B::Cache>> = self
            .running
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| indices.contains(i))
            .map(|(_, s)| PrefillItem {
                tokens: &s.context,
                cache: &mut s.cache,
                adapter: s.request.req.adapter.as_ref().map(|a| &a.weights),
            })
            .collect();
        self.backend.prefill(&mut items)
    }

    /// Records `tokens` more context positions of sequence `i` as cached and, once its whole
    /// context is, samples from the logits.
    fn record_prefill(&mut self, i: usize, tokens: usize, result: Result<Vec<f32>, String>) {
        let logits = match result {
            Ok(l) => l,
            Err(e) => return self.running[i].fail(e),
        };
        self.running[i].cached += tokens;
        if !self.running[i].prefilled() {
            return;
        }
        self.keep_prompt(i);
        let metrics = self.metrics.clone();
        let s = &mut self.running[i];
        if s.generated.is_empty() {
            metrics.prefilled(s.request.req.prompt.len());
            metrics.first_token(s.request.enqueued.elapsed().as_secs_f64());
        }
        emit(s, &logits, &metrics);
    }

    /// Copies the full blocks of sequence `i`'s prompt that are not cached yet into the prefix
    /// cache, within what the budget leaves after the running sequences.
    fn keep_prompt(&mut self, i: usize) {
        let block_bytes = (self.block() * self.kv_bytes_per_token).max(1);
        let room = self.config.kv_budget_bytes.saturating_sub(self.running_used()) / block_bytes;
        let Some(prefix) = self.prefix.as_mut() else { return };
        let s = &self.running[i];
        let backend = &self.backend;
        let scope = Scope::of(s.request.req.adapter.as_ref());
        prefix.insert(&scope, &s.request.req.prompt, room, |start, len| {
            backend
                .copy_positions(&s.cache, start, len)
                .map_err(|e| tracing::debug!(error = %e, "prompt blocks not cached"))
                .ok()
        });
    }

    /// Gives each decoding sequence whose cache is full one more block. When the budget
    /// cannot hold them, cached prefix blocks are evicted, then the youngest sequence is
    /// preempted and the count redone; a sequence
    /// alone that still does not fit has outgrown the whole budget and ends with `length`.
    fn make_room(&mut self) {
        let block = self.block();
        let needs_block = |s: &Sequence<B::Cache>| s.decoding && !s.done && s.cached + 1 > s.kv_positions;
        loop {
            let growing = self.running.iter().filter(|s| needs_block(s)).count();
            let growth = (growing * block).saturating_mul(self.kv_bytes_per_token);
            if growing == 0 || self.kv_used() + growth <= self.config.kv_budget_bytes {
                break;
            }
            if self.prefix.as_mut().is_some_and(|p| p.evict_one()) {
                continue;
            }
            let live = self.running.iter().filter(|s| !s.done).count();
            if live > 1 {
                self.preempt_youngest();
                continue;
            }
            for s in self.running.iter_mut().filter(|s| !s.done) {
                let _ = s.request.events.send(Event::Finished(FinishReason::Length));
                s.done = true;
            }
            return;
        }
        for s in self.running.iter_mut() {
            if needs_block(s) {
                let positions = s.kv_positions + block;
                match self.backend.reserve(&mut s.cache, positions) {
                    Ok(()) => s.kv_positions = positions,
                    Err(e) => s.fail(e),
                }
            }
        }
    }

    /// Frees the youngest live sequence's cache and puts it back at the head of the queue
    /// with its sampler and generated tokens, so it resumes where it stopped.
    fn preempt_youngest(&mut self) {
        let youngest = (self.running.iter().enumerate())
            .filter(|(_, s)| !s.done)
            .max_by_key(|(_, s)| s.admitted)
            .map(|(i, _)| i);
        let Some(i) = youngest else { return };
        let s = self.running.remove(i);
        self.waiting.push_front(Waiting {
            request: s.request,
            sampler: s.sampler,
            constraint: s.constraint,
            generated: s.generated,
            announced: true,
        });
        self.metrics.preempted();
    }

    fn decode_step(&mut self) {
        let mut indices = Vec::new();
        let mut items: Vec<DecodeItem<'_, B::Cache>> = Vec::new();
        for (i, s) in self.running.iter_mut().enumerate() {
            if !s.decoding || s.done {
                continue;
            }
            let Some(&token) = s.generated.last() else { continue };
            indices.push(i);
            items.push(DecodeItem {
                token,
                cache: &mut s.cache,
                adapter: s.request.req.adapter.as_ref().map(|a| &a.weights),
            });
        }
        if items.is_empty() {
            return;
        }
        self.metrics.batch_size.observe(items.len() as f64);
        let results = self.backend.decode(&mut items);
        drop(items);
        for (i, result) in indices.into_iter().zip(results) {
            let s = &mut self.running[i];
            match result {
                Ok(logits) => {
                    s.cached += 1;
                    self.metrics
                        .inter_token_latency
                        .observe(s.last_emit.elapsed().as_secs_f64());
                    emit(s, &logits, &self.metrics);
                }
                Err(e) => s.fail(e),
            }
        }
    }
}

/// Samples from `logits` (within the sequence's grammar, if it has one) and tells the handler;
/// marks the sequence done when it ends.
fn emit<C>(seq: &mut Sequence<C>, logits: &[f32], metrics: &Metrics) {
    let masked;
    let logits = match seq.constraint.as_mut() {
        Some(constraint) => {
            let mut m = logits.to_vec();
            if let Err(e) = constraint.mask(&mut m, &seq.request.req.stop_ids) {
                return seq.fail(e);
            }
            masked = m;
            &masked[..]
        }
        None => logits,
    };
    let (id, logprob) = seq.sampler.sample(logits);
    let events = &seq.request.events;
    if seq.request.req.stop_ids.contains(&id) {
        let _ = events.send(Event::Finished(FinishReason::Stop));
        seq.done = true;
        return;
    }
    seq.generated.push(id);
    seq.last_emit = Instant::now();
    metrics.generated_token();
    if events.send(Event::Token { id, logprob }).is_err() {
        // The client went away.
        seq.done = true;
        return;
    }
    if let Some(constraint) = seq.constraint.as_mut() {
        match constraint.advance(id) {
            // The grammar is complete: nothing may follow.
            Ok(true) => {
                let _ = seq.request.events.send(Event::Finished(FinishReason::Stop));
                seq.done = true;
                return;
            }
            Ok(false) => {}
            Err(e) => return seq.fail(e),
        }
    }
    if seq.generated.len() >= seq.request.req.max_tokens {
        let _ = events.send(Event::Finished(FinishReason::Length));
        seq.done = true;
    }
}
