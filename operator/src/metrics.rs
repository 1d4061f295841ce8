//! The operator's Prometheus metrics.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

/// Metrics of every controller, registered once in one registry.
pub struct Metrics {
    pub registry: Registry,
    reconciles: IntCounterVec,
    failures: IntCounterVec,
    duration: HistogramVec,
    finetunejobs: IntGaugeVec,
    /// Phase of each FineTuneJob last reconciled, so the per-phase gauge counts each job once.
    phases: Mutex<BTreeMap<String, String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(Opts::new("kubetune_operator_reconciles_total", "Reconciles run"), &["controller"])
            .expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new("kubetune_operator_reconcile_errors_total", "Reconciles that failed, by error"),
            &["controller", "error"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new("kubetune_operator_reconcile_duration_seconds", "Time spent in one reconcile")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            &["controller"],
        )
        .expect("valid metric");
        let finetunejobs = IntGaugeVec::new(Opts::new("kubetune_finetunejobs", "FineTuneJobs by phase"), &["phase"])
            .expect("valid metric");
        for m in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(finetunejobs.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        Self { registry, reconciles, failures, duration, finetunejobs, phases: Mutex::new(BTreeMap::new()) }
    }

    /// Counts a reconcile and times it until the returned guard drops.
    pub fn reconcile_started(&self, controller: &'static str) -> ReconcileTimer<'_> {
        self.reconciles.with_label_values(&[controller]).inc();
        ReconcileTimer { metrics: self, controller, start: Instant::now() }
    }

    pub fn reconcile_failed(&self, controller: &str, error: &str) {
        self.failures.with_label_values(&[controller, error]).inc();
    }

    /// Records a FineTuneJob's phase (None when it is gone) and refreshes the per-phase gauge.
    pub fn set_finetunejob_phase(&self, key: &str, phase: Option<&str>) {
        let Ok(mut phases) = self.phases.lock() else { return };
        match phase {
            Some(p) => phases.insert(key.to_string(), p.to_string()),
            None => phases.remove(key),
        };
        let mut counts: BTreeMap<&str, i64> =
            ["Pending", "Running", "Succeeded", "Failed", "Suspended"].into_iter().map(|p| (p, 0)).collect();
        for p in phases.values() {
            *counts.entry(p.as_str()).or_default() += 1;
        }
        for (phase, n) in counts {
            self.finetunejobs.with_label_values(&[phase]).set(n);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}

/// Observes the reconcile duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics.duration.with_label_values(&[self.controller]).observe(self.start.elapsed().as_secs_f64());
    }
}
