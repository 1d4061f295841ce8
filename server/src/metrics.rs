//! Prometheus metrics. Labels hold only values the server chose (served model names, HTTP
//! status codes): a client sending random `model` strings cannot grow the series count.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

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
}

/// Label for requests whose `model` matched nothing served.
pub const UNKNOWN_MODEL: &str = "unknown";

impl Metrics {
    pub fn new() -> Self {
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
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(time_to_first_token.clone()),
            Box::new(inter_token_latency.clone()),
            Box::new(request_duration.clone()),
            Box::new(generated_tokens.clone()),
            Box::new(queue_depth.clone()),
            Box::new(batch_size.clone()),
            Box::new(loaded_adapters.clone()),
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
        }
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
