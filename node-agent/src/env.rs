//! Container environment: `env`, `envFrom`, `valueFrom` and Kubernetes' `$(VAR)` expansion.
//!
//! Secrets and ConfigMaps are fetched by the caller (see [`referenced_objects`]) so everything
//! here is pure and unit-testable.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, EnvVarSource, Pod, ResourceFieldSelector};

/// Objects' `data` (binary values decoded lossily), by object name.
pub type ObjectData = BTreeMap<String, BTreeMap<String, String>>;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EnvError {
    #[error("secret {0:?} not found")]
    MissingSecret(String),
    #[error("couldn't find key {key} in Secret {name}")]
    MissingSecretKey { name: String, key: String },
    #[error("configmap {0:?} not found")]
    MissingConfigMap(String),
    #[error("couldn't find key {key} in ConfigMap {name}")]
    MissingConfigMapKey { name: String, key: String },
    #[error("env var {var}: unsupported fieldRef {path:?}")]
    UnsupportedField { var: String, path: String },
    #[error("env var {var}: unsupported resourceFieldRef {detail}")]
    UnsupportedResource { var: String, detail: String },
    #[error("env var {0}: valueFrom names no source")]
    EmptyValueFrom(String),
}

/// Everything env resolution may read besides the container itself.
pub struct EnvInputs<'a> {
    pub pod: &'a Pod,
    pub pod_ip: String,
    pub host_ip: String,
    pub secrets: &'a ObjectData,
    pub config_maps: &'a ObjectData,
    /// Node allocatable cpu/memory: what `limits.*` resolves to when a container sets no limit.
    pub node_cpu: &'a str,
    pub node_memory: &'a str,
}

/// Names of the Secrets and ConfigMaps the container's env refers to.
pub fn referenced_objects(container: &Container) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut secrets = BTreeSet::new();
    let mut config_maps = BTreeSet::new();
    for from in container.env_from.iter().flatten() {
        if let Some(s) = &from.secret_ref {
            secrets.insert(s.name.clone());
        }
        if let Some(c) = &from.config_map_ref {
            config_maps.insert(c.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        let Some(source) = &var.value_from else {
            continue;
        };
        if let Some(s) = &source.secret_key_ref {
            secrets.insert(s.name.clone());
        }
        if let Some(c) = &source.config_map_key_ref {
            config_maps.insert(c.name.clone());
        }
    }
    (secrets, config_maps)
}

/// The container's environment, in Kubernetes' precedence: `envFrom` first, then `env`
/// entries in order, each able to refer to the ones defined before it via `$(NAME)`.
pub fn resolve(container: &Container, inputs: &EnvInputs) -> Result<BTreeMap<String, String>, EnvError> {
    let mut env = BTreeMap::new();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or("");
        if let Some(r) = &from.secret_ref {
            match inputs.secrets.get(&r.name) {
                Some(data) => env.extend(data.iter().map(|(k, v)| (format!("{prefix}{k}"), v.clone()))),
                None if r.optional == Some(true) => {}
                None => return Err(EnvError::MissingSecret(r.name.clone())),
            }
        }
        if let Some(r) = &from.config_map_ref {
            match inputs.config_maps.get(&r.name) {
                Some(data) => env.extend(data.iter().map(|(k, v)| (format!("{prefix}{k}"), v.clone()))),
                None if r.optional == Some(true) => {}
                None => return Err(EnvError::MissingConfigMap(r.name.clone())),
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => Some(expand(value, |name| env.get(name).cloned())),
            (None, Some(source)) => value_from(&var.name, source, container, inputs)?,
            (None, None) => Some(String::new()),
        };
        // An optional reference to a missing key leaves the variable unset, as in Kubernetes.
        if let Some(value) = value {
            env.insert(var.name.clone(), value);
        }
    }
    Ok(env)
}

fn value_from(
    var: &str,
    source: &EnvVarSource,
    container: &Container,
    inputs: &EnvInputs,
) -> Result<Option<String>, EnvError> {
    if let Some(r) = &source.secret_key_ref {
        let found = inputs.secrets.get(&r.name);
        return key_value(
            found,
            &r.name,
            &r.key,
            r.optional,
            EnvError::MissingSecret,
            |name, key| EnvError::MissingSecretKey { name, key },
        );
    }
    if let Some(r) = &source.config_map_key_ref {
        let found = inputs.config_maps.get(&r.name);
        return key_value(
            found,
            &r.name,
            &r.key,
            r.optional,
            EnvError::MissingConfigMap,
            |name, key| EnvError::MissingConfigMapKey { name, key },
        );
    }
    if let Some(r) = &source.field_ref {
        return field_value(&r.field_path, inputs)
            .map(Some)
            .ok_or_else(|| EnvError::UnsupportedField {
                var: var.into(),
                path: r.field_path.clone(),
            });
    }
    if let Some(r) = &source.resource_field_ref {
        return resource_value(var, r, container, inputs).map(Some);
    }
    Err(EnvError::EmptyValueFrom(var.into()))
}

/// Downward API `fieldRef` paths (the ones kubelet supports for env).
pub fn field_value(path: &str, inputs: &EnvInputs) -> Option<String> {
    let meta = &inputs.pod.metadata;
    let spec = inputs.pod.spec.as_ref();
    let keyed = |prefix: &str| -> Option<String> {
        path.strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")
            .map(str::to_owned)
    };
    if let Some(key) = keyed("metadata.labels") {
        return Some(
            meta.labels
                .as_ref()
                .and_then(|l| l.get(&key))
                .cloned()
                .unwrap_or_default(),
        );
    }
    if let Some(key) = keyed("metadata.annotations") {
        return Some(
            meta.annotations
                .as_ref()
                .and_then(|a| a.get(&key))
                .cloned()
                .unwrap_or_default(),
        );
    }
    Some(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()).unwrap_or_default(),
        "status.podIP" | "status.podIPs" => inputs.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => inputs.host_ip.clone(),
        _ => return None,
    })
}

