//! Pure construction of a ModelDeployment's children: the adapters ConfigMap, the Deployment of
//! inference pods, their Service, an optional PodDisruptionBudget and an optional
//! HorizontalPodAutoscaler.
//!
//! Adapter versions are deliberately not in the pod template: a new version is hot-swapped into
//! running pods through their admin API, so it must not roll the Deployment. The ConfigMap holds
//! the versions a pod loads when it (re)starts, and it is updated once a rollout is promoted.

use super::validate::ValidModelDeployment;
use crate::config::OperatorConfig;
use crate::error::{Error, Result};
use crate::workload::{
    apply_identity, apply_placement, device_env, resources_or_one_gpu, restricted_container_security,
    restricted_pod_security,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kube::{Resource, ResourceExt};
use kubetune_crds::server_contract::{AdaptersFile, ADAPTERS_FILE, ADMIN_PORT, SERVER_PORT};
use kubetune_crds::{AutoscalingSpec, ModelDeployment};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Label on every child object, naming the ModelDeployment it belongs to.
pub const MODELDEPLOYMENT_LABEL: &str = "kubetune.dev/modeldeployment";
pub const SERVER_CONTAINER: &str = "server";
const CACHE_PATH: &str = "/var/cache/kubetune";
/// Per-pod average an autoscaler keeps its metric at when spec.autoscaling.targetPerPod is unset.
const DEFAULT_TARGET_PER_POD: u32 = 8;

/// Where server pods read their admin key (the Secret's one item), for `--admin-api-key-file`.
const ADMIN_KEY_DIR: &str = "/etc/kubetune/admin";
const ADMIN_KEY_ITEM: &str = "key";

/// Everything one reconcile applies.
pub struct Children {
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    pub pdb: Option<PodDisruptionBudget>,
    pub hpa: Option<HorizontalPodAutoscaler>,
    /// Only the operator may reach the admin port (with `--admin-policy-from`).
    pub network_policy: Option<NetworkPolicy>,
}

/// The model name clients send for the base model: spec.baseModel.servedName, else derived from
/// the URI. Clients know a model by its name (`meta-llama/Llama-3.2-1B-Instruct`), not by where
/// the operator's storage keeps it. hf://org/name[@revision] gives the repository `org/name`; any
/// other URI its last path segment unchanged, extension and quantization suffix included (a
/// .gguf file's name is how such files are known).
pub fn served_model_name(md: &ModelDeployment) -> String {
    let base = &md.spec.base_model;
    if let Some(name) = &base.served_name {
        return name.clone();
    }
    let uri = base.uri.trim_end_matches('/');
    let path = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    if uri.starts_with("hf://") {
        return path.split_once('@').map_or(path, |(repo, _)| repo).to_string();
    }
    path.rsplit('/').next().unwrap_or(path).to_string()
}

/// The pod selector as a label-selector string, for status.selector (the scale subresource).
pub fn selector_string(md: &ModelDeployment) -> String {
    selector_labels(md)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn adapters_config_map_name(md: &ModelDeployment) -> String {
    format!("{}-adapters", md.name_any())
}

/// The Secret holding the key the operator sends to the server pods' admin API.
pub fn admin_key_secret_name(md: &ModelDeployment) -> String {
    format!("{}-admin-key", md.name_any())
}

/// A fresh admin key: 32 bytes from the kernel's CSPRNG, hex-encoded. Never logged.
pub fn new_admin_key() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The admin key Secret, owned by the ModelDeployment so that it goes with it. It is created
/// once and never applied again: a new key would lock the operator out of pods started with the
/// old one until they restart.
pub fn admin_key_secret(md: &ModelDeployment, key: &str) -> Result<Secret> {
    let owner = md.controller_owner_ref(&()).ok_or_else(|| Error::MissingField {
        object: format!("ModelDeployment {}", md.name_any()),
        field: "metadata.uid",
    })?;
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(admin_key_secret_name(md)),
            namespace: md.namespace(),
            labels: Some(labels(md)),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            ADMIN_KEY_ITEM.to_string(),
            ByteString(key.as_bytes().to_vec()),
        )])),
        ..Default::default()
    })
}

