//! Pod-spec pieces every kubetune workload shares: placement from the spec, the restricted
//! security contexts, the default of one GPU, and the device the pod's binary opens.

use crate::error::{Error, Result};
use kubetune_crds::PodPlacement;
use serde_json::{json, Value};

/// Copies the spec's scheduling fields into a pod spec, leaving unset ones out.
pub fn apply_placement(pod_spec: &mut Value, p: &PodPlacement) -> Result<()> {
    for (key, value) in [
        ("nodeSelector", serde_json::to_value(&p.node_selector)),
        ("tolerations", serde_json::to_value(&p.tolerations)),
        ("affinity", serde_json::to_value(&p.affinity)),
        ("priorityClassName", serde_json::to_value(&p.priority_class_name)),
        ("imagePullSecrets", serde_json::to_value(&p.image_pull_secrets)),
    ] {
        let value = value.map_err(|source| Error::Serialize {
            what: "pod placement",
            source,
        })?;
        if !value.is_null() {
            pod_spec[key] = value;
        }
    }
    Ok(())
}

/// Whether `image` is one of `allowed`: an entry that is a repository matches that repository
/// with any tag or digest (never a longer name: `ghcr.io/kubetune/trainer-evil` is not
/// `ghcr.io/kubetune/trainer`); an entry ending in `/` matches every image under it.
pub fn image_allowed(image: &str, allowed: &[String]) -> bool {
    allowed.iter().any(|entry| {
        if entry.ends_with('/') {
            return image.starts_with(entry.as_str());
        }
        image
            .strip_prefix(entry.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(':') || rest.starts_with('@'))
    })
}

/// Err names `field` when the spec's image is not one the operator allows. No image at all is
/// the operator's own default, which is not the user's choice and not checked.
pub fn check_image(field: &str, image: Option<&str>, allowed: &[String]) -> std::result::Result<(), String> {
    match image {
        Some(image) if !image_allowed(image, allowed) => Err(format!(
            "{field}: {image} is not in the operator's allowed images ({}); ask the platform team to add it (chart value allowedImages)",
            allowed.join(", ")
        )),
        _ => Ok(()),
    }
}

/// The identity fields of a pod: the ServiceAccount the spec names, else the operator's default,
/// never left to the namespace. A pod of the default gets no API token: neither the trainer nor
/// the server calls the Kubernetes API, so a token would only be something to steal. A pod of a
/// ServiceAccount the user named keeps what that ServiceAccount's own
/// `automountServiceAccountToken` says: naming one is how a user asks for its identity.
pub fn apply_identity(pod_spec: &mut Value, p: &PodPlacement, default_service_account: &str) {
    match &p.service_account_name {
        Some(named) => pod_spec["serviceAccountName"] = json!(named),
        None => {
            pod_spec["serviceAccountName"] = json!(default_service_account);
            pod_spec["automountServiceAccountToken"] = json!(false);
        }
    }
}

/// The message of a pod that waits for the ServiceAccount its spec names: not final, as
/// GitOps tools often create the ServiceAccount after the object that uses it.
pub fn service_account_missing(namespace: &str, name: &str) -> String {
    format!("spec.serviceAccountName: waiting for ServiceAccount {namespace}/{name} to exist")
}

/// The spec's resources, or one GPU when it sets none at all.
pub fn resources_or_one_gpu(p: &PodPlacement, gpu_resource: &str) -> Result<Value> {
    match &p.resources {
        Some(r) => serde_json::to_value(r).map_err(|source| Error::Serialize {
            what: "resources",
            source,
        }),
        None => Ok(json!({"limits": {gpu_resource: "1"}})),
    }
}

/// Environment variable the trainer and the server read their `--device` from.
pub const DEVICE_ENV: &str = "KUBETUNE_DEVICE";

/// GPUs one pod can use: the trainer and the server open a single device.
pub const MAX_GPUS_PER_POD: u64 = 1;

