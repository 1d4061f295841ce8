//! The engine loop (continuous batching). Each iteration:
//! 1. takes newly submitted requests into the waiting queue and drops cancelled ones;
//! 2. admits waiting requests in arrival order while a batch slot and KV budget are free, and
//!    prefills each (its first token comes out right away);
//! 3. runs one decode step for every sequence that was already running.
//!
//! New requests therefore join between decode steps without waiting for the batch to drain.
//! KV memory is reserved for prompt + max_tokens at admission, so a running sequence can
//! never run out of cache and nothing needs to be preempted.

use super::backend::{Backend, DecodeItem};
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

pub(super) fn run<B: Backend>(backend: B, mut rx: mpsc::UnboundedReceiver<Admitted>, config: EngineConfig, metrics: Arc<Metrics>) {
    let mut waiting: VecDeque<Admitted> = VecDeque::new();
    let mut running: Vec<Sequence<B::Cache>> = Vec::new();
    let mut kv_used = 0usize;
    loop {
        if waiting.is_empty() && running.is_empty() {
            metrics.queue_depth.set(0);
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

        let mut prefilled = 0;
        while running.len() < config.max_batch {
            let Some(front) = waiting.front() else { break };
            let need = kv_need(&backend, front);
            // An empty batch always admits, so one oversized request cannot wedge the queue
            // (validation keeps requests within the budget; this is the backstop).
            if kv_used + need > config.kv_budget_bytes && !running.is_empty() {
                break;
            }
            let Some(request) = waiting.pop_front() else { break };
            if let Some(seq) = prefill(&backend, request, need, &metrics) {
                kv_used += seq.kv_reserved;
                running.push(seq);
                prefilled += 1;
            }
        }
        metrics.queue_depth.set(waiting.len() as i64);

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
    }
}

fn kv_need<B: Backend>(backend: &B, r: &Admitted) -> usize {
    (r.req.prompt.len() + r.req.max_tokens).saturating_mul(backend.kv_bytes_per_token())
}

fn prefill<B: Backend>(backend: &B, request: Admitted, kv_reserved: usize, metrics: &Metrics) -> Option<Sequence<B::Cache>> {
    let mut cache = backend.new_cache(request.req.prompt.len() + request.req.max_tokens);
    let adapter = request.req.adapter.as_ref().map(|a| &a.weights);
    let logits = match backend.forward(&request.req.prompt, &mut cache, adapter) {
        Ok(l) => l,
        Err(e) => {
            let _ = request.events.send(Event::Failed(e));
            return None;
        }
    };
    let sampler = Sampler::new(request.req.params.clone());
    let mut seq = Sequence { request, cache, sampler, generated: 0, last_token: 0, last_emit: Instant::now(), kv_reserved };
    metrics.time_to_first_token.observe(seq.request.enqueued.elapsed().as_secs_f64());
    match emit(&mut seq, &logits, metrics) {
        Outcome::Continue => Some(seq),
        Outcome::Done => None,
    }
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
                metrics.inter_token_latency.observe(seq.last_emit.elapsed().as_secs_f64());
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
    metrics.generated_tokens.inc();
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