fn resource_value(
    var: &str,
    r: &ResourceFieldSelector,
    container: &Container,
    inputs: &EnvInputs,
) -> Result<String, EnvError> {
    let unsupported = |detail: String| EnvError::UnsupportedResource {
        var: var.into(),
        detail,
    };
    let target = match r.container_name.as_deref() {
        None | Some("") => container,
        Some(name) => inputs
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == name))
            .ok_or_else(|| unsupported(format!("names unknown container {name:?}")))?,
    };
    let (kind, resource) = r
        .resource
        .split_once('.')
        .ok_or_else(|| unsupported(r.resource.clone()))?;
    let resources = target.resources.as_ref();
    let set = match kind {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => return Err(unsupported(r.resource.clone())),
    };
    let raw = match (set.and_then(|s| s.get(resource)), kind, resource) {
        (Some(q), _, _) => q.0.clone(),
        (None, "limits", "cpu") => inputs.node_cpu.to_owned(),
        (None, "limits", "memory") => inputs.node_memory.to_owned(),
        (None, _, _) => "0".to_owned(),
    };
    let value = parse_quantity(&raw).ok_or_else(|| unsupported(format!("quantity {raw:?}")))?;
    let divisor = match &r.divisor {
        Some(d) => parse_quantity(&d.0).ok_or_else(|| unsupported(format!("divisor {:?}", d.0)))?,
        None => 1.0,
    };
    if divisor <= 0.0 {
        return Err(unsupported("divisor must be positive".into()));
    }
    // Kubernetes rounds up so a container never sees less than it was given.
    Ok(format!("{}", (value / divisor).ceil() as i64))
}

