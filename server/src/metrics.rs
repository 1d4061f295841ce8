//! Prometheus metrics. Labels hold only values the server chose (served model names, HTTP
//! status codes): a client sending random `model` strings cannot grow the series count.
//!
//! Besides its own `kubetune_server_*` series the server exports vLLM's names for the same
//! quantities (`vllm:num_requests_running`, ...; labelled `model_name` with the base model's
//! served name, as vLLM labels them), so dashboards and autoscalers written for vLLM read it
//! unchanged. Colons are legal in Prometheus metric names (reserved for recording rules by
//! convention, which vLLM ignores too) and the prometheus crate accepts them.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub request_duration: HistogramVec,
    pub generated_tokens: IntCounter,
    pub queue_depth: IntGauge,
    pub batch_size: Histogram,
    pub loaded_adapters: IntGauge,
    /// On-demand adapter loads by outcome: loaded, failed, timeout.
    pub adapter_loads: IntCounterVec,
    /// On-demand adapters evicted to make room for another.
    pub adapter_evictions: IntCounter,
    /// On-demand adapters read and waiting for running requests to leave a slot.
    pub adapter_loads_waiting: IntGauge,
    pub preemptions: IntCounter,
    /// KV blocks the prefix cache holds (they count against --kv-cache-mb).
    pub prefix_cache_blocks: IntGauge,
    pub vllm: VllmMetrics,
    /// The most adapters loaded at once (`max_lora` of vllm:lora_requests_info).
    max_lora: AtomicUsize,
    /// The (running, waiting) adapter lists vllm:lora_requests_info shows now.
    lora_info: Mutex<Option<(String, String)>>,
}

/// vLLM's names for the engine's state and request outcomes.
pub struct VllmMetrics {
    pub num_requests_running: IntGauge,
    pub num_requests_waiting: IntGauge,
    /// Share (0 to 1, despite the name, as in vLLM) of the KV cache budget reserved.
    pub kv_cache_usage_perc: Gauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub time_to_first_token: Histogram,
    pub e2e_request_latency: Histogram,
    pub request_success: IntCounterVec,
    pub num_preemptions: IntCounter,
    /// Prompt tokens looked up in the prefix cache, and those found (vLLM V1's counters).
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    /// One series naming the adapters of running and waiting requests (labels
    /// `running_lora_adapters`, `waiting_lora_adapters`, `max_lora`), valued with when they
    /// last changed, as vLLM sets it.
    pub lora_requests_info: GaugeVec,
}

/// Label for requests whose `model` matched nothing served.
pub const UNKNOWN_MODEL: &str = "unknown";

