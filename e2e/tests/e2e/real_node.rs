//! The local cluster's node is a real one, as kind's is (kubelet, containerd and kube-proxy;
//! e2e/cluster/node-up.sh): it enforces pod security contexts, serves Services through
//! kube-proxy, lets `kubectl logs`, `exec` and `port-forward` reach a pod, and hands out GPUs
//! through kubelet's device manager. Its pods run images built from this workspace's binaries
//! (e2e/images/build.sh). On kind (the CI workflow's other job) these tests are skipped: they
//! check our node, and kind's is real already.

use crate::tools::{find, render, run, scratch_dir};
use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{LogParams, PostParams};
use kube::Api;
use kubetune_e2e::{client, kubeconfig_path, kubectl_path, wait_for, TestNamespace};
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);
const TOOLS_IMAGE: &str = "kubetune.local/tools:1";

/// The server image as e2e/images/build.sh tags it: the chart's CPU variant, `<appVersion>`.
fn server_image() -> Result<String> {
    let chart = std::fs::read_to_string(crate::tools::chart_dir().join("Chart.yaml"))?;
    let version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .context("Chart.yaml has no appVersion")?
        .trim()
        .trim_matches('"');
    Ok(format!("kubetune/server:{version}"))
}

/// A pod that is never restarted, so a failure stays visible.
fn test_pod(name: &str, spec: Value) -> Result<Pod> {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": spec,
    });
    let spec = &mut pod["spec"];
    if spec.get("restartPolicy").is_none() {
        spec["restartPolicy"] = json!("Never");
    }
    Ok(serde_json::from_value(pod)?)
}

/// The pod and container security contexts of the operator's pods, as the chart renders them.
fn charts_security_contexts() -> Result<(Value, Value)> {
    let objects = render("kubetune", "kubetune-system", &[])?;
    let pod = &find(&objects, "Deployment", Some("kubetune"))["spec"]["template"]["spec"];
    let container = &pod["containers"][0]["securityContext"];
    assert!(
        pod["securityContext"]["runAsNonRoot"] == true && container["readOnlyRootFilesystem"] == true,
        "the chart no longer locks its pods down: {pod:#}"
    );
    Ok((pod["securityContext"].clone(), container.clone()))
}

fn phase(pod: Option<&Pod>) -> Option<&str> {
    pod?.status.as_ref()?.phase.as_deref()
}

fn waiting_reason(pod: Option<&Pod>) -> Option<(String, String)> {
    let statuses = pod?.status.as_ref()?.container_statuses.as_ref()?;
    let waiting = statuses.first()?.state.as_ref()?.waiting.as_ref()?;
    Some((
        waiting.reason.clone().unwrap_or_default(),
        waiting.message.clone().unwrap_or_default(),
    ))
}

