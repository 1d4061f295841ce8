//! Node registration and heartbeats.
//!
//! Each node is kept alive the way kubelet does it: its Lease in `kube-node-lease` is renewed
//! every few seconds and its status (Ready condition with a fresh heartbeat) is re-applied
//! periodically, so kube-controller-manager's node lifecycle controller never marks it
//! NotReady or taints it. Everything is written with server-side apply, which also recreates a
//! Node or Lease somebody deleted.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

pub const FIELD_MANAGER: &str = "kubetune-node-agent";
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

/// What every node this agent registers looks like.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub names: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub gpus: u32,
    pub gpu_memory_mib: u64,
    pub gpu_product: String,
    pub cpu: String,
    pub memory: String,
    pub ephemeral_storage: String,
    pub max_pods: u32,
    pub lease_duration_seconds: i32,
    pub lease_renew: Duration,
    pub status_refresh: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot register node {node}: {source}")]
    Register { node: String, source: kube::Error },
    #[error("cannot update status of node {node}: {source}")]
    Status { node: String, source: kube::Error },
    #[error("cannot renew lease of node {node}: {source}")]
    Lease { node: String, source: kube::Error },
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub fn node_labels(name: &str, opts: &NodeOptions) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = [
        ("kubernetes.io/hostname", name.to_owned()),
        ("kubernetes.io/os", "linux".to_owned()),
        ("kubernetes.io/arch", arch().to_owned()),
        ("node.kubernetes.io/instance-type", "kubetune-local".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if opts.gpus > 0 {
        // The labels NVIDIA's GPU feature discovery sets, so schedulers can select on them.
        labels.insert("nvidia.com/gpu.present".into(), "true".into());
        labels.insert("nvidia.com/gpu.count".into(), opts.gpus.to_string());
        labels.insert("nvidia.com/gpu.product".into(), opts.gpu_product.clone());
        labels.insert("nvidia.com/gpu.memory".into(), opts.gpu_memory_mib.to_string());
    }
    labels.extend(opts.labels.clone());
    labels
}

pub fn resources(opts: &NodeOptions) -> BTreeMap<String, Quantity> {
    let mut r: BTreeMap<String, Quantity> = [
        ("cpu", opts.cpu.clone()),
        ("memory", opts.memory.clone()),
        ("ephemeral-storage", opts.ephemeral_storage.clone()),
        ("pods", opts.max_pods.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Quantity(v)))
    .collect();
    if opts.gpus > 0 {
        r.insert("nvidia.com/gpu".into(), Quantity(opts.gpus.to_string()));
    }
    r
}

/// The node status to report; `since` is when this agent started (condition transition time).
pub fn node_status(opts: &NodeOptions, since: &Time, now: &Time) -> NodeStatus {
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(since.clone()),
    };
    NodeStatus {
        capacity: Some(resources(opts)),
        allocatable: Some(resources(opts)),
        addresses: Some(vec![NodeAddress {
            type_: "InternalIP".into(),
            address: "127.0.0.1".into(),
        }]),
        conditions: Some(vec![
            condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubetune node agent has sufficient memory available",
            ),
            condition(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "kubetune node agent has no disk pressure",
            ),
            condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "kubetune node agent has sufficient PID available",
            ),
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "kubetune node agent is posting ready status",
            ),
        ]),
        node_info: Some(NodeSystemInfo {
            architecture: arch().into(),
            operating_system: "linux".into(),
            os_image: "kubetune local processes".into(),
            kernel_version: String::new(),
            container_runtime_version: "kubetune://0.1.0".into(),
            kubelet_version: "v1.36.3-kubetune".into(),
            kube_proxy_version: String::new(),
            machine_id: String::new(),
            system_uuid: String::new(),
            boot_id: String::new(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Creates or updates one node and its status; returns the node's uid (for the Lease owner).
async fn apply_node(client: &Client, name: &str, opts: &NodeOptions, since: &Time) -> Result<String, NodeError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "labels": node_labels(name, opts) },
    });
    let applied = nodes
        .patch(name, &apply_params(), &Patch::Apply(&node))
        .await
        .map_err(|source| NodeError::Register {
            node: name.into(),
            source,
        })?;
    apply_status(client, name, opts, since).await?;
    Ok(applied.metadata.uid.unwrap_or_default())
}

