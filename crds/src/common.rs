//! Types shared by FineTuneJob and ModelDeployment.

use k8s_openapi::api::core::v1::{Affinity, LocalObjectReference, ResourceRequirements, Toleration};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// URI schemes kubetune can read models and datasets from, and write adapters to.
pub const URI_SCHEMES: &[&str] = &["s3", "gs", "az", "file", "pvc", "hf"];

/// The OpenAPI pattern every URI field carries, built from [`URI_SCHEMES`].
pub const URI_PATTERN: &str = r"^(s3|gs|az|file|pvc|hf)://.+$";

/// The pattern of registry fields: [`URI_PATTERN`] without `pvc`. The operator resolves adapter
/// versions by reading the registry itself, and it mounts no PersistentVolumeClaims.
pub const REGISTRY_URI_PATTERN: &str = r"^(s3|gs|az|file|hf)://.+$";

/// A DNS-1123 label: what Kubernetes allows as a name segment, and what adapter names must be.
pub const DNS1123_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// The base model to fine-tune or to serve.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaseModelSpec {
    /// Where the model lives, in Hugging Face layout (config.json, *.safetensors, tokenizer.json).
    /// Schemes: s3://bucket/prefix, gs://, az://, file:///path, pvc://claim/path (a
    /// PersistentVolumeClaim of the namespace, mounted read-only into the pods that read it),
    /// hf://org/name[@revision].
    #[schemars(regex(pattern = r"^(s3|gs|az|file|pvc|hf)://.+$"), length(max = 2048))]
    pub uri: String,
}

/// A reference to a Secret in the same namespace holding object-storage credentials
/// (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally AWS_ENDPOINT_URL, AWS_REGION).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"), length(min = 1, max = 253))]
    pub name: String,
}

/// Where and how the pods run: the scheduling fields every kubetune workload shares.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodPlacement {
    /// CPU, memory and GPU (e.g. nvidia.com/gpu) requests and limits of the main container.
    /// Unset: one GPU. At most one GPU: the trainer and the server open a single device, on
    /// CUDA when the pod requests a GPU and on the CPU when it requests none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the pods tolerate, e.g. those on GPU nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Node and pod affinity rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// ServiceAccount the pods run as; the namespace's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Secrets for pulling the container image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
}
