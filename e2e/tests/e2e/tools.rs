//! Shared by the tests: the external tools (through e2e/tools.sh, which builds or unpacks what
//! is missing), rendering the chart with helm, and installing the operator from it, with the
//! lock that keeps an installed operator away from the other tests' objects.

use anyhow::{bail, Context, Result};
use kubetune_e2e::{repo_root, yaml_documents};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Who may use the cluster while an operator runs. An operator installed from the chart watches
/// every namespace: two at once would both reconcile the same objects (and `install_operator`
/// refuses to start next to a running one), and one would also reconcile the FineTuneJobs and
/// ModelDeployments other tests create only to see how the API server stores them, giving them
/// trainer Jobs and status they do not expect. Cargo used to keep them apart by running one test
/// binary after another; in this one binary all tests run on parallel threads, so:
/// - a test that installs an operator holds the write side for as long as the operator exists
///   (`install_operator` takes it; [`OperatorInstall`] keeps it until the operator is deleted);
/// - a test that creates kubetune objects holds the read side ([`no_operator`]) while it
///   creates and looks at them;
/// - a test that creates none takes nothing.
///
/// A test holding the read side must not install an operator: it would wait for itself.
/// tokio's lock is fair, so a waiting install is not starved by a stream of readers, and it does
/// not poison: a test that fails holding it lets the others run.
pub static OPERATOR_LOCK: RwLock<()> = RwLock::const_new(());

/// The read side of [`OPERATOR_LOCK`]: no operator runs until the guard drops. Declare it
/// before the test's namespace: locals drop in reverse order, so the namespace's deletion has
/// started when an operator may come (as it had when cargo started the next binary).
pub async fn no_operator() -> RwLockReadGuard<'static, ()> {
    OPERATOR_LOCK.read().await
}

/// Path of a tool that e2e/tools.sh provides: helm, promtool, lua or actionlint.
pub fn tool(name: &str) -> PathBuf {
    static TOOLS: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    let tools = TOOLS.get_or_init(|| {
        let names = ["helm", "promtool", "lua", "actionlint"];
        let out = Command::new(repo_root().join("e2e/tools.sh"))
            .args(names)
            .output()
            .expect("running e2e/tools.sh");
        assert!(
            out.status.success(),
            "e2e/tools.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let paths: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(PathBuf::from)
            .collect();
        assert_eq!(paths.len(), names.len(), "e2e/tools.sh printed {paths:?}");
        names.iter().map(|n| n.to_string()).zip(paths).collect()
    });
    tools
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p.clone())
        .unwrap_or_else(|| panic!("no tool {name}"))
}

pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/kubetune")
}

/// Runs a command, failing with its output when it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

/// `helm template <release> charts/kubetune -n <namespace> --include-crds <args>`.
pub fn helm_template_cmd(release: &str, namespace: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(["template", release])
        .arg(chart_dir())
        .args(["--namespace", namespace, "--include-crds"])
        .args(args);
    cmd
}

/// The chart rendered into objects.
pub fn render(release: &str, namespace: &str, args: &[&str]) -> Result<Vec<Value>> {
    let text = run(&mut helm_template_cmd(release, namespace, args))?;
    yaml_documents(&text)
}

/// The one rendered object of a kind (and name, when given).
pub fn find<'a>(objects: &'a [Value], kind: &str, name: Option<&str>) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && name.is_none_or(|n| o["metadata"]["name"] == n))
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} {name:?}, found {}", found.len());
    found[0]
}

pub fn kinds(objects: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or("?").to_string())
        .collect();
    kinds.sort();
    kinds
}