fn ready(pod: Option<&Pod>) -> bool {
    pod.and_then(|p| p.status.as_ref())
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn kubectl(ns: &TestNamespace) -> Command {
    let mut cmd = Command::new(kubectl_path());
    cmd.arg("--kubeconfig")
        .arg(kubeconfig_path())
        .args(["--namespace", &ns.name]);
    cmd
}

#[tokio::test]
async fn the_node_is_ready_on_a_real_container_runtime_and_open_to_every_pod() -> Result<()> {
    let client = client().await?;
    let nodes: Api<Node> = Api::all(client);
    let node = nodes
        .list(&kube::api::ListParams::default())
        .await?
        .items
        .into_iter()
        .next()
        .context("no Node registered: is e2e/cluster/node-up.sh running?")?;
    let status = node.status.as_ref().context("status")?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    assert!(ready, "{:#?}", status.conditions);
    let runtime = status.node_info.as_ref().map(|i| i.container_runtime_version.clone());
    assert!(
        runtime.as_deref().is_some_and(|r| r.starts_with("containerd://")),
        "a real container runtime: {runtime:?}"
    );
    // The product's pods carry no tolerations: a tainted node would leave them Pending.
    let taints = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    assert!(taints.is_empty(), "{taints:?}");
    Ok(())
}

/// kubelet refuses to start a container that would run as root in a pod the chart's
/// `runAsNonRoot` covers, and a container that starts as the chart says runs as 65532 on a
/// read-only root filesystem, without capabilities.
#[tokio::test]
async fn the_charts_pod_security_is_enforced_a_pod_breaking_it_does_not_start() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "security").await?;
    let pods: Api<Pod> = ns.api();
    let (pod_security, container_security) = charts_security_contexts()?;

    let mut as_root = pod_security.clone();
    as_root["runAsUser"] = json!(0);
    let breaking = test_pod(
        "as-root",
        json!({
            "securityContext": as_root,
            "containers": [{"name": "main", "image": TOOLS_IMAGE, "imagePullPolicy": "IfNotPresent",
                            "command": ["sh", "-c", "echo started"], "securityContext": container_security}],
        }),
    )?;
    pods.create(&PostParams::default(), &breaking).await?;
    let refused = wait_for(&pods, "as-root", "refused", TIMEOUT, |p: Option<&Pod>| {
        waiting_reason(p).is_some_and(|(reason, _)| reason == "CreateContainerConfigError")
    })
    .await?;
    let (_, message) = waiting_reason(Some(&refused)).context("waiting")?;
    assert!(message.contains("non-root"), "{message}");
    assert_eq!(phase(Some(&refused)), Some("Pending"), "it never ran");

    let compliant = test_pod(
        "as-chart-says",
        json!({
            "securityContext": pod_security,
            "containers": [{"name": "main", "image": TOOLS_IMAGE, "imagePullPolicy": "IfNotPresent",
                            "command": ["sh", "-c", "id -u; grep CapEff /proc/self/status; touch /written 2>/dev/null && echo wrote / || echo read-only /"],
                            "securityContext": container_security}],
        }),
    )?;
    pods.create(&PostParams::default(), &compliant).await?;
    wait_for(&pods, "as-chart-says", "Succeeded", TIMEOUT, |p: Option<&Pod>| {
        matches!(phase(p), Some("Succeeded" | "Failed"))
    })
    .await?;
    let log = pods.logs("as-chart-says", &LogParams::default()).await?;
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.first(), Some(&"65532"), "runs as the chart's user: {log}");
    assert!(
        log.contains("CapEff:\t0000000000000000"),
        "all capabilities dropped: {log}"
    );
    // stdout only (touch's complaint goes nowhere): the log's order is the container's.
    assert_eq!(lines.last(), Some(&"read-only /"), "{log}");
    assert!(!lines.contains(&"wrote /"), "{log}");
    Ok(())
}

