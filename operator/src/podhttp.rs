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
        self.send_with_key(method, ip, port, path, json, None).await
    }

    /// As [`send`](Self::send), with `Authorization: Bearer <key>` when `key` is given. Errors
    /// name the URI only, never the key.
    pub async fn send_with_key(
        &self,
        method: Method,
        ip: &str,
        port: u16,
        path: &str,
        json: Option<Vec<u8>>,
        key: Option<&str>,
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
        if let Some(key) = key {
            builder = builder.header("authorization", format!("Bearer {key}"));
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers one request with 200 and returns its head (request line and headers).
    async fn one_request() -> (u16, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let head = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
            String::from_utf8_lossy(&request).to_lowercase()
        });
        (port, head)
    }

    #[tokio::test]
    async fn a_key_is_sent_as_a_bearer_authorization_header_and_no_key_sends_none() {
        let http = PodHttp::new(Duration::from_secs(5));
        let (port, head) = one_request().await;
        let reply = http
            .send_with_key(Method::DELETE, "127.0.0.1", port, "/v1/adapters/a", None, Some("k3y"))
            .await
            .expect("reply");
        assert_eq!(reply.status, 200);
        let head = head.await.expect("server");
        assert!(head.contains("authorization: bearer k3y\r\n"), "{head}");

        let (port, head) = one_request().await;
        http.send(Method::GET, "127.0.0.1", port, "/metrics", None)
            .await
            .expect("reply");
        let head = head.await.expect("server");
        assert!(!head.contains("authorization"), "{head}");
    }
}