/// Parses a Kubernetes quantity (`500m`, `2Gi`, `1e3`, `1.5`) into a plain number.
pub fn parse_quantity(text: &str) -> Option<f64> {
    let text = text.trim();
    const SUFFIXES: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (suffix, factor) in SUFFIXES {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    text.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// Kubernetes `$(VAR)` expansion: defined names are replaced, undefined references are left
/// as written, and `$$` escapes a literal `$` (so `$$(VAR)` yields `$(VAR)`).
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(close) => {
                    let name = &inner[..close];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[close + 1..];
                }
                None => {
                    // No closing paren: the rest is literal text.
                    out.push('$');
                    out.push_str(after);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// One key of a Secret's or ConfigMap's data, as secretKeyRef and configMapKeyRef read it: an
/// optional reference yields nothing where the object or key is missing, a required one an error.
fn key_value(
    data: Option<&BTreeMap<String, String>>,
    name: &str,
    key: &str,
    optional: Option<bool>,
    missing_object: fn(String) -> EnvError,
    missing_key: fn(String, String) -> EnvError,
) -> Result<Option<String>, EnvError> {
    let optional = optional == Some(true);
    match data.map(|d| d.get(key)) {
        Some(Some(v)) => Ok(Some(v.clone())),
        _ if optional => Ok(None),
        None => Err(missing_object(name.to_string())),
        Some(None) => Err(missing_key(name.to_string(), key.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, EnvFromSource, EnvVar, ObjectFieldSelector, PodSpec, ResourceRequirements,
        SecretKeySelector,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn lookup(name: &str) -> Option<String> {
        match name {
            "A" => Some("alpha".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expansion_follows_kubernetes_rules() {
        assert_eq!(expand("x$(A)y", lookup), "xalphay");
        assert_eq!(expand("$(MISSING)", lookup), "$(MISSING)");
        assert_eq!(expand("$$(A)", lookup), "$(A)");
        assert_eq!(expand("$$$(A)", lookup), "$alpha");
        assert_eq!(expand("cost $5", lookup), "cost $5");
        assert_eq!(expand("$(A", lookup), "$(A");
        assert_eq!(expand("end$", lookup), "end$");
        assert_eq!(expand("[$(EMPTY)]", lookup), "[]");
        assert_eq!(expand("$(A)$(A)", lookup), "alphaalpha");
    }

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn from(name: &str, source: EnvVarSource) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(source),
        }
    }

    fn pod() -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some("p".into());
        pod.metadata.namespace = Some("ns".into());
        pod.metadata.labels = Some([("app".to_string(), "web".to_string())].into());
        pod.spec = Some(PodSpec {
            node_name: Some("gpu-0".into()),
            ..Default::default()
        });
        pod
    }

    #[test]
    fn resolves_values_sources_and_order() {
        let pod = pod();
        let secrets: ObjectData = [("s".to_string(), [("token".to_string(), "t0p".to_string())].into())].into();
        let config_maps: ObjectData = [("c".to_string(), [("MODE".to_string(), "fast".to_string())].into())].into();
        let inputs = EnvInputs {
            pod: &pod,
            pod_ip: "127.0.0.7".into(),
            host_ip: "127.0.0.1".into(),
            secrets: &secrets,
            config_maps: &config_maps,
            node_cpu: "8",
            node_memory: "16Gi",
        };
        let field = |path: &str| EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        };
        let container = Container {
            name: "main".into(),
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "c".into(),
                    optional: None,
                }),
                prefix: Some("CFG_".into()),
                secret_ref: None,
            }]),
            env: Some(vec![
                from("POD_IP", field("status.podIP")),
                from("NAME", field("metadata.name")),
                from("NS", field("metadata.namespace")),
                from("NODE", field("spec.nodeName")),
                from("APP", field("metadata.labels['app']")),
                from(
                    "TOKEN",
                    EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "s".into(),
                            key: "token".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    },
                ),
                var("URL", "http://$(POD_IP):8080/$(CFG_MODE)/$(LATER)"),
                var("LATER", "x"),
                var("CFG_MODE", "overridden"),
            ]),
            ..Default::default()
        };
        let env = resolve(&container, &inputs).expect("resolvable");
        assert_eq!(env["POD_IP"], "127.0.0.7");
        assert_eq!(env["NAME"], "p");
        assert_eq!(env["NS"], "ns");
        assert_eq!(env["NODE"], "gpu-0");
        assert_eq!(env["APP"], "web");
        assert_eq!(env["TOKEN"], "t0p");
        // Only variables defined earlier expand; later ones stay literal.
        assert_eq!(env["URL"], "http://127.0.0.7:8080/fast/$(LATER)");
        assert_eq!(env["CFG_MODE"], "overridden");
    }

    #[test]
    fn missing_references_are_errors_unless_optional() {
        let pod = pod();
        let empty = ObjectData::new();
        let inputs = EnvInputs {
            pod: &pod,
            pod_ip: String::new(),
            host_ip: String::new(),
            secrets: &empty,
            config_maps: &empty,
            node_cpu: "1",
            node_memory: "1Gi",
        };
        let secret = |optional| EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: "nope".into(),
                key: "k".into(),
                optional,
            }),
            ..Default::default()
        };
        let container = Container {
            env: Some(vec![from("X", secret(None))]),
            ..Default::default()
        };
        assert_eq!(
            resolve(&container, &inputs),
            Err(EnvError::MissingSecret("nope".into()))
        );
        let container = Container {
            env: Some(vec![from("X", secret(Some(true)))]),
            ..Default::default()
        };
        assert!(!resolve(&container, &inputs).expect("optional").contains_key("X"));
        let bad_field = EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "spec.bogus".into(),
                api_version: None,
            }),
            ..Default::default()
        };
        let container = Container {
            env: Some(vec![from("X", bad_field)]),
            ..Default::default()
        };
        assert!(matches!(
            resolve(&container, &inputs),
            Err(EnvError::UnsupportedField { .. })
        ));
    }

    #[test]
    fn resource_fields_round_up_and_default_limits_to_node() {
        let pod = pod();
        let empty = ObjectData::new();
        let inputs = EnvInputs {
            pod: &pod,
            pod_ip: String::new(),
            host_ip: String::new(),
            secrets: &empty,
            config_maps: &empty,
            node_cpu: "8",
            node_memory: "16Gi",
        };
        let resource = |resource: &str, divisor: Option<&str>| EnvVarSource {
            resource_field_ref: Some(ResourceFieldSelector {
                resource: resource.into(),
                divisor: divisor.map(|d| Quantity(d.into())),
                container_name: None,
            }),
            ..Default::default()
        };
        let container = Container {
            resources: Some(ResourceRequirements {
                requests: Some([("cpu".to_string(), Quantity("250m".into()))].into()),
                limits: Some([("memory".to_string(), Quantity("1536Mi".into()))].into()),
                ..Default::default()
            }),
            env: Some(vec![
                from("REQ_CPU", resource("requests.cpu", None)),
                from("REQ_MCPU", resource("requests.cpu", Some("1m"))),
                from("LIM_CPU", resource("limits.cpu", None)),
                from("LIM_MEM_GI", resource("limits.memory", Some("1Gi"))),
            ]),
            ..Default::default()
        };
        let env = resolve(&container, &inputs).expect("resolvable");
        assert_eq!(env["REQ_CPU"], "1");
        assert_eq!(env["REQ_MCPU"], "250");
        assert_eq!(env["LIM_CPU"], "8");
        assert_eq!(env["LIM_MEM_GI"], "2");
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("2Gi"), Some(2147483648.0));
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("3"), Some(3.0));
        assert_eq!(parse_quantity("lots"), None);
    }
}
