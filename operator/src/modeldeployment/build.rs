//! Pure construction of a ModelDeployment's children: the adapters ConfigMap, the Deployment of
//! inference pods, their Service and an optional PodDisruptionBudget.
//!
//! Adapter versions are deliberately not in the pod template: a new version is hot-swapped into
//! running pods through their admin API, so it must not roll the Deployment. The ConfigMap holds
//! the versions a pod loads when it (re)starts, and it is updated once a rollout is promoted.

use super::validate::ValidModelDeployment;
use crate::config::OperatorConfig;
use crate::error::{Error, Result};
use crate::workload::{
    apply_placement, device_env, resources_or_one_gpu, restricted_container_security, restricted_pod_security,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::{Resource, ResourceExt};
use kubetune_crds::server_contract::{AdaptersFile, ADAPTERS_FILE, SERVER_PORT};
use kubetune_crds::ModelDeployment;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Label on every child object, naming the ModelDeployment it belongs to.
pub const MODELDEPLOYMENT_LABEL: &str = "kubetune.dev/modeldeployment";
pub const SERVER_CONTAINER: &str = "server";
const CACHE_PATH: &str = "/var/cache/kubetune";

/// Everything one reconcile applies.
pub struct Children {
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    pub pdb: Option<PodDisruptionBudget>,
}

pub fn adapters_config_map_name(md: &ModelDeployment) -> String {
    format!("{}-adapters", md.name_any())
}

/// Labels that select the inference pods.
pub fn selector_labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "kubetune-server".into()),
        (MODELDEPLOYMENT_LABEL.into(), md.name_any()),
    ])
}

fn labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    let mut l = selector_labels(md);
    l.insert("app.kubernetes.io/managed-by".into(), "kubetune-operator".into());
    l
}

/// The Service URL clients use, as status.endpoint reports it.
pub fn endpoint(md: &ModelDeployment) -> String {
    format!(
        "http://{}.{}.svc:{SERVER_PORT}/v1",
        md.name_any(),
        md.namespace().unwrap_or_default()
    )
}

