//! Agent-wide settings and shared state handed to every pod worker.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use kube::Client;
use tokio_util::sync::CancellationToken;

use crate::ipam::Ipam;

/// Fake-mode annotation: containers terminate with this exit code.
pub const FAKE_EXIT_CODE: &str = "kubetune.dev/fake-exit-code";
/// Fake-mode annotation: seconds a container "runs" before it exits with the fake code.
pub const FAKE_RUN_SECONDS: &str = "kubetune.dev/fake-run-seconds";

/// How pods reach the API server: copied from the agent's own kubeconfig.
#[derive(Debug, Clone)]
pub struct ApiAccess {
    pub server: String,
    pub ca_pem: Option<String>,
    pub insecure: bool,
    pub tls_server_name: Option<String>,
}

pub struct Agent {
    pub client: Client,
    pub ipam: Mutex<Ipam>,
    pub state_dir: PathBuf,
    pub config_path: Option<PathBuf>,
    pub fake: bool,
    /// Agent env vars passed through to every process (PATH, HOME, ...).
    pub pass_env: Vec<String>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub node_cpu: String,
    pub node_memory: String,
    pub api: ApiAccess,
    pub shutdown: CancellationToken,
}

impl Agent {
    pub fn allocate_ip(&self, wanted: Option<&str>) -> Result<std::net::Ipv4Addr, crate::ipam::IpamError> {
        let mut ipam = self.ipam.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ip) = wanted.and_then(|w| w.parse().ok()) {
            if ipam.reserve(ip) {
                return Ok(ip);
            }
        }
        ipam.allocate()
    }

    pub fn release_ip(&self, ip: std::net::Ipv4Addr) {
        self.ipam.lock().unwrap_or_else(|e| e.into_inner()).release(ip);
    }
}
