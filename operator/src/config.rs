//! Operator settings: the defaults every FineTuneJob and ModelDeployment falls back to.

use clap::Args;
use kubetune_storage::RegistryScope;

/// Trainer image used when neither the FineTuneJob nor the operator's settings name one: this
/// release's CUDA build, as the chart installs it (`<appVersion>-cuda`). Pinned to the crate's
/// version, never `latest`: a moving tag would change what new pods run with no change to the
/// operator or to Git.
pub const DEFAULT_TRAINER_IMAGE: &str = concat!("ghcr.io/kubetune/trainer:", env!("CARGO_PKG_VERSION"), "-cuda");
/// Inference server image used by default; pinned like [`DEFAULT_TRAINER_IMAGE`].
pub const DEFAULT_SERVER_IMAGE: &str = concat!("ghcr.io/kubetune/server:", env!("CARGO_PKG_VERSION"), "-cuda");

/// Seconds a trainer pod is given between SIGTERM and SIGKILL. On SIGTERM the trainer finishes
/// its current optimizer step, writes a checkpoint (the adapter, plus AdamW's two moments: 12
/// bytes per trainable parameter in f32) and uploads it; the retried pod resumes from it. The
/// Kubernetes default of 30 s is too short for that: LoRA r=64 on all seven projections of an
/// 8B Llama is 168M trainable parameters, a 2 GB checkpoint, 80 s at 25 MB/s to object storage,
/// plus a step of a few seconds (tens on a CPU). 300 s covers that with room to spare; a pod
/// that is done sooner exits sooner, so the cost of a long grace period is only paid by a
/// trainer that hangs, and a node drain that waits for it.
pub const DEFAULT_TRAINER_TERMINATION_GRACE_SECONDS: i64 = 300;

/// Settings shared by the controllers. Comes from flags or environment variables.
#[derive(Args, Clone, Debug)]
pub struct OperatorConfig {
    /// Trainer image used when a FineTuneJob names none.
    #[arg(long, env = "KUBETUNE_TRAINER_IMAGE", default_value = DEFAULT_TRAINER_IMAGE)]
    pub trainer_image: String,
    /// Inference server image used when a ModelDeployment names none.
    #[arg(long, env = "KUBETUNE_SERVER_IMAGE", default_value = DEFAULT_SERVER_IMAGE)]
    pub server_image: String,
    /// Adapter registry used when a FineTuneJob or ModelDeployment names none (e.g. s3://bucket/kubetune).
    #[arg(long, env = "KUBETUNE_REGISTRY")]
    pub default_registry: Option<String>,
    /// How the registry root is shared between namespaces: `namespace` (each namespace's
    /// adapters under `<registry>/namespaces/<namespace>`, so one team's `support-bot` is never
    /// another's) or `shared` (every namespace uses the root itself and shares its adapter
    /// names, as before scoping existed).
    #[arg(long, env = "KUBETUNE_REGISTRY_SCOPE", default_value_t = RegistryScope::Namespace)]
    pub registry_scope: RegistryScope,
    /// Extended resource that GPUs are requested as.
    #[arg(long, env = "KUBETUNE_GPU_RESOURCE", default_value = "nvidia.com/gpu")]
    pub gpu_resource: String,
    /// Node label holding the memory of one GPU in MiB (NVIDIA GPU feature discovery's label).
    #[arg(long, env = "KUBETUNE_GPU_MEMORY_LABEL", default_value = "nvidia.com/gpu.memory")]
    pub gpu_memory_label: String,
    /// Size limit of the trainer's scratch volume (model, dataset, checkpoints), as a quantity.
    #[arg(long, env = "KUBETUNE_SCRATCH_SIZE", default_value = "50Gi")]
    pub scratch_size: String,
    /// Port of the trainer's Prometheus endpoint, which the operator reads progress from.
    #[arg(long, env = "KUBETUNE_TRAINER_METRICS_PORT", default_value_t = 9090)]
    pub trainer_metrics_port: u16,
    /// terminationGracePeriodSeconds of trainer pods: long enough for the trainer to checkpoint
    /// and upload on SIGTERM (see DEFAULT_TRAINER_TERMINATION_GRACE_SECONDS for the sizing).
    #[arg(
        long,
        env = "KUBETUNE_TRAINER_TERMINATION_GRACE_SECONDS",
        default_value_t = DEFAULT_TRAINER_TERMINATION_GRACE_SECONDS,
        value_parser = clap::value_parser!(i64).range(1..)
    )]
    pub trainer_termination_grace_seconds: i64,
    /// The only pods that may reach the inference servers' admin port, as
    /// `NAMESPACE/LABEL=VALUE,...` (the operator's own pods; the chart sets it unless
    /// networkPolicy.admin is false). Set, each ModelDeployment gets a NetworkPolicy admitting
    /// only them to that port, and anyone to the inference port.
    #[arg(long, env = "KUBETUNE_ADMIN_POLICY_FROM", value_parser = parse_admin_policy_from)]
    pub admin_policy_from: Option<AdminPolicyFrom>,
    /// Images a FineTuneJob's or ModelDeployment's `spec.image` may name, comma-separated: a
    /// repository (`ghcr.io/kubetune/trainer`, any tag or digest of it) or a prefix ending in
    /// `/` (`registry.example.com/ml/`, every repository under it). Whoever may create these
    /// objects would otherwise run any code on the GPU nodes. The operator's own
    /// `--trainer-image` and `--server-image` need not be listed: a spec never names them.
    #[arg(
        long,
        env = "KUBETUNE_ALLOWED_IMAGES",
        value_delimiter = ',',
        default_value = DEFAULT_ALLOWED_IMAGES,
        value_parser = parse_allowed_image
    )]
    pub allowed_images: Vec<String>,
    /// ServiceAccount of trainer and server pods whose spec names none. Set explicitly, so that
    /// the operator, not whatever the namespace's admission adds, decides it; such pods get no
    /// API token (neither binary calls the Kubernetes API).
    #[arg(long, env = "KUBETUNE_DEFAULT_SERVICE_ACCOUNT", default_value = "default")]
    pub default_service_account: String,
    /// Storage endpoints (`http://minio.storage:9000`, comma-separated) that a tenant's storage
    /// Secret may point the operator's own reads at (a ModelDeployment's registry, a
    /// FineTuneJob's config.json); `file://` allows local paths. Unlisted, only the providers'
    /// own endpoints are used: a Secret is the tenant's word, and the operator's requests must
    /// not go wherever a tenant likes.
    #[arg(long, env = "KUBETUNE_ALLOWED_STORAGE_ENDPOINTS", value_delimiter = ',')]
    pub allowed_storage_endpoints: Vec<String>,
}

