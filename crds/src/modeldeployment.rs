//! ModelDeployment: base model + adapters → OpenAI-compatible inference pods, with safe rollouts of
//! new adapter versions.

use crate::common::{PodPlacement, SecretRef};
use crate::conditions::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Inference pods serving a base model and LoRA adapters through an OpenAI-compatible API.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kubetune.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    shortname = "mdep",
    category = "kubetune",
    namespaced,
    status = "ModelDeploymentStatus",
    derive = "PartialEq",
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.replicas","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".status.servedModelName","description":"The model name clients send for the base model"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Pending, Progressing, Ready, Degraded or Failed"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.readyDisplay","description":"Ready replicas of the desired"}"#,
    printcolumn = r#"{"name":"Serving","type":"string","jsonPath":".status.servingDisplay","description":"Adapter versions every replica serves"}"#,
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.endpoint","description":"OpenAI-compatible endpoint"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// The base model every replica loads, and the name clients ask for it by.
    pub base_model: ServedBaseModel,
    /// LoRA adapters to serve, each under its own model name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub adapters: Vec<AdapterSource>,
    /// Number of inference pods. Defaults to 1; 0 scales the deployment down. Ignored while
    /// spec.autoscaling is set: the HorizontalPodAutoscaler owns the Deployment's replicas then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    /// Scales the inference pods on their load with an autoscaling/v2 HorizontalPodAutoscaler
    /// owned by this ModelDeployment (removed with this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Where the inference pods run and with what resources.
    #[serde(flatten)]
    pub placement: PodPlacement,
    /// Inference server settings. A change rolls the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerSpec>,
    /// How adapter version changes reach the serving pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
    /// Adapter registry root; the operator's configured default when unset. Not on a
    /// PersistentVolumeClaim: the operator reads registries itself, and mounts no claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(s3|gs|az|file|hf)://.+$"), length(max = 2048))]
    pub registry: Option<String>,
    /// Secret with the object-storage credentials the server uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_secret_ref: Option<SecretRef>,
    /// Seconds a rollout of the server pods (a new pod template, or scaling up) may go without
    /// progress before Ready turns False with reason ProgressDeadlineExceeded (phase Failed, or
    /// Degraded while earlier replicas still serve). The Deployment's progressDeadlineSeconds;
    /// defaults to its 600. Before the deadline, pods that cannot be scheduled or whose image
    /// cannot be pulled show as reason Unschedulable or ImagePullBackOff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub progress_deadline_seconds: Option<i32>,
    /// Creates a PodDisruptionBudget keeping all but one replica up during voluntary disruptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_disruption_budget: Option<bool>,
}

/// The base model a ModelDeployment serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServedBaseModel {
    /// Where the model lives: a directory in Hugging Face layout (config.json, *.safetensors,
    /// tokenizer.json) or a .gguf file. Schemes: s3://bucket/prefix, gs://, az://, file:///path,
    /// pvc://claim/path (a PersistentVolumeClaim of the namespace, mounted read-only into the
    /// server pods), hf://org/name[@revision].
    #[schemars(regex(pattern = r"^(s3|gs|az|file|pvc|hf)://.+$"), length(max = 2048))]
    pub uri: String,
    /// The model name clients send for the base model (OpenAI's `model`), e.g.
    /// `meta-llama/Llama-3.2-1B-Instruct`. When unset: for hf://org/name[@revision] the repository
    /// `org/name`; for any other URI its last path segment as it is (`s3://b/models/smollm2` →
    /// `smollm2`, `s3://b/m/SmolLM2-135M-Instruct.Q4_1.gguf` → `SmolLM2-135M-Instruct.Q4_1.gguf`).
    /// status.servedModelName reports the name in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^\S+$"))]
    pub served_name: Option<String>,
}

/// Load-based scaling of the inference pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
        "message": "spec.autoscaling.minReplicas: must not exceed maxReplicas",
        "fieldPath": ".minReplicas"
    }
]))]
pub struct AutoscalingSpec {
    /// Fewest inference pods. Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: Option<i32>,
    /// Most inference pods.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// What is averaged over the pods: `runningRequests` (sequences being decoded, the server's
    /// `vllm:num_requests_running`, the default) or `queuedRequests` (requests waiting for a batch
    /// slot, `vllm:num_requests_waiting`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<AutoscalingMetric>,
    /// The per-pod average the autoscaler keeps the metric at. Defaults to 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub target_per_pod: Option<u32>,
    /// The Pods metric's name in the custom metrics API (as your metrics adapter, e.g.
    /// prometheus-adapter, exposes it); defaults to the server's series name for `metric`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub metric_name: Option<String>,
}

