//! The operator's Prometheus metrics.

use kubetune_crds::RolloutState;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Instant;

/// Metrics of every controller, registered once in one registry.
pub struct Metrics {
    pub registry: Registry,
    reconciles: IntCounterVec,
    failures: IntCounterVec,
    duration: HistogramVec,
    finetunejobs: IntGaugeVec,
    modeldeployment_ready: IntGaugeVec,
    modeldeployment_rollout: IntGaugeVec,
    /// ModelDeployments with series, (namespace, name), so deleted ones can be dropped.
    modeldeployments: Mutex<BTreeSet<(String, String)>>,
    /// Phase of each FineTuneJob last reconciled ("namespace/name"), so the per-phase gauge
    /// counts each job once.
    phases: Mutex<BTreeMap<String, String>>,
    /// Namespaces with FineTuneJob series, so a namespace's go with its last job.
    finetunejob_namespaces: Mutex<BTreeSet<String>>,
}

/// Every FineTuneJob phase: each namespace with a job reports all of them, zeros included.
const FINETUNEJOB_PHASES: [&str; 5] = ["Pending", "Running", "Succeeded", "Failed", "Suspended"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("kubetune_operator_reconciles_total", "Reconciles run"),
            &["controller"],
        )
        .expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new(
                "kubetune_operator_reconcile_errors_total",
                "Reconciles that failed, by error",
            ),
            &["controller", "error"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "kubetune_operator_reconcile_duration_seconds",
                "Time spent in one reconcile",
            )
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            &["controller"],
        )
        .expect("valid metric");
        // By namespace too: on a shared cluster an alert on failed jobs goes to their team.
        let finetunejobs = IntGaugeVec::new(
            Opts::new("kubetune_finetunejobs", "FineTuneJobs by namespace and phase"),
            &["namespace", "phase"],
        )
        .expect("valid metric");
        let modeldeployment_ready = IntGaugeVec::new(
            Opts::new(
                "kubetune_modeldeployment_ready",
                "1 when every replica of the ModelDeployment serves the desired adapter versions",
            ),
            &["namespace", "modeldeployment"],
        )
        .expect("valid metric");
        let modeldeployment_rollout = IntGaugeVec::new(
            Opts::new(
                "kubetune_modeldeployment_rollout_state",
                "1 for the state of the ModelDeployment's last rollout, 0 for the others",
            ),
            &["namespace", "modeldeployment", "state"],
        )
        .expect("valid metric");
        for m in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(finetunejobs.clone()),
            Box::new(modeldeployment_ready.clone()),
            Box::new(modeldeployment_rollout.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        Self {
            registry,
            reconciles,
            failures,
            duration,
            finetunejobs,
            modeldeployment_ready,
            modeldeployment_rollout,
            modeldeployments: Mutex::new(BTreeSet::new()),
            phases: Mutex::new(BTreeMap::new()),
            finetunejob_namespaces: Mutex::new(BTreeSet::new()),
        }
    }

    /// Counts a reconcile and times it until the returned guard drops.
    pub fn reconcile_started(&self, controller: &'static str) -> ReconcileTimer<'_> {
        self.reconciles.with_label_values(&[controller]).inc();
        ReconcileTimer {
            metrics: self,
            controller,
            start: Instant::now(),
        }
    }

    pub fn reconcile_failed(&self, controller: &str, error: &str) {
        self.failures.with_label_values(&[controller, error]).inc();
    }

    /// Records the phase of the FineTuneJob `key` ("namespace/name"; phase None when it is
    /// gone) and refreshes the per-namespace, per-phase gauge.
    pub fn set_finetunejob_phase(&self, key: &str, phase: Option<&str>) {
        let Ok(mut phases) = self.phases.lock() else { return };
        match phase {
            Some(p) => phases.insert(key.to_string(), p.to_string()),
            None => phases.remove(key),
        };
        let mut counts: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        for (key, phase) in phases.iter() {
            let namespace = key.split_once('/').map_or("", |(ns, _)| ns);
            for p in FINETUNEJOB_PHASES {
                counts.entry((namespace, p)).or_default();
            }
            *counts.entry((namespace, phase.as_str())).or_default() += 1;
        }
        let Ok(mut reported) = self.finetunejob_namespaces.lock() else {
            return;
        };
        let now: BTreeSet<String> = counts.keys().map(|(ns, _)| ns.to_string()).collect();
        for gone in reported.difference(&now) {
            for p in FINETUNEJOB_PHASES {
                let _ = self.finetunejobs.remove_label_values(&[gone, p]);
            }
        }
        for ((namespace, phase), n) in counts {
            self.finetunejobs.with_label_values(&[namespace, phase]).set(n);
        }
        *reported = now;
    }

    /// Records a ModelDeployment's readiness and the state of its last rollout (None: no
    /// rollout yet, every state 0).
    pub fn set_modeldeployment(&self, namespace: &str, name: &str, ready: bool, rollout: Option<RolloutState>) {
        self.modeldeployment_ready
            .with_label_values(&[namespace, name])
            .set(i64::from(ready));
        for state in ROLLOUT_STATES {
            let value = i64::from(rollout == Some(state));
            self.modeldeployment_rollout
                .with_label_values(&[namespace, name, &format!("{state:?}")])
                .set(value);
        }
        if let Ok(mut known) = self.modeldeployments.lock() {
            known.insert((namespace.to_string(), name.to_string()));
        }
    }

    /// Drops the series of objects that no longer exist. Deleted objects are never reconciled
    /// again (no finalizers), so the caller prunes with the controllers' caches from time to time.
    pub fn retain(
        &self,
        finetunejob_exists: impl Fn(&str, &str) -> bool,
        modeldeployment_exists: impl Fn(&str, &str) -> bool,
    ) {
        let gone: Vec<String> = match self.phases.lock() {
            Ok(phases) => phases
                .keys()
                .filter(|k| k.split_once('/').is_none_or(|(ns, n)| !finetunejob_exists(ns, n)))
                .cloned()
                .collect(),
            Err(_) => Vec::new(),
        };
        for key in gone {
            self.set_finetunejob_phase(&key, None);
        }
        let Ok(mut known) = self.modeldeployments.lock() else {
            return;
        };
        known.retain(|(ns, name)| {
            let keep = modeldeployment_exists(ns, name);
            if !keep {
                let _ = self.modeldeployment_ready.remove_label_values(&[ns, name]);
                for state in ROLLOUT_STATES {
                    let _ = self
                        .modeldeployment_rollout
                        .remove_label_values(&[ns, name, &format!("{state:?}")]);
                }
            }
            keep
        });
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

const ROLLOUT_STATES: [RolloutState; 5] = [
    RolloutState::Progressing,
    RolloutState::Canary,
    RolloutState::Promoted,
    RolloutState::RolledBack,
    RolloutState::Failed,
];

/// Observes the reconcile duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .with_label_values(&[self.controller])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modeldeployment_series_are_one_hot_and_go_with_the_object() {
        let m = Metrics::new();
        m.set_modeldeployment("ns", "support", false, Some(RolloutState::Failed));
        let text = m.render();
        assert!(
            text.contains(r#"kubetune_modeldeployment_ready{modeldeployment="support",namespace="ns"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"kubetune_modeldeployment_rollout_state{modeldeployment="support",namespace="ns",state="Failed"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"kubetune_modeldeployment_rollout_state{modeldeployment="support",namespace="ns",state="Promoted"} 0"#
            ),
            "{text}"
        );

        m.retain(|_, _| false, |_, _| false);
        let text = m.render();
        assert!(!text.contains("modeldeployment=\"support\""), "{text}");
    }

    #[test]
    fn finetunejobs_are_counted_by_namespace_and_a_namespace_goes_with_its_last_job() {
        let m = Metrics::new();
        m.set_finetunejob_phase("team-a/one", Some("Running"));
        m.set_finetunejob_phase("team-a/two", Some("Failed"));
        m.set_finetunejob_phase("team-b/three", Some("Running"));
        m.set_finetunejob_phase("team-a/two", Some("Failed"));
        let text = m.render();
        for series in [
            r#"kubetune_finetunejobs{namespace="team-a",phase="Running"} 1"#,
            r#"kubetune_finetunejobs{namespace="team-a",phase="Failed"} 1"#,
            r#"kubetune_finetunejobs{namespace="team-a",phase="Pending"} 0"#,
            r#"kubetune_finetunejobs{namespace="team-b",phase="Running"} 1"#,
            r#"kubetune_finetunejobs{namespace="team-b",phase="Failed"} 0"#,
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }

        m.retain(|ns, _| ns == "team-a", |_, _| true);
        let text = m.render();
        assert!(!text.contains(r#"namespace="team-b""#), "{text}");
        assert!(
            text.contains(r#"kubetune_finetunejobs{namespace="team-a",phase="Failed"} 1"#),
            "{text}"
        );
    }
}