async fn apply_status(client: &Client, name: &str, opts: &NodeOptions, since: &Time) -> Result<(), NodeError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let status = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "status": node_status(opts, since, &now()),
    });
    nodes
        .patch_status(name, &apply_params(), &Patch::Apply(&status))
        .await
        .map(|_| ())
        .map_err(|source| NodeError::Status {
            node: name.into(),
            source,
        })
}

async fn renew_lease(client: &Client, name: &str, uid: &str, opts: &NodeOptions) -> Result<(), NodeError> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(LEASE_NAMESPACE.into()),
            // Like kubelet: the Lease goes away with its Node.
            owner_references: (!uid.is_empty()).then(|| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: name.into(),
                    uid: uid.into(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.into()),
            lease_duration_seconds: Some(opts.lease_duration_seconds),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    };
    let mut body = serde_json::to_value(&lease).unwrap_or_default();
    body["apiVersion"] = "coordination.k8s.io/v1".into();
    body["kind"] = "Lease".into();
    leases
        .patch(name, &apply_params(), &Patch::Apply(&body))
        .await
        .map(|_| ())
        .map_err(|source| NodeError::Lease {
            node: name.into(),
            source,
        })
}

/// Registers every node (and its Lease) once; fails if the API server refuses.
pub async fn register(
    client: &Client,
    opts: &NodeOptions,
    since: &Time,
) -> Result<BTreeMap<String, String>, NodeError> {
    let mut uids = BTreeMap::new();
    for name in &opts.names {
        let uid = apply_node(client, name, opts, since).await?;
        renew_lease(client, name, &uid, opts).await?;
        tracing::info!(node = %name, gpus = opts.gpus, "node registered");
        uids.insert(name.clone(), uid);
    }
    Ok(uids)
}

/// Renews leases and refreshes node status until `stop`; errors are logged and retried on
/// the next tick, since a blip in the API server must not kill the agent.
pub async fn keep_alive(
    client: Client,
    opts: NodeOptions,
    mut uids: BTreeMap<String, String>,
    since: Time,
    stop: CancellationToken,
) {
    let mut lease_tick = tokio::time::interval(opts.lease_renew);
    let mut status_tick = tokio::time::interval(opts.status_refresh);
    lease_tick.tick().await;
    status_tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = lease_tick.tick() => {
                for name in &opts.names {
                    let uid = uids.get(name).cloned().unwrap_or_default();
                    if let Err(e) = renew_lease(&client, name, &uid, &opts).await {
                        tracing::warn!(error = %e, "lease renewal failed");
                    }
                }
            }
            _ = status_tick.tick() => {
                for name in &opts.names {
                    match apply_node(&client, name, &opts, &since).await {
                        Ok(uid) => { uids.insert(name.clone(), uid); }
                        Err(e) => tracing::warn!(error = %e, "node status refresh failed"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> NodeOptions {
        NodeOptions {
            names: vec!["gpu-0".into()],
            labels: [("pool".to_string(), "a100".to_string())].into(),
            gpus: 2,
            gpu_memory_mib: 81920,
            gpu_product: "NVIDIA-A100-SXM4-80GB".into(),
            cpu: "16".into(),
            memory: "64Gi".into(),
            ephemeral_storage: "100Gi".into(),
            max_pods: 110,
            lease_duration_seconds: 40,
            lease_renew: Duration::from_secs(10),
            status_refresh: Duration::from_secs(30),
        }
    }

    #[test]
    fn labels_and_capacity_advertise_gpus() {
        let labels = node_labels("gpu-0", &opts());
        assert_eq!(labels["kubernetes.io/hostname"], "gpu-0");
        assert_eq!(labels["nvidia.com/gpu.count"], "2");
        assert_eq!(labels["nvidia.com/gpu.memory"], "81920");
        assert_eq!(labels["pool"], "a100");
        let status = node_status(&opts(), &now(), &now());
        let capacity = status.capacity.expect("capacity");
        assert_eq!(capacity["nvidia.com/gpu"], Quantity("2".into()));
        assert_eq!(capacity["pods"], Quantity("110".into()));
        let ready = status
            .conditions
            .expect("conditions")
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_eq!(ready.status, "True");
        assert_eq!(status.addresses.expect("addresses")[0].address, "127.0.0.1");
    }

    #[test]
    fn cpu_only_nodes_have_no_gpu_resources() {
        let mut o = opts();
        o.gpus = 0;
        assert!(!resources(&o).contains_key("nvidia.com/gpu"));
        assert!(!node_labels("cpu-0", &o).contains_key("nvidia.com/gpu.count"));
    }
}
