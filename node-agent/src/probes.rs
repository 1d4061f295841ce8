//! Startup, readiness and liveness probes (httpGet, tcpSocket, exec).
//!
//! One probe task runs per container run and reports transitions on a channel; the container
//! supervisor owns the consequences (ready flag, restart). gRPC and HTTPS probes are not
//! supported: they count as failures with a message saying so, so a pod never looks healthier
//! than the agent can tell.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant};

#[derive(Debug, Clone, PartialEq)]
pub enum ProbeEvent {
    /// Startup probe passed (or there is none): the container counts as started.
    Started,
    Ready(bool),
    /// Startup or liveness probe failed `failureThreshold` times: restart the container.
    Unhealthy(String),
}

/// Where and how probes reach the container.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    pub ip: String,
    pub ports: BTreeMap<String, i32>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
}

impl ProbeTarget {
    pub fn new(ip: &str, container: &Container, env: BTreeMap<String, String>, cwd: PathBuf) -> Self {
        let ports = container
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.clone().map(|n| (n, p.container_port)))
            .collect();
        Self {
            ip: ip.into(),
            ports,
            env,
            cwd,
        }
    }

    fn port(&self, port: &IntOrString) -> Result<i32, String> {
        match port {
            IntOrString::Int(n) => Ok(*n),
            IntOrString::String(name) => match name.parse() {
                Ok(n) => Ok(n),
                Err(_) => self
                    .ports
                    .get(name)
                    .copied()
                    .ok_or_else(|| format!("port {name:?} is not a named container port")),
            },
        }
    }
}

fn secs(value: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(value.unwrap_or(default).max(0) as u64)
}

/// One probe attempt. `Ok` means healthy; `Err` carries kubelet-style failure output.
pub async fn check(probe: &Probe, target: &ProbeTarget) -> Result<(), String> {
    let limit = secs(probe.timeout_seconds, 1).max(Duration::from_secs(1));
    if let Some(http) = &probe.http_get {
        if http.scheme.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("HTTPS")) {
            return Err("HTTPS probes are not supported by the kubetune node agent".into());
        }
        let host = http
            .host
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| target.ip.clone());
        let port = target.port(&http.port)?;
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        let headers: Vec<(String, String)> = http
            .http_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        return match timeout(limit, http_get(&host, port, &path, &headers)).await {
            Ok(result) => result,
            Err(_) => Err(format!("Get \"http://{host}:{port}{path}\": context deadline exceeded")),
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        let host = tcp
            .host
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| target.ip.clone());
        let port = target.port(&tcp.port)?;
        return match timeout(limit, TcpStream::connect((host.as_str(), port as u16))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {host}:{port}: {e}")),
            Err(_) => Err(format!("dial tcp {host}:{port}: i/o timeout")),
        };
    }
    if let Some(exec) = &probe.exec {
        return exec_probe(exec.command.as_deref().unwrap_or_default(), target, limit).await;
    }
    Err("probe type not supported by the kubetune node agent (use httpGet, tcpSocket or exec)".into())
}

