//! `kubetune-node-agent`: plays kubelet for kubetune's local test cluster.
//!
//! It registers fake GPU Nodes and runs the pods scheduled onto them as local processes, each
//! with its own loopback pod IP (127.0.x.y), its own directory under `--state-dir`, per-container
//! log files, probes, restarts and status reporting. See `--help` for every option.
//!
//! Example (two nodes with 2 fake GPUs each, images mapped by `node-agent.yaml`):
//!
//! ```sh
//! target/debug/kubetune-node-agent \
//!   --kubeconfig .kubetune/cluster/admin.kubeconfig \
//!   --node gpu-0 --node gpu-1 --gpus 2 --gpu-memory-mib 81920 \
//!   --label kubetune.dev/pool=local \
//!   --config node-agent.yaml --state-dir .kubetune/node-agent
//! ```
//!
//! with `node-agent.yaml`:
//!
//! ```yaml
//! images:
//!   kubetune/trainer: /abs/path/target/debug/kubetune-trainer
//!   kubetune/server: /abs/path/target/debug/kubetune-server
//! ```
//!
//! For scale tests add `--fake --nodes 50 --name-prefix fake-`: no processes are started,
//! containers are Running and Ready at once, and the pod annotation
//! `kubetune.dev/fake-exit-code` (plus optional `kubetune.dev/fake-run-seconds`) makes them exit.

mod agent;
mod config;
mod container;
mod env;
mod ipam;
mod node;
mod pods;
mod probes;
mod process;
mod setup;
mod status;
mod volumes;
mod worker;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio_util::sync::CancellationToken;

