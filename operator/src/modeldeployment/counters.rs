//! A server pod's request counters per adapter, parsed from its Prometheus text: what a canary
//! analysis compares before and after its window.
//!
//! Series read: `kubetune_server_requests_total{model, status}` and
//! `kubetune_server_request_duration_seconds_bucket{model, le}`. The `model` label is the name a
//! client asked for, which may carry a version (`bot@2`): both count for adapter `bot`.

use kubetune_crds::{LatencyBucket, ServingCounters};
use std::collections::BTreeMap;

/// Counters by adapter name.
pub fn parse(text: &str, pod: &str) -> BTreeMap<String, ServingCounters> {
    let mut out: BTreeMap<String, ServingCounters> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, labels, value)) = split_sample(line) else {
            continue;
        };
        let Some(model) = label(labels, "model") else { continue };
        let adapter = model.split('@').next().unwrap_or(model).to_string();
        let entry = || ServingCounters {
            pod: pod.to_string(),
            ..Default::default()
        };
        match name {
            "kubetune_server_requests_total" => {
                let c = out.entry(adapter).or_insert_with(entry);
                c.requests += value;
                if label(labels, "status").is_some_and(|s| s.starts_with('5')) {
                    c.errors += value;
                }
            }
            "kubetune_server_request_duration_seconds_bucket" => {
                let le = match label(labels, "le") {
                    Some("+Inf") => None,
                    Some(v) => match v.parse::<f64>() {
                        Ok(le) => Some(le),
                        Err(_) => continue,
                    },
                    None => continue,
                };
                let c = out.entry(adapter).or_insert_with(entry);
                match c.latency.iter_mut().find(|b| b.le == le) {
                    Some(b) => b.count += value,
                    None => c.latency.push(LatencyBucket { le, count: value }),
                }
            }
            _ => {}
        }
    }
    out
}

/// `name{labels} value` → (name, labels, value); None for anything else.
fn split_sample(line: &str) -> Option<(&str, &str, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.trim().parse().ok()?;
    let (name, rest) = series.split_once('{')?;
    Some((name.trim(), rest.strip_suffix('}')?, value))
}

/// The value of `key` in `a="x",b="y"` (our own server writes no escaped quotes in these labels).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split("\",").find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP kubetune_server_requests_total Generation requests
# TYPE kubetune_server_requests_total counter
kubetune_server_requests_total{model="bot",status="200"} 90
kubetune_server_requests_total{model="bot@2",status="200"} 5
kubetune_server_requests_total{model="bot",status="500"} 3
kubetune_server_requests_total{model="bot",status="400"} 2
kubetune_server_requests_total{model="other",status="200"} 7
kubetune_server_request_duration_seconds_bucket{model="bot",le="0.5"} 80
kubetune_server_request_duration_seconds_bucket{model="bot",le="+Inf"} 100
kubetune_server_request_duration_seconds_count{model="bot"} 100
"#;

    #[test]
    fn sums_requests_errors_and_buckets_per_adapter() {
        let parsed = parse(TEXT, "pod-a");
        let bot = &parsed["bot"];
        assert_eq!((bot.pod.as_str(), bot.requests, bot.errors), ("pod-a", 100.0, 3.0));
        assert_eq!(
            bot.latency,
            vec![
                LatencyBucket {
                    le: Some(0.5),
                    count: 80.0
                },
                LatencyBucket { le: None, count: 100.0 }
            ]
        );
        assert_eq!(parsed["other"].requests, 7.0);
    }

    #[test]
    fn ignores_lines_it_does_not_understand() {
        assert!(parse(
            "garbage\nkubetune_server_requests_total{model=\"bot\"} notanumber\n",
            "p"
        )
        .is_empty());
    }
}
