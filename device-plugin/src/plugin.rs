//! The DevicePlugin service kubelet calls, and the registration call to kubelet.

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Endpoint, Server, Uri};
use tonic::{Request, Response, Status};

pub mod api {
    tonic::include_proto!("v1beta1");
}

use api::device_plugin_server::{DevicePlugin, DevicePluginServer};
use api::registration_client::RegistrationClient;

/// The API version kubelet is asked to speak.
const API_VERSION: &str = "v1beta1";
const HEALTHY: &str = "Healthy";
/// Where a container learns which GPUs it got, as NVIDIA's runtime reads it.
pub const VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";

/// N devices named "0".."N-1", all healthy: what `nvidia-smi -L` would index.
#[derive(Clone, Debug)]
pub struct FakeGpus {
    ids: Vec<String>,
}

impl FakeGpus {
    pub fn new(count: u32) -> Self {
        Self {
            ids: (0..count).map(|i| i.to_string()).collect(),
        }
    }

    fn list(&self) -> api::ListAndWatchResponse {
        api::ListAndWatchResponse {
            devices: self
                .ids
                .iter()
                .map(|id| api::Device {
                    id: id.clone(),
                    health: HEALTHY.into(),
                    topology: None,
                })
                .collect(),
        }
    }

    fn allocate(&self, request: &api::ContainerAllocateRequest) -> Result<api::ContainerAllocateResponse, Status> {
        if let Some(unknown) = request.devices_ids.iter().find(|id| !self.ids.contains(id)) {
            return Err(Status::invalid_argument(format!("no device {unknown:?} here")));
        }
        Ok(api::ContainerAllocateResponse {
            envs: [(VISIBLE_DEVICES.to_string(), request.devices_ids.join(","))].into(),
            ..Default::default()
        })
    }
}

type DeviceStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<api::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for FakeGpus {
    async fn get_device_plugin_options(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<api::DevicePluginOptions>, Status> {
        Ok(Response::new(api::DevicePluginOptions::default()))
    }

    type ListAndWatchStream = DeviceStream;

    /// The devices once; they never change, so the stream then stays open, as kubelet expects
    /// of a plugin that is alive.
    async fn list_and_watch(&self, _: Request<api::Empty>) -> Result<Response<Self::ListAndWatchStream>, Status> {
        use tokio_stream::StreamExt;
        let once = tokio_stream::once(Ok(self.list()));
        Ok(Response::new(Box::pin(once.chain(tokio_stream::pending()))))
    }

    async fn get_preferred_allocation(
        &self,
        _: Request<api::PreferredAllocationRequest>,
    ) -> Result<Response<api::PreferredAllocationResponse>, Status> {
        Ok(Response::new(api::PreferredAllocationResponse::default()))
    }

    async fn allocate(
        &self,
        request: Request<api::AllocateRequest>,
    ) -> Result<Response<api::AllocateResponse>, Status> {
        let container_responses = request
            .get_ref()
            .container_requests
            .iter()
            .map(|c| self.allocate(c))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(api::AllocateResponse { container_responses }))
    }

    async fn pre_start_container(
        &self,
        _: Request<api::PreStartContainerRequest>,
    ) -> Result<Response<api::PreStartContainerResponse>, Status> {
        Ok(Response::new(api::PreStartContainerResponse {}))
    }
}

/// Serves the plugin on `socket` (a stale file from an earlier run is replaced).
pub async fn serve(devices: FakeGpus, socket: &Path) -> Result<JoinHandle<()>> {
    match tokio::fs::remove_file(socket).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let listener = UnixListener::bind(socket)?;
    let incoming = UnixListenerStream::new(listener);
    Ok(tokio::spawn(async move {
        let served = Server::builder()
            .add_service(DevicePluginServer::new(devices))
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "device plugin server stopped");
        }
    }))
}

/// A gRPC channel over a Unix socket (the URI is a placeholder tonic needs).
pub async fn channel(socket: &Path) -> Result<tonic::transport::Channel> {
    let path: PathBuf = socket.into();
    Endpoint::try_from("http://[::]:0")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| format!("connecting to {}", socket.display()))
}