/// A minimal HTTP/1.1 GET: kubelet only looks at the status code (200..400 is success).
async fn http_get(host: &str, port: i32, path: &str, headers: &[(String, String)]) -> Result<(), String> {
    let url = format!("http://{host}:{port}{path}");
    let mut stream = TcpStream::connect((host, port as u16))
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.36\r\nAccept: */*\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    // The status line is all we need; stop reading once we have it.
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream.read(&mut buf).await.map_err(|e| format!("Get \"{url}\": {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("Get \"{url}\": malformed HTTP response"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

async fn exec_probe(command: &[String], target: &ProbeTarget, limit: Duration) -> Result<(), String> {
    let Some((first, rest)) = command.split_first() else {
        return Err("exec probe has an empty command".into());
    };
    let path = target.env.get("PATH").cloned().unwrap_or_default();
    let program = crate::process::resolve_program(first, &path, &target.cwd).map_err(|e| e.to_string())?;
    let mut child = tokio::process::Command::new(program)
        .args(rest)
        .env_clear()
        .envs(&target.env)
        .current_dir(&target.cwd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("exec probe failed to start: {e}"))?;
    let mut stdout = child.stdout.take();
    let run = async {
        let mut out = String::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_string(&mut out).await;
        }
        (child.wait().await, out)
    };
    match timeout(limit, run).await {
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((Ok(status), out)) => Err(format!("command exited with {status}: {}", out.trim())),
        Ok((Err(e), _)) => Err(format!("exec probe failed: {e}")),
        Err(_) => Err(format!("command timed out after {}s", limit.as_secs())),
    }
}

/// Runs the container's probes from `started` (the process start) until the receiver is
/// dropped, reporting transitions on `events`.
pub async fn run(container: Container, target: ProbeTarget, started: Instant, events: mpsc::Sender<ProbeEvent>) {
    if let Some(probe) = &container.startup_probe {
        if let Err(message) = until_threshold(probe, &target, started, true).await {
            let _ = events
                .send(ProbeEvent::Unhealthy(format!("Startup probe failed: {message}")))
                .await;
            return;
        }
    }
    if events.send(ProbeEvent::Started).await.is_err() {
        return;
    }
    let readiness = async {
        let Some(probe) = &container.readiness_probe else {
            let _ = events.send(ProbeEvent::Ready(true)).await;
            return;
        };
        let mut ready = false;
        let (mut successes, mut failures) = (0, 0);
        let mut next = started + secs(probe.initial_delay_seconds, 0);
        loop {
            sleep_until(next).await;
            next = Instant::now() + secs(probe.period_seconds, 10).max(Duration::from_secs(1));
            match check(probe, &target).await {
                Ok(()) => {
                    successes += 1;
                    failures = 0;
                }
                Err(message) => {
                    failures += 1;
                    successes = 0;
                    tracing::debug!(container = %container.name, %message, "readiness probe failed");
                }
            }
            let now_ready = if successes >= probe.success_threshold.unwrap_or(1).max(1) {
                true
            } else if failures >= probe.failure_threshold.unwrap_or(3).max(1) {
                false
            } else {
                ready
            };
            if now_ready != ready {
                ready = now_ready;
                if events.send(ProbeEvent::Ready(ready)).await.is_err() {
                    return;
                }
            }
        }
    };
    let liveness = async {
        let Some(probe) = &container.liveness_probe else {
            return std::future::pending::<()>().await;
        };
        if let Err(message) = until_threshold(probe, &target, started, false).await {
            let _ = events
                .send(ProbeEvent::Unhealthy(format!("Liveness probe failed: {message}")))
                .await;
        }
    };
    tokio::join!(readiness, liveness);
}

/// Probes every period. With `stop_on_success` it returns `Ok` at the first success (startup);
/// otherwise it only returns, with `Err`, after `failureThreshold` consecutive failures.
async fn until_threshold(
    probe: &Probe,
    target: &ProbeTarget,
    started: Instant,
    stop_on_success: bool,
) -> Result<(), String> {
    let threshold = probe.failure_threshold.unwrap_or(3).max(1);
    let mut failures = 0;
    let mut next = started + secs(probe.initial_delay_seconds, 0);
    loop {
        sleep_until(next).await;
        next = Instant::now() + secs(probe.period_seconds, 10).max(Duration::from_secs(1));
        match check(probe, target).await {
            Ok(()) if stop_on_success => return Ok(()),
            Ok(()) => failures = 0,
            Err(message) => {
                failures += 1;
                if failures >= threshold {
                    return Err(message);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction, TCPSocketAction};
    use tokio::net::TcpListener;

    fn target(ports: Vec<(&str, i32)>) -> ProbeTarget {
        let container = Container {
            ports: Some(
                ports
                    .into_iter()
                    .map(|(n, p)| ContainerPort {
                        name: Some(n.into()),
                        container_port: p,
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        };
        ProbeTarget::new("127.0.0.1", &container, BTreeMap::new(), std::env::temp_dir())
    }

    async fn serve_once(status: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            if let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        port
    }

    fn http_probe(port: IntOrString) -> Probe {
        Probe {
            http_get: Some(HTTPGetAction {
                port,
                path: Some("/healthz".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn http_probe_judges_by_status_code_and_resolves_named_ports() {
        let port = serve_once("200 OK").await;
        assert_eq!(
            check(
                &http_probe(IntOrString::String("http".into())),
                &target(vec![("http", port as i32)])
            )
            .await,
            Ok(())
        );
        let port = serve_once("503 Service Unavailable").await;
        let result = check(&http_probe(IntOrString::Int(port as i32)), &target(vec![])).await;
        assert_eq!(result, Err("HTTP probe failed with statuscode: 503".into()));
        let missing = check(&http_probe(IntOrString::String("nope".into())), &target(vec![])).await;
        assert!(missing.is_err());
    }

    #[tokio::test]
    async fn tcp_probe_connects() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port() as i32;
        let probe = Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(port),
                host: None,
            }),
            ..Default::default()
        };
        assert_eq!(check(&probe, &target(vec![])).await, Ok(()));
        drop(listener);
        assert!(check(&probe, &target(vec![])).await.is_err());
    }
}
