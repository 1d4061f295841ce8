//! Prometheus gauges for the run, served on `/metrics` so the operator can read progress.

use crate::dpo::DpoStats;
use crate::error::{Result, TrainError};
use prometheus::{Encoder, Gauge, GaugeVec, Opts, Registry, TextEncoder};
use std::net::SocketAddr;
use std::sync::Arc;

pub struct Metrics {
    registry: Registry,
    pub train_loss: AbsentUntilSet,
    pub eval_loss: AbsentUntilSet,
    pub step: Gauge,
    pub total_steps: Gauge,
    pub epoch: Gauge,
    pub tokens_per_second: Gauge,
    pub learning_rate: Gauge,
    pub grad_norm: Gauge,
    pub resumed_from_step: Gauge,
    /// Held-out loss of the base model and of the adapter (`model="base|adapter"`), once judged.
    evaluation_loss: GaugeVec,
    /// Held-out score of each, under spec.evaluation.metric.
    evaluation_score: GaugeVec,
    /// Under `method: dpo`, `kubetune_train_dpo_*` by `split="train|eval"`: the last step's
    /// pairs and the held-out pairs at the latest evaluation.
    dpo: Vec<(GaugeVec, DpoValue)>,
}

impl Metrics {
    /// Gauges labelled `job="<job>"` (KUBETUNE_JOB_NAME in a trainer pod).
    pub fn new(job: &str) -> Result<Self> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| -> Result<Gauge> {
            let g = Gauge::with_opts(Opts::new(name, help).const_label("job", job))
                .map_err(|e| TrainError::Metrics(e.to_string()))?;
            registry
                .register(Box::new(g.clone()))
                .map_err(|e| TrainError::Metrics(e.to_string()))?;
            Ok(g)
        };
        let absent = |name: &str, help: &str| -> Result<AbsentUntilSet> {
            let v = GaugeVec::new(Opts::new(name, help).const_label("job", job), &[])
                .map_err(|e| TrainError::Metrics(e.to_string()))?;
            registry
                .register(Box::new(v.clone()))
                .map_err(|e| TrainError::Metrics(e.to_string()))?;
            Ok(AbsentUntilSet(v))
        };
        // Named apart from kubetune_eval_loss, the live series the operator and the alerts read:
        // a labelled second series under that name would be mistaken for it.
        let by_model = |name: &str, help: &str| -> Result<GaugeVec> {
            let v = GaugeVec::new(Opts::new(name, help).const_label("job", job), &["model"])
                .map_err(|e| TrainError::Metrics(e.to_string()))?;
            registry
                .register(Box::new(v.clone()))
                .map_err(|e| TrainError::Metrics(e.to_string()))?;
            Ok(v)
        };
        Ok(Self {
            train_loss: absent(
                "kubetune_train_loss",
                "Latest training loss (absent before the first step).",
            )?,
            eval_loss: absent(
                "kubetune_eval_loss",
                "Latest evaluation loss (absent before the first evaluation).",
            )?,
            step: gauge("kubetune_train_step", "Optimizer steps completed.")?,
            total_steps: gauge("kubetune_train_total_steps", "Optimizer steps the run will take.")?,
            epoch: gauge("kubetune_train_epoch", "Passes over the training data, fractional.")?,
            tokens_per_second: gauge(
                "kubetune_train_tokens_per_second",
                "Training throughput in tokens per second.",
            )?,
            learning_rate: gauge("kubetune_learning_rate", "Learning rate of the latest step.")?,
            grad_norm: gauge("kubetune_grad_norm", "Global gradient norm before clipping.")?,
            resumed_from_step: gauge(
                "kubetune_train_resumed_from_step",
                "Checkpoint step this run resumed from (0: started from zero).",
            )?,
            evaluation_loss: by_model(
                "kubetune_evaluation_loss",
                "Held-out loss per answer token after training, of the base model and of the adapter.",
            )?,
            evaluation_score: by_model(
                "kubetune_evaluation_score",
                "Held-out score (fraction right, 0 to 1) after training, of the base model and of the adapter.",
            )?,
            dpo: dpo_gauges(&registry, job)?,
            registry,
        })
    }

    /// Exports one split's (`train` or `eval`) DPO statistics.
    pub fn set_dpo(&self, split: &str, stats: &DpoStats) {
        for (gauge, value) in &self.dpo {
            gauge.with_label_values(&[split]).set(value(stats));
        }
    }

    /// Exports the final evaluation, base and adapter side by side.
    pub fn set_evaluation(&self, e: &kubetune_crds::EvaluationResult) {
        for (model, result) in [("base", &e.base), ("adapter", &e.adapter)] {
            if let Some(loss) = result.loss {
                self.evaluation_loss.with_label_values(&[model]).set(loss);
            }
            if let Some(score) = result.score {
                self.evaluation_score.with_label_values(&[model]).set(score);
            }
        }
    }

    /// The Prometheus text exposition of all gauges.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding gauges into a Vec cannot fail; an empty page would show the problem anyway.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Reads one quantity of the DPO statistics.
