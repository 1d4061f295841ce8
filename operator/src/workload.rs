//! Pod-spec pieces every kubetune workload shares: placement from the spec, the restricted
//! security contexts, and the default of one GPU.

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
        ("serviceAccountName", serde_json::to_value(&p.service_account_name)),
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
