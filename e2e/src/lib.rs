//! Helpers for kubetune's end-to-end tests.
//!
//! The tests take any cluster: `KUBECONFIG` when set, else the local cluster's admin kubeconfig
//! (`.kubetune/cluster/admin.kubeconfig`, written by `e2e/cluster/up.sh`).

pub mod pods;
pub mod store;

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiCapabilities, ApiResource, Discovery, Scope};
use kube::runtime::wait::{await_condition, Condition};
use kube::{Client, Config, Resource};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Field manager of everything the tests apply.
pub const FIELD_MANAGER: &str = "kubetune-e2e";

/// The repository root (the e2e crate's parent).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The kubeconfig the tests use.
pub fn kubeconfig_path() -> PathBuf {
    match std::env::var_os("KUBECONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join(".kubetune/cluster/admin.kubeconfig"),
    }
}

/// A client for the test cluster, with a message that says how to start one when there is none.
pub async fn client() -> Result<Client> {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path).with_context(|| {
        format!(
            "no kubeconfig at {}: start the local cluster with e2e/cluster/up.sh or set KUBECONFIG",
            path.display()
        )
    })?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    client.apiserver_version().await.with_context(|| {
        format!(
            "the cluster in {} does not answer: is it up (e2e/cluster/up.sh)?",
            path.display()
        )
    })?;
    Ok(client)
}

/// A namespace that lives as long as the test holds it; deleted on drop.
pub struct TestNamespace {
    pub client: Client,
    pub name: String,
}

impl TestNamespace {
    /// Creates a fresh namespace named after the test.
    pub async fn new(client: &Client, prefix: &str) -> Result<Self> {
        let suffix: u32 = std::process::id()
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .subsec_nanos());
        let name = format!("e2e-{prefix}-{:x}", suffix & 0xffffff);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"kubetune.dev/e2e": "true"}}
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        Ok(Self {
            client: client.clone(),
            name,
        })
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Best effort: the namespace controller deletes what is inside. The test's client cannot be
        // used here: its connection task lives on the test's runtime, which this drop is blocking.
        // So a thread with a runtime and client of its own does the delete.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(rt) = rt {
                let _ = rt.block_on(async {
                    let client = client().await?;
                    Api::<Namespace>::all(client)
                        .delete(&name, &DeleteParams::background())
                        .await?;
                    anyhow::Ok(())
                });
            }
        })
        .join();
    }
}

/// Waits until `cond` holds for the named object, or fails after `timeout` with the object's last state.
pub async fn wait_for<K>(api: &Api<K>, name: &str, what: &str, timeout: Duration, cond: impl Condition<K>) -> Result<K>
where
    K: Clone + Debug + Send + DeserializeOwned + Resource + 'static,
{
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, cond)).await {
        Ok(Ok(Some(obj))) => Ok(obj),
        Ok(Ok(None)) => bail!("{name} was deleted while waiting for it to be {what}"),
        Ok(Err(e)) => Err(anyhow!(e)).context(format!("watching {name} for {what}")),
        Err(_) => {
            let last = api.get_opt(name).await.ok().flatten();
            bail!("{name} not {what} after {timeout:?}; last seen: {last:#?}")
        }
    }
}

/// Waits until the named object is gone, or fails after `timeout`.
pub async fn wait_deleted<K>(api: &Api<K>, name: &str, timeout: Duration) -> Result<()>
where
    K: Clone + Debug + Send + DeserializeOwned + Resource + 'static,
{
    let Some(obj) = api.get_opt(name).await? else {
        return Ok(());
    };
    let uid = obj.meta().uid.clone().unwrap_or_default();
    match tokio::time::timeout(
        timeout,
        await_condition(api.clone(), name, kube::runtime::wait::conditions::is_deleted(&uid)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(anyhow!(e)).context(format!("watching {name} for deletion")),
        Err(_) => bail!("{name} still exists after {timeout:?}"),
    }
}

/// Splits a multi-document YAML file into JSON objects, skipping empty documents.
pub fn yaml_documents(text: &str) -> Result<Vec<serde_json::Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_json::Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

use serde::Deserialize;

/// How an object is sent to the API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyMode {
    /// Server-side apply, persisted.
    Apply,
    /// Server-side apply with dryRun=All: every validation runs, nothing is stored.
    DryRun,
}

/// Server-side applies one object of any kind (namespaced ones into `namespace` unless they name
/// their own), resolving its API through discovery. Returns the API server's answer.
pub async fn apply_object(
    client: &Client,
    discovery: &Discovery,
    namespace: &str,
    obj: &serde_json::Value,
    mode: ApplyMode,
) -> Result<DynamicObject> {
    let dynamic: DynamicObject = serde_json::from_value(obj.clone()).context("object is not a Kubernetes object")?;
    let types = dynamic
        .types
        .as_ref()
        .ok_or_else(|| anyhow!("object has no apiVersion/kind"))?;
    let gvk = GroupVersionKind::try_from(types)?;
    let (resource, caps) = discovery
        .resolve_gvk(&gvk)
        .ok_or_else(|| anyhow!("the cluster does not serve {gvk:?}"))?;
    let name = dynamic
        .metadata
        .name
        .clone()
        .ok_or_else(|| anyhow!("object has no metadata.name"))?;
    let api = dynamic_api(
        client,
        &resource,
        &caps,
        dynamic.metadata.namespace.as_deref().unwrap_or(namespace),
    );
    let mut params = PatchParams::apply(FIELD_MANAGER).force();
    if mode == ApplyMode::DryRun {
        params = params.dry_run();
    }
    Ok(api.patch(&name, &params, &Patch::Apply(obj)).await?)
}

fn dynamic_api(client: &Client, resource: &ApiResource, caps: &ApiCapabilities, namespace: &str) -> Api<DynamicObject> {
    match caps.scope {
        Scope::Namespaced => Api::namespaced_with(client.clone(), namespace, resource),
        Scope::Cluster => Api::all_with(client.clone(), resource),
    }
}

/// Installs (server-side applies) kubetune's CRDs and waits until the API server serves them.
pub async fn install_crds(client: &Client) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in kubetune_crds::all_crds() {
        let name = crd.metadata.name.clone().ok_or_else(|| anyhow!("CRD without a name"))?;
        api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
            .await?;
        let established = |obj: Option<&CustomResourceDefinition>| {
            obj.and_then(|c| c.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
        };
        wait_for(&api, &name, "Established", Duration::from_secs(60), established).await?;
    }
    Ok(())
}

/// The kubectl to run: `$KUBECTL`, else the local cluster's (at the version pinned in
/// e2e/cluster/versions.env), else whatever `kubectl` is on PATH.
pub fn kubectl_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBECTL").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let versions = std::fs::read_to_string(repo_root().join("e2e/cluster/versions.env")).unwrap_or_default();
    let version = versions.lines().find_map(|l| l.strip_prefix("KUBERNETES_VERSION="));
    let cache = std::env::var_os("KUBETUNE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kubetune")));
    match (version, cache) {
        (Some(v), Some(c)) if c.join(format!("bin/kubernetes-{v}/kubectl")).exists() => {
            c.join(format!("bin/kubernetes-{v}/kubectl"))
        }
        _ => PathBuf::from("kubectl"),
    }
}