/// The key an admin key Secret holds, if it holds one.
pub fn admin_key_of(secret: &Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(ADMIN_KEY_ITEM)?;
    String::from_utf8(bytes.0.clone()).ok().filter(|k| !k.trim().is_empty())
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

/// Annotation on the pod template naming the admin key Secret's uid: pods read the key at start,
/// so a recreated Secret (a new key) must roll them.
pub const ADMIN_KEY_SECRET_ANNOTATION: &str = "kubetune.dev/admin-key-secret-uid";

/// Builds every child of a validated spec. `registry` is the resolved registry root; `serving`
/// the adapters pods load at start; `admin_key_secret_uid` the uid of the admin key Secret.
pub fn build_children(
    md: &ModelDeployment,
    valid: &ValidModelDeployment,
    config: &OperatorConfig,
    registry: &str,
    serving: &AdaptersFile,
    admin_key_secret_uid: Option<&str>,
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
    // The storage URI stays a base-model name too, so that adapters recording it as their base
    // still load (and clients that sent it keep working where the server accepts aliases).
    let mut args: Vec<String> = vec![
        "--model".into(),
        valid.model_uri.clone(),
        "--served-model-name".into(),
        served_model_name(md),
        "--base-model-alias".into(),
        spec.base_model.uri.clone(),
        "--listen".into(),
        format!("$(POD_IP):{SERVER_PORT}"),
        // The admin API on a port of its own, which the Service does not expose.
        "--admin-listen".into(),
        format!("$(POD_IP):{ADMIN_PORT}"),
        "--registry".into(),
        registry.to_string(),
        "--adapters-file".into(),
        ADAPTERS_FILE.into(),
        "--cache-dir".into(),
        CACHE_PATH.into(),
        // Without it the server refuses its admin API, which the operator loads adapters through.
        "--admin-api-key-file".into(),
        format!("{ADMIN_KEY_DIR}/{ADMIN_KEY_ITEM}"),
    ];
    let numeric = [
        ("--max-batch", server.max_batch_size),
        ("--max-context", server.max_context_length),
        ("--max-queue", server.max_queue),
        ("--max-adapters", server.max_loaded_adapters),
    ];
    for (flag, value) in numeric {
        if let Some(v) = value {
            args.extend([flag.to_string(), v.to_string()]);
        }
    }
    if server.merge == Some(true) {
        args.push("--merge".into());
    }
    if server.on_demand_adapters == Some(true) {
        args.push("--adapter-on-demand".into());
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
    let mounts = [
        vec![
            json!({"name": "adapters", "mountPath": "/etc/kubetune/adapters", "readOnly": true}),
            json!({"name": "cache", "mountPath": CACHE_PATH}),
            json!({"name": "tmp", "mountPath": "/tmp"}),
            json!({"name": "admin-key", "mountPath": ADMIN_KEY_DIR, "readOnly": true}),
        ],
        valid.claims.volume_mounts(),
    ]
    .concat();
    let volumes = [
        vec![
            json!({"name": "adapters", "configMap": {"name": adapters_config_map_name(md)}}),
            json!({"name": "cache", "emptyDir": {}}),
            json!({"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}),
            // Group-readable only: the pod's fsGroup lets the non-root server read it.
            json!({"name": "admin-key", "secret": {
                "secretName": admin_key_secret_name(md),
                "items": [{"key": ADMIN_KEY_ITEM, "path": ADMIN_KEY_ITEM}],
                "defaultMode": 0o440,
            }}),
        ],
        valid.claims.volumes(),
    ]
    .concat();
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
        "ports": [
            {"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"},
            {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "failureThreshold": 6},
        "startupProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 2, "failureThreshold": 300},
        "volumeMounts": mounts,
        "securityContext": restricted_container_security(),
    });
    let mut pod_spec = json!({
        "containers": [container],
        "volumes": volumes,
        "securityContext": restricted_pod_security(),
    });
    apply_placement(&mut pod_spec, &spec.placement)?;
    apply_identity(&mut pod_spec, &spec.placement, &config.default_service_account);
    let mut deployment_spec = json!({
        "selector": {"matchLabels": selector_labels(md)},
        // A new pod must be ready (model and adapters loaded) before an old one goes.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {"metadata": {"labels": labels(md)}, "spec": pod_spec},
    });
    if let Some(uid) = admin_key_secret_uid {
        deployment_spec["template"]["metadata"]["annotations"] = json!({ADMIN_KEY_SECRET_ANNOTATION: uid});
    }
    // Under an autoscaler the replicas are its to set: applying ours would undo each of its
    // decisions on every reconcile.
    if spec.autoscaling.is_none() {
        deployment_spec["replicas"] = json!(spec.replicas.unwrap_or(1));
    }
    if let Some(seconds) = spec.progress_deadline_seconds {
        deployment_spec["progressDeadlineSeconds"] = json!(seconds);
    }
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta(md.name_any()),
        "spec": deployment_spec,
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
    let hpa = spec.autoscaling.as_ref().map(|a| {
        let meta = ObjectMeta {
            name: Some(md.name_any()),
            namespace: md.namespace(),
            labels: Some(labels(md)),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        };
        autoscaler(md, meta, a)
    });
    let network_policy = config.admin_policy_from.as_ref().map(|from| {
        let meta = ObjectMeta {
            name: Some(md.name_any()),
            namespace: md.namespace(),
            labels: Some(labels(md)),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        };
        admin_network_policy(md, meta, from)
    });
    Ok(Children {
        config_map,
        deployment,
        service,
        pdb,
        hpa,
        network_policy,
    })
}

/// Ingress to the server pods: the inference port from anywhere (clients, Prometheus, probes),
/// the admin port from the operator's pods only. Any other port is closed by the policy.
fn admin_network_policy(
    md: &ModelDeployment,
    meta: ObjectMeta,
    from: &crate::config::AdminPolicyFrom,
) -> NetworkPolicy {
    let port = |p: u16| NetworkPolicyPort {
        port: Some(IntOrString::Int(p.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let operator = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                from.namespace.clone(),
            )])),
            ..Default::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some(from.labels.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    NetworkPolicy {
        metadata: meta,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(md)),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    ports: Some(vec![port(SERVER_PORT)]),
                    from: None,
                },
                NetworkPolicyIngressRule {
                    ports: Some(vec![port(ADMIN_PORT)]),
                    from: Some(vec![operator]),
                },
            ]),
            ..Default::default()
        }),
    }
}

