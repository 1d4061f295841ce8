//! The node agent plays kubelet: pods scheduled onto its Nodes run as local processes, with their
//! exit codes, readiness and IPs reported to the API server.

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use kubetune_e2e::{client, wait_for, TestNamespace};
use serde_json::json;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

fn job(name: &str, script: &str) -> Result<Job> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "main", "image": "busybox:1.36",
                    "command": ["sh", "-c", script],
                    "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
                }]
            }}
        }
    }))?)
}

fn job_condition(type_: &'static str) -> impl Fn(Option<&Job>) -> bool {
    move |job| {
        job.and_then(|j| j.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
    }
}

/// The terminated state of the only container of the Job's only pod.
async fn terminated_state(ns: &TestNamespace, job: &str) -> Result<ContainerStateTerminated> {
    let pods: Api<Pod> = ns.api();
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await?;
    assert_eq!(list.items.len(), 1, "expected one pod for job {job}");
    let status = list.items[0].status.clone().context("pod has no status")?;
    let container = status
        .container_statuses
        .unwrap_or_default()
        .into_iter()
        .next()
        .context("no container status")?;
    container
        .state
        .and_then(|s| s.terminated)
        .context("container is not terminated")
}

#[tokio::test]
async fn nodes_are_registered_with_gpu_capacity() -> Result<()> {
    let client = client().await?;
    // The node agent's Nodes; the real node (kubetune.dev/pool=real) has no GPUs.
    let nodes = Api::<Node>::all(client)
        .list(&ListParams::default().labels("kubetune.dev/pool=local"))
        .await?;
    assert!(
        !nodes.items.is_empty(),
        "no Node registered: is the node agent running?"
    );
    for node in &nodes.items {
        let status = node.status.as_ref().context("node without status")?;
        let gpus = status
            .capacity
            .as_ref()
            .and_then(|c| c.get("nvidia.com/gpu"))
            .map(|q| q.0.clone());
        assert!(
            gpus.is_some_and(|g| g != "0"),
            "node {:?} has no nvidia.com/gpu capacity",
            node.metadata.name
        );
        let ready = status
            .conditions
            .as_ref()
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        assert!(ready, "node {:?} is not Ready", node.metadata.name);
    }
    Ok(())
}

#[tokio::test]
async fn job_pod_runs_to_completion_with_its_exit_code() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "job").await?;
    let jobs: Api<Job> = ns.api();
    jobs.create(
        &PostParams::default(),
        &job("ok", "echo hello from $(POD_NAME); exit 0")?,
    )
    .await?;
    jobs.create(
        &PostParams::default(),
        &job("fails", "echo failing on purpose >&2; exit 3")?,
    )
    .await?;

    wait_for(&jobs, "ok", "Complete", TIMEOUT, job_condition("Complete")).await?;
    let ok = terminated_state(&ns, "ok").await?;
    assert_eq!((ok.exit_code, ok.reason.as_deref()), (0, Some("Completed")));

    wait_for(&jobs, "fails", "Failed", TIMEOUT, job_condition("Failed")).await?;
    let failed = terminated_state(&ns, "fails").await?;
    assert_eq!((failed.exit_code, failed.reason.as_deref()), (3, Some("Error")));
    Ok(())
}

#[tokio::test]
async fn deployment_pod_becomes_ready_behind_its_readiness_probe() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "deploy").await?;
    let deployments: Api<Deployment> = ns.api();
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{
                    "name": "web", "image": "python:3",
                    "command": ["python3", "-m", "http.server", "--bind", "$(POD_IP)", "8080"],
                    "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}
                }]}
            }
        }
    }))?;
    deployments.create(&PostParams::default(), &deployment).await?;
    let available =
        |d: Option<&Deployment>| d.and_then(|d| d.status.as_ref()).and_then(|s| s.available_replicas) == Some(1);
    wait_for(&deployments, "web", "available", TIMEOUT, available).await?;

    let pods: Api<Pod> = ns.api();
    let pod = pods
        .list(&ListParams::default().labels("app=web"))
        .await?
        .items
        .remove(0);
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .context("pod has no IP")?;
    assert!(
        ip.starts_with("127.") && ip != "127.0.0.1",
        "pod IP {ip} is not a pod's own loopback address"
    );
    // The readiness probe said yes; so does the server itself, on the pod's own address.
    let reply = tokio::net::TcpStream::connect((ip.as_str(), 8080)).await;
    assert!(reply.is_ok(), "nothing listens on {ip}:8080: {reply:?}");
    Ok(())
}