/// The load signal the autoscaler follows.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AutoscalingMetric {
    #[default]
    RunningRequests,
    QueuedRequests,
}

impl AutoscalingMetric {
    /// The server's Prometheus series for this signal (server/src/metrics.rs).
    pub fn series(self) -> &'static str {
        match self {
            AutoscalingMetric::RunningRequests => "vllm:num_requests_running",
            AutoscalingMetric::QueuedRequests => "vllm:num_requests_waiting",
        }
    }
}

/// One adapter to serve: a registry version, or whatever a FineTuneJob published.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.version) != has(self.fromFineTuneJob)",
        "message": "spec.adapters[]: set exactly one of version and fromFineTuneJob",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.version) || (type(self.version) == int ? self.version >= 1 : self.version == 'latest')",
        "message": "spec.adapters[].version: must be a version number >= 1 or the string latest",
        "fieldPath": ".version"
    }
]))]
pub struct AdapterSource {
    /// The model name clients ask for, and the adapter's name in the registry (a DNS-1123 label).
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(min = 1, max = 63))]
    pub name: String,
    /// A version number (1, 2, ...) or `latest`, which follows each newly published version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<IntOrString>,
    /// Serve the adapter version the named FineTuneJob (same namespace) published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"), length(min = 1, max = 253))]
    pub from_fine_tune_job: Option<String>,
}

/// Inference server settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// Server container image; the operator's configured default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Most sequences decoded together in one batch. Defaults to 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_batch_size: Option<u32>,
    /// Longest prompt plus completion, in tokens; the model's own limit when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 1048576))]
    pub max_context_length: Option<u32>,
    /// Merge the single adapter into the base weights for top speed (allows exactly one adapter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<bool>,
    /// Also serve, on first request, any other adapter of the deployment's registry that a
    /// request names (`name`, `name@N`), evicting the least recently used of those when
    /// `maxLoadedAdapters` is reached: one deployment carries hundreds of adapters. Those in
    /// spec.adapters stay loaded and roll out as usual. Not with `merge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand_adapters: Option<bool>,
    /// Adapters a pod holds in memory at once, spec.adapters included. Defaults to 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_loaded_adapters: Option<u32>,
    /// Requests waiting beyond this many get HTTP 429. Defaults to 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_queue: Option<u32>,
    /// How the base weights are held: `none` (as the checkpoint has them, the default) or
    /// `int8` (int8 weights with one scale per output row; on CPUs with AVX-512 VNNI each
    /// product's inputs are rounded to int8 per row too; about three times f32's single-stream
    /// decode speed on CPU). int8 is for CPU serving: give spec.resources without a GPU,
    /// or the server refuses to start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<ServerQuantize>,
}

/// Weight format of the inference server (its `--quantize` flag).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ServerQuantize {
    None,
    Int8,
}

impl ServerQuantize {
    /// The server's flag value.
    pub fn as_flag(self) -> &'static str {
        match self {
            ServerQuantize::None => "none",
            ServerQuantize::Int8 => "int8",
        }
    }
}

/// How adapter version changes are rolled out.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// `hotSwap` loads the new version into every pod at once through the admin API;
    /// `canary` serves it from a share of the replicas first and promotes or rolls back on metrics.
    /// Defaults to hotSwap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<RolloutStrategy>,
    /// Canary settings, used when strategy is canary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySpec>,
    /// Holds the current rollout where it is (no promotion, no rollback) while true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// Aborts the current rollout and returns every pod to the previous version while true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<bool>,
    /// Attempts to load a version into a pod before the rollout is marked Failed. Defaults to 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 20))]
    pub max_attempts: Option<u32>,
}

/// Rollout strategy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RolloutStrategy {
    /// Load the new version into every pod, then switch the served name atomically on each.
    HotSwap,
    /// Serve the new version from some replicas first, watch their metrics, then promote or roll back.
    Canary,
}

/// Canary analysis settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanarySpec {
    /// Percentage of replicas (rounded up, at least one) that serve the new version first. Defaults to 25.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub replica_percent: Option<u32>,
    /// Seconds of canary traffic to watch before deciding. Defaults to 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub analysis_seconds: Option<u32>,
    /// Highest acceptable share of failed requests on the canary, in [0, 1]. Defaults to 0.01.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0, "maximum" = 1))]
    pub max_error_rate: Option<f64>,
    /// Highest acceptable p99 end-to-end latency on the canary, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_p99_latency_ms: Option<u32>,
}

