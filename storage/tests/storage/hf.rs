//! Hugging Face hub downloads against a stand-in hub on loopback (tests cannot reach the real
//! one): URL parsing, download + cache, offline mode, LFS verification, auth errors, retries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kubetune_storage::{Cache, Credentials, HfConfig, RetryPolicy, Sha256Digest, StorageError, StorageUri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// Requests the fake hub received: (path, authorization header).
type Log = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Serves `routes` (path → (status, body)); a route whose status list has several entries
/// answers them in turn (to script transient failures), repeating the last one.
async fn fake_hub(routes: HashMap<String, Vec<(u16, Vec<u8>)>>) -> (String, Log) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let routes = Arc::new(Mutex::new(routes));
    let seen = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (seen, routes) = (seen.clone(), routes.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let auth = head
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                    .map(|l| l["authorization:".len()..].trim().to_string());
                seen.lock().unwrap().push((path.clone(), auth));
                let (status, body) = {
                    let mut routes = routes.lock().unwrap();
                    match routes.get_mut(&path) {
                        Some(answers) if answers.len() > 1 => answers.remove(0),
                        Some(answers) => answers[0].clone(),
                        None => (404, b"not found".to_vec()),
                    }
                };
                let head = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
            });
        }
    });
    (format!("http://{addr}"), log)
}

fn hub_routes(weights_served: &[u8], weights_promised: &[u8]) -> HashMap<String, Vec<(u16, Vec<u8>)>> {
    let info = serde_json::json!({
        "sha": SHA,
        "siblings": [
            {"rfilename": ".gitattributes"},
            {"rfilename": "config.json"},
            {"rfilename": "model.safetensors", "lfs": {"sha256": Sha256Digest::of(weights_promised).hex(), "size": weights_promised.len()}}
        ]
    });
    HashMap::from([
        (
            "/api/models/org/tiny/revision/main?blobs=true".to_string(),
            vec![(200, info.to_string().into_bytes())],
        ),
        // The first answer is a transient failure, to prove it is retried.
        (
            format!("/org/tiny/resolve/{SHA}/config.json"),
            vec![(503, vec![]), (200, b"{}".to_vec())],
        ),
        (
            format!("/org/tiny/resolve/{SHA}/model.safetensors"),
            vec![(200, weights_served.to_vec())],
        ),
        (
            "/api/models/org/gated/revision/main?blobs=true".to_string(),
            vec![(401, b"unauthorized".to_vec())],
        ),
    ])
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
    }
}

fn cache(root: &std::path::Path, endpoint: &str, offline: bool) -> Cache {
    let creds = Credentials::none().with("HF_TOKEN", "hf_s3cr3t");
    let cfg = HfConfig::from_values(
        Some(endpoint.to_string()),
        Some(if offline { "1" } else { "0" }),
        &creds,
    )
    .unwrap();
    Cache::new(root).unwrap().with_hf_config(cfg).with_retry(fast_retry())
}

#[test]
fn hf_uris_parse_and_hostile_ones_are_rejected() {
    let parsed = |s: &str| match StorageUri::parse(s).unwrap() {
        StorageUri::HuggingFace(repo) => (repo.repo_id(), repo.revision),
        other => panic!("{s} parsed as {other:?}"),
    };
    assert_eq!(parsed("hf://org/tiny"), ("org/tiny".into(), "main".into()));
    assert_eq!(parsed("hf://org/tiny@v1.0"), ("org/tiny".into(), "v1.0".into()));
    assert_eq!(parsed("hf://gpt2@refs/pr/1"), ("gpt2".into(), "refs/pr/1".into()));
    for bad in [
        "hf://",
        "hf://org/../x",
        "hf://a/b/c",
        "hf://org/x@../../etc",
        "hf://org/x@",
        "hf://org/.x",
        "hf://org/x@/abs",
    ] {
        let err = StorageUri::parse(bad).unwrap_err().to_string();
        assert!(err.contains(bad), "{bad}: {err}");
    }
}

