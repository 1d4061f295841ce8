//! Preparing a pod to run: its directory, volumes, service-account token and kubeconfig, and
//! the fully resolved command line and environment of each container.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount};
use kube::api::PostParams;
use kube::Api;

use crate::agent::{Agent, ApiAccess};
use crate::config::{image_name, AgentConfig};
use crate::env::{self, EnvInputs, ObjectData};
use crate::probes::ProbeTarget;
use crate::process::{LaunchSpec, POD_UID_ENV};
use crate::volumes::{self, MountMap, VolumeInputs};

/// Requested lifetime of service-account tokens; refreshed at 80% of what the server grants.
pub const TOKEN_SECONDS: i64 = 86_400;

/// Why a pod cannot start yet, shown as a container's waiting reason.
#[derive(Debug, Clone, PartialEq)]
pub struct SetupFailure {
    /// The container it concerns; `None` for the whole pod.
    pub container: Option<String>,
    pub reason: &'static str,
    pub message: String,
}

impl SetupFailure {
    fn pod(reason: &'static str, message: String) -> Self {
        Self {
            container: None,
            reason,
            message,
        }
    }
    fn container(name: &str, reason: &'static str, message: String) -> Self {
        Self {
            container: Some(name.into()),
            reason,
            message,
        }
    }
}

/// Everything needed to start (and restart) one container.
#[derive(Debug, Clone)]
pub struct Launch {
    pub container: Container,
    pub spec: LaunchSpec,
    pub image_id: String,
    /// Host path of terminationMessagePath when it lies under a volume mount.
    pub termination_path: Option<PathBuf>,
    pub probe_target: ProbeTarget,
}

#[derive(Debug)]
pub struct Prepared {
    pub init: Vec<Launch>,
    pub containers: Vec<Launch>,
    /// Where the kubeconfig's token lives, for refreshing; `None` without a token.
    pub token_file: Option<PathBuf>,
    pub token_expires_in: Option<std::time::Duration>,
}

pub fn kubeconfig_yaml(api: &ApiAccess, namespace: &str, user: &str, token_file: &Path) -> String {
    let mut cluster = serde_json::json!({ "server": api.server });
    if let Some(pem) = &api.ca_pem {
        use base64::Engine;
        cluster["certificate-authority-data"] = base64::engine::general_purpose::STANDARD.encode(pem).into();
    }
    if api.insecure {
        cluster["insecure-skip-tls-verify"] = true.into();
    }
    if let Some(name) = &api.tls_server_name {
        cluster["tls-server-name"] = name.clone().into();
    }
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "kubetune", "cluster": cluster }],
        "users": [{ "name": user, "user": { "tokenFile": token_file.display().to_string() } }],
        "contexts": [{ "name": "kubetune", "context": { "cluster": "kubetune", "user": user, "namespace": namespace } }],
        "current-context": "kubetune",
    });
    serde_yaml::to_string(&config).unwrap_or_default()
}

async fn fetch_objects(
    agent: &Agent,
    namespace: &str,
    secrets: &BTreeSet<String>,
    config_maps: &BTreeSet<String>,
) -> Result<(ObjectData, ObjectData), SetupFailure> {
    let fail = |kind: &str, name: &str, e: kube::Error| {
        SetupFailure::pod(
            "CreateContainerConfigError",
            format!("cannot read {kind} {namespace}/{name}: {e}"),
        )
    };
    let secret_api: Api<Secret> = Api::namespaced(agent.client.clone(), namespace);
    let mut secret_data = ObjectData::new();
    for name in secrets {
        if let Some(secret) = secret_api.get_opt(name).await.map_err(|e| fail("secret", name, e))? {
            let data = secret.data.unwrap_or_default().into_iter();
            secret_data.insert(
                name.clone(),
                data.map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                    .collect(),
            );
        }
    }
    let cm_api: Api<ConfigMap> = Api::namespaced(agent.client.clone(), namespace);
    let mut cm_data = ObjectData::new();
    for name in config_maps {
        if let Some(cm) = cm_api.get_opt(name).await.map_err(|e| fail("configmap", name, e))? {
            let mut data: BTreeMap<String, String> = cm.data.unwrap_or_default();
            for (k, v) in cm.binary_data.unwrap_or_default() {
                data.insert(k, String::from_utf8_lossy(&v.0).into_owned());
            }
            cm_data.insert(name.clone(), data);
        }
    }
    Ok((secret_data, cm_data))
}