/// The server image, locked down as the operator runs it, answers through its Service's
/// ClusterIP (kube-proxy's rules), from this machine and from a pod, and through
/// `kubectl port-forward`; it writes its log where `kubectl logs` reads it, and `kubectl exec`
/// runs a command beside it.
#[tokio::test]
async fn the_server_answers_through_its_service_and_kubectl_reaches_its_pod() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "service").await?;
    let pods: Api<Pod> = ns.api();
    let model = scratch_dir("real-node-model")?.join("tiny-llama");
    kubetune_model::tiny::write_tiny_model(&model, &kubetune_model::tiny::TinySpec::default())?;
    readable_by_everyone(&model)?;
    let (pod_security, container_security) = charts_security_contexts()?;
    let server = test_pod(
        "server",
        json!({
            "securityContext": pod_security,
            "restartPolicy": "Always",
            "containers": [
                {"name": "server", "image": server_image()?, "imagePullPolicy": "IfNotPresent",
                 "args": ["--model", "/model", "--served-model-name", "tiny", "--device", "cpu"],
                 "ports": [{"name": "http", "containerPort": 8000}],
                 "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1},
                 "securityContext": container_security,
                 "volumeMounts": [{"name": "model", "mountPath": "/model", "readOnly": true}]},
                {"name": "tools", "image": TOOLS_IMAGE, "imagePullPolicy": "IfNotPresent",
                 "command": ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"],
                 "securityContext": container_security}
            ],
            "volumes": [{"name": "model", "hostPath": {"path": model, "type": "Directory"}}],
        }),
    )?;
    pods.create(&PostParams::default(), &server).await?;
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "server"},
        "spec": {"selector": {"app": "server"}, "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
    }))?;
    let service = ns.api::<Service>().create(&PostParams::default(), &service).await?;
    wait_for(&pods, "server", "Ready", TIMEOUT, ready).await?;

    let cluster_ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the Service has no ClusterIP")?;
    let models = get_models(&format!("http://{cluster_ip}:8000")).await?;
    assert_eq!(models["data"][0]["id"], "tiny", "{models:#}");

    let logs = run(kubectl(&ns).args(["logs", "server", "-c", "server"]))?;
    assert!(!logs.trim().is_empty(), "kubectl logs printed nothing");
    let exec = run(kubectl(&ns).args([
        "exec",
        "server",
        "-c",
        "tools",
        "--",
        "sh",
        "-c",
        "echo from $(hostname)",
    ]))?;
    assert_eq!(exec.trim(), "from server");
    // From inside a pod too: the Service leads back to this very pod (hairpin on the bridge).
    let url = format!("http://{cluster_ip}:8000/v1/models");
    let from_pod = run(kubectl(&ns).args([
        "exec", "server", "-c", "tools", "--", "busybox", "wget", "-q", "-O", "-", &url,
    ]))?;
    let from_pod: Value = serde_json::from_str(&from_pod).with_context(|| format!("from the pod: {from_pod}"))?;
    assert_eq!(from_pod["data"][0]["id"], "tiny");

    let forwarded = port_forward(&ns, "server", 8000).await?;
    let models = get_models(&format!("http://127.0.0.1:{}", forwarded.port)).await?;
    assert_eq!(models["data"][0]["id"], "tiny");
    Ok(())
}