/// Builds every child of a validated spec. `registry` is the resolved registry root; `serving`
/// the adapters pods load at start.
pub fn build_children(
    md: &ModelDeployment,
    valid: &ValidModelDeployment,
    config: &OperatorConfig,
    registry: &str,
    serving: &AdaptersFile,
) -> Result<Children> {
    let ser = |what: &'static str| move |source| Error::Serialize { what, source };
    let owner = md.controller_owner_ref(&()).ok_or_else(|| Error::MissingField {
        object: format!("ModelDeployment {}", md.name_any()),
        field: "metadata.uid",
    })?;
    let meta = |name: String| json!({"name": name, "namespace": md.namespace(), "labels": labels(md), "ownerReferences": [owner]});
    let spec = &md.spec;

    let adapters_json = serde_json::to_string_pretty(serving).map_err(ser("adapters file"))?;
    let config_map: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": meta(adapters_config_map_name(md)),
        "data": {"adapters.json": adapters_json},
    }))
    .map_err(ser("config map"))?;

    let server = spec.server.clone().unwrap_or_default();
    let mut args: Vec<String> = vec![
        "--model".into(),
        spec.base_model.uri.clone(),
        "--listen".into(),
        format!("$(POD_IP):{SERVER_PORT}"),
        "--registry".into(),
        registry.to_string(),
        "--adapters-file".into(),
        ADAPTERS_FILE.into(),
        "--cache-dir".into(),
        CACHE_PATH.into(),
    ];
    let numeric = [
        ("--max-batch", server.max_batch_size),
        ("--max-context", server.max_context_length),
        ("--max-queue", server.max_queue),
    ];
    for (flag, value) in numeric {
        if let Some(v) = value {
            args.extend([flag.to_string(), v.to_string()]);
        }
    }
    if server.merge == Some(true) {
        args.push("--merge".into());
    }
    if let Some(q) = server.quantize {
        args.extend(["--quantize".to_string(), q.as_flag().to_string()]);
    }
    let env_from: Vec<Value> = spec
        .storage_secret_ref
        .iter()
        .map(|s| json!({"secretRef": {"name": s.name}}))
        .collect();
    let resources = resources_or_one_gpu(&spec.placement, &config.gpu_resource)?;
    let container = json!({
        "name": SERVER_CONTAINER,
        "image": server.image.clone().unwrap_or_else(|| config.server_image.clone()),
        "args": args,
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            device_env(valid.gpus),
        ],
        "envFrom": env_from,
        "resources": resources,
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "failureThreshold": 6},
        "startupProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 2, "failureThreshold": 300},
        "volumeMounts": [
            {"name": "adapters", "mountPath": "/etc/kubetune/adapters", "readOnly": true},
            {"name": "cache", "mountPath": CACHE_PATH},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": restricted_container_security(),
    });
    let mut pod_spec = json!({
        "containers": [container],
        "volumes": [
            {"name": "adapters", "configMap": {"name": adapters_config_map_name(md)}},
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        ],
        "securityContext": restricted_pod_security(),
    });
    apply_placement(&mut pod_spec, &spec.placement)?;
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta(md.name_any()),
        "spec": {
            "replicas": spec.replicas.unwrap_or(1),
            "selector": {"matchLabels": selector_labels(md)},
            // A new pod must be ready (model and adapters loaded) before an old one goes.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels(md)}, "spec": pod_spec},
        },
    }))
    .map_err(ser("deployment"))?;

    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta(md.name_any()),
        "spec": {
            "selector": selector_labels(md),
            "ports": [{"name": "http", "port": SERVER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }))
    .map_err(ser("service"))?;

    let pdb = match spec.pod_disruption_budget {
        Some(true) => Some(
            serde_json::from_value(json!({
                "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": meta(md.name_any()),
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(md)}},
            }))
            .map_err(ser("pod disruption budget"))?,
        ),
        _ => None,
    };
    Ok(Children {
        config_map,
        deployment,
        service,
        pdb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::modeldeployment;
    use kubetune_crds::server_contract::ServedAdapter;

    fn valid(md: &ModelDeployment) -> ValidModelDeployment {
        crate::modeldeployment::validate::validate(&md.spec, &OperatorConfig::for_tests()).expect("fixture is valid")
    }

    /// The children of `md` serving `adapters`, with the test config and registry.
    fn children(md: &ModelDeployment, adapters: &AdaptersFile) -> Children {
        build_children(
            md,
            &valid(md),
            &OperatorConfig::for_tests(),
            "s3://kubetune/registry",
            adapters,
        )
        .expect("builds")
    }

    /// The device the server container is told to open.
    fn device(md: &ModelDeployment) -> Option<String> {
        let c = children(md, &serving());
        let pod = c.deployment.spec.and_then(|s| s.template.spec).expect("pod");
        let mut set = pod.containers[0]
            .env
            .clone()
            .into_iter()
            .flatten()
            .filter(|e| e.name == "KUBETUNE_DEVICE");
        let device = set.next().and_then(|e| e.value);
        assert!(set.next().is_none(), "KUBETUNE_DEVICE is set once");
        device
    }

    fn serving() -> AdaptersFile {
        AdaptersFile {
            adapters: vec![ServedAdapter {
                name: "support-bot".into(),
                source: "support-bot@2".into(),
                version: 2,
                digest: "sha256:ab".into(),
            }],
        }
    }

    #[test]
    fn adapter_versions_live_in_the_config_map_not_the_pod_template() {
        let md = modeldeployment("modeldeployment.yaml");
        let c = children(&md, &serving());
        let data = c
            .config_map
            .data
            .as_ref()
            .and_then(|d| d.get("adapters.json"))
            .expect("adapters.json");
        let file: AdaptersFile = serde_json::from_str(data).expect("adapters file");
        assert_eq!(file, serving());

        let other = AdaptersFile { adapters: vec![] };
        let c2 = children(&md, &other);
        assert_eq!(
            c.deployment.spec, c2.deployment.spec,
            "a new adapter version must not roll the pods"
        );
    }

    #[test]
    fn spec_server_quantize_becomes_the_servers_flag() {
        let mut md = modeldeployment("modeldeployment.yaml");
        let mut server = md.spec.server.clone().unwrap_or_default();
        server.quantize = Some(kubetune_crds::ServerQuantize::Int8);
        md.spec.server = Some(server);
        let c = children(&md, &serving());
        let pod = c
            .deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod");
        let args = pod.containers[0].args.clone().unwrap_or_default();
        assert!(
            args.windows(2).any(|w| w[0] == "--quantize" && w[1] == "int8"),
            "{args:?}"
        );
    }

    #[test]
    fn server_pods_are_probed_and_locked_down() {
        let md = modeldeployment("modeldeployment.yaml");
        let c = children(&md, &serving());
        let spec = c.deployment.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(1));
        let pod = spec.template.spec.as_ref().expect("pod");
        let server = &pod.containers[0];
        let ready = server
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("readiness");
        assert_eq!(ready.path.as_deref(), Some("/ready"));
        assert_eq!(
            server
                .security_context
                .as_ref()
                .and_then(|s| s.read_only_root_filesystem),
            Some(true)
        );
        let args = server.args.clone().unwrap_or_default();
        assert!(args
            .windows(2)
            .any(|w| w[0] == "--adapters-file" && w[1] == ADAPTERS_FILE));
        assert!(args.windows(2).any(|w| w[0] == "--max-batch" && w[1] == "16"));
        assert!(
            !args.iter().any(|a| a == "--quantize"),
            "no quantize flag unless the spec asks"
        );
        assert_eq!(
            c.service.spec.as_ref().and_then(|s| s.selector.clone()),
            Some(selector_labels(&md))
        );
        assert!(c.pdb.is_none());
        assert_eq!(endpoint(&md), "http://support.team-a.svc:8000/v1");
    }

    #[test]
    fn gpu_servers_open_cuda_whether_the_gpu_is_the_default_or_asked_for() {
        let mut md = modeldeployment("modeldeployment.yaml");
        assert_eq!(device(&md).as_deref(), Some("cuda"), "no resources: one GPU");
        md.spec.placement.resources =
            Some(serde_json::from_value(json!({"limits": {"nvidia.com/gpu": "1"}})).expect("resources"));
        assert_eq!(device(&md).as_deref(), Some("cuda"));
    }

    #[test]
    fn cpu_servers_open_the_cpu() {
        let mut md = modeldeployment("modeldeployment.yaml");
        md.spec.placement.resources =
            Some(serde_json::from_value(json!({"requests": {"cpu": "4", "memory": "8Gi"}})).expect("resources"));
        assert_eq!(device(&md).as_deref(), Some("cpu"));
    }

    #[test]
    fn pdb_when_asked() {
        let mut md = modeldeployment("modeldeployment.yaml");
        md.spec.pod_disruption_budget = Some(true);
        let c = children(&md, &serving());
        assert!(c.pdb.is_some());
    }
}
