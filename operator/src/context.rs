//! State shared by every reconcile.

use crate::config::OperatorConfig;
use crate::finetunejob::model_facts::ModelShapes;
use crate::finetunejob::progress::MetricsReader;
use crate::metrics::Metrics;
use kube::runtime::events::Recorder;
use kube::Client;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub metrics_reader: MetricsReader,
    pub backoff: Backoff,
    pub model_shapes: ModelShapes,
    pub pod_http: crate::podhttp::PodHttp,
    /// How often running FineTuneJobs are looked at again (see [`crate::pace`]).
    pub finetunejob_pace: crate::pace::Pace,
    /// How often ModelDeployments are looked at again.
    pub modeldeployment_pace: crate::pace::Pace,
}

/// Per-object retry delays after failed reconciles: 5 s, doubling, at most 5 min.
#[derive(Default)]
pub struct Backoff(Mutex<HashMap<String, u32>>);

impl Backoff {
    const BASE: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(300);

    /// Records a failure and returns how long to wait before the next try.
    pub fn failed(&self, key: &str) -> Duration {
        let Ok(mut map) = self.0.lock() else { return Self::MAX };
        let n = map.entry(key.to_string()).or_insert(0);
        let delay = Self::BASE.saturating_mul(2u32.saturating_pow(*n)).min(Self::MAX);
        *n = n.saturating_add(1);
        delay
    }

    /// Forgets the failures of an object that reconciled.
    pub fn succeeded(&self, key: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(key);
        }
    }
}

/// The error policy both controllers share: count the error, log it with the object's key, and
/// retry with per-object exponential backoff.
pub fn retry_with_backoff(
    ctx: &Context,
    controller: &'static str,
    key: &str,
    error: &crate::error::Error,
) -> kube::runtime::controller::Action {
    ctx.metrics.reconcile_failed(controller, error.metric_label());
    let delay = ctx.backoff.failed(key);
    tracing::warn!(%controller, object = %key, %error, retry_in = ?delay, "reconcile failed");
    kube::runtime::controller::Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let b = Backoff::default();
        let delays: Vec<u64> = (0..9).map(|_| b.failed("ns/a").as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(b.failed("ns/b").as_secs(), 5, "objects back off independently");
        b.succeeded("ns/a");
        assert_eq!(b.failed("ns/a").as_secs(), 5);
    }
}
