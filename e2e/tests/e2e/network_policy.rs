//! NetworkPolicies are enforced on the local cluster's node (kube-router's firewall, started by
//! e2e/cluster/node-up.sh), so that a test can show a policy working: here, that a deny-all
//! policy cuts a pod off and lets it be reached again once deleted, so no test that relies on
//! enforcement passes for want of an enforcer. `finetune_and_serve.rs` uses [`Prober`] to show
//! the chart's own policy keeping all but the operator off the servers' admin port.
//!
//! Probes go from pod to pod, by pod IP: the node's own address (this machine, kubelet's probes)
//! is let through by every enforcer, so a probe from the test process would prove nothing.

use crate::tools::run;
use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, PostParams};
use kube::Api;
use kubetune_e2e::{client, kubeconfig_path, kubectl_path, wait_for, TestNamespace};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

/// The probes' image: any busybox. The local cluster's node has ours (e2e/images/build.sh);
/// elsewhere (kind) `KUBETUNE_TOOLS_IMAGE` names one the cluster can pull, such as `busybox:1.37`.
fn tools_image() -> String {
    std::env::var("KUBETUNE_TOOLS_IMAGE").unwrap_or_else(|_| "kubetune.local/tools:1".into())
}
/// How long a pod takes to start, and an enforcer to apply a change (a new pod or policy).
const TIMEOUT: Duration = Duration::from_secs(120);

fn running(pod: Option<&Pod>) -> bool {
    pod.and_then(|p| p.status.as_ref())
        .and_then(|s| s.pod_ip.as_ref().zip(s.phase.as_deref()))
        .is_some_and(|(_, phase)| phase == "Running")
}

/// The pod's IP once it runs.
pub async fn running_pod_ip(pods: &Api<Pod>, name: &str) -> Result<String> {
    let pod = wait_for(pods, name, "Running", TIMEOUT, running).await?;
    pod.status.and_then(|s| s.pod_ip).context("a running pod has an IP")
}

/// A busybox pod that probes TCP ports from where it runs: its namespace and labels are what a
/// NetworkPolicy's `from` looks at.
pub struct Prober {
    namespace: String,
    name: String,
}

impl Prober {
    /// Starts the pod and waits until it runs.
    pub async fn start(
        client: &kube::Client,
        namespace: &str,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Self> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "probe", "image": tools_image(), "imagePullPolicy": "IfNotPresent",
                                "command": ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"],
                                // Never Ready, so never an endpoint of a Service whose selector its labels match.
                                "readinessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 60}}],
            },
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
        running_pod_ip(&pods, name).await?;
        Ok(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    /// Whether a TCP connection from this pod to `ip:port` is accepted now (busybox nc, 2 s to
    /// connect): refused and timed out are both "no".
    pub fn connects(&self, ip: &str, port: u16) -> Result<bool> {
        let probe = format!("busybox nc -w 2 {ip} {port} </dev/null >/dev/null 2>&1 && echo open || echo closed");
        let out = run(Command::new(kubectl_path())
            .arg("--kubeconfig")
            .arg(kubeconfig_path())
            .args([
                "--namespace",
                &self.namespace,
                "exec",
                &self.name,
                "--",
                "sh",
                "-c",
                &probe,
            ]))?;
        match out.trim() {
            "open" => Ok(true),
            "closed" => Ok(false),
            other => bail!("probe from {}/{}: {other:?}", self.namespace, self.name),
        }
    }

    /// Waits until connecting to `ip:port` from this pod is accepted (`open`) or not: an
    /// enforcer applies a new pod or policy a moment after the API server has it.
    pub async fn wait_until(&self, ip: &str, port: u16, open: bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if self.connects(ip, port)? == open {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let want = if open { "accepted" } else { "refused" };
                bail!(
                    "a connection from {}/{} to {ip}:{port} is still not {want} after {TIMEOUT:?}",
                    self.namespace,
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A pod in a namespace with no policy reaches another; a policy that selects every pod of that
/// namespace and allows no ingress cuts it off; deleting the policy lets it through again.
#[tokio::test]
async fn network_policies_are_enforced_a_deny_all_policy_cuts_a_pod_off_until_it_is_deleted() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "netpol").await?;
    let pods: Api<Pod> = ns.api();
    let web: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "web", "image": tools_image(), "imagePullPolicy": "IfNotPresent",
                            "command": ["busybox", "httpd", "-f", "-p", "8080", "-h", "/"]}],
        },
    }))?;
    pods.create(&PostParams::default(), &web).await?;
    let client_pod = Prober::start(&client, &ns.name, "client", BTreeMap::new()).await?;
    let web_ip = running_pod_ip(&pods, "web").await?;
    client_pod.wait_until(&web_ip, 8080, true).await?;

    let deny_all: Value = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny-all"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    });
    let policies: Api<NetworkPolicy> = ns.api();
    policies
        .create(&PostParams::default(), &serde_json::from_value(deny_all)?)
        .await?;
    client_pod
        .wait_until(&web_ip, 8080, false)
        .await
        .context("a deny-all NetworkPolicy is not enforced: is kube-router running (e2e/cluster/node-up.sh)?")?;

    policies.delete("deny-all", &DeleteParams::default()).await?;
    client_pod.wait_until(&web_ip, 8080, true).await?;
    Ok(())
}
