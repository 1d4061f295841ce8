//! Start-up: the command line, loading the model and the listed adapters, warm-up, serving and
//! graceful shutdown.

use crate::adapters::{AdapterLimits, AdapterSet, LoadedAdapter};
use crate::api::{self, AppState};
use crate::engine::backend::{Backend, CandleBackend};
use crate::engine::{Engine, EngineConfig, Event, GenerateRequest};
use crate::error::StartupError;
use crate::loader::{AdapterLoader, AdapterSpec};
use crate::metrics::Metrics;
use crate::sampling::SamplingParams;
use crate::text::TextCodec;
use clap::Parser;
use kubetune_model::{load_model, BaseFormat, LoadOptions};
use kubetune_storage::{Cache, Credentials, Registry, Storage};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Every flag also reads `KUBETUNE_<FLAG>` (`--max-batch`: `KUBETUNE_MAX_BATCH`), as the
/// operator's flags do; a flag on the command line wins. Repeatable flags take one value from
/// the environment.
#[derive(Parser, Debug, Clone)]
#[command(
    version,
    about = "OpenAI-compatible inference server for a base model and LoRA adapters"
)]
pub struct Args {
    /// Base model: a local directory, file://, s3://, gs://, az:// or hf:// URI (HF layout).
    #[arg(long, env = "KUBETUNE_MODEL")]
    pub model: String,
    /// The id clients use for the base model; defaults to --model.
    #[arg(long, env = "KUBETUNE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Other names of the base model that adapters may record as base_model_name_or_path.
    #[arg(long = "base-model-alias", env = "KUBETUNE_BASE_MODEL_ALIAS")]
    pub base_model_aliases: Vec<String>,
    /// An adapter to load at start, `name=SOURCE` (registry reference `reg-name@N`, or the URI
    /// or directory of a version with its manifest.json, verified against it). Repeatable.
    #[arg(long = "adapter", env = "KUBETUNE_ADAPTER", value_parser = parse_adapter_flag)]
    pub adapters: Vec<AdapterSpec>,
    /// The operator's adapters file (JSON `{"adapters": [{name, source, version, digest}]}`).
    #[arg(long, env = "KUBETUNE_ADAPTERS_FILE")]
    pub adapters_file: Option<PathBuf>,
    /// Adapter registry root that registry references resolve in.
    #[arg(long, env = "KUBETUNE_REGISTRY")]
    pub registry: Option<String>,
    #[arg(long, env = "KUBETUNE_LISTEN", default_value = "0.0.0.0:8000")]
    pub listen: String,
    /// Serve the adapter admin API on this address only, and not on --listen: a port apart that
    /// the Service clients use does not expose. Unset, it is served on --listen.
    #[arg(long, env = "KUBETUNE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    #[arg(long, env = "KUBETUNE_MAX_BATCH", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_batch: u32,
    /// Longest prompt + completion in tokens; defaults to the model's max_position_embeddings.
    #[arg(long, env = "KUBETUNE_MAX_CONTEXT", value_parser = clap::value_parser!(u32).range(2..))]
    pub max_context: Option<u32>,
    /// Requests that may wait for a batch slot before the server answers 429.
    #[arg(long, env = "KUBETUNE_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: u32,
    /// KV cache memory for all running sequences together, MiB.
    #[arg(long, env = "KUBETUNE_KV_CACHE_MB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_cache_mb: u64,
    /// Positions per KV cache block: a sequence's cache grows, and counts against
    /// --kv-cache-mb, one block at a time as it generates.
    #[arg(long, env = "KUBETUNE_KV_BLOCK_TOKENS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub kv_block_tokens: u32,
    /// Prompt tokens prefilled per engine step, between two decode steps: a long prompt is
    /// prefilled in chunks of this size, so running streams keep their inter-token latency and
    /// its attention scores stay within chunk x context per layer.
    #[arg(long, env = "KUBETUNE_PREFILL_CHUNK_TOKENS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub prefill_chunk_tokens: u32,
    /// Keep the KV of full prompt blocks after their request (vLLM's flag), so a later prompt
    /// of the same adapter that starts the same way (a system prompt, few-shot examples)
    /// prefills only the rest. The blocks use only --kv-cache-mb that running sequences leave
    /// free and are evicted, least recently used first, before any request waits or is
    /// preempted. On by default; `--enable-prefix-caching=false` or
    /// `--no-enable-prefix-caching` turns it off.
    #[arg(long, env = "KUBETUNE_ENABLE_PREFIX_CACHING", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// vLLM's spelling of --enable-prefix-caching=false.
    #[arg(
        long,
        env = "KUBETUNE_NO_ENABLE_PREFIX_CACHING",
        overrides_with = "enable_prefix_caching"
    )]
    pub no_enable_prefix_caching: bool,
    #[arg(long, env = "KUBETUNE_MAX_ADAPTERS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_adapters: u32,
    #[arg(long, env = "KUBETUNE_MAX_ADAPTER_RANK", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_adapter_rank: u32,
    #[arg(long, env = "KUBETUNE_MAX_ADAPTER_MEMORY_MB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_adapter_memory_mb: u64,
    /// Load a `--registry` adapter that a request names and that is not loaded, instead of
    /// answering 404: it is verified like any load, served under its registry name, and
    /// evicted (least recently used, when --max-adapters or --max-adapter-memory-mb is
    /// reached, and only while no request uses it) to make room for another. Adapters loaded
    /// at start or through the admin API are pinned: never evicted. Off by default: the
    /// operator unloads adapters its ModelDeployment does not list.
    #[arg(long, env = "KUBETUNE_ADAPTER_ON_DEMAND")]
    pub adapter_on_demand: bool,
    /// On-demand adapter loads that may run at once; requests for one adapter share one load.
    #[arg(long, env = "KUBETUNE_ADAPTER_LOAD_CONCURRENCY", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub adapter_load_concurrency: u32,
    /// The longest one adapter load (download and read) may take, on demand, at start or
    /// through the admin API.
    #[arg(long, env = "KUBETUNE_ADAPTER_LOAD_TIMEOUT_S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub adapter_load_timeout_s: u64,
    /// Largest registry adapter version to download, MiB, as its manifest lists its files: a
    /// larger one is refused before any weights are downloaded.
    #[arg(long, env = "KUBETUNE_MAX_ADAPTER_DOWNLOAD_MB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_adapter_download_mb: u64,
    /// Space for adapters in --cache-dir, MiB: after each load the least recently used adapter
    /// entries are deleted until the rest fit. Unset: no cap.
    #[arg(long, env = "KUBETUNE_ADAPTER_CACHE_MAX_MB", value_parser = clap::value_parser!(u64).range(1..))]
    pub adapter_cache_max_mb: Option<u64>,
    /// Fold the one listed adapter into the base weights (fastest; no other adapters served).
    #[arg(long, env = "KUBETUNE_MERGE")]
    pub merge: bool,
    /// How the base weights are held. `none`: as the checkpoint has them (f32). `int8`: the
    /// projections and the head rounded to int8 with one scale per output row, for CPU
    /// serving. A decoded token then reads a quarter of the bytes; on CPUs with AVX-512 VNNI
    /// each product's inputs are rounded to int8 per row as well (PyTorch's dynamic int8
    /// quantization), so prefill and batched decoding multiply in int8 too. Benchmark model:
    /// about 3x f32's single-stream speed. Adapters stay f32; with --merge the adapter is
    /// folded in before rounding.
    #[arg(long, env = "KUBETUNE_QUANTIZE", value_enum, default_value_t = Quantize::None)]
    pub quantize: Quantize,
    /// auto, cpu, cuda or cuda:N. auto: CUDA when this binary was built with it and a GPU
    /// opens, else the CPU. An explicit cuda never falls back to the CPU. On a GPU the base is
    /// held in bf16.
    #[arg(long, env = "KUBETUNE_DEVICE", default_value = "auto", value_parser = kubetune_model::device::parse_flag)]
    pub device: kubetune_model::DeviceChoice,
    /// File with one API key per line; when set, completions and chat require
    /// `Authorization: Bearer <key>`, and so does GET /v1/models (which also takes an admin key).
    /// Without it they are open.
    #[arg(long, env = "KUBETUNE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// File with one admin key per line; when set, the adapter admin API (POST/GET
    /// /v1/adapters, DELETE /v1/adapters/NAME) requires `Authorization: Bearer <admin key>`.
    /// Without it the admin API is off (403 "admin API disabled"); API keys never grant admin
    /// access.
    #[arg(long, env = "KUBETUNE_ADMIN_API_KEY_FILE")]
    pub admin_api_key_file: Option<PathBuf>,
    /// Download cache for models and adapters from object storage and the registry.
    #[arg(long, env = "KUBETUNE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Directory of a mounted Secret with storage credentials (AWS_*, ...), on top of the env.
    #[arg(long, env = "KUBETUNE_CREDENTIALS_DIR")]
    pub credentials_dir: Option<PathBuf>,
    /// How long in-flight requests may run after SIGTERM before the server exits anyway.
    #[arg(long, env = "KUBETUNE_SHUTDOWN_TIMEOUT_S", default_value_t = 30)]
    pub shutdown_timeout_s: u64,
    #[arg(long, env = "KUBETUNE_RETRY_AFTER_S", default_value_t = 1)]
    pub retry_after_s: u64,
    /// A deadline for each generation request, from its arrival to its last token: past it the
    /// sequences are cancelled and the client gets 504 (or, streaming, an error event). Unset:
    /// no deadline.
    #[arg(long, alias = "request-timeout", env = "KUBETUNE_REQUEST_TIMEOUT_S", value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_s: Option<u64>,
    /// How `tool_choice: auto` answers are read for calls: `auto` takes the format the chat
    /// template writes (`<tool_call>` blocks: hermes; Llama 3's JSON: llama3_json); `none`
    /// refuses `auto` (`required` and named functions need no format: a grammar holds them).
    #[arg(long, env = "KUBETUNE_TOOL_CALL_PARSER", value_enum, default_value_t = crate::tools::ToolParserFlag::Auto)]
    pub tool_call_parser: crate::tools::ToolParserFlag,
    /// Seconds between SSE comments on a stream with nothing to send (a long prefill, a wait in
    /// the queue), so that proxies with idle timeouts keep the connection.
    #[arg(long, env = "KUBETUNE_SSE_KEEP_ALIVE_S", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub sse_keep_alive_s: u64,
}