/// A fresh scratch directory under the system temp dir.
pub fn scratch_dir(prefix: &str) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("kubetune-{prefix}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The operator installed from the chart into `namespace`, with the images e2e/images/build.sh
/// makes from this workspace's binaries (kubetune/*); available when this returns. Its
/// cluster-scoped objects go when the value drops, the namespace takes the rest.
/// Holds the write side of [`OPERATOR_LOCK`] until the operator is deleted.
pub struct OperatorInstall {
    pub deployment: String,
    release: String,
    // Dropped after `Drop::drop` has deleted the operator: the lock goes last.
    _exclusive: RwLockWriteGuard<'static, ()>,
}

pub async fn install_operator(client: &kube::Client, namespace: &str) -> Result<OperatorInstall> {
    use k8s_openapi::api::apps::v1::Deployment;
    use kubetune_e2e::{apply_object, wait_for, ApplyMode};
    // Before looking for other operators: the other test that installs one deletes it before
    // it lets go of the lock.
    let exclusive = OPERATOR_LOCK.write().await;
    // Two operators would both reconcile every namespace; `make demo` leaves one running.
    let operators: kube::Api<Deployment> = kube::Api::all(client.clone());
    let others = operators
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=kubetune-operator"))
        .await?;
    // Only running ones count: the chart tests apply the chart with images that never start.
    let running = |d: &&Deployment| {
        d.metadata.deletion_timestamp.is_none() && d.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0) > 0
    };
    if let Some(other) = others.items.iter().find(running) {
        anyhow::bail!(
            "another kubetune operator runs in namespace {} (make demo installs one); the end-to-end tests need the cluster to themselves: \
             helm uninstall {} -n {} (or e2e/cluster/down.sh --purge)",
            other.metadata.namespace.as_deref().unwrap_or("?"),
            other.metadata.labels.as_ref().and_then(|l| l.get("app.kubernetes.io/instance")).map_or("kubetune", |v| v),
            other.metadata.namespace.as_deref().unwrap_or("?"),
        );
    }
    let discovery = kube::discovery::Discovery::new(client.clone()).run().await?;
    // The namespaces' storage Secrets name the local S3 server, and the operator reads the
    // registry through it only when the chart allows that endpoint.
    let s3 = kubetune_e2e::store::s3_env()?;
    let endpoint = s3
        .iter()
        .find(|(k, _)| k == "AWS_ENDPOINT_URL")
        .map_or("", |(_, v)| v.as_str());
    let allowed = format!("registry.allowedEndpoints={{{endpoint}}}");
    let values = [
        "--set",
        "operator.image.repository=kubetune/operator",
        "--set",
        "trainer.image.repository=kubetune/trainer",
        "--set",
        "server.image.repository=kubetune/server",
        "--set",
        &allowed,
    ];
    let objects = render(namespace, namespace, &values)?;
    let install = OperatorInstall {
        deployment: objects
            .iter()
            .find(|o| o["kind"] == "Deployment")
            .and_then(|o| o["metadata"]["name"].as_str())
            .context("chart has a Deployment")?
            .to_string(),
        release: namespace.to_string(),
        _exclusive: exclusive,
    };
    for obj in objects.iter().filter(|o| {
        !o["apiVersion"]
            .as_str()
            .unwrap_or("")
            .starts_with("monitoring.coreos.com/")
    }) {
        // The CRDs are installed by the tests already; the chart's copy must agree with them.
        let mode = if obj["kind"] == "CustomResourceDefinition" {
            ApplyMode::DryRun
        } else {
            ApplyMode::Apply
        };
        apply_object(client, &discovery, namespace, obj, mode)
            .await
            .with_context(|| format!("applying {} {}", obj["kind"], obj["metadata"]["name"]))?;
    }
    let deployments: kube::Api<Deployment> = kube::Api::namespaced(client.clone(), namespace);
    let available =
        |d: Option<&Deployment>| d.and_then(|d| d.status.as_ref()).and_then(|s| s.available_replicas) == Some(1);
    wait_for(
        &deployments,
        &install.deployment,
        "available",
        std::time::Duration::from_secs(120),
        available,
    )
    .await?;
    Ok(install)
}

impl Drop for OperatorInstall {
    fn drop(&mut self) {
        // Gone before the lock lets the next test install its own operator or create objects
        // of its own: a live operator would reconcile them.
        let _ = Command::new(kubetune_e2e::kubectl_path())
            .arg("--kubeconfig")
            .arg(kubetune_e2e::kubeconfig_path())
            .args([
                "delete",
                "deployment",
                "--cascade=foreground",
                "--wait",
                "--timeout=60s",
                "--ignore-not-found",
                "-n",
            ])
            .arg(&self.release)
            .arg(&self.deployment)
            .output();
        let _ = Command::new(kubetune_e2e::kubectl_path())
            .arg("--kubeconfig")
            .arg(kubetune_e2e::kubeconfig_path())
            .args(["delete", "clusterrole,clusterrolebinding", "--ignore-not-found", "-l"])
            .arg(format!("app.kubernetes.io/instance={}", self.release))
            .output();
    }
}