/// Asks the TokenRequest API for a token of the pod's service account, bound to the pod.
pub async fn request_token(
    agent: &Agent,
    pod: &Pod,
    audience: &str,
) -> Result<(String, Option<std::time::Duration>), SetupFailure> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let api: Api<ServiceAccount> = Api::namespaced(agent.client.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            // No audiences: the API server's own, which is what a kubeconfig token needs.
            audiences: (!audience.is_empty()).then(|| vec![audience.into()]),
            expiration_seconds: Some(TOKEN_SECONDS),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        }),
        ..Default::default()
    };
    let response = api
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .map_err(|e| {
            SetupFailure::pod(
                "CreateContainerConfigError",
                format!("cannot get a token for service account {namespace}/{account}: {e}"),
            )
        })?;
    let status = response.status.unwrap_or_default();
    let token = status.token.filter(|t| !t.is_empty()).ok_or_else(|| {
        SetupFailure::pod(
            "CreateContainerConfigError",
            format!("token request for {namespace}/{account} returned no token"),
        )
    })?;
    let expires_in = status
        .expiration_timestamp
        .and_then(|t| t.0.duration_since(k8s_openapi::jiff::Timestamp::now()).try_into().ok());
    Ok((token, expires_in))
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<(), SetupFailure> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |e: std::io::Error| {
        SetupFailure::pod(
            "CreateContainerConfigError",
            format!("cannot write {}: {e}", path.display()),
        )
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    std::fs::write(path, contents).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(fail)
}

