//! The engine loop (continuous batching). Each iteration:
//! 1. takes newly submitted requests into the waiting queue and drops cancelled ones;
//! 2. admits waiting requests in arrival order while a batch slot and KV budget are free, and
//!    prefills them together (each one's first token comes out right away);
//! 3. runs one decode step for every sequence that was already running.
//!
//! New requests therefore join between decode steps without waiting for the batch to drain.
//! KV memory is reserved for prompt + max_tokens at admission, so a running sequence can
//! never run out of cache and nothing needs to be preempted.

use super::backend::{Backend, DecodeItem, PrefillItem};
use super::{Admitted, EngineConfig, Event, FinishReason};
use crate::metrics::Metrics;
use crate::sampling::Sampler;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

struct Sequence<C> {
    request: Admitted,
    cache: C,
    sampler: Sampler,
    generated: usize,
    last_token: u32,
    last_emit: Instant,
    kv_reserved: usize,
}

enum Outcome {
    Continue,
    Done,
}

pub(super) fn run<B: Backend>(
    backend: B,
    mut rx: mpsc::UnboundedReceiver<Admitted>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) {
    let mut waiting: VecDeque<Admitted> = VecDeque::new();
    let mut running: Vec<Sequence<B::Cache>> = Vec::new();
    let mut kv_used = 0usize;
    loop {
        if waiting.is_empty() && running.is_empty() {
            metrics.engine_state(0, 0, 0.0);
            match rx.blocking_recv() {
                Some(r) => waiting.push_back(r),
                // Every handle is gone and nothing is left to finish.
                None => return,
            }
        }
        while let Ok(r) = rx.try_recv() {
            waiting.push_back(r);
        }
        waiting.retain(|r| !r.events.is_closed());

        let mut admitted = Vec::new();
        while running.len() + admitted.len() < config.max_batch {
            let Some(front) = waiting.front() else { break };
            let need = kv_need(&backend, front);
            // An empty batch always admits, so one oversized request cannot wedge the queue
            // (validation keeps requests within the budget; this is the backstop).
            if kv_used + need > config.kv_budget_bytes && !(running.is_empty() && admitted.is_empty()) {
                break;
            }
            let Some(request) = waiting.pop_front() else { break };
            kv_used += need;
            admitted.push((request, need));
        }
        metrics.engine_state(
            waiting.len(),
            running.len() + admitted.len(),
            kv_share(kv_used, &config),
        );
        let new = prefill(&backend, admitted, &metrics);
        let prefilled = new.len();
        running.extend(new);

        // Sequences prefilled above sit at the end of `running`; the rest take a decode step.
        let decoding = running.len() - prefilled;
        if decoding > 0 {
            metrics.batch_size.observe(decoding as f64);
            let outcomes = decode_step(&backend, &mut running[..decoding], &metrics);
            let mut i = 0;
            running.retain(|_| {
                let keep = i >= decoding || matches!(outcomes[i], Outcome::Continue);
                i += 1;
                keep
            });
        }
        // Finished sequences were dropped above; cancelled ones go here.
        running.retain(|s| !s.request.events.is_closed());
        kv_used = running.iter().map(|s| s.kv_reserved).sum();
        metrics.engine_state(waiting.len(), running.len(), kv_share(kv_used, &config));
    }
}

fn kv_share(used: usize, config: &EngineConfig) -> f64 {
    used as f64 / config.kv_budget_bytes.max(1) as f64
}

fn kv_need<B: Backend>(backend: &B, r: &Admitted) -> usize {
    (r.req.prompt.len() + r.req.max_tokens).saturating_mul(backend.kv_bytes_per_token())
}

/// Prefills the admitted requests together (the backend batches what it can); each one's
/// first token comes out right away. Returns the sequences that go on decoding.
fn prefill<B: Backend>(backend: &B, admitted: Vec<(Admitted, usize)>, metrics: &Metrics) -> Vec<Sequence<B::Cache>> {
    if admitted.is_empty() {
        return Vec::new();
    }
    let mut caches: Vec<B::Cache> = admitted
        .iter()
        .map(|(r, _)| backend.new_cache(r.req.prompt.len() + r.req.max_tokens))
        .collect();
    let results = {
        let mut items: Vec<PrefillItem<'_, B::Cache>> = admitted
            .iter()
            .zip(caches.iter_mut())
            .map(|((r, _), cache)| PrefillItem {
                tokens: &r.req.prompt,
                cache,
                adapter: r.req.adapter.as_ref().map(|a| &a.weights),
            })
            .collect();
        backend.prefill(&mut items)
    };
    let mut sequences = Vec::with_capacity(admitted.len());
    for (((request, kv_reserved), cache), result) in admitted.into_iter().zip(caches).zip(results) {
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                let _ = request.events.send(Event::Failed(e));
                continue;
            }
        };
        let sampler = Sampler::new(request.req.params.clone());
        let mut seq = Sequence {
            request,
            cache,
            sampler,
            generated: 0,
            last_token: 0,
            last_emit: Instant::now(),
            kv_reserved,
        };
        metrics.prefilled(seq.request.req.prompt.len());
        metrics.first_token(seq.request.enqueued.elapsed().as_secs_f64());
        if let Outcome::Continue = emit(&mut seq, &logits, metrics) {
            sequences.push(seq);
        }
    }
    sequences
}

fn decode_step<B: Backend>(backend: &B, seqs: &mut [Sequence<B::Cache>], metrics: &Metrics) -> Vec<Outcome> {
    let mut items: Vec<DecodeItem<'_, B::Cache>> = seqs
        .iter_mut()
        .map(|s| DecodeItem {
            token: s.last_token,
            cache: &mut s.cache,
            adapter: s.request.req.adapter.as_ref().map(|a| &a.weights),
        })
        .collect();
    let results = backend.decode(&mut items);
    drop(items);
    seqs.iter_mut()
        .zip(results)
        .map(|(seq, result)| match result {
            Ok(logits) => {
                metrics
                    .inter_token_latency
                    .observe(seq.last_emit.elapsed().as_secs_f64());
                emit(seq, &logits, metrics)
            }
            Err(e) => {
                let _ = seq.request.events.send(Event::Failed(e));
                Outcome::Done
            }
        })
        .collect()
}

/// Samples from `logits` and tells the handler; says whether the sequence goes on.
fn emit<C>(seq: &mut Sequence<C>, logits: &[f32], metrics: &Metrics) -> Outcome {
    let (id, logprob) = seq.sampler.sample(logits);
    let events = &seq.request.events;
    if seq.request.req.stop_ids.contains(&id) {
        let _ = events.send(Event::Finished(FinishReason::Stop));
        return Outcome::Done;
    }
    seq.generated += 1;
    seq.last_token = id;
    seq.last_emit = Instant::now();
    metrics.generated_token();
    if events.send(Event::Token { id, logprob }).is_err() {
        // The client went away.
        return Outcome::Done;
    }
    if seq.generated >= seq.request.req.max_tokens {
        let _ = events.send(Event::Finished(FinishReason::Length));
        return Outcome::Done;
    }
    Outcome::Continue
}
