//! Hugging Face hub downloads (`hf://org/name[@revision]`).
//!
//! Online: the revision is resolved to a commit through the hub API, every file of that commit
//! is downloaded through `/resolve/<commit>/<file>` (LFS files are verified against the sha256
//! the API reports), and the snapshot is stored at `<cache>/hf/<org>--<name>/snapshots/<commit>`
//! with `refs/<revision>` pointing at the commit. Offline (`HF_HUB_OFFLINE=1`) only the cache
//! is consulted, and a miss is an error naming the URI, never a network attempt.

use std::fmt;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::credentials::Credentials;
use crate::digest::Sha256Digest;
use crate::error::{Result, StorageError};
use crate::fs::{fill_once, temp_sibling};
use crate::names::validate_relative_path;
use crate::progress::{ProgressFn, Tracker};
use crate::retry::{with_retry, Attempt, RetryPolicy};
use crate::uri::HfRepo;

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Hub settings.
#[derive(Clone)]
pub struct HfConfig {
    /// Base URL of the hub (HF_ENDPOINT), e.g. an in-cluster mirror.
    pub endpoint: String,
    /// Access token (HF_TOKEN); sent as a bearer token, never logged.
    pub token: Option<String>,
    /// HF_HUB_OFFLINE: serve from the cache only.
    pub offline: bool,
}

impl fmt::Debug for HfConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HfConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .finish()
    }
}

impl HfConfig {
    /// Reads HF_ENDPOINT and HF_HUB_OFFLINE from the environment and HF_TOKEN from `credentials`.
    pub fn from_env(credentials: &Credentials) -> Result<Self> {
        let offline = std::env::var("HF_HUB_OFFLINE").ok();
        Self::from_values(std::env::var("HF_ENDPOINT").ok(), offline.as_deref(), credentials)
    }

    /// Like [`HfConfig::from_env`] with explicit values (tests, CLI flags).
    pub fn from_values(endpoint: Option<String>, offline: Option<&str>, credentials: &Credentials) -> Result<Self> {
        let offline = match offline.map(|v| v.trim().to_ascii_lowercase()) {
            None => false,
            Some(v) => match v.as_str() {
                "" | "0" | "false" | "no" | "off" => false,
                "1" | "true" | "yes" | "on" => true,
                _ => {
                    return Err(StorageError::invalid_name(
                        "HF_HUB_OFFLINE",
                        &v,
                        "expected 1/true/yes/on or 0/false/no/off",
                    ))
                }
            },
        };
        let endpoint = endpoint.unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            return Err(StorageError::invalid_name(
                "HF_ENDPOINT",
                &endpoint,
                "must be an http(s):// URL",
            ));
        }
        Ok(Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: credentials.get("HF_TOKEN").map(str::to_string),
            offline,
        })
    }
}

/// The subset of the hub's model-info answer we use.
#[derive(serde::Deserialize)]
struct ModelInfo {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    lfs: Option<LfsInfo>,
}

#[derive(serde::Deserialize)]
struct LfsInfo {
    sha256: String,
}

/// `<cache_root>/hf/models--<org>--<name>`: the hub's own cache layout, so the directory is
/// recognisable to anyone who knows `huggingface_hub`.
fn repo_dir(cache_root: &Path, repo: &HfRepo) -> PathBuf {
    let dir = match &repo.org {
        Some(org) => format!("models--{org}--{}", repo.name),
        None => format!("models--{}", repo.name),
    };
    cache_root.join("hf").join(dir)
}