/// The repositories of the default trainer and server images: what a spec may name unless the
/// chart allows more.
pub const DEFAULT_ALLOWED_IMAGES: &str = "ghcr.io/kubetune/trainer,ghcr.io/kubetune/server";

/// One `--allowed-images` entry: a repository, or a prefix ending in `/`. A tag or digest would
/// pin what is allowed to a mutable name or make the list unusable, and an empty entry would
/// allow everything: both are refused.
fn parse_allowed_image(text: &str) -> Result<String, String> {
    let entry = text.trim();
    let last = entry.rsplit('/').next().unwrap_or(entry);
    if entry.is_empty() || entry.contains('@') || last.contains(':') || entry.contains(char::is_whitespace) {
        return Err(format!(
            "{text:?}: expected a repository (registry.example.com/team/trainer) or a prefix ending in '/', without tag or digest"
        ));
    }
    Ok(entry.to_string())
}

/// The pods `--admin-policy-from` names: their namespace and labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminPolicyFrom {
    pub namespace: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

fn parse_admin_policy_from(text: &str) -> Result<AdminPolicyFrom, String> {
    let usage = || format!("{text:?}: expected NAMESPACE/LABEL=VALUE[,LABEL=VALUE...]");
    let (namespace, labels) = text.split_once('/').ok_or_else(usage)?;
    let labels = labels
        .split(',')
        .map(|pair| {
            let (k, v) = pair.trim().split_once('=').ok_or_else(usage)?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect::<Result<std::collections::BTreeMap<_, _>, String>>()?;
    // An empty selector would admit every pod of the namespace: not what the flag promises.
    if namespace.is_empty() || labels.keys().any(String::is_empty) || labels.is_empty() {
        return Err(usage());
    }
    Ok(AdminPolicyFrom {
        namespace: namespace.to_string(),
        labels,
    })
}

impl OperatorConfig {
    /// Settings for tests and fixtures.
    pub fn for_tests() -> Self {
        Self {
            trainer_image: "kubetune/trainer:test".into(),
            server_image: "kubetune/server:test".into(),
            default_registry: Some("s3://kubetune/registry".into()),
            registry_scope: RegistryScope::Namespace,
            gpu_resource: "nvidia.com/gpu".into(),
            gpu_memory_label: "nvidia.com/gpu.memory".into(),
            scratch_size: "10Gi".into(),
            trainer_metrics_port: 9090,
            trainer_termination_grace_seconds: DEFAULT_TRAINER_TERMINATION_GRACE_SECONDS,
            admin_policy_from: None,
            allowed_images: vec![
                "kubetune/trainer".into(),
                "kubetune/server".into(),
                "registry.example.com/kubetune/".into(),
            ],
            default_service_account: "default".into(),
            allowed_storage_endpoints: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_policy_from_names_a_namespace_and_at_least_one_label() {
        let parsed = parse_admin_policy_from("kubetune-system/app=op, release=r1").expect("valid");
        assert_eq!(parsed.namespace, "kubetune-system");
        assert_eq!(
            parsed.labels.into_iter().collect::<Vec<_>>(),
            [("app".into(), "op".into()), ("release".into(), "r1".into())]
        );
        for bad in [
            "kubetune-system",
            "/app=op",
            "kubetune-system/",
            "kubetune-system/app",
            "ns/=op",
        ] {
            let err = parse_admin_policy_from(bad).expect_err(bad);
            assert!(err.contains("NAMESPACE/LABEL=VALUE"), "{bad}: {err}");
        }
    }
    use clap::{Command, FromArgMatches as _};

    #[test]
    fn allowed_images_default_to_the_repositories_of_the_default_images() {
        let command = OperatorConfig::augment_args(Command::new("kubetune-operator"));
        let parsed = command.try_get_matches_from(["kubetune-operator"]).expect("defaults");
        let config = OperatorConfig::from_arg_matches(&parsed).expect("config");
        assert_eq!(
            config.allowed_images,
            ["ghcr.io/kubetune/trainer", "ghcr.io/kubetune/server"]
        );
        for image in [&config.trainer_image, &config.server_image] {
            assert!(crate::workload::image_allowed(image, &config.allowed_images), "{image}");
        }
        assert_eq!(config.default_service_account, "default");
    }

    #[test]
    fn registries_are_scoped_by_namespace_unless_the_shared_scope_is_asked_for() {
        assert_eq!(default_of("registry_scope"), "namespace");
        let command = OperatorConfig::augment_args(Command::new("kubetune-operator"));
        let parsed = command
            .clone()
            .try_get_matches_from(["kubetune-operator", "--registry-scope", "shared"])
            .expect("shared");
        let config = OperatorConfig::from_arg_matches(&parsed).expect("config");
        assert_eq!(config.registry_scope, RegistryScope::Shared);
        let err = command
            .try_get_matches_from(["kubetune-operator", "--registry-scope", "tenant"])
            .expect_err("no such scope");
        assert!(err.to_string().contains("expected namespace or shared"), "{err}");
    }

    #[test]
    fn an_allowed_image_with_a_tag_a_digest_or_nothing_is_refused() {
        let command = OperatorConfig::augment_args(Command::new("kubetune-operator"));
        for bad in ["ghcr.io/x/y:v1", "ghcr.io/x/y@sha256:ab", "ghcr.io/x,", " "] {
            let err = command
                .clone()
                .try_get_matches_from(["kubetune-operator", "--allowed-images", bad])
                .expect_err(bad);
            assert!(err.to_string().contains("--allowed-images"), "{bad}: {err}");
        }
        let parsed = command
            .try_get_matches_from([
                "kubetune-operator",
                "--allowed-images",
                "localhost:5000/kt/trainer,reg.example/ml/",
            ])
            .expect("a registry port is not a tag");
        let config = OperatorConfig::from_arg_matches(&parsed).expect("config");
        assert_eq!(config.allowed_images, ["localhost:5000/kt/trainer", "reg.example/ml/"]);
    }

    /// The default clap gives `id` when neither the flag nor its environment variable is set.
    fn default_of(id: &str) -> String {
        let command = OperatorConfig::augment_args(Command::new("kubetune-operator"));
        let arg = command
            .get_arguments()
            .find(|a| a.get_id() == id)
            .unwrap_or_else(|| panic!("no argument {id}"));
        let values: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        assert_eq!(values.len(), 1, "{id} has one default");
        values[0].clone()
    }

    /// The chart's appVersion, from charts/kubetune/Chart.yaml.
    fn chart_app_version() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/kubetune/Chart.yaml");
        let text = std::fs::read_to_string(path).expect("reading Chart.yaml");
        let chart: serde_yaml::Value = serde_yaml::from_str(&text).expect("Chart.yaml is YAML");
        chart["appVersion"]
            .as_str()
            .expect("appVersion is a string")
            .to_string()
    }

    #[test]
    fn the_default_images_are_pinned_to_the_crates_version_which_is_the_charts_app_version() {
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            chart_app_version(),
            version,
            "the chart installs the images of the release it ships"
        );
        for (id, repository) in [
            ("trainer_image", "ghcr.io/kubetune/trainer"),
            ("server_image", "ghcr.io/kubetune/server"),
        ] {
            let image = default_of(id);
            assert_eq!(image, format!("{repository}:{version}-cuda"), "{id}");
            assert!(!image.contains("latest"), "{id}: {image}");
        }
    }

    #[test]
    fn trainer_pods_get_five_minutes_to_checkpoint_on_sigterm_unless_configured_otherwise() {
        assert_eq!(default_of("trainer_termination_grace_seconds"), "300");
        let command = OperatorConfig::augment_args(Command::new("kubetune-operator"));
        let parsed = command
            .clone()
            .try_get_matches_from(["kubetune-operator", "--trainer-termination-grace-seconds", "900"])
            .expect("a positive number parses");
        let config = OperatorConfig::from_arg_matches(&parsed).expect("config");
        assert_eq!(config.trainer_termination_grace_seconds, 900);
        let err = command
            .try_get_matches_from(["kubetune-operator", "--trainer-termination-grace-seconds", "0"])
            .expect_err("no grace at all would lose the checkpoint");
        assert!(err.to_string().contains("--trainer-termination-grace-seconds"), "{err}");
    }
}