/// The server runs as 65532 and reads the model through a hostPath volume; the weights are
/// written through a private temporary file, so they start readable by their owner only.
fn readable_by_everyone(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// GETs /v1/models from our server. Until kube-proxy has written a new Service's rules, a
/// connection to its ClusterIP is refused, or taken by whatever this machine's network does with
/// addresses it does not know (here a proxy that answers 404): only an answer with our server's
/// request id counts. A port-forward's listener, too, comes up a moment after it says so.
async fn get_models(base: &str) -> Result<Value> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        // A new connection each time: one kept alive would stay with whoever answered first.
        .pool_max_idle_per_host(0)
        .build()?;
    let url = format!("{base}/v1/models");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let last = match http.get(&url).send().await {
            Ok(r) if r.headers().contains_key("x-request-id") => return Ok(r.error_for_status()?.json().await?),
            Ok(r) => format!("an answer not from our server: {r:?}"),
            Err(e) if e.is_connect() => e.to_string(),
            Err(e) => return Err(e).context(format!("GET {url}")),
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("GET {url}: no answer from the server after 60 s; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `kubectl port-forward` to a pod's port, on a local port it picks; ends when dropped.
struct PortForward {
    child: std::process::Child,
    port: u16,
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn port_forward(ns: &TestNamespace, pod: &str, port: u16) -> Result<PortForward> {
    use std::io::{BufRead, BufReader};
    let mut child = kubectl(ns)
        .args(["port-forward", &format!("pod/{pod}"), &format!(":{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    // kubectl prints "Forwarding from 127.0.0.1:PORT -> 8000" once it listens, then a line per
    // connection: its output is read to the end, or kubectl would die writing to a closed pipe.
    let (first, line) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = first.send(lines.next().transpose());
        lines.for_each(drop);
    });
    // Owned from here on, so that the process is killed on every way out.
    let mut forward = PortForward { child, port: 0 };
    let line = tokio::time::timeout(TIMEOUT, line)
        .await??
        .context("kubectl port-forward")?
        .context("kubectl port-forward ended without a word")?;
    forward.port = match line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("127.0.0.1:"))
        .and_then(|p| p.parse().ok())
    {
        Some(port) => port,
        None => bail!("kubectl port-forward printed {line:?}"),
    };
    Ok(forward)
}

fn gpu_pod(name: &str, gpus: u32) -> Result<Pod> {
    test_pod(
        name,
        json!({
            "containers": [{"name": "main", "image": TOOLS_IMAGE, "imagePullPolicy": "IfNotPresent",
                            "command": ["sh", "-c", "echo \"gpus=$NVIDIA_VISIBLE_DEVICES\"; trap 'exit 0' TERM; while :; do sleep 1; done"],
                            "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}}],
            "terminationGracePeriodSeconds": 1,
        }),
    )
}

fn unschedulable(pod: Option<&Pod>) -> Option<String> {
    let conditions = pod?.status.as_ref()?.conditions.as_ref()?;
    let scheduled = conditions.iter().find(|c| c.type_ == "PodScheduled")?;
    (scheduled.status == "False").then(|| scheduled.message.clone().unwrap_or_default())
}

/// GPUs come from kubelet's device manager (our device plugin's fake devices): a pod is told
/// which it got, and a pod that asks for a GPU while none is free waits, unscheduled, until one
/// is.
#[tokio::test]
async fn gpus_are_handed_out_by_kubelets_device_manager_and_a_pod_waits_for_a_free_one() -> Result<()> {
    // No operator, so no trainer or server pod holds a GPU meanwhile (they ask for one).
    let _no_trainers = crate::tools::no_operator().await;
    let client = client().await?;
    let gpus = node_gpus(&client).await?;
    assert!(gpus >= 2, "the node offers {gpus} GPUs");
    let ns = TestNamespace::new(&client, "gpus").await?;
    let pods: Api<Pod> = ns.api();
    pods.create(&PostParams::default(), &gpu_pod("all", gpus)?).await?;
    wait_for(&pods, "all", "Running", TIMEOUT, |p: Option<&Pod>| {
        phase(p) == Some("Running")
    })
    .await?;
    let said = wait_for_log(&pods, "all", "gpus=").await?;
    let mut ids: Vec<u32> = said
        .trim()
        .trim_start_matches("gpus=")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("NVIDIA_VISIBLE_DEVICES: {said}"))?;
    ids.sort();
    assert_eq!(
        ids,
        (0..gpus).collect::<Vec<_>>(),
        "every device, named in NVIDIA_VISIBLE_DEVICES: {said}"
    );

    pods.create(&PostParams::default(), &gpu_pod("waiting", 1)?).await?;
    let pending = wait_for(&pods, "waiting", "unschedulable", TIMEOUT, |p: Option<&Pod>| {
        unschedulable(p).is_some_and(|m| !m.is_empty())
    })
    .await?;
    let message = unschedulable(Some(&pending)).unwrap_or_default();
    assert!(message.contains("Insufficient nvidia.com/gpu"), "{message}");

    pods.delete("all", &Default::default()).await?;
    wait_for(&pods, "waiting", "Running", TIMEOUT, |p: Option<&Pod>| {
        phase(p) == Some("Running")
    })
    .await?;
    let said = wait_for_log(&pods, "waiting", "gpus=").await?;
    let id: Option<u32> = said.trim().strip_prefix("gpus=").and_then(|id| id.parse().ok());
    assert!(id.is_some_and(|id| id < gpus), "one device once one was free: {said}");
    Ok(())
}

/// The GPUs the node offers (kubelet's allocatable, from the device plugin).
async fn node_gpus(client: &kube::Client) -> Result<u32> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .next()
        .context("no Node")?;
    let allocatable = node.status.and_then(|s| s.allocatable).unwrap_or_default();
    let gpus = allocatable
        .get("nvidia.com/gpu")
        .context("the node offers no nvidia.com/gpu")?;
    Ok(gpus.0.parse()?)
}

/// The first line of the pod's log that starts with `prefix`, once the container has written it.
async fn wait_for_log(pods: &Api<Pod>, name: &str, prefix: &str) -> Result<String> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let log = pods.logs(name, &LogParams::default()).await.unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.starts_with(prefix)) {
            return Ok(line.to_string());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{name} logged no line starting {prefix:?} in {TIMEOUT:?}: {log:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
