//! Operator settings: the defaults every FineTuneJob and ModelDeployment falls back to.

use clap::Args;

/// Settings shared by the controllers. Comes from flags or environment variables.
#[derive(Args, Clone, Debug)]
pub struct OperatorConfig {
    /// Trainer image used when a FineTuneJob names none.
    #[arg(
        long,
        env = "KUBETUNE_TRAINER_IMAGE",
        default_value = "ghcr.io/kubetune/trainer:latest"
    )]
    pub trainer_image: String,
    /// Inference server image used when a ModelDeployment names none.
    #[arg(
        long,
        env = "KUBETUNE_SERVER_IMAGE",
        default_value = "ghcr.io/kubetune/server:latest"
    )]
    pub server_image: String,
    /// Adapter registry used when a FineTuneJob or ModelDeployment names none (e.g. s3://bucket/kubetune).
    #[arg(long, env = "KUBETUNE_REGISTRY")]
    pub default_registry: Option<String>,
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
}

impl OperatorConfig {
    /// Settings for tests and fixtures.
    pub fn for_tests() -> Self {
        Self {
            trainer_image: "kubetune/trainer:test".into(),
            server_image: "kubetune/server:test".into(),
            default_registry: Some("s3://kubetune/registry".into()),
            gpu_resource: "nvidia.com/gpu".into(),
            gpu_memory_label: "nvidia.com/gpu.memory".into(),
            scratch_size: "10Gi".into(),
            trainer_metrics_port: 9090,
        }
    }
}