/// Tells kubelet (on `kubelet_socket`) that `resource` is served on `endpoint`, a socket name
/// in the same directory.
pub async fn register(kubelet_socket: &Path, endpoint: &str, resource: &str) -> Result<()> {
    let mut kubelet = RegistrationClient::new(channel(kubelet_socket).await?);
    kubelet
        .register(api::RegisterRequest {
            version: API_VERSION.into(),
            endpoint: endpoint.into(),
            resource_name: resource.into(),
            options: Some(api::DevicePluginOptions::default()),
        })
        .await
        .context("kubelet refused the registration")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::device_plugin_client::DevicePluginClient;
    use api::registration_server::{Registration, RegistrationServer};
    use tokio::sync::mpsc;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kubetune-device-plugin-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[tokio::test]
    async fn kubelet_sees_every_device_healthy_and_a_container_learns_which_it_got() {
        let socket = scratch("serve").join("plugin.sock");
        let server = serve(FakeGpus::new(3), &socket).await.expect("serve");
        let mut client = DevicePluginClient::new(channel(&socket).await.expect("channel"));

        let mut devices = client.list_and_watch(api::Empty {}).await.expect("list").into_inner();
        let first = devices.message().await.expect("stream").expect("a device list");
        let listed: Vec<(String, String)> = first.devices.into_iter().map(|d| (d.id, d.health)).collect();
        assert_eq!(
            listed,
            [("0", HEALTHY), ("1", HEALTHY), ("2", HEALTHY)].map(|(i, h)| (i.to_string(), h.to_string()))
        );

        let allocated = client
            .allocate(api::AllocateRequest {
                container_requests: vec![
                    api::ContainerAllocateRequest {
                        devices_ids: vec!["0".into(), "2".into()],
                    },
                    api::ContainerAllocateRequest {
                        devices_ids: vec!["1".into()],
                    },
                ],
            })
            .await
            .expect("allocate")
            .into_inner();
        let envs: Vec<_> = allocated
            .container_responses
            .iter()
            .map(|c| c.envs.get(VISIBLE_DEVICES).cloned())
            .collect();
        assert_eq!(envs, [Some("0,2".to_string()), Some("1".to_string())]);
        server.abort();
    }

    #[tokio::test]
    async fn a_device_that_is_not_ours_is_refused_by_name() {
        let socket = scratch("refuse").join("plugin.sock");
        let server = serve(FakeGpus::new(1), &socket).await.expect("serve");
        let mut client = DevicePluginClient::new(channel(&socket).await.expect("channel"));
        let refused = client
            .allocate(api::AllocateRequest {
                container_requests: vec![api::ContainerAllocateRequest {
                    devices_ids: vec!["7".into()],
                }],
            })
            .await
            .expect_err("no device 7");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("\"7\""), "{}", refused.message());
        server.abort();
    }

    /// Stands in for kubelet's registration service.
    struct Kubelet(mpsc::UnboundedSender<api::RegisterRequest>);

    #[tonic::async_trait]
    impl Registration for Kubelet {
        async fn register(&self, request: Request<api::RegisterRequest>) -> Result<Response<api::Empty>, Status> {
            let _ = self.0.send(request.into_inner());
            Ok(Response::new(api::Empty {}))
        }
    }

    #[tokio::test]
    async fn registration_names_the_api_version_the_socket_and_the_resource() {
        let kubelet_socket = scratch("register").join("kubelet.sock");
        let _ = std::fs::remove_file(&kubelet_socket);
        let (sent, mut received) = mpsc::unbounded_channel();
        let incoming = UnixListenerStream::new(UnixListener::bind(&kubelet_socket).expect("bind"));
        let kubelet = tokio::spawn(
            Server::builder()
                .add_service(RegistrationServer::new(Kubelet(sent)))
                .serve_with_incoming(incoming),
        );
        register(&kubelet_socket, "kubetune-gpu.sock", "nvidia.com/gpu")
            .await
            .expect("register");
        let request = received.recv().await.expect("a registration");
        assert_eq!(
            (
                request.version.as_str(),
                request.endpoint.as_str(),
                request.resource_name.as_str()
            ),
            ("v1beta1", "kubetune-gpu.sock", "nvidia.com/gpu")
        );
        kubelet.abort();
    }
}