/// Returns a local snapshot directory of `repo` under `cache_root`, downloading it unless
/// offline.
pub(crate) async fn download(
    cache_root: &Path,
    repo: &HfRepo,
    cfg: &HfConfig,
    retry: &RetryPolicy,
    progress: Option<&ProgressFn>,
) -> Result<PathBuf> {
    let base = repo_dir(cache_root, repo);
    let ref_path = base.join("refs").join(&repo.revision);
    let cached_commit = if repo.is_commit() {
        Some(repo.revision.clone())
    } else {
        tokio::fs::read_to_string(&ref_path)
            .await
            .ok()
            .map(|s| s.trim().to_string())
    };
    let cached = cached_commit
        .map(|c| base.join("snapshots").join(c))
        .filter(|p| p.exists());
    if cfg.offline {
        return cached.ok_or_else(|| StorageError::Offline {
            uri: repo.to_string(),
            cache_dir: base.clone(),
        });
    }
    // A commit never changes, so a cached commit snapshot needs no network at all.
    if repo.is_commit() {
        if let Some(dir) = cached {
            return Ok(dir);
        }
    }

    let client = reqwest::Client::builder()
        .build()
        .map_err(|e| StorageError::invalid_name("HF_ENDPOINT", &cfg.endpoint, e.to_string()))?;
    let info_url = format!(
        "{}/api/models/{}/revision/{}?blobs=true",
        cfg.endpoint,
        repo.repo_id(),
        repo.revision.replace('/', "%2F")
    );
    let uri = repo.to_string();
    let info: ModelInfo = with_retry(retry, "resolving", &uri, || async {
        let body = send(&client, &info_url, cfg, &uri)
            .await?
            .bytes()
            .await
            .map_err(transient)?;
        serde_json::from_slice(&body).map_err(|e| {
            Attempt::Permanent(StorageError::InvalidManifest {
                uri: uri.clone(),
                reason: format!("unexpected hub answer: {e}"),
            })
        })
    })
    .await?;
    if info.sha.len() != 40 || !info.sha.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(StorageError::InvalidManifest {
            uri,
            reason: format!("hub returned commit {:?}, not a 40-digit hex sha", info.sha),
        });
    }
    let snapshot = base.join("snapshots").join(&info.sha);
    let info = &info;
    let client = &client;
    let dir = fill_once(cache_root, &format!("hf-{}", info.sha), &snapshot, |tmp| async move {
        for sibling in &info.siblings {
            let file = &sibling.rfilename;
            if file.split('/').any(|s| s.starts_with('.')) {
                continue; // .gitattributes and friends: repository metadata, not model files.
            }
            validate_relative_path("Hugging Face file name", file)?;
            let expected = match &sibling.lfs {
                Some(lfs) => Some(Sha256Digest::parse(
                    "Hugging Face LFS sha256",
                    &format!("sha256:{}", lfs.sha256),
                )?),
                None => None,
            };
            let url = format!("{}/{}/resolve/{}/{file}", cfg.endpoint, repo.repo_id(), info.sha);
            let file_uri = format!("{}/{file}", repo);
            let dest = tmp.join(file);
            if let Some(parent) = dest.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| StorageError::io("creating", parent, e))?;
            }
            with_retry(retry, "downloading", &file_uri, || {
                download_file(client, &url, cfg, &file_uri, &dest, expected.as_ref(), progress)
            })
            .await?;
        }
        Ok(())
    })
    .await?;
    write_ref(&ref_path, &info.sha).await?;
    Ok(dir)
}

/// Records revision → commit through temp file + rename so readers never see half a sha.
async fn write_ref(ref_path: &Path, sha: &str) -> Result<()> {
    if let Some(parent) = ref_path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| StorageError::io("creating", parent, e))?;
    }
    let tmp = temp_sibling(ref_path);
    tokio::fs::write(&tmp, sha)
        .await
        .map_err(|e| StorageError::io("writing", &tmp, e))?;
    tokio::fs::rename(&tmp, ref_path)
        .await
        .map_err(|e| StorageError::io("renaming into place at", ref_path, e))
}

fn transient(e: reqwest::Error) -> Attempt {
    Attempt::Transient(Box::new(e))
}

/// Sends a GET with the token (if any) and classifies failures by status.
async fn send(
    client: &reqwest::Client,
    url: &str,
    cfg: &HfConfig,
    uri: &str,
) -> std::result::Result<reqwest::Response, Attempt> {
    let mut req = client.get(url);
    if let Some(token) = &cfg.token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.map_err(transient)?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let code = status.as_u16();
    if code == 429 || status.is_server_error() {
        return Err(Attempt::Transient(format!("{url} answered HTTP {status}").into()));
    }
    let hint = match code {
        401 | 403 => "; the repository may be gated or private: set HF_TOKEN to a token with access",
        404 => "; check the repository name and revision",
        _ => "",
    };
    Err(Attempt::Permanent(StorageError::Transfer {
        operation: "requesting",
        uri: uri.to_string(),
        attempts: 1,
        source: format!("{url} answered HTTP {status}{hint}").into(),
    }))
}

async fn download_file(
    client: &reqwest::Client,
    url: &str,
    cfg: &HfConfig,
    uri: &str,
    dest: &Path,
    expected: Option<&Sha256Digest>,
    progress: Option<&ProgressFn>,
) -> std::result::Result<(), Attempt> {
    let resp = send(client, url, cfg, uri).await?;
    let mut tracker = Tracker::new(uri, resp.content_length(), progress);
    let tmp = temp_sibling(dest);
    let result = async {
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| StorageError::io("creating", &tmp, e))?;
        let mut hasher = Sha256::new();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(transient)?;
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| StorageError::io("writing", &tmp, e))?;
            tracker.advance(chunk.len() as u64);
        }
        file.sync_all()
            .await
            .map_err(|e| StorageError::io("flushing", &tmp, e))?;
        if let Some(expected) = expected {
            expected.verify(uri, &Sha256Digest::from_hasher(hasher))?;
        }
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|e| StorageError::io("renaming into place at", dest, e))?;
        tracker.finish();
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}
