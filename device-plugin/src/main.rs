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
    let kubelet = args.socket_dir.join(KUBELET_SOCKET);
    let devices = plugin::FakeGpus::new(args.devices);
    let mut retry = Backoff::default();
    loop {
        // Served anew each round: kubelet deletes every socket in its directory when it starts,
        // also one bound a moment before it did, and then cannot dial the plugin it was told of.
        let server = plugin::serve(devices.clone(), &socket)
            .await
            .with_context(|| format!("serving on {}", socket.display()))?;
        match plugin::register(&kubelet, SOCKET, &args.resource).await {
            Ok(()) => {
                retry = Backoff::default();
                tracing::info!(resource = %args.resource, devices = args.devices, "registered with kubelet");
                // kubelet restarting deletes our socket: then serve and register anew.
                while tokio::fs::try_exists(&socket).await.unwrap_or(false) && !server.is_finished() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                tracing::info!("the socket is gone (kubelet restarted?); serving and registering again");
            }
            Err(e) => {
                // kubelet not started yet, or it could not dial us back: try again, for as long
                // as it takes, as NVIDIA's plugin does.
                tracing::warn!(error = %format!("{e:#}"), kubelet = %kubelet.display(), "registration failed; retrying");
                tokio::time::sleep(retry.next()).await;
            }
        }
        server.abort();
    }
}

/// Waits between registration attempts: 100 ms, doubling up to 5 s.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(100))
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        wait
    }
}