type DpoValue = fn(&DpoStats) -> f64;

/// The DPO gauges, absent until a DPO run sets them, so SFT runs export none.
fn dpo_gauges(registry: &Registry, job: &str) -> Result<Vec<(GaugeVec, DpoValue)>> {
    let quantities: [(&str, &str, DpoValue); 5] = [
        ("loss", "DPO loss, mean over the pairs.", |s| s.loss),
        (
            "rewards_chosen",
            "Mean reward of the chosen answers, beta * (policy - reference) log-prob.",
            |s| s.rewards_chosen,
        ),
        ("rewards_rejected", "Mean reward of the rejected answers.", |s| {
            s.rewards_rejected
        }),
        ("rewards_margins", "Mean of chosen minus rejected reward.", |s| {
            s.rewards_margins
        }),
        (
            "rewards_accuracies",
            "Share of pairs whose chosen reward is above the rejected one.",
            |s| s.rewards_accuracies,
        ),
    ];
    quantities
        .into_iter()
        .map(|(name, help, value)| {
            let opts = Opts::new(format!("kubetune_train_dpo_{name}"), help).const_label("job", job);
            let v = GaugeVec::new(opts, &["split"]).map_err(|e| TrainError::Metrics(e.to_string()))?;
            registry
                .register(Box::new(v.clone()))
                .map_err(|e| TrainError::Metrics(e.to_string()))?;
            Ok((v, value))
        })
        .collect()
}

/// A gauge that exports no series until its first value. The losses are these: a placeholder
/// (NaN, or 0) before the first step would fire the "loss not finite" alert, or draw a false
/// point, all through a long model download.
#[derive(Clone)]
pub struct AbsentUntilSet(GaugeVec);

impl AbsentUntilSet {
    pub fn set(&self, value: f64) {
        // A vector without variable labels has one child, created by this first use.
        self.0.with_label_values(&[] as &[&str]).set(value);
    }
}

/// Serves `/metrics` on `addr` from a background thread; returns the bound address. Binding
/// happens before returning so a taken port fails the run at start, not silently.
pub fn serve(metrics: Arc<Metrics>, addr: SocketAddr) -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| TrainError::Metrics(format!("bind {addr}: {e}")))?;
    let bound = listener.local_addr().map_err(|e| TrainError::Metrics(e.to_string()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| TrainError::Metrics(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TrainError::Metrics(format!("runtime: {e}")))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                let app = axum::Router::new().route(
                    "/metrics",
                    axum::routing::get(move || {
                        let m = metrics.clone();
                        async move { m.render() }
                    }),
                );
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => {
                        if let Err(e) = axum::serve(l, app).await {
                            tracing::error!(error = %e, "metrics server stopped");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "metrics listener"),
                }
            })
        })
        .map_err(|e| TrainError::Metrics(format!("thread: {e}")))?;
    Ok(bound)
}