#[tokio::test]
async fn downloads_then_serves_offline_from_cache() {
    let (endpoint, log) = fake_hub(hub_routes(b"weights", b"weights")).await;
    let dir = tempfile::tempdir().unwrap();
    let online = cache(dir.path(), &endpoint, false);
    let snapshot = online
        .download_model("hf://org/tiny", &Credentials::none())
        .await
        .unwrap();
    assert!(snapshot.ends_with(format!("snapshots/{SHA}")), "{}", snapshot.display());
    assert_eq!(std::fs::read(snapshot.join("config.json")).unwrap(), b"{}");
    assert_eq!(std::fs::read(snapshot.join("model.safetensors")).unwrap(), b"weights");
    assert!(!snapshot.join(".gitattributes").exists());
    {
        let log = log.lock().unwrap();
        assert!(
            log.iter().all(|(_, auth)| auth.as_deref() == Some("Bearer hf_s3cr3t")),
            "token sent on every request"
        );
        let config_gets = log.iter().filter(|(p, _)| p.ends_with("config.json")).count();
        assert_eq!(config_gets, 2, "the 503 was retried once");
    }

    let requests_before = log.lock().unwrap().len();
    let offline = cache(dir.path(), &endpoint, true);
    assert_eq!(
        offline
            .download_model("hf://org/tiny@main", &Credentials::none())
            .await
            .unwrap(),
        snapshot
    );
    assert_eq!(
        offline
            .download_model(&format!("hf://org/tiny@{SHA}"), &Credentials::none())
            .await
            .unwrap(),
        snapshot
    );
    assert_eq!(
        log.lock().unwrap().len(),
        requests_before,
        "offline mode makes no requests"
    );

    let err = offline
        .download_model("hf://org/other", &Credentials::none())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Offline { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("hf://org/other@main") && msg.contains("HF_HUB_OFFLINE"),
        "{msg}"
    );
}

#[tokio::test]
async fn lfs_digest_mismatch_is_reported_and_not_cached() {
    let (endpoint, _log) = fake_hub(hub_routes(b"tampered", b"weights")).await;
    let dir = tempfile::tempdir().unwrap();
    let err = cache(dir.path(), &endpoint, false)
        .download_model("hf://org/tiny", &Credentials::none())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::DigestMismatch { uri, .. } if uri.ends_with("model.safetensors")),
        "{err}"
    );
    let err = cache(dir.path(), &endpoint, true)
        .download_model("hf://org/tiny", &Credentials::none())
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Offline { .. }),
        "a failed download leaves nothing to serve offline: {err}"
    );
}

#[tokio::test]
async fn auth_failure_names_uri_and_hints_without_leaking_token() {
    let (endpoint, _log) = fake_hub(hub_routes(b"w", b"w")).await;
    let dir = tempfile::tempdir().unwrap();
    let err = cache(dir.path(), &endpoint, false)
        .download_model("hf://org/gated", &Credentials::none())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("hf://org/gated@main") && msg.contains("401") && msg.contains("HF_TOKEN"),
        "{msg}"
    );
    assert!(!msg.contains("hf_s3cr3t"));
}

#[test]
fn config_redacts_token_and_rejects_bad_offline_values() {
    let creds = Credentials::none().with("HF_TOKEN", "hf_s3cr3t");
    let cfg = HfConfig::from_values(None, None, &creds).unwrap();
    assert!(!format!("{cfg:?}").contains("hf_s3cr3t"));
    assert_eq!(cfg.endpoint, "https://huggingface.co");
    let err = HfConfig::from_values(None, Some("maybe"), &creds)
        .unwrap_err()
        .to_string();
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains("maybe"), "{err}");
    assert!(HfConfig::from_values(Some("ftp://mirror".into()), None, &creds).is_err());
}