/// Observed state of a ModelDeployment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// Coarse state: Pending, Progressing, Ready, Degraded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ModelDeploymentPhase>,
    /// Conditions; Ready is true only when every replica serves the desired adapter versions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Server pods observed (not terminating), ready or not: the scale subresource's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Label selector of the server pods, for the scale subresource (kubectl scale, autoscalers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The model name clients send for the base model (spec.baseModel.servedName or its default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model_name: Option<String>,
    /// Replicas that are ready and serve every desired adapter version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// "ready/desired", for the printer column; desired is the autoscaler's choice under
    /// spec.autoscaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_display: Option<String>,
    /// Per adapter: the version wanted and the version every replica serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub adapters: Vec<AdapterStatus>,
    /// "name@vN,..." of what is served, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_display: Option<String>,
    /// Base URL of the OpenAI-compatible API (the Service), e.g. http://name.ns.svc:8000/v1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// One rollout, for a quick look: one in progress if any, else the one that ended last.
    /// status.rollouts has every adapter's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// Per adapter, its rollout in progress or its last one. Adapters roll out independently:
    /// each keeps its own failed attempts, canary pods and analysis window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["adapter"]))]
    pub rollouts: Vec<RolloutStatus>,
    /// The most recent rollouts, newest first (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), extend("x-kubernetes-list-type" = "atomic"))]
    pub rollout_history: Vec<RolloutStatus>,
}

/// Coarse state of a ModelDeployment.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ModelDeploymentPhase {
    /// Waiting for pods or for adapter versions to resolve.
    Pending,
    /// A rollout is under way.
    Progressing,
    /// Every replica serves the desired versions.
    Ready,
    /// Serving, but not everything desired (e.g. a rollout failed and the previous version serves).
    Degraded,
    /// Nothing can be served; the conditions say why.
    Failed,
}

/// Desired and served version of one adapter.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterStatus {
    /// Adapter name.
    pub name: String,
    /// The version the spec resolves to now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_version: Option<u32>,
    /// The version every ready replica serves; unset while replicas disagree or none serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_version: Option<u32>,
    /// Manifest digest of the desired version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// One rollout of an adapter version.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Progressing, Canary, Promoted, RolledBack or Failed.
    pub state: RolloutState,
    /// Adapter being rolled out.
    pub adapter: String,
    /// Version served before the rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<u32>,
    /// Version being rolled out.
    pub to_version: u32,
    /// Machine-readable reason for the state, e.g. AdapterLoadFailed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the rollout started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it reached Promoted, RolledBack or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Load attempts that failed so far; the rollout fails at spec.rollout.maxAttempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_attempts: Option<u32>,
    /// Manifest digest of the version being rolled out, so a failed version is not retried
    /// until the spec or the registry points elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_digest: Option<String>,
    /// The canary of a `canary` rollout: which replicas serve the new version first, and the
    /// counters its analysis compares against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStatus>,
}

/// Progress of a canary.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    /// Pods chosen to serve the new version first.
    pub pods: Vec<String>,
    /// When every canary pod served the new version and the analysis window opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis_started_at: Option<Time>,
    /// Each canary pod's request counters for the adapter when the window opened.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub baseline: Vec<ServingCounters>,
    /// The analysis passed; the version is being loaded into the other replicas.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passed: bool,
}

/// A server pod's cumulative request counters for one adapter, from its /metrics.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServingCounters {
    pub pod: String,
    /// Generation requests answered.
    pub requests: f64,
    /// Of those, answered with a 5xx status.
    pub errors: f64,
    /// Cumulative latency histogram: requests that took at most `le` seconds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency: Vec<LatencyBucket>,
}

/// One cumulative histogram bucket.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LatencyBucket {
    /// Upper bound in seconds; absent for +Inf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub le: Option<f64>,
    pub count: f64,
}

/// State of a rollout.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RolloutState {
    /// Loading the new version into the pods.
    #[default]
    Progressing,
    /// The new version serves from the canary replicas while their metrics are watched.
    Canary,
    /// Every replica serves the new version.
    Promoted,
    /// The new version was withdrawn; the previous one serves.
    RolledBack,
    /// The rollout gave up; the previous version serves and the reason says why.
    Failed,
}
