//! The generation engine: one actor thread owns the model, the queue and every KV cache;
//! HTTP handlers talk to it through channels. Overload is decided here, before anything is
//! queued: a semaphore of `max_batch + max_queue` permits turns a full queue into HTTP 429.

mod actor;
pub mod backend;
mod prefix;
#[cfg(test)]
mod tests;

use crate::adapters::LoadedAdapter;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::sampling::{SamplingParams, TokenLogprob};
use backend::Backend;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Requests that may wait for a batch slot; beyond this the server answers 429.
    pub max_queue: usize,
    /// Longest prompt + completion, in tokens.
    pub max_context: usize,
    /// KV cache memory all running sequences may hold together.
    pub kv_budget_bytes: usize,
    /// Positions per KV block: caches are allocated, grown and counted in whole blocks.
    pub kv_block_tokens: usize,
    /// Prompt tokens prefilled per engine iteration, between two decode steps: bounds both
    /// the stall running streams see and a long prompt's attention scores (chunk x context).
    pub prefill_chunk_tokens: usize,
    /// Seconds clients are told to wait in Retry-After when the queue is full.
    pub retry_after_s: u64,
    /// Keep full prompt blocks' KV after their sequence, for later prompts of the same
    /// adapter that start the same way (see `prefix`).
    pub prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            max_queue: 64,
            max_context: 2048,
            kv_budget_bytes: 1 << 30,
            kv_block_tokens: 32,
            prefill_chunk_tokens: 512,
            retry_after_s: 1,
            prefix_caching: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (EOS) or a stop string.
    Stop,
    /// max_tokens reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What the engine tells a request's handler.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The request left the queue for a batch slot after `queued_s` seconds (sent once, also
    /// if it is later preempted and readmitted), with its first `cached_tokens` prompt tokens
    /// found in the prefix cache.
    Admitted {
        queued_s: f64,
        cached_tokens: usize,
    },
    Token {
        id: u32,
        logprob: Option<TokenLogprob>,
    },
    Finished(FinishReason),
    Failed(String),
}

/// A validated generation, ready for the engine.
#[derive(Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub adapter: Option<Arc<LoadedAdapter>>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop_ids: Arc<Vec<u32>>,
    /// The grammar the output must follow (`response_format`, `guided_*`); cloning gives each
    /// choice its own position in it.
    pub constraint: Option<crate::grammar::Constraint>,
}

/// A request inside the engine: the permit is released when the request is dropped, which is
/// when it finishes, fails or is cancelled.
pub(crate) struct Admitted {
    req: GenerateRequest,
    events: mpsc::UnboundedSender<Event>,
    enqueued: Instant,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Admitted {
    /// A request ends (finished, failed or cancelled), and with it its hold on its adapter.
    fn drop(&mut self) {
        if let Some(adapter) = self.req.adapter.take() {
            crate::adapters::LoadedAdapter::release(adapter);
        }
    }
}

/// Handle to the engine actor; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<Admitted>,
    permits: Arc<Semaphore>,
    config: EngineConfig,
    kv_bytes_per_token: usize,
    /// False once the actor thread has ended: it panicked, since it otherwise runs as long as
    /// any handle exists.
    alive: Arc<AtomicBool>,
}

/// Clears the engine's liveness when the actor thread ends, by return or by panic (drop runs
/// during unwinding).
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
        if std::thread::panicking() {
            tracing::error!("the engine thread panicked; /health now fails so the pod is restarted");
        }
    }
}

impl Engine {
    /// Starts the actor on its own OS thread: model steps are long, blocking CPU work that
    /// must not stall the async runtime serving HTTP.
    pub fn start<B: Backend>(backend: B, config: EngineConfig, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let kv_bytes_per_token = backend.kv_bytes_per_token();
        let permits = Arc::new(Semaphore::new(config.max_batch + config.max_queue));
        let actor_config = config.clone();
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        std::thread::Builder::new()
            .name("kubetune-engine".into())
            .spawn(move || {
                let _guard = guard;
                actor::run(backend, rx, actor_config, metrics)
            })
            .expect("spawning the engine thread");
        Self {
            tx,
            permits,
            config,
            kv_bytes_per_token,
            alive,
        }
    }

    /// Whether the actor thread still runs. Once it has died nothing can be generated, and
    /// the probes say so instead of answering 200 while every request fails.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// KV bytes a sequence of `tokens` positions needs.
    pub fn kv_bytes(&self, tokens: usize) -> usize {
        tokens.saturating_mul(self.kv_bytes_per_token)
    }

    /// Queues a request, or refuses it at once when the server is at capacity. Dropping the
    /// returned receiver cancels the generation at the next step.
    pub fn submit(&self, req: GenerateRequest) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        if !self.is_alive() {
            return Err(ApiError::EngineDown);
        }
        let permit = self.permits.clone().try_acquire_owned().map_err(|e| match e {
            tokio::sync::TryAcquireError::Closed => ApiError::ShuttingDown,
            tokio::sync::TryAcquireError::NoPermits => ApiError::Overloaded {
                capacity: self.config.max_batch + self.config.max_queue,
                retry_after_s: self.config.retry_after_s,
            },
        })?;
        let (events, rx) = mpsc::unbounded_channel();
        let admitted = Admitted {
            req,
            events,
            enqueued: Instant::now(),
            _permit: permit,
        };
        // The receiver is gone only when the actor thread has ended.
        self.tx.send(admitted).map_err(|_| ApiError::EngineDown)?;
        Ok(rx)
    }

    /// Refuses new requests from now on; those already admitted run to completion.
    pub fn close(&self) {
        self.permits.close();
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        (self.config.max_batch + self.config.max_queue).saturating_sub(self.permits.available_permits())
    }
}
