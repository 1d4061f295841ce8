//! kubetune-server: an OpenAI-compatible inference server for one base model and many LoRA
//! adapters.
//!
//! - [`api`]: HTTP routes; requests are validated into `ValidGeneration` before anything runs.
//! - [`engine`]: the actor that owns the batch, the KV caches and the model (continuous
//!   batching, bounded queue, cancellation), behind the [`engine::backend::Backend`] trait.
//! - [`adapters`] / [`loader`]: the loaded adapter set and how adapters are fetched and checked.
//! - [`ondemand`]: loading a registry adapter a request names (LRU, single-flight).
//! - [`server`]: start-up from the command line, warm-up, graceful shutdown.
//! - [`grammar`] / [`tools`]: constrained output, and tool calls read from (or held to) it.

pub mod adapters;
pub mod api;
pub mod engine;
pub mod error;
pub mod grammar;
pub mod loader;
pub mod metrics;
pub mod ondemand;
pub mod sampling;
pub mod server;
pub mod text;
pub mod tools;
