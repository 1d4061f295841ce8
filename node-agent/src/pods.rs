//! Watches the pods bound to this agent's nodes and keeps one worker task per pod.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::agent::Agent;
use crate::worker;

struct Handle {
    node: String,
    pod: watch::Sender<Option<Pod>>,
}

/// Streams watch events of one node's pods into `events` until the receiver goes away.
async fn watch_node(agent: Arc<Agent>, node: String, events: mpsc::Sender<(String, Event<Pod>)>) {
    let api: Api<Pod> = Api::all(agent.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                if events.send((node.clone(), event)).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!(node = %node, error = %e, "pod watch failed; retrying"),
        }
    }
}

/// Holds the IPs of pods already bound to our nodes (from before an agent restart), so that
/// a new pod on one node cannot be given an IP an existing pod on another still owns.
async fn hold_existing_ips(agent: &Agent, nodes: &[String]) {
    let api: Api<Pod> = Api::all(agent.client.clone());
    for node in nodes {
        let params = kube::api::ListParams::default().fields(&format!("spec.nodeName={node}"));
        match api.list(&params).await {
            Ok(list) => {
                let mut ipam = agent.ipam.lock().unwrap_or_else(|e| e.into_inner());
                for ip in list
                    .items
                    .iter()
                    .filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
                {
                    ipam.hold(ip);
                }
            }
            Err(e) => {
                tracing::warn!(node = %node, error = %e, "cannot list existing pods to keep their IPs")
            }
        }
    }
}

/// Runs until `agent.shutdown` fires, then waits (bounded) for every pod's processes to stop.
pub async fn run(agent: Arc<Agent>, nodes: Vec<String>) {
    hold_existing_ips(&agent, &nodes).await;
    let (events_tx, mut events) = mpsc::channel(1024);
    let mut watchers = JoinSet::new();
    for node in nodes {
        watchers.spawn(watch_node(agent.clone(), node, events_tx.clone()));
    }
    drop(events_tx);

    let mut workers = JoinSet::new();
    let mut pods: HashMap<String, Handle> = HashMap::new();
    // Pods whose worker has finished: late events about them must not start a new one.
    let mut finished: HashSet<String> = HashSet::new();
    let mut listed: HashMap<String, HashSet<String>> = HashMap::new();
    loop {
        tokio::select! {
            _ = agent.shutdown.cancelled() => break,
            Some(done) = workers.join_next(), if !workers.is_empty() => {
                match done {
                    Ok(uid) => {
                        pods.remove(&uid);
                        finished.insert(uid);
                    }
                    Err(e) => tracing::error!(error = %e, "pod worker crashed"),
                }
            }
            event = events.recv() => {
                let Some((node, event)) = event else { break };
                match event {
                    Event::Init => { listed.insert(node, HashSet::new()); }
                    Event::InitApply(pod) | Event::Apply(pod) => {
                        let Some(uid) = pod.metadata.uid.clone() else { continue };
                        listed.entry(node.clone()).or_default().insert(uid.clone());
                        if finished.contains(&uid) {
                            continue;
                        }
                        match pods.get(&uid) {
                            Some(handle) => { handle.pod.send_replace(Some(pod)); }
                            None => {
                                tracing::info!(node = %node, pod = %format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or(""), pod.metadata.name.as_deref().unwrap_or("")), "pod assigned");
                                let (tx, rx) = watch::channel(Some(pod));
                                let agent = agent.clone();
                                let worker_uid = uid.clone();
                                workers.spawn(async move {
                                    worker::run(agent, rx).await;
                                    worker_uid
                                });
                                pods.insert(uid, Handle { node, pod: tx });
                            }
                        }
                    }
                    Event::InitDone => {
                        // A relist shows the full set: anything we run that is not in it is gone.
                        let seen = listed.remove(&node).unwrap_or_default();
                        for (uid, handle) in &pods {
                            if handle.node == node && !seen.contains(uid) {
                                handle.pod.send_replace(None);
                            }
                        }
                    }
                    Event::Delete(pod) => {
                        if let Some(handle) = pod.metadata.uid.as_ref().and_then(|uid| pods.get(uid)) {
                            handle.pod.send_replace(None);
                        }
                    }
                }
            }
        }
    }
    watchers.abort_all();
    // Workers see the shutdown themselves and stop their processes; give them a bounded time.
    let drain = async { while workers.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(15), drain).await.is_err() {
        tracing::warn!("some pod workers did not stop in time");
    }
}