impl Metrics {
    /// `model_name`: the base model's served name, the `model_name` label of vLLM's series.
    pub fn new(model_name: &str) -> Self {
        let registry = Registry::new();
        let latency = || {
            vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]
        };
        let requests = IntCounterVec::new(
            Opts::new(
                "kubetune_server_requests_total",
                "Generation requests by served model and HTTP status",
            ),
            &["model", "status"],
        )
        .expect("static metric definition");
        let time_to_first_token = Histogram::with_opts(
            HistogramOpts::new(
                "kubetune_server_time_to_first_token_seconds",
                "From admission to the first generated token",
            )
            .buckets(latency()),
        )
        .expect("static metric definition");
        let inter_token_latency = Histogram::with_opts(
            HistogramOpts::new(
                "kubetune_server_inter_token_latency_seconds",
                "Between consecutive tokens of one sequence",
            )
            .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
        )
        .expect("static metric definition");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "kubetune_server_request_duration_seconds",
                "End-to-end duration of generation requests",
            )
            .buckets(latency()),
            &["model"],
        )
        .expect("static metric definition");
        let generated_tokens = IntCounter::new("kubetune_server_generated_tokens_total", "Tokens generated")
            .expect("static metric definition");
        let queue_depth = IntGauge::new(
            "kubetune_server_queue_depth",
            "Requests admitted but waiting for a batch slot",
        )
        .expect("static metric definition");
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("kubetune_server_batch_size", "Sequences in each engine step")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
        )
        .expect("static metric definition");
        let loaded_adapters =
            IntGauge::new("kubetune_server_loaded_adapters", "LoRA adapters loaded").expect("static metric definition");
        let preemptions = IntCounter::new(
            "kubetune_server_preemptions_total",
            "Sequences preempted when the KV budget ran out; each recomputes its cache later",
        )
        .expect("static metric definition");
        let adapter_loads = IntCounterVec::new(
            Opts::new(
                "kubetune_server_adapter_loads_total",
                "On-demand adapter loads (--adapter-on-demand) by outcome: loaded, failed, timeout",
            ),
            &["outcome"],
        )
        .expect("static metric definition");
        let prefix_cache_blocks = IntGauge::new(
            "kubetune_server_prefix_cache_blocks",
            "KV blocks of prompt prefixes kept for later requests; counted in --kv-cache-mb and evicted before any sequence is preempted",
        )
        .expect("static metric definition");
        let adapter_evictions = IntCounter::new(
            "kubetune_server_adapter_evictions_total",
            "On-demand adapters evicted, least recently used first, to make room for another",
        )
        .expect("static metric definition");
        let adapter_loads_waiting = IntGauge::new(
            "kubetune_server_adapter_loads_waiting",
            "On-demand adapters read and waiting for a slot: every other on-demand adapter is in use by a running request",
        )
        .expect("static metric definition");
        let vllm_opts = |name: &str, help: &str| Opts::new(name, help).const_label("model_name", model_name);
        let vllm_histogram = |name: &str, help: &str| {
            Histogram::with_opts(
                HistogramOpts::new(name, help)
                    .const_label("model_name", model_name)
                    .buckets(latency()),
            )
            .expect("static metric definition")
        };
        let vllm = VllmMetrics {
            num_requests_running: IntGauge::with_opts(vllm_opts(
                "vllm:num_requests_running",
                "Sequences in the running batch",
            ))
            .expect("static metric definition"),
            num_requests_waiting: IntGauge::with_opts(vllm_opts(
                "vllm:num_requests_waiting",
                "Requests waiting for a batch slot",
            ))
            .expect("static metric definition"),
            kv_cache_usage_perc: Gauge::with_opts(vllm_opts(
                "vllm:kv_cache_usage_perc",
                "Share of the KV cache budget held by running sequences' blocks (1 = full)",
            ))
            .expect("static metric definition"),
            prompt_tokens: IntCounter::with_opts(vllm_opts("vllm:prompt_tokens_total", "Prompt tokens prefilled"))
                .expect("static metric definition"),
            generation_tokens: IntCounter::with_opts(vllm_opts("vllm:generation_tokens_total", "Tokens generated"))
                .expect("static metric definition"),
            time_to_first_token: vllm_histogram(
                "vllm:time_to_first_token_seconds",
                "From admission to the first generated token",
            ),
            e2e_request_latency: vllm_histogram(
                "vllm:e2e_request_latency_seconds",
                "End-to-end duration of generation requests",
            ),
            request_success: IntCounterVec::new(
                vllm_opts(
                    "vllm:request_success_total",
                    "Sequences (one per choice) that finished, by why",
                ),
                &["finished_reason"],
            )
            .expect("static metric definition"),
            num_preemptions: IntCounter::with_opts(vllm_opts(
                "vllm:num_preemptions_total",
                "Sequences preempted when the KV budget ran out",
            ))
            .expect("static metric definition"),
            prefix_cache_queries: IntCounter::with_opts(vllm_opts(
                "vllm:prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache",
            ))
            .expect("static metric definition"),
            prefix_cache_hits: IntCounter::with_opts(vllm_opts(
                "vllm:prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache, not prefilled",
            ))
            .expect("static metric definition"),
            lora_requests_info: GaugeVec::new(
                vllm_opts(
                    "vllm:lora_requests_info",
                    "Adapters of running and waiting requests; the value is when they last changed (Unix seconds)",
                ),
                &["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            )
            .expect("static metric definition"),
        };
        for c in [
            Box::new(vllm.num_requests_running.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(vllm.num_requests_waiting.clone()),
            Box::new(vllm.kv_cache_usage_perc.clone()),
            Box::new(vllm.prompt_tokens.clone()),
            Box::new(vllm.generation_tokens.clone()),
            Box::new(vllm.time_to_first_token.clone()),
            Box::new(vllm.e2e_request_latency.clone()),
            Box::new(vllm.request_success.clone()),
            Box::new(vllm.num_preemptions.clone()),
            Box::new(vllm.prefix_cache_queries.clone()),
            Box::new(vllm.prefix_cache_hits.clone()),
            Box::new(vllm.lora_requests_info.clone()),
            Box::new(prefix_cache_blocks.clone()),
            Box::new(preemptions.clone()),
            Box::new(requests.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(inter_token_latency.clone()),
            Box::new(request_duration.clone()),
            Box::new(generated_tokens.clone()),
            Box::new(queue_depth.clone()),
            Box::new(batch_size.clone()),
            Box::new(loaded_adapters.clone()),
            Box::new(adapter_loads.clone()),
            Box::new(adapter_evictions.clone()),
            Box::new(adapter_loads_waiting.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            time_to_first_token,
            inter_token_latency,
            request_duration,
            generated_tokens,
            queue_depth,
            batch_size,
            loaded_adapters,
            adapter_loads,
            adapter_evictions,
            adapter_loads_waiting,
            preemptions,
            prefix_cache_blocks,
            vllm,
            max_lora: AtomicUsize::new(0),
            lora_info: Mutex::new(None),
        }
    }

    /// The most adapters the server loads at once (`--max-adapters`).
    pub fn set_max_lora(&self, n: usize) {
        self.max_lora.store(n, Ordering::Relaxed);
    }

    /// The adapters of running and waiting requests, for vllm:lora_requests_info: when they
    /// change, the old series goes and a new one, valued now, takes its place, so that there
    /// is one series at a time (vLLM keeps the old ones; dashboards take the newest either way).
    pub fn lora_requests(&self, running: &[&str], waiting: &[&str]) {
        let labels = (adapter_list(running), adapter_list(waiting));
        let Ok(mut shown) = self.lora_info.lock() else {
            return;
        };
        if shown.as_ref() == Some(&labels) {
            return;
        }
        let max_lora = self.max_lora.load(Ordering::Relaxed).to_string();
        let info = &self.vllm.lora_requests_info;
        if let Some((running, waiting)) = shown.take() {
            let _ = info.remove_label_values(&[&max_lora, &waiting, &running]);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        info.with_label_values(&[&max_lora, &labels.1, &labels.0]).set(now);
        *shown = Some(labels);
    }

    /// The engine's state after each step: waiting and running sequences, and the reserved
    /// share of the KV budget.
    pub fn engine_state(&self, waiting: usize, running: usize, kv_share: f64) {
        self.queue_depth.set(waiting as i64);
        self.vllm.num_requests_waiting.set(waiting as i64);
        self.vllm.num_requests_running.set(running as i64);
        self.vllm.kv_cache_usage_perc.set(kv_share);
    }

    pub fn preempted(&self) {
        self.preemptions.inc();
        self.vllm.num_preemptions.inc();
    }

    /// A prefix cache lookup of `queried` prompt tokens found the first `hit` of them.
    pub fn prefix_lookup(&self, queried: usize, hit: usize) {
        self.vllm.prefix_cache_queries.inc_by(queried as u64);
        self.vllm.prefix_cache_hits.inc_by(hit as u64);
    }

    pub fn prefilled(&self, prompt_tokens: usize) {
        self.vllm.prompt_tokens.inc_by(prompt_tokens as u64);
    }

    pub fn first_token(&self, seconds: f64) {
        self.time_to_first_token.observe(seconds);
        self.vllm.time_to_first_token.observe(seconds);
    }

    pub fn generated_token(&self) {
        self.generated_tokens.inc();
        self.vllm.generation_tokens.inc();
    }

    /// One choice (sequence) of a request ran to its end: `reason` is stop or length.
    pub fn choice_finished(&self, reason: &str) {
        self.vllm.request_success.with_label_values(&[reason]).inc();
    }

    /// A request's every choice ran to its end, after `seconds`.
    pub fn finished(&self, model: &str, seconds: f64) {
        self.request_duration.with_label_values(&[model]).observe(seconds);
        self.vllm.e2e_request_latency.observe(seconds);
    }

    pub fn request(&self, model: &str, status: u16) {
        self.requests.with_label_values(&[model, &status.to_string()]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Adapter names as vLLM lists them in a label: each once, comma-separated (sorted here, so
/// that the same set is the same series).
fn adapter_list(names: &[&str]) -> String {
    let mut names = names.to_vec();
    names.sort_unstable();
    names.dedup();
    names.join(",")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_requests_info_is_one_series_naming_each_adapter_once() {
        let m = Metrics::new("base");
        m.set_max_lora(4);
        m.lora_requests(&["b", "a", "b"], &["c"]);
        let series = |m: &Metrics| -> Vec<String> {
            m.render()
                .lines()
                .filter(|l| l.starts_with("vllm:lora_requests_info{"))
                .map(|l| l.rsplit_once(' ').map_or(l, |(labels, _)| labels).to_string())
                .collect()
        };
        assert_eq!(
            series(&m),
            [
                r#"vllm:lora_requests_info{max_lora="4",model_name="base",running_lora_adapters="a,b",waiting_lora_adapters="c"}"#
            ]
        );
        m.lora_requests(&[], &[]);
        assert_eq!(
            series(&m),
            [
                r#"vllm:lora_requests_info{max_lora="4",model_name="base",running_lora_adapters="",waiting_lora_adapters=""}"#
            ],
            "the old series is gone"
        );
    }
}