/// GPUs the pod will request: the spec's limit (or request) of the GPU resource; one GPU when
/// the spec sets no resources at all; none when it sets resources without a GPU (CPU work).
/// Err names the field when the count is not a whole number, or more than one GPU: the binaries
/// open one device, so a second GPU would be held and never used.
pub fn requested_gpus(p: &PodPlacement, gpu_resource: &str) -> std::result::Result<u64, String> {
    let Some(resources) = p.resources.as_ref() else {
        return Ok(1);
    };
    let mut gpus = None;
    for (kind, map) in [("limits", &resources.limits), ("requests", &resources.requests)] {
        let Some(quantity) = map.as_ref().and_then(|m| m.get(gpu_resource)) else {
            continue;
        };
        let field = format!("spec.resources.{kind}[\"{gpu_resource}\"]");
        let count = quantity
            .0
            .parse::<u64>()
            .map_err(|_| format!("{field}: {:?} is not a whole number of GPUs", quantity.0))?;
        if count > MAX_GPUS_PER_POD {
            return Err(format!(
                "{field}: {count} GPUs requested, but one GPU per pod is supported: the trainer and the server open a single device (multi-GPU is not implemented); request 1"
            ));
        }
        // Limits first: for an extended resource the request defaults to the limit.
        gpus.get_or_insert(count);
    }
    Ok(gpus.unwrap_or(0))
}

/// The `KUBETUNE_DEVICE` entry for a pod with `gpus` GPUs. Always set, never left to `auto`: a
/// pod holding a GPU must use it or fail saying why (a CPU-only binary refuses `cuda`), and a
/// pod without one must not try a GPU it does not hold.
pub fn device_env(gpus: u64) -> Value {
    json!({"name": DEVICE_ENV, "value": if gpus == 0 { "cpu" } else { "cuda" }})
}

/// Non-root, no privilege escalation, read-only root filesystem, every capability dropped.
pub fn restricted_container_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

