//! Plain HTTP to pods on their pod IPs: trainer metrics and the inference servers' admin API.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// A response: status code and body.
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

/// Shared HTTP client with a per-request deadline.
#[derive(Clone)]
pub struct PodHttp {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl PodHttp {
    pub fn new(timeout: Duration) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            timeout,
        }
    }

    /// Sends a request to `http://ip:port{path}`; Err says why there was no reply.
    pub async fn send(
        &self,
        method: Method,
        ip: &str,
        port: u16,
        path: &str,
        json: Option<Vec<u8>>,
    ) -> Result<Reply, String> {
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        let uri = format!("http://{host}:{port}{path}");
        let mut builder = Request::builder().method(method).uri(&uri);
        if json.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(json.unwrap_or_default())))
            .map_err(|e| format!("{uri}: {e}"))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| format!("{uri}: {e}"))?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{uri}: {e}"))?
                .to_bytes();
            Ok(Reply { status, body })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("{uri}: no answer within {:?}", self.timeout))?
    }
}
