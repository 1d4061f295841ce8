//! Live training progress, read from the trainer's Prometheus endpoint.
//!
//! Why the metrics endpoint: the trainer serves it anyway for Prometheus and its alerts, so the
//! operator reads the very numbers users alert on, with no second channel to keep in step and
//! no write access to the FineTuneJob for the trainer's ServiceAccount.

use crate::podhttp::PodHttp;
use hyper::Method;
use kubetune_crds::{DpoRewards, TrainingProgress};
use std::time::Duration;

/// Reads trainer metrics, shared by all reconciles.
#[derive(Clone)]
pub struct MetricsReader {
    http: PodHttp,
}

impl Default for MetricsReader {
    fn default() -> Self {
        Self {
            http: PodHttp::new(Duration::from_secs(3)),
        }
    }
}

impl MetricsReader {
    /// Reads and parses `http://{ip}:{port}/metrics`. None when the trainer does not answer in
    /// time (it may be starting or finishing); progress then keeps its last value.
    pub async fn read(&self, ip: &str, port: u16) -> Option<TrainingProgress> {
        let reply = self.http.send(Method::GET, ip, port, "/metrics", None).await.ok()?;
        if reply.status != 200 {
            return None;
        }
        parse_progress(&String::from_utf8_lossy(&reply.body))
    }
}

/// Extracts training progress from Prometheus text exposition. None without a step metric.
pub fn parse_progress(text: &str) -> Option<TrainingProgress> {
    let value = |name: &str| -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let metric = series.split('{').next()?.trim();
                (metric == name).then(|| value.trim().parse::<f64>().ok())?
            })
            .filter(|v| v.is_finite() || name.ends_with("_loss"))
    };
    let step = value("kubetune_train_step")?;
    let total = value("kubetune_train_total_steps").unwrap_or(0.0);
    let tokens_per_second = value("kubetune_train_tokens_per_second").filter(|t| *t > 0.0);
    Some(TrainingProgress {
        step: step as u64,
        total_steps: total as u64,
        epoch: value("kubetune_train_epoch"),
        train_loss: value("kubetune_train_loss").filter(|l| l.is_finite()),
        eval_loss: value("kubetune_eval_loss").filter(|l| l.is_finite()),
        tokens_per_second,
        eta: None,
        last_progress_time: None,
        display: None,
        resumed_from_step: value("kubetune_train_resumed_from_step")
            .filter(|s| *s > 0.0)
            .map(|s| s as u64),
        dpo: dpo_rewards(text, "train"),
        eval_dpo: dpo_rewards(text, "eval"),
    })
}

/// The trainer's `kubetune_train_dpo_rewards_*{split="..."}` gauges; None when it exports
/// none for the split (not a DPO run, or no step or evaluation yet).
fn dpo_rewards(text: &str, split: &str) -> Option<DpoRewards> {
    let label = format!("split=\"{split}\"");
    let value = |name: &str| -> Option<f64> {
        let metric = format!("kubetune_train_dpo_rewards_{name}");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (found, labels) = series.split_once('{')?;
                (found == metric && labels.split(',').any(|kv| kv.trim_end_matches('}') == label))
                    .then(|| value.trim().parse::<f64>().ok())?
            })
            .filter(|v| v.is_finite())
    };
    let rewards = DpoRewards {
        chosen: value("chosen"),
        rejected: value("rejected"),
        margins: value("margins"),
        accuracies: value("accuracies"),
    };
    (rewards != DpoRewards::default()).then_some(rewards)
}

/// Formats seconds as a Go-style duration (1h2m3s), the form kubectl users read.
pub fn format_duration(mut secs: u64) -> String {
    let hours = secs / 3600;
    secs %= 3600;
    let (minutes, seconds) = (secs / 60, secs % 60);
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, _) => format!("{minutes}m{seconds}s"),
        _ => format!("{hours}h{minutes}m{seconds}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
# HELP kubetune_train_loss Latest training loss.
# TYPE kubetune_train_loss gauge
kubetune_train_loss{job=\"ns/ftj\"} 1.25
kubetune_eval_loss{job=\"ns/ftj\"} NaN
kubetune_train_step{job=\"ns/ftj\"} 30
kubetune_train_total_steps{job=\"ns/ftj\"} 120
kubetune_train_epoch{job=\"ns/ftj\"} 0.75
kubetune_train_tokens_per_second{job=\"ns/ftj\"} 512.5
kubetune_train_resumed_from_step{job=\"ns/ftj\"} 20
";

    #[test]
    fn parses_the_trainer_metrics() {
        let p = parse_progress(SAMPLE).expect("progress");
        assert_eq!((p.step, p.total_steps), (30, 120));
        assert_eq!(p.train_loss, Some(1.25));
        assert_eq!(p.eval_loss, None, "NaN eval loss means none yet");
        assert_eq!(p.epoch, Some(0.75));
        assert_eq!(p.tokens_per_second, Some(512.5));
        assert_eq!(p.resumed_from_step, Some(20));
    }

    #[test]
    fn a_trainer_with_no_loss_yet_exports_no_loss_series_and_the_progress_has_none() {
        let p =
            parse_progress("kubetune_train_step{job=\"ns/ftj\"} 0\nkubetune_train_total_steps{job=\"ns/ftj\"} 120\n")
                .expect("progress");
        assert_eq!((p.step, p.train_loss, p.eval_loss), (0, None, None));
    }

    #[test]
    fn dpo_rewards_are_read_per_split_and_absent_for_other_runs() {
        let text = format!(
            "{SAMPLE}kubetune_train_dpo_rewards_chosen{{job=\"ns/ftj\",split=\"train\"}} 0.5\n\
             kubetune_train_dpo_rewards_accuracies{{job=\"ns/ftj\",split=\"train\"}} 0.75\n\
             kubetune_train_dpo_rewards_accuracies{{job=\"ns/ftj\",split=\"eval\"}} 0.9\n"
        );
        let p = parse_progress(&text).expect("progress");
        let train = p.dpo.expect("train rewards");
        assert_eq!(
            (train.chosen, train.accuracies, train.margins),
            (Some(0.5), Some(0.75), None)
        );
        assert_eq!(p.eval_dpo.expect("eval rewards").accuracies, Some(0.9));
        let sft = parse_progress(SAMPLE).expect("progress");
        assert_eq!((sft.dpo, sft.eval_dpo), (None, None));
    }

    #[test]
    fn no_step_metric_means_no_progress() {
        assert_eq!(parse_progress("kubetune_train_loss 1.0\n"), None);
        assert_eq!(parse_progress("garbage without spaces"), None);
    }

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(format_duration(5), "5s");
        assert_eq!(format_duration(125), "2m5s");
        assert_eq!(format_duration(3725), "1h2m5s");
    }
}
