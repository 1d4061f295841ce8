//! Talking to pods over HTTP. The local cluster has no kube-proxy, so tests reach server and
//! trainer pods by pod IP; on a real cluster the test process must run where pod IPs route
//! (in the cluster, or a kind node's network).

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::{json, Value};
use std::time::Duration;

/// Pods matching `selector` that are Ready and not being deleted, with their IPs.
pub async fn ready_pod_ips(pods: &Api<Pod>, selector: &str) -> Result<Vec<(String, String)>> {
    let list = pods.list(&ListParams::default().labels(selector)).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            let conditions = p.status.as_ref().and_then(|s| s.conditions.as_ref());
            conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|p| Some((p.metadata.name.clone()?, p.status?.pod_ip?)))
        .collect())
}

/// An HTTP client for pod endpoints, with a timeout so a hung pod fails the test instead of
/// stalling it.
pub fn http() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?)
}

/// A greedy chat completion from a kubetune-server at `ip`; the answer's text.
pub async fn chat(http: &reqwest::Client, ip: &str, model: &str, question: &str) -> Result<String> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0});
    let reply = http
        .post(format!("http://{ip}:8000/v1/chat/completions"))
        .json(&body)
        .send()
        .await?;
    let status = reply.status();
    let text = reply.text().await?;
    if !status.is_success() {
        bail!("chat completion on {ip} answered {status}: {text}");
    }
    let value: Value = serde_json::from_str(&text).with_context(|| format!("chat completion body: {text}"))?;
    value["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no message content in {text}"))
}

/// The adapters a kubetune-server at `ip` serves: (id, version) from `GET /v1/models`.
pub async fn served_models(http: &reqwest::Client, ip: &str) -> Result<Vec<(String, Option<u64>)>> {
    let value: Value = http
        .get(format!("http://{ip}:8000/v1/models"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let data = value["data"]
        .as_array()
        .with_context(|| format!("no data in {value}"))?;
    Ok(data
        .iter()
        .filter_map(|m| Some((m["id"].as_str()?.to_string(), m["version"].as_u64())))
        .collect())
}

/// One gauge or counter from a Prometheus text endpoint (the first series of that name).
pub async fn metric(http: &reqwest::Client, ip: &str, port: u16, name: &str) -> Result<Option<f64>> {
    let text = http
        .get(format!("http://{ip}:{port}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        (series.split('{').next()? == name).then(|| value.parse().ok())?
    }))
}
