//! kubetune-device-plugin: fake GPUs for the local cluster's real node, through kubelet's own
//! device manager.
//!
//! The machine has no GPU, yet the product's pods ask for `nvidia.com/gpu`. Rather than patching
//! the Node's capacity, this plugin speaks kubelet's device-plugin API (v1beta1, gRPC over Unix
//! sockets) as NVIDIA's plugin does: it registers the resource, lists N healthy devices, and on
//! allocation tells the container which ones it got in `NVIDIA_VISIBLE_DEVICES`. Capacity,
//! scheduling, per-container limits and "no GPU free, so Pending" then come from kubelet and the
//! scheduler themselves.
//!
//! kubelet removes every socket in its device-plugins directory when it restarts, so the plugin
//! watches its own socket and serves and registers again when it disappears.

mod plugin;

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(version, about = "Advertises fake GPUs to kubelet through the device-plugin API")]
struct Args {
    /// kubelet's device-plugins directory (`<kubelet root>/device-plugins`).
    #[arg(long, default_value = "/var/lib/kubelet/device-plugins")]
    socket_dir: PathBuf,
    /// The extended resource the devices are.
    #[arg(long, default_value = "nvidia.com/gpu")]
    resource: String,
    /// How many devices to advertise.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    devices: u32,
}

/// The plugin's socket, in kubelet's directory: kubelet finds it by this name.
const SOCKET: &str = "kubetune-gpu.sock";
const KUBELET_SOCKET: &str = "kubelet.sock";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let args = Args::parse();
    let socket = args.socket_dir.join(SOCKET);
    let devices = plugin::FakeGpus::new(args.devices);
    loop {
        let server = plugin::serve(devices.clone(), &socket)
            .await
            .with_context(|| format!("serving on {}", socket.display()))?;
        let kubelet = args.socket_dir.join(KUBELET_SOCKET);
        if let Err(e) = register_when_kubelet_listens(&kubelet, &args.resource).await {
            server.abort();
            return Err(e);
        }
        tracing::info!(resource = %args.resource, devices = args.devices, "registered with kubelet");
        // kubelet restarting deletes our socket: then serve and register anew.
        while tokio::fs::try_exists(&socket).await.unwrap_or(false) && !server.is_finished() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tracing::info!("the socket is gone (kubelet restarted?); serving and registering again");
        server.abort();
    }
}

/// Registers, retrying while kubelet's socket is absent or refuses (kubelet starting).
async fn register_when_kubelet_listens(kubelet: &std::path::Path, resource: &str) -> Result<()> {
    let mut wait = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        match plugin::register(kubelet, SOCKET, resource).await {
            Ok(()) => return Ok(()),
            Err(e) if tries < 120 => {
                tracing::debug!(error = %e, "kubelet not ready for registration");
                tries += 1;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e).context(format!("registering with kubelet at {}", kubelet.display())),
        }
    }
}