/// An autoscaling/v2 HPA of the server Deployment on a per-pod average of the server's load
/// (a Pods metric, which a custom metrics adapter serves from the pods' /metrics).
fn autoscaler(md: &ModelDeployment, meta: ObjectMeta, a: &AutoscalingSpec) -> HorizontalPodAutoscaler {
    let metric = a.metric.unwrap_or_default();
    let target = a.target_per_pod.unwrap_or(DEFAULT_TARGET_PER_POD);
    HorizontalPodAutoscaler {
        metadata: meta,
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: md.name_any(),
            },
            min_replicas: Some(a.min_replicas.unwrap_or(1)),
            max_replicas: a.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Pods".into(),
                pods: Some(PodsMetricSource {
                    metric: MetricIdentifier {
                        name: a.metric_name.clone().unwrap_or_else(|| metric.series().into()),
                        selector: None,
                    },
                    target: MetricTarget {
                        type_: "AverageValue".into(),
                        average_value: Some(Quantity(target.to_string())),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            }]),
            ..Default::default()
        },
        ..Default::default()
    }
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
            Some("secret-uid-1"),
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
    fn server_pods_read_the_admin_key_from_the_model_deployments_secret_mounted_read_only() {
        let md = modeldeployment("modeldeployment.yaml");
        let c = children(&md, &serving());
        let pod = c.deployment.spec.and_then(|s| s.template.spec).expect("pod");
        let args = pod.containers[0].args.clone().unwrap_or_default();
        assert_eq!(flag(&args, "--admin-api-key-file"), ["/etc/kubetune/admin/key"]);
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "admin-key")
            .expect("admin key volume");
        let secret = volume.secret.as_ref().expect("a Secret volume");
        assert_eq!(secret.secret_name.as_deref(), Some(admin_key_secret_name(&md).as_str()));
        assert_eq!(secret.default_mode, Some(0o440));
        let mount = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "admin-key")
            .expect("admin key mount");
        assert_eq!(mount.mount_path, "/etc/kubetune/admin");
        assert_eq!(mount.read_only, Some(true));
    }

    #[test]
    fn the_admin_api_listens_on_its_own_port_which_the_service_does_not_expose() {
        let md = modeldeployment("modeldeployment.yaml");
        let c = children(&md, &serving());
        let pod = c.deployment.spec.and_then(|s| s.template.spec).expect("pod");
        let args = pod.containers[0].args.clone().unwrap_or_default();
        assert_eq!(flag(&args, "--admin-listen"), ["$(POD_IP):8001"]);
        assert_eq!(flag(&args, "--listen"), ["$(POD_IP):8000"]);
        let ports: Vec<(Option<String>, i32)> = pod.containers[0]
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.container_port))
            .collect();
        assert_eq!(ports, [(Some("http".into()), 8000), (Some("admin".into()), 8001)]);
        let service_ports: Vec<i32> = c
            .service
            .spec
            .and_then(|s| s.ports)
            .unwrap_or_default()
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(service_ports, [8000]);
    }

    #[test]
    fn a_new_admin_key_secret_changes_the_pod_template_so_pods_restart_with_its_key() {
        let md = modeldeployment("modeldeployment.yaml");
        let template = |uid: &str| {
            let c = build_children(
                &md,
                &valid(&md),
                &OperatorConfig::for_tests(),
                "s3://kubetune/registry",
                &serving(),
                Some(uid),
            )
            .expect("builds");
            c.deployment.spec.expect("spec").template
        };
        let (first, second) = (template("uid-1"), template("uid-2"));
        let annotation = |t: &k8s_openapi::api::core::v1::PodTemplateSpec| {
            t.metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get(ADMIN_KEY_SECRET_ANNOTATION).cloned())
        };
        assert_eq!(annotation(&first).as_deref(), Some("uid-1"));
        assert_eq!(annotation(&second).as_deref(), Some("uid-2"));
        assert_ne!(first, second);
        assert_eq!(first, template("uid-1"), "the same Secret leaves the template as it is");
    }

    #[test]
    fn with_admin_policy_from_only_the_operators_pods_may_reach_the_admin_port() {
        let md = modeldeployment("modeldeployment.yaml");
        assert!(
            children(&md, &serving()).network_policy.is_none(),
            "off without the setting"
        );
        let config = OperatorConfig {
            admin_policy_from: Some(crate::config::AdminPolicyFrom {
                namespace: "kubetune-system".into(),
                labels: BTreeMap::from([("app.kubernetes.io/name".into(), "kubetune-operator".into())]),
            }),
            ..OperatorConfig::for_tests()
        };
        let c = build_children(&md, &valid(&md), &config, "s3://kubetune/registry", &serving(), None).expect("builds");
        let policy = serde_json::to_value(c.network_policy.expect("a policy")).expect("json");
        assert_eq!(policy["metadata"]["ownerReferences"][0]["uid"], json!(md.metadata.uid));
        assert_eq!(
            policy["spec"]["podSelector"]["matchLabels"],
            json!(selector_labels(&md)),
            "it selects the server pods"
        );
        assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
        assert_eq!(
            policy["spec"]["ingress"],
            json!([
                {"ports": [{"port": 8000, "protocol": "TCP"}]},
                {"ports": [{"port": 8001, "protocol": "TCP"}], "from": [{
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubetune-system"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubetune-operator"}},
                }]},
            ])
        );
    }

    #[test]
    fn the_admin_key_secret_is_owned_by_the_model_deployment_and_holds_the_key_it_was_built_with() {
        let md = modeldeployment("modeldeployment.yaml");
        let secret = admin_key_secret(&md, "k3y").expect("builds");
        assert_eq!(secret.metadata.name, Some(admin_key_secret_name(&md)));
        assert_eq!(secret.metadata.namespace, md.namespace());
        let owners = secret.metadata.owner_references.clone().unwrap_or_default();
        assert_eq!(owners.len(), 1);
        assert_eq!(Some(&owners[0].uid), md.metadata.uid.as_ref());
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(admin_key_of(&secret).as_deref(), Some("k3y"));
    }

    #[test]
    fn admin_keys_are_64_hex_digits_and_differ_each_time() {
        let (a, b) = (new_admin_key().expect("random"), new_admin_key().expect("random"));
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn a_secret_without_a_key_item_or_with_an_empty_one_holds_no_admin_key() {
        let md = modeldeployment("modeldeployment.yaml");
        let mut secret = admin_key_secret(&md, "  ").expect("builds");
        assert_eq!(admin_key_of(&secret), None);
        secret.data = None;
        assert_eq!(admin_key_of(&secret), None);
    }

    #[test]
    fn pdb_when_asked() {
        let mut md = modeldeployment("modeldeployment.yaml");
        md.spec.pod_disruption_budget = Some(true);
        let c = children(&md, &serving());
        assert!(c.pdb.is_some());
    }

    /// The server container's arguments.
    fn args(c: &Children) -> Vec<String> {
        let pod = c
            .deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod");
        pod.containers[0].args.clone().unwrap_or_default()
    }

    fn flag(args: &[String], name: &str) -> Vec<String> {
        args.windows(2).filter(|w| w[0] == name).map(|w| w[1].clone()).collect()
    }

    #[test]
    fn on_demand_adapters_and_the_loaded_adapter_cap_reach_the_server_only_when_asked() {
        let mut md = modeldeployment("modeldeployment.yaml");
        let plain = args(&children(&md, &serving()));
        assert!(!plain.contains(&"--adapter-on-demand".to_string()));
        assert!(flag(&plain, "--max-adapters").is_empty());
        let server = md.spec.server.get_or_insert_with(Default::default);
        server.on_demand_adapters = Some(true);
        server.max_loaded_adapters = Some(40);
        let args = args(&children(&md, &serving()));
        assert!(args.contains(&"--adapter-on-demand".to_string()), "{args:?}");
        assert_eq!(flag(&args, "--max-adapters"), ["40"]);
        assert_eq!(flag(&args, "--cache-dir").len(), 1, "on-demand loads need the cache");
        assert_eq!(flag(&args, "--registry").len(), 1, "and the registry");
    }

    #[test]
    fn the_base_model_is_served_under_its_name_and_its_uri_stays_a_base_model_alias() {
        let md = modeldeployment("modeldeployment.yaml");
        let args = args(&children(&md, &serving()));
        assert_eq!(flag(&args, "--served-model-name"), ["tiny-llama"]);
        assert_eq!(flag(&args, "--base-model-alias"), ["s3://kubetune/models/tiny-llama"]);
        assert_eq!(flag(&args, "--model"), ["s3://kubetune/models/tiny-llama"]);
    }

    #[test]
    fn the_served_name_is_the_specs_else_the_hf_repository_else_the_last_path_segment() {
        let name = |uri: &str, served: Option<&str>| {
            let mut md = modeldeployment("modeldeployment.yaml");
            md.spec.base_model.uri = uri.into();
            md.spec.base_model.served_name = served.map(Into::into);
            served_model_name(&md)
        };
        assert_eq!(name("s3://kubetune/models/smollm2", None), "smollm2");
        assert_eq!(name("s3://kubetune/models/smollm2/", None), "smollm2");
        assert_eq!(
            name("s3://b/m/SmolLM2-135M-Instruct.Q4_1.gguf", None),
            "SmolLM2-135M-Instruct.Q4_1.gguf"
        );
        assert_eq!(
            name("hf://meta-llama/Llama-3.2-1B-Instruct@main", None),
            "meta-llama/Llama-3.2-1B-Instruct"
        );
        assert_eq!(name("pvc://models/tiny", None), "tiny");
        assert_eq!(
            name(
                "s3://kubetune/models/smollm2",
                Some("HuggingFaceTB/SmolLM2-135M-Instruct")
            ),
            "HuggingFaceTB/SmolLM2-135M-Instruct"
        );
    }

    #[test]
    fn a_base_model_on_a_claim_is_mounted_read_only_and_served_under_its_name_and_uri() {
        let mut md = modeldeployment("modeldeployment.yaml");
        md.spec.base_model.uri = "pvc://models/smollm2".into();
        let c = children(&md, &serving());
        let pod = c.deployment.spec.and_then(|s| s.template.spec).expect("pod");
        let args = pod.containers[0].args.clone().unwrap_or_default();
        assert_eq!(flag(&args, "--model"), ["file:///mnt/kubetune/pvc/models/smollm2"]);
        assert_eq!(flag(&args, "--served-model-name"), ["smollm2"]);
        assert_eq!(flag(&args, "--base-model-alias"), ["pvc://models/smollm2"]);
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.persistent_volume_claim.is_some())
            .expect("a claim volume");
        let claim = volume.persistent_volume_claim.as_ref().expect("claim");
        assert_eq!((claim.claim_name.as_str(), claim.read_only), ("models", Some(true)));
        let mount = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == volume.name)
            .expect("the claim is mounted");
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/mnt/kubetune/pvc/models", Some(true))
        );
    }

    #[test]
    fn an_object_store_base_model_mounts_no_claim() {
        let md = modeldeployment("modeldeployment.yaml");
        let pod = children(&md, &serving())
            .deployment
            .spec
            .and_then(|s| s.template.spec)
            .expect("pod");
        assert!(pod
            .volumes
            .iter()
            .flatten()
            .all(|v| v.persistent_volume_claim.is_none()));
    }

    fn autoscaled() -> ModelDeployment {
        let mut md = modeldeployment("modeldeployment.yaml");
        md.spec.autoscaling = Some(
            serde_json::from_value(
                json!({"minReplicas": 2, "maxReplicas": 6, "metric": "queuedRequests", "targetPerPod": 4}),
            )
            .expect("autoscaling"),
        );
        md
    }

    #[test]
    fn without_autoscaling_the_deployment_has_the_specs_replicas_and_there_is_no_hpa() {
        let md = modeldeployment("modeldeployment.yaml");
        let c = children(&md, &serving());
        assert!(c.hpa.is_none());
        assert_eq!(c.deployment.spec.and_then(|s| s.replicas), Some(1));
    }

    #[test]
    fn under_autoscaling_the_deployment_replicas_are_left_to_an_hpa_owned_by_the_model_deployment() {
        let md = autoscaled();
        let c = children(&md, &serving());
        let applied = serde_json::to_value(&c.deployment).expect("json");
        assert!(
            applied["spec"].get("replicas").is_none(),
            "the applied Deployment must not claim replicas: {}",
            applied["spec"]
        );
        let hpa = serde_json::to_value(c.hpa.as_ref().expect("hpa")).expect("json");
        assert_eq!(
            (hpa["apiVersion"].as_str(), hpa["kind"].as_str()),
            (Some("autoscaling/v2"), Some("HorizontalPodAutoscaler"))
        );
        assert_eq!(
            hpa["metadata"]["ownerReferences"][0]["uid"],
            md.metadata.uid.clone().expect("uid")
        );
        assert_eq!(
            hpa["spec"]["scaleTargetRef"],
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "support"})
        );
        assert_eq!(
            (hpa["spec"]["minReplicas"].as_i64(), hpa["spec"]["maxReplicas"].as_i64()),
            (Some(2), Some(6))
        );
        assert_eq!(
            hpa["spec"]["metrics"],
            json!([{"type": "Pods", "pods": {
                "metric": {"name": "vllm:num_requests_waiting"},
                "target": {"type": "AverageValue", "averageValue": "4"},
            }}])
        );
    }

    #[test]
    fn an_autoscaler_defaults_to_eight_running_requests_per_pod() {
        let mut md = modeldeployment("modeldeployment.yaml");
        md.spec.autoscaling = Some(serde_json::from_value(json!({"maxReplicas": 3})).expect("autoscaling"));
        let hpa = serde_json::to_value(children(&md, &serving()).hpa.expect("hpa")).expect("json");
        assert_eq!(hpa["spec"]["minReplicas"], 1);
        assert_eq!(
            hpa["spec"]["metrics"][0]["pods"]["metric"]["name"],
            "vllm:num_requests_running"
        );
        assert_eq!(hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"], "8");
    }

    #[test]
    fn the_progress_deadline_is_the_deployments_and_unset_leaves_its_default() {
        let mut md = modeldeployment("modeldeployment.yaml");
        let deadline = |md: &ModelDeployment| {
            children(md, &serving())
                .deployment
                .spec
                .and_then(|s| s.progress_deadline_seconds)
        };
        assert_eq!(deadline(&md), None);
        md.spec.progress_deadline_seconds = Some(300);
        assert_eq!(deadline(&md), Some(300));
    }
}