/// Pod-level counterpart of [`restricted_container_security`].
pub fn restricted_pod_security() -> Value {
    json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use std::collections::BTreeMap;

    const GPU: &str = "nvidia.com/gpu";

    fn allowed(entries: &[&str]) -> Vec<String> {
        entries.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn a_repository_entry_allows_its_tags_and_digests_and_no_longer_name() {
        let list = allowed(&["ghcr.io/kubetune/trainer"]);
        for ok in [
            "ghcr.io/kubetune/trainer",
            "ghcr.io/kubetune/trainer:0.1.0-cuda",
            "ghcr.io/kubetune/trainer@sha256:0123",
        ] {
            assert!(image_allowed(ok, &list), "{ok}");
        }
        for refused in [
            "ghcr.io/kubetune/trainer-evil:1",
            "ghcr.io/kubetune/trainer/sub:1",
            "ghcr.io/kubetune/server:1",
            "docker.io/ghcr.io/kubetune/trainer:1",
        ] {
            assert!(!image_allowed(refused, &list), "{refused}");
        }
    }

    #[test]
    fn a_prefix_entry_ending_in_a_slash_allows_every_repository_under_it() {
        let list = allowed(&["registry.example.com/ml/"]);
        assert!(image_allowed("registry.example.com/ml/trainer:v2", &list));
        assert!(image_allowed("registry.example.com/ml/team-a/server@sha256:ab", &list));
        assert!(!image_allowed("registry.example.com/mlx/trainer:v2", &list));
    }

    #[test]
    fn an_image_outside_the_list_is_refused_naming_the_field_and_the_list() {
        let list = allowed(&["ghcr.io/kubetune/trainer", "registry.example.com/ml/"]);
        let err = check_image("spec.image", Some("ghcr.io/x/y:1"), &list).expect_err("not allowed");
        assert_eq!(
            err,
            "spec.image: ghcr.io/x/y:1 is not in the operator's allowed images (ghcr.io/kubetune/trainer, registry.example.com/ml/); ask the platform team to add it (chart value allowedImages)"
        );
        assert_eq!(
            check_image("spec.image", None, &list),
            Ok(()),
            "the operator's default is not the user's choice"
        );
        assert_eq!(
            check_image("spec.image", Some("ghcr.io/kubetune/trainer:2"), &list),
            Ok(())
        );
    }

    #[test]
    fn pods_run_as_the_named_service_account_or_the_operators_default_without_a_token() {
        let mut pod = json!({});
        apply_identity(&mut pod, &PodPlacement::default(), "kubetune-workload");
        assert_eq!(
            pod,
            json!({"serviceAccountName": "kubetune-workload", "automountServiceAccountToken": false})
        );
        let named = PodPlacement {
            service_account_name: Some("trainer".into()),
            ..Default::default()
        };
        let mut pod = json!({});
        apply_identity(&mut pod, &named, "kubetune-workload");
        // The named ServiceAccount's own automountServiceAccountToken decides.
        assert_eq!(pod, json!({"serviceAccountName": "trainer"}));
    }

    fn placement(limits: &[(&str, &str)], requests: &[(&str, &str)]) -> PodPlacement {
        let map = |pairs: &[(&str, &str)]| {
            (!pairs.is_empty()).then(|| {
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                    .collect::<BTreeMap<_, _>>()
            })
        };
        PodPlacement {
            resources: Some(ResourceRequirements {
                limits: map(limits),
                requests: map(requests),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn no_resources_means_one_gpu_and_resources_without_one_mean_none() {
        assert_eq!(requested_gpus(&PodPlacement::default(), GPU), Ok(1));
        assert_eq!(
            requested_gpus(&placement(&[("memory", "4Gi")], &[("cpu", "2")]), GPU),
            Ok(0)
        );
        assert_eq!(requested_gpus(&placement(&[(GPU, "0")], &[]), GPU), Ok(0));
    }

    #[test]
    fn a_gpu_is_counted_from_limits_or_from_requests() {
        assert_eq!(requested_gpus(&placement(&[(GPU, "1")], &[]), GPU), Ok(1));
        assert_eq!(requested_gpus(&placement(&[], &[(GPU, "1")]), GPU), Ok(1));
    }

    #[test]
    fn more_than_one_gpu_is_refused_in_limits_or_requests_naming_the_field() {
        let err = requested_gpus(&placement(&[(GPU, "1")], &[(GPU, "2")]), GPU).expect_err("two GPUs");
        assert!(
            err.starts_with(r#"spec.resources.requests["nvidia.com/gpu"]: 2 GPUs requested"#),
            "{err}"
        );
        assert!(err.contains("one GPU per pod is supported"), "{err}");
        let err = requested_gpus(&placement(&[(GPU, "8")], &[]), GPU).expect_err("eight GPUs");
        assert!(
            err.starts_with(r#"spec.resources.limits["nvidia.com/gpu"]: 8 GPUs"#),
            "{err}"
        );
    }

    #[test]
    fn a_gpu_count_that_is_not_a_whole_number_is_refused_naming_the_field() {
        let err = requested_gpus(&placement(&[(GPU, "500m")], &[]), GPU).expect_err("half a GPU");
        assert_eq!(
            err,
            r#"spec.resources.limits["nvidia.com/gpu"]: "500m" is not a whole number of GPUs"#
        );
    }

    #[test]
    fn the_configured_gpu_resource_is_the_one_counted() {
        let p = placement(&[("amd.com/gpu", "2"), (GPU, "1")], &[]);
        assert!(requested_gpus(&p, "amd.com/gpu").is_err());
        assert_eq!(requested_gpus(&p, GPU), Ok(1));
    }

    #[test]
    fn the_device_is_cuda_with_a_gpu_and_the_cpu_without() {
        assert_eq!(device_env(1), json!({"name": "KUBETUNE_DEVICE", "value": "cuda"}));
        assert_eq!(device_env(0), json!({"name": "KUBETUNE_DEVICE", "value": "cpu"}));
    }
}