impl Args {
    /// Whether prefix caching is on: --enable-prefix-caching, unless vLLM's negation came last.
    pub fn prefix_caching(&self) -> bool {
        self.enable_prefix_caching && !self.no_enable_prefix_caching
    }
}

fn parse_adapter_flag(s: &str) -> Result<AdapterSpec, String> {
    let (name, source) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected name=SOURCE"))?;
    if name.is_empty() || source.is_empty() {
        return Err(format!("`{s}`: expected name=SOURCE with both parts non-empty"));
    }
    Ok(AdapterSpec {
        name: name.into(),
        source: source.into(),
        version: None,
        digest: None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantize {
    None,
    Int8,
}

/// Opens `--device` and logs where the server runs, and why not on a GPU where auto chose the
/// CPU.
fn open_device(choice: kubetune_model::DeviceChoice) -> Result<candle_core::Device, StartupError> {
    let (device, cpu_because) = kubetune_model::device::open(choice).map_err(|e| flag("--device", e.to_string()))?;
    let dtype = kubetune_model::device::base_dtype(&device);
    match cpu_because {
        Some(why) => tracing::info!(device = "cpu", ?dtype, asked = ?choice, why = %why, "device chosen"),
        None => tracing::info!(device = %kubetune_model::device::describe(&device), ?dtype, "device chosen"),
    }
    Ok(device)
}

fn flag(flag: &'static str, reason: impl Into<String>) -> StartupError {
    StartupError::Flag {
        flag,
        reason: reason.into(),
    }
}

/// Every adapter to load at start: --adapter flags, then the adapters file.
fn startup_adapters(args: &Args) -> Result<Vec<AdapterSpec>, StartupError> {
    let mut specs = args.adapters.clone();
    if let Some(path) = &args.adapters_file {
        let text = std::fs::read_to_string(path).map_err(|e| StartupError::File {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let file: kubetune_crds::server_contract::AdaptersFile =
            serde_json::from_str(&text).map_err(|e| StartupError::File {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        specs.extend(file.adapters.into_iter().map(|a| AdapterSpec {
            name: a.name,
            source: a.source,
            version: Some(a.version),
            digest: Some(a.digest),
        }));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = specs.iter().find(|s| !seen.insert(s.name.clone())) {
        return Err(flag("--adapter", format!("adapter `{}` is listed twice", dup.name)));
    }
    Ok(specs)
}

/// The model's directory in HF layout: `--model` itself, its download, or, for a GGUF file,
/// the import beside it.
async fn model_dir(args: &Args, cache: Option<&Cache>, credentials: &Credentials) -> Result<PathBuf, StartupError> {
    let path = model_path(args, cache, credentials).await?;
    tokio::task::spawn_blocking(move || kubetune_model::gguf::model_dir(&path))
        .await
        .map_err(|e| StartupError::Warmup(e.to_string()))?
        .map_err(StartupError::from)
}

async fn model_path(args: &Args, cache: Option<&Cache>, credentials: &Credentials) -> Result<PathBuf, StartupError> {
    let local = Path::new(&args.model);
    if local.is_dir() || kubetune_model::gguf::is_gguf(local) {
        return Ok(local.to_path_buf());
    }
    let cache = cache.ok_or_else(|| {
        flag(
            "--model",
            format!(
                "`{}` is not a local directory or .gguf file, and without --cache-dir it cannot be downloaded",
                args.model
            ),
        )
    })?;
    Ok(cache.download_model(&args.model, credentials).await?)
}

/// Everything `serve` needs, built from the command line.
pub async fn build(args: &Args) -> Result<Arc<AppState>, StartupError> {
    build_with(args, |b| b).await
}

/// As `build`, with the model backend wrapped by `wrap` (tests use it to observe or gate
/// engine steps).
pub async fn build_with<B: Backend>(
    args: &Args,
    wrap: impl FnOnce(CandleBackend) -> B,
) -> Result<Arc<AppState>, StartupError> {
    // Key files first: a bad one fails before minutes of model download.
    let keys = api::auth::Keys {
        api: args
            .api_keys_file
            .as_deref()
            .map(|p| api::auth::read_keys(p, "--api-keys-file"))
            .transpose()?,
        admin: args
            .admin_api_key_file
            .as_deref()
            .map(|p| api::auth::read_keys(p, "--admin-api-key-file"))
            .transpose()?,
    };
    if args.adapter_on_demand && (args.merge || args.registry.is_none() || args.cache_dir.is_none()) {
        return Err(flag(
            "--adapter-on-demand",
            "loads from --registry into --cache-dir, so it needs both, and does not go with --merge",
        ));
    }
    let mut credentials = Credentials::from_env();
    if let Some(dir) = &args.credentials_dir {
        credentials = credentials.merged(Credentials::from_secret_dir(dir)?);
    }
    let cache = args.cache_dir.as_ref().map(Cache::new).transpose()?;
    let dir = model_dir(args, cache.as_ref(), &credentials).await?;
    let device = open_device(args.device)?;
    if args.quantize == Quantize::Int8 && !device.is_cpu() {
        return Err(flag(
            "--quantize",
            "int8 weights are for CPU serving; on a GPU use --quantize none",
        ));
    }
    // Rounded as they load, unless an adapter is to be merged first.
    let base = if args.quantize == Quantize::Int8 && !args.merge {
        BaseFormat::Int8
    } else {
        BaseFormat::Dense
    };
    let options = LoadOptions::on(device.clone(), base);
    let load_dir = dir.clone();
    let (config, model) = tokio::task::spawn_blocking(move || load_model(&load_dir, &options))
        .await
        .map_err(|e| StartupError::Warmup(e.to_string()))??;
    let codec = Arc::new(TextCodec::load(&dir, &config.eos_token_ids())?);
    let max_context = match args.max_context {
        Some(c) if c as usize > config.max_position_embeddings => {
            return Err(flag(
                "--max-context",
                format!(
                    "{c} exceeds the model's max_position_embeddings {}",
                    config.max_position_embeddings
                ),
            ))
        }
        Some(c) => c as usize,
        None => config.max_position_embeddings,
    };
    let base_name = args.served_model_name.clone().unwrap_or_else(|| args.model.clone());
    let mut base_names = vec![args.model.clone(), base_name.clone()];
    base_names.extend(args.base_model_aliases.iter().cloned());
    let registry = args
        .registry
        .as_ref()
        .map(|r| Storage::from_uri(r, &credentials).map(Registry::open))
        .transpose()?;
    let loader = Arc::new(AdapterLoader {
        config: config.clone(),
        base_names,
        registry,
        cache,
        credentials,
        device,
        limits: crate::loader::LoadLimits {
            timeout: Duration::from_secs(args.adapter_load_timeout_s),
            max_download_bytes: args.max_adapter_download_mb.saturating_mul(1 << 20),
            cache_max_bytes: args.adapter_cache_max_mb.map(|m| m.saturating_mul(1 << 20)),
        },
        cache_guard: Default::default(),
    });
    let limits = AdapterLimits {
        max_adapters: args.max_adapters as usize,
        max_rank: args.max_adapter_rank as usize,
        max_bytes: (args.max_adapter_memory_mb as usize).saturating_mul(1 << 20),
    };
    let adapters = Arc::new(AdapterSet::new(limits));
    let specs = startup_adapters(args)?;
    for spec in &specs {
        let loaded = loader
            .load(spec, &adapters)
            .await
            .map_err(|error| StartupError::Adapter {
                name: spec.name.clone(),
                error,
            })?;
        adapters.insert(loaded).map_err(|error| StartupError::Adapter {
            name: spec.name.clone(),
            error,
        })?;
    }
    let (model, merged) = if args.merge {
        let [only] = specs.as_slice() else {
            return Err(flag(
                "--merge",
                format!("needs exactly one adapter, {} are listed", specs.len()),
            ));
        };
        let adapter = adapters.remove(&only.name).map_err(|error| StartupError::Adapter {
            name: only.name.clone(),
            error,
        })?;
        let merged = model.merged(&adapter.weights)?;
        let merged = if args.quantize == Quantize::Int8 {
            merged.quantize_int8()?
        } else {
            merged
        };
        (merged, Some(adapter))
    } else {
        (model, None)
    };
    let engine_config = EngineConfig {
        max_batch: args.max_batch as usize,
        max_queue: args.max_queue as usize,
        max_context,
        kv_budget_bytes: (args.kv_cache_mb as usize).saturating_mul(1 << 20),
        kv_block_tokens: args.kv_block_tokens as usize,
        prefill_chunk_tokens: args.prefill_chunk_tokens as usize,
        retry_after_s: args.retry_after_s,
        prefix_caching: args.prefix_caching(),
    };
    let metrics = Arc::new(Metrics::new(&base_name));
    metrics.set_max_lora(args.max_adapters as usize);
    let engine = Engine::start(wrap(CandleBackend::new(model)), engine_config, metrics.clone());
    let vocab = config.vocab_size;
    let loader = if args.merge { None } else { Some(loader) };
    let on_demand = (args.adapter_on_demand && loader.is_some())
        .then(|| crate::ondemand::OnDemand::new(args.adapter_load_concurrency as usize));
    let state = AppState::new(engine, codec, adapters, metrics, base_name, merged, vocab, loader, keys);
    Ok(Arc::new(
        state
            .with_timeouts(args.request_timeout_s, args.sse_keep_alive_s)
            .with_on_demand(on_demand)
            .with_tool_parser(args.tool_call_parser),
    ))
}

/// Runs one short generation for the base and for every adapter, so the first real request
/// pays no one-time costs and a broken adapter shows before the pod reports ready.
pub async fn warm_up(state: &AppState) -> Result<(), StartupError> {
    let mut targets: Vec<Option<Arc<LoadedAdapter>>> = vec![None];
    targets.extend(state.adapters.list().into_iter().map(Some));
    let prompt = state.codec.encode_prompt("Hello").map_err(StartupError::Warmup)?;
    for adapter in targets {
        let request = GenerateRequest {
            prompt: prompt.clone(),
            adapter,
            params: SamplingParams::greedy(),
            max_tokens: 1,
            stop_ids: Arc::new(Vec::new()),
            constraint: None,
        };
        let mut rx = state
            .engine
            .submit(request)
            .map_err(|e| StartupError::Warmup(e.to_string()))?;
        loop {
            match rx.recv().await {
                Some(Event::Finished(_)) => break,
                Some(Event::Admitted { .. } | Event::Token { .. }) => {}
                Some(Event::Failed(e)) => return Err(StartupError::Warmup(e)),
                None => return Err(StartupError::Warmup("the engine stopped".into())),
            }
        }
    }
    Ok(())
}

/// Serves until `shutdown` completes (SIGTERM or Ctrl-C in the binary: [`shutdown_signal`]),
/// then stops accepting, lets in-flight requests finish and returns when they are done or
/// `deadline` has passed, whichever comes first.
///
/// With `admin_listener`, the admin API is served there and not on `listener`; it stops with the
/// main server (a load in flight at shutdown has no pod left to serve it).
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    admin_listener: Option<tokio::net::TcpListener>,
    deadline: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (app, _admin) = match admin_listener {
        None => (api::router(state.clone()), None),
        Some(admin_listener) => {
            let admin_app = api::admin_router(state.clone());
            let admin = tokio::spawn(async move { axum::serve(admin_listener, admin_app).await });
            (api::public_router(state.clone()), Some(AbortOnDrop(admin)))
        }
    };
    let stopping = Arc::new(tokio::sync::Notify::new());
    let notify = stopping.clone();
    let signal_state = state.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!(
            in_flight = signal_state.engine.in_flight(),
            "shutting down: no new requests"
        );
        signal_state.set_ready(false);
        signal_state.engine.close();
        notify.notify_one();
    });
    let expired = async {
        stopping.notified().await;
        tokio::time::sleep(deadline).await;
    };
    tokio::select! {
        result = server => result,
        () = expired => {
            tracing::warn!(in_flight = state.engine.in_flight(), "shutdown deadline passed; abandoning requests still running");
            Ok(())
        }
    }
}

/// Stops the admin server whichever way `serve` returns.
struct AbortOnDrop(tokio::task::JoinHandle<std::io::Result<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_flag_also_reads_its_kubetune_environment_variable() {
        let command = Args::command();
        let mut checked = 0;
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long().filter(|l| !matches!(*l, "help" | "version")) else {
                continue;
            };
            let want = format!("KUBETUNE_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(want.as_str()), "--{long}");
            checked += 1;
        }
        assert!(checked >= 20, "{checked} flags");
    }

    #[test]
    fn prefix_caching_is_on_by_default_and_off_with_either_spelling_of_vllms_flag() {
        let parse = |flags: &[&str]| {
            let argv = [&["kubetune-server", "--model", "m"], flags].concat();
            Args::try_parse_from(argv).expect("valid flags").prefix_caching()
        };
        assert!(parse(&[]));
        assert!(parse(&["--enable-prefix-caching"]));
        assert!(!parse(&["--enable-prefix-caching=false"]));
        assert!(!parse(&["--no-enable-prefix-caching"]));
        assert!(
            parse(&["--no-enable-prefix-caching", "--enable-prefix-caching"]),
            "the last one wins"
        );
    }

    #[test]
    fn flags_from_the_environment_parse_like_flags_and_the_command_line_wins() {
        // The only test in this binary that sets these variables, so parallel tests cannot
        // see them.
        let vars = [
            ("KUBETUNE_MODEL", "/models/m"),
            ("KUBETUNE_MAX_BATCH", "3"),
            ("KUBETUNE_MAX_QUEUE", "9"),
            ("KUBETUNE_MERGE", "true"),
            ("KUBETUNE_ADAPTER", "a=/adapters/a"),
            ("KUBETUNE_QUANTIZE", "int8"),
        ];
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        let parsed = Args::try_parse_from(["kubetune-server", "--max-batch", "5"]);
        for (k, _) in vars {
            std::env::remove_var(k);
        }
        let args = parsed.expect("the environment supplies --model");
        assert_eq!(args.model, "/models/m");
        assert_eq!(args.max_batch, 5, "the command line wins");
        assert_eq!(args.max_queue, 9);
        assert!(args.merge);
        assert_eq!(args.quantize, Quantize::Int8);
        assert_eq!(args.adapters.len(), 1);
        assert_eq!(args.adapters[0].source, "/adapters/a");
    }
}