/// Prepares everything; any failure is reported and the whole preparation retried later.
pub async fn prepare(agent: &Agent, pod: &Pod, pod_ip: &str, dir: &Path) -> Result<Prepared, SetupFailure> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let spec = pod.spec.clone().unwrap_or_default();
    std::fs::create_dir_all(dir)
        .map_err(|e| SetupFailure::pod("ContainerCreating", format!("cannot create {}: {e}", dir.display())))?;
    let config = match &agent.config_path {
        // Re-read on every attempt so fixing the image map un-sticks pending pods.
        Some(path) => AgentConfig::load(path).map_err(|e| SetupFailure::pod("ErrImagePull", e.to_string()))?,
        None => AgentConfig::default(),
    };

    let all: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .collect();
    let (mut secrets, mut config_maps) = (BTreeSet::new(), BTreeSet::new());
    for c in &all {
        let (s, m) = env::referenced_objects(c);
        secrets.extend(s);
        config_maps.extend(m);
    }
    volumes::referenced_objects(pod, &mut secrets, &mut config_maps);
    let (secret_data, cm_data) = fetch_objects(agent, namespace, &secrets, &config_maps).await?;

    // The pod's API identity: a bound token for its service account, behind a kubeconfig.
    let (token, expires_in) = request_token(agent, pod, "").await?;
    let token_file = dir.join("kube").join("token");
    write(&token_file, &token, 0o600)?;
    let account = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
    let kubeconfig = dir.join("kube").join("config");
    write(
        &kubeconfig,
        &kubeconfig_yaml(&agent.api, namespace, &account, &token_file),
        0o600,
    )?;
    let mut tokens = BTreeMap::from([(String::new(), token)]);
    for audience in volumes::token_audiences(pod).into_iter().filter(|a| !a.is_empty()) {
        let (t, _) = request_token(agent, pod, &audience).await?;
        tokens.insert(audience, t);
    }

    let env_inputs = || EnvInputs {
        pod,
        pod_ip: pod_ip.into(),
        host_ip: "127.0.0.1".into(),
        secrets: &secret_data,
        config_maps: &cm_data,
        node_cpu: &agent.node_cpu,
        node_memory: &agent.node_memory,
    };
    let volume_paths = volumes::volume_paths(&agent.state_dir, dir, pod);
    volumes::materialise(
        pod,
        &volume_paths,
        &VolumeInputs {
            env: env_inputs(),
            tokens: &tokens,
        },
    )
    .map_err(|e| SetupFailure::pod("CreateContainerConfigError", e.to_string()))?;

    let mut base_env: BTreeMap<String, String> = agent
        .pass_env
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
        .collect();
    base_env.insert("HOSTNAME".into(), pod.metadata.name.clone().unwrap_or_default());
    base_env.insert(POD_UID_ENV.into(), pod.metadata.uid.clone().unwrap_or_default());
    let launch = |c: &Container| -> Result<Launch, SetupFailure> {
        let config_error = |m: String| SetupFailure::container(&c.name, "CreateContainerConfigError", m);
        let container_env = env::resolve(c, &env_inputs()).map_err(|e| config_error(e.to_string()))?;
        let mounts = MountMap::for_container(c, &volume_paths).map_err(|e| config_error(e.to_string()))?;
        for host_dir in mounts.host_dirs() {
            std::fs::create_dir_all(host_dir)
                .map_err(|e| config_error(format!("cannot create {}: {e}", host_dir.display())))?;
        }
        let expand = |s: &String| env::expand(s, |name| container_env.get(name).cloned());
        let image = c.image.clone().unwrap_or_default();
        // A command names a path in the container, which may lie under a mount; an image's
        // binary is a host path already and must not be rewritten (a checkout under /tmp
        // would otherwise land in a pod's /tmp emptyDir).
        let (program, mut args, image_id) = match c.command.as_deref() {
            Some([first, rest @ ..]) => (
                mounts.rewrite(&expand(first)),
                rest.iter().map(expand).collect(),
                format!("local://{}", image_name(&image)),
            ),
            _ => {
                let binary = config.binary_for(&image).ok_or_else(|| {
                    SetupFailure::container(
                        &c.name,
                        "ErrImagePull",
                        format!("image {image:?} is not mapped to a local binary in the node agent config and the container has no command"),
                    )
                })?;
                (
                    binary.display().to_string(),
                    Vec::new(),
                    format!("local://{}", binary.display()),
                )
            }
        };
        args.extend(c.args.iter().flatten().map(expand));
        let mut process_env = base_env.clone();
        process_env.extend(container_env.iter().map(|(k, v)| (k.clone(), mounts.rewrite(v))));
        process_env
            .entry("KUBECONFIG".into())
            .or_insert_with(|| kubeconfig.display().to_string());
        let cwd = c
            .working_dir
            .as_deref()
            .and_then(|w| mounts.rewrite_path(w))
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.to_owned());
        let termination_path = mounts
            .rewrite_path(c.termination_message_path.as_deref().unwrap_or("/dev/termination-log"))
            .map(PathBuf::from);
        Ok(Launch {
            container: c.clone(),
            spec: LaunchSpec {
                program,
                args: args.iter().map(|a| mounts.rewrite(a)).collect(),
                env: process_env.clone(),
                cwd: cwd.clone(),
                log: dir.join(format!("{}.log", c.name)),
                pid_file: dir.join(format!("{}.pid", c.name)),
            },
            image_id,
            termination_path,
            probe_target: ProbeTarget::new(pod_ip, c, process_env, cwd),
        })
    };
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(&launch)
        .collect::<Result<_, _>>()?;
    let containers = spec.containers.iter().map(&launch).collect::<Result<_, _>>()?;
    Ok(Prepared {
        init,
        containers,
        token_file: Some(token_file),
        token_expires_in: expires_in,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_points_at_token_file_and_embeds_ca() {
        let api = ApiAccess {
            server: "https://127.0.0.1:6443".into(),
            ca_pem: Some("-----BEGIN CERTIFICATE-----\n".into()),
            insecure: false,
            tls_server_name: None,
        };
        let yaml = kubeconfig_yaml(&api, "team-a", "operator", Path::new("/s/pods/p/kube/token"));
        let parsed: serde_json::Value = serde_yaml::from_str(&yaml).expect("valid yaml");
        assert_eq!(parsed["clusters"][0]["cluster"]["server"], "https://127.0.0.1:6443");
        assert!(parsed["clusters"][0]["cluster"]["certificate-authority-data"].is_string());
        assert_eq!(parsed["users"][0]["user"]["tokenFile"], "/s/pods/p/kube/token");
        assert_eq!(parsed["contexts"][0]["context"]["namespace"], "team-a");
    }
}
