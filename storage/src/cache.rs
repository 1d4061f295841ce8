//! The local download cache. Entries are directories under `<root>/entries/<key>`, where the
//! key is a sha256 over the source URI and its version (ETag, digest or commit), so a changed
//! object gets a new entry instead of silently serving stale bytes.
//!
//! Concurrency: an entry is built in `<root>/tmp/` and renamed into place whole, so readers
//! see either nothing or a complete entry. Fillers of the same key serialise on an exclusive
//! file lock (`<root>/locks/<key>.lock`, flock), so the bytes are downloaded once even when
//! several processes start at the same moment; the lock dies with its process, so a crash
//! leaves no stuck lock, only a stray temp directory.

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::credentials::Credentials;
use crate::digest::Sha256Digest;
use crate::error::{Result, StorageError};
use crate::fs::{fill_once, lock_exclusive};
use crate::hf::{self, HfConfig};
use crate::names::validate_relative_path;
use crate::progress::ProgressFn;
use crate::registry::{Registry, ResolvedAdapter};
use crate::retry::RetryPolicy;
use crate::store::Storage;
use crate::uri::StorageUri;

/// A local cache directory.
#[derive(Clone)]
pub struct Cache {
    root: PathBuf,
    progress: Option<ProgressFn>,
    hf: HfConfig,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("root", &self.root)
            .field("hf", &self.hf)
            .finish()
    }
}

/// The cache key for `parts`: sha256 over NUL-separated parts (NUL cannot occur in URIs).
fn key_of(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

impl Cache {
    /// Opens (creating if needed) a cache at `root`. Hugging Face settings come from the
    /// environment (HF_ENDPOINT, HF_HUB_OFFLINE) and `HF_TOKEN` from [`Credentials::from_env`].
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for sub in ["entries", "locks", "tmp", "hf"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(|e| StorageError::io("creating cache directory", &dir, e))?;
        }
        Ok(Self {
            root,
            progress: None,
            hf: HfConfig::from_env(&Credentials::from_env())?,
            retry: RetryPolicy::default(),
        })
    }

    /// Reports byte progress of every download to `progress`.
    pub fn with_progress(mut self, progress: ProgressFn) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Replaces the Hugging Face settings.
    pub fn with_hf_config(mut self, hf: HfConfig) -> Self {
        self.hf = hf;
        self
    }

    /// Replaces the retry policy for Hugging Face downloads (stores carry their own).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Downloads one object into the cache and returns the local file path. The entry is keyed
    /// by the object URI and its ETag (or `expected` digest), and verified against `expected`.
    pub async fn download_object(
        &self,
        storage: &Storage,
        rel: &str,
        expected: Option<&Sha256Digest>,
    ) -> Result<PathBuf> {
        validate_relative_path("object path", rel)?;
        let uri = storage.object_uri(rel);
        let version = match expected {
            Some(d) => d.to_string(),
            None => {
                let info = storage.head(rel).await?;
                // Without an ETag, size + mtime is the best version marker the store offers.
                info.etag
                    .unwrap_or_else(|| format!("{}-{}", info.size, info.last_modified.to_rfc3339()))
            }
        };
        let key = key_of(&["object", &uri, &version]);
        let file_name = rel.rsplit('/').next().unwrap_or(rel).to_string();
        let entry = self.root.join("entries").join(&key);
        let progress = self.progress.clone();
        let dir = fill_once(&self.root, &key, &entry, |tmp| async move {
            storage
                .download_to(rel, &tmp.join(&file_name), expected, progress.as_ref())
                .await
                .map(|_| ())
        })
        .await?;
        Ok(dir.join(rel.rsplit('/').next().unwrap_or(rel)))
    }

    /// Downloads every object below `rel_prefix` into a cached directory tree and returns it.
    /// Hidden files (a segment starting with '.') are skipped: they are VCS or tool metadata,
    /// never model weights, and the name rules reject them.
    pub async fn download_prefix(&self, storage: &Storage, rel_prefix: &str) -> Result<PathBuf> {
        let uri = storage.object_uri(rel_prefix);
        let prefix = match rel_prefix.trim_end_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let mut objects = Vec::new();
        for obj in storage.list(rel_prefix).await? {
            let Some(rel) = obj.key.strip_prefix(&prefix) else {
                continue;
            };
            if rel.split('/').any(|s| s.starts_with('.')) {
                tracing::info!(key = %obj.key, "skipping hidden file");
                continue;
            }
            validate_relative_path("object path", rel)?;
            objects.push((rel.to_string(), obj));
        }
        if objects.is_empty() {
            return Err(StorageError::NotFound { uri });
        }
        objects.sort_by(|a, b| a.0.cmp(&b.0));
        let listing: Vec<String> = objects
            .iter()
            .map(|(rel, o)| format!("{rel} {} {}", o.size, o.etag.as_deref().unwrap_or("-")))
            .collect();
        let key = key_of(&["prefix", &uri, &listing.join("\n")]);
        let entry = self.root.join("entries").join(&key);
        let progress = self.progress.clone();
        fill_once(&self.root, &key, &entry, |tmp| async move {
            for (rel, obj) in &objects {
                let local = tmp.join(rel);
                if let Some(parent) = local.parent() {
                    tokio::fs::create_dir_all(parent)
                        .await
                        .map_err(|e| StorageError::io("creating", parent, e))?;
                }
                storage.download_to(&obj.key, &local, None, progress.as_ref()).await?;
            }
            Ok(())
        })
        .await
    }

    /// Makes a model available locally: `hf://` from the Hugging Face hub (honouring
    /// HF_HUB_OFFLINE), a `.gguf` object as that one file (the model crate imports it), anything
    /// else as a directory prefix of a store.
    pub async fn download_model(&self, uri: &str, credentials: &Credentials) -> Result<PathBuf> {
        match StorageUri::parse(uri)? {
            StorageUri::HuggingFace(repo) => {
                hf::download(&self.root, &repo, &self.hf, &self.retry, self.progress.as_ref()).await
            }
            _ if names_gguf_file(uri) => {
                let (parent, name) = uri.rsplit_once('/').expect("a parsed store URI has a path");
                let storage = Storage::from_uri(parent, credentials)?;
                self.download_object(&storage, name, None).await
            }
            _ => {
                let storage = Storage::from_uri(uri, credentials)?;
                self.download_prefix(&storage, "").await
            }
        }
    }

    /// Fetches an adapter version into the cache (keyed by its manifest digest, which pins
    /// every file's sha256) and returns the directory.
    pub async fn fetch_adapter(&self, registry: &Registry, adapter: &ResolvedAdapter) -> Result<PathBuf> {
        let key = key_of(&["adapter", adapter.digest.hex()]);
        let entry = self.root.join("entries").join(&key);
        if entry.exists() {
            return Ok(entry);
        }
        let lock_path = self.root.join("locks").join(format!("{key}.lock"));
        let _lock = lock_exclusive(lock_path).await?;
        if !entry.exists() {
            registry.fetch(adapter, &entry, self.progress.as_ref()).await?;
        }
        Ok(entry)
    }
}

/// True for a store URI whose last segment is a GGUF file name (llama.cpp's single-file format).
fn names_gguf_file(uri: &str) -> bool {
    let last = uri.rsplit('/').next().unwrap_or_default();
    last.len() > ".gguf".len() && last.to_ascii_lowercase().ends_with(".gguf")
}