/// Registers fake GPU nodes and runs their pods as local processes (kubetune's local kubelet).
///
/// Pods see their volumes as host directories under --state-dir: any arg, command word or env
/// value that starts with a volumeMount's mountPath (or is `key=<mountPath>...`) is rewritten to
/// the host directory. Each process gets KUBECONFIG pointing to a per-pod kubeconfig with a
/// token for the pod's service account.
#[derive(Debug, Parser)]
#[command(name = "kubetune-node-agent", version, verbatim_doc_comment)]
struct Cli {
    /// Kubeconfig of the agent itself (default: KUBECONFIG, ~/.kube/config or in-cluster).
    #[arg(long, env = "KUBETUNE_AGENT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Node name to register; repeat for several nodes.
    #[arg(long = "node", value_name = "NAME")]
    nodes: Vec<String>,
    /// Register this many nodes named <name-prefix>0, <name-prefix>1, ... (in addition to --node).
    #[arg(long = "nodes", value_name = "N")]
    node_count: Option<u32>,
    /// Prefix for the names of --nodes.
    #[arg(long, default_value = "kubetune-node-")]
    name_prefix: String,
    /// Extra node label KEY=VALUE; repeat for several.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Fake `nvidia.com/gpu` capacity of each node (0: a CPU-only node).
    #[arg(long, default_value_t = 1)]
    gpus: u32,
    /// Value of the `nvidia.com/gpu.memory` node label (MiB per GPU).
    #[arg(long, default_value_t = 24576)]
    gpu_memory_mib: u64,
    /// Value of the `nvidia.com/gpu.product` node label.
    #[arg(long, default_value = "NVIDIA-Fake-GPU")]
    gpu_product: String,
    /// CPU capacity of each node.
    #[arg(long, default_value = "8")]
    cpu: String,
    /// Memory capacity of each node.
    #[arg(long, default_value = "32Gi")]
    memory: String,
    /// Ephemeral-storage capacity of each node.
    #[arg(long, default_value = "100Gi")]
    ephemeral_storage: String,
    /// Pod capacity of each node.
    #[arg(long, default_value_t = 110)]
    max_pods: u32,
    /// YAML config mapping images to local binaries (`images: {name: /path}`); re-read for
    /// every pod start, so edits apply without restarting the agent.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where pod directories (volumes, logs, kubeconfigs) live.
    #[arg(long, default_value = ".kubetune/node-agent")]
    state_dir: PathBuf,
    /// Loopback range pod IPs are taken from; agents sharing a host need disjoint ranges.
    #[arg(long, default_value = "127.0.0.0/16")]
    pod_ip_range: String,
    /// Do not start processes: containers are Running and Ready at once (scale tests).
    #[arg(long)]
    fake: bool,
    /// Agent env var passed to every process besides PATH, HOME, USER, LANG, LC_ALL, TMPDIR;
    /// repeat for several.
    #[arg(long = "pass-env", value_name = "NAME")]
    pass_env: Vec<String>,
    /// First restart back-off of crashed containers (doubles up to the maximum).
    #[arg(long, default_value_t = 10.0)]
    restart_backoff_seconds: f64,
    /// Maximum restart back-off.
    #[arg(long, default_value_t = 300.0)]
    max_restart_backoff_seconds: f64,
    /// How often node Leases are renewed.
    #[arg(long, default_value_t = 10)]
    lease_renew_seconds: u64,
    /// How often node status (Ready heartbeat) is re-applied.
    #[arg(long, default_value_t = 30)]
    status_refresh_seconds: u64,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn node_names(cli: &Cli) -> Vec<String> {
    let mut names = cli.nodes.clone();
    let generated = cli.node_count.unwrap_or(if names.is_empty() { 1 } else { 0 });
    names.extend((0..generated).map(|i| format!("{}{i}", cli.name_prefix)));
    names
}

fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

fn api_access(config: &Config) -> anyhow::Result<agent::ApiAccess> {
    let ca_pem = match (&config.root_cert_file, &config.root_cert) {
        (Some(file), _) => {
            Some(std::fs::read_to_string(file).with_context(|| format!("reading CA {}", file.display()))?)
        }
        (None, Some(certs)) => Some(certs.iter().map(|c| pem(c)).collect()),
        (None, None) => None,
    };
    Ok(agent::ApiAccess {
        server: config.cluster_url.to_string().trim_end_matches('/').to_owned(),
        ca_pem,
        insecure: config.accept_invalid_certs,
        tls_server_name: config.tls_server_name.clone(),
    })
}

async fn kube_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))
        }
        None => Config::infer().await.context("no kubeconfig found (use --kubeconfig)"),
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // An empty RUST_LOG would silence everything; treat it as unset. (Targets match by prefix,
    // so a plain `kube=warn` would also silence `kubetune_node_agent`.)
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => tracing_subscriber::EnvFilter::new(spec),
        _ => tracing_subscriber::EnvFilter::new("info,kube_client=warn,kube_runtime=warn"),
    };
    if cli.log_json {
        tracing_subscriber::fmt().with_env_filter(filter).json().init();
    } else {
        use std::io::IsTerminal;
        // Colour codes only help on a terminal; up.sh sends our output to a log file.
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stdout().is_terminal())
            .init();
    }

    let names = node_names(&cli);
    if names.is_empty() {
        bail!("no nodes to register: use --node NAME or --nodes N");
    }
    if !(cli.restart_backoff_seconds > 0.0 && cli.max_restart_backoff_seconds >= cli.restart_backoff_seconds) {
        bail!("--restart-backoff-seconds must be > 0 and <= --max-restart-backoff-seconds");
    }
    let ipam = ipam::Ipam::new(&cli.pod_ip_range)?;
    if let Some(path) = &cli.config {
        // Fail fast on a broken config at startup; later it is re-read per pod start.
        config::AgentConfig::load(path)?;
    }
    std::fs::create_dir_all(&cli.state_dir).with_context(|| format!("creating {}", cli.state_dir.display()))?;
    let state_dir = std::fs::canonicalize(&cli.state_dir)?;
    process::reap_orphans(&state_dir);

    let kube_config = kube_config(cli.kubeconfig.as_ref()).await?;
    let api = api_access(&kube_config)?;
    let client = Client::try_from(kube_config).context("building the Kubernetes client")?;
    let opts = node::NodeOptions {
        names: names.clone(),
        labels: cli.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        gpus: cli.gpus,
        gpu_memory_mib: cli.gpu_memory_mib,
        gpu_product: cli.gpu_product.clone(),
        cpu: cli.cpu.clone(),
        memory: cli.memory.clone(),
        ephemeral_storage: cli.ephemeral_storage.clone(),
        max_pods: cli.max_pods,
        lease_duration_seconds: 40,
        lease_renew: Duration::from_secs(cli.lease_renew_seconds.max(1)),
        status_refresh: Duration::from_secs(cli.status_refresh_seconds.max(1)),
    };

    let shutdown = CancellationToken::new();
    let since = Time(Timestamp::now());
    // The API server may still be starting: keep trying until it answers or we are told to stop.
    let uids = loop {
        match node::register(&client, &opts, &since).await {
            Ok(uids) => break uids,
            Err(e) => tracing::warn!(error = %e, "node registration failed; retrying in 2s"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown_signal() => return Ok(()),
        }
    };

    let mut pass_env: Vec<String> = ["PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR"]
        .map(String::from)
        .to_vec();
    pass_env.extend(cli.pass_env.iter().cloned());
    let agent = Arc::new(agent::Agent {
        client: client.clone(),
        ipam: Mutex::new(ipam),
        state_dir,
        config_path: cli
            .config
            .as_ref()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
        fake: cli.fake,
        pass_env,
        backoff_base: Duration::from_secs_f64(cli.restart_backoff_seconds),
        backoff_max: Duration::from_secs_f64(cli.max_restart_backoff_seconds),
        node_cpu: cli.cpu.clone(),
        node_memory: cli.memory.clone(),
        api,
        shutdown: shutdown.clone(),
    });
    tracing::info!(nodes = ?names, fake = cli.fake, state_dir = %agent.state_dir.display(), "node agent running");
    let heartbeat = tokio::spawn(node::keep_alive(client, opts, uids, since, shutdown.clone()));
    let pod_manager = tokio::spawn(pods::run(agent, names));

    shutdown_signal().await;
    tracing::info!("shutting down: stopping all pod processes");
    shutdown.cancel();
    let _ = pod_manager.await;
    let _ = heartbeat.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_combine_explicit_and_generated() {
        let cli = Cli::parse_from(["agent", "--node", "gpu-a", "--nodes", "2", "--name-prefix", "fake-"]);
        assert_eq!(node_names(&cli), vec!["gpu-a", "fake-0", "fake-1"]);
        let cli = Cli::parse_from(["agent"]);
        assert_eq!(node_names(&cli), vec!["kubetune-node-0"]);
        assert!(Cli::try_parse_from(["agent", "--label", "novalue"]).is_err());
    }
}
