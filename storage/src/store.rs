//! `Storage`: one bucket/prefix (or local directory) behind `object_store`, with the few
//! operations the cache and registry need, each retried and each error naming the object URI.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::credentials::Credentials;
use crate::digest::Sha256Digest;
use crate::error::{Result, StorageError};
use crate::fs::temp_sibling;
use crate::progress::{ProgressFn, Tracker};
use crate::retry::{classify, with_retry, Attempt, RetryPolicy};
use crate::uri::StorageUri;

/// Metadata of one stored object; `key` is relative to the storage root.
#[derive(Clone, Debug)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
    pub last_modified: DateTime<Utc>,
}

/// Result of a create-only write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The object did not exist and now holds our bytes.
    Created,
    /// Somebody else's object was already there; ours was not written.
    AlreadyExists,
    /// The backend cannot do create-only writes (e.g. S3 with `AWS_CONDITIONAL_PUT=disabled`).
    Unsupported,
}

/// A storage root: `s3://bucket/prefix`, `gs://...`, `az://...` or `file:///dir`.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    root: StorageUri,
    prefix: Vec<String>,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Storage {
    // The store's own Debug may include its configuration; only the URI is shown here.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("root", &self.root.to_string()).finish()
    }
}

impl Storage {
    /// Opens the storage root named by `uri` with `credentials` (see [`Credentials`] for keys).
    /// `file://` directories are created if missing. `hf://` is not a storage root: use
    /// [`crate::Cache::download_model`] for model sources.
    pub fn from_uri(uri: &str, credentials: &Credentials) -> Result<Self> {
        let parsed = StorageUri::parse(uri)?;
        let build_err = |e: object_store::Error| StorageError::InvalidUri {
            uri: uri.to_string(),
            reason: format!("cannot configure the store: {e}"),
        };
        // No retries inside object_store: ours (RetryPolicy) is the only layer.
        let no_retry = RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        };
        let (store, prefix): (Arc<dyn ObjectStore>, Vec<String>) = match &parsed {
            StorageUri::S3 { bucket, prefix } => {
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_retry(no_retry);
                for (k, v) in credentials.with_prefix("AWS_") {
                    match k.to_ascii_lowercase().parse() {
                        Ok(key) => b = b.with_config(key, v),
                        // Only the key name is logged, never the value.
                        Err(_) => tracing::debug!(key = k, "not an object_store S3 setting; not used"),
                    }
                }
                (Arc::new(b.build().map_err(build_err)?), prefix.clone())
            }
            StorageUri::Gcs { bucket, prefix } => {
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::new()
                    .with_bucket_name(bucket)
                    .with_retry(no_retry);
                for (k, v) in credentials.with_prefix("GOOGLE_") {
                    match k.to_ascii_lowercase().parse() {
                        Ok(key) => b = b.with_config(key, v),
                        Err(_) => tracing::debug!(key = k, "not an object_store GCS setting; not used"),
                    }
                }
                (Arc::new(b.build().map_err(build_err)?), prefix.clone())
            }
            StorageUri::Azure { container, prefix } => {
                let mut b = object_store::azure::MicrosoftAzureBuilder::new()
                    .with_container_name(container)
                    .with_retry(no_retry);
                for (k, v) in credentials.with_prefix("AZURE_") {
                    match k.to_ascii_lowercase().parse() {
                        Ok(key) => b = b.with_config(key, v),
                        Err(_) => tracing::debug!(key = k, "not an object_store Azure setting; not used"),
                    }
                }
                (Arc::new(b.build().map_err(build_err)?), prefix.clone())
            }
            StorageUri::File { path } => {
                std::fs::create_dir_all(path).map_err(|e| StorageError::io("creating storage directory", path, e))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(path)
                    .map_err(build_err)?
                    .with_automatic_cleanup(true);
                (Arc::new(fs), Vec::new())
            }
            StorageUri::HuggingFace(_) => {
                return Err(StorageError::InvalidUri {
                    uri: uri.to_string(),
                    reason: "hf:// is a read-only model source, not a storage root; use it as a base model URI".into(),
                })
            }
        };
        Ok(Self {
            store,
            root: parsed,
            prefix,
            retry: RetryPolicy::default(),
        })
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The storage root URI.
    pub fn uri(&self) -> String {
        self.root.to_string()
    }

    /// The full URI of an object below the root.
    pub fn object_uri(&self, rel: &str) -> String {
        if rel.is_empty() {
            return self.root.to_string();
        }
        format!("{}/{}", self.root.to_string().trim_end_matches('/'), rel)
    }

    /// The object_store key for `rel`. Every caller builds `rel` from validated segments;
    /// `Key::parse` re-checks (it rejects `.`/`..` and empty segments) as a second line.
    fn key(&self, rel: &str) -> Result<Key> {
        let full = self
            .prefix
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(rel).filter(|r| !r.is_empty()))
            .collect::<Vec<_>>()
            .join("/");
        Key::parse(&full).map_err(|e| StorageError::invalid_name("object key", rel, e.to_string()))
    }

    fn relative(&self, key: &Key) -> String {
        let parts: Vec<_> = key
            .parts()
            .skip(self.prefix.len())
            .map(|p| p.as_ref().to_string())
            .collect();
        parts.join("/")
    }

    fn info(&self, meta: object_store::ObjectMeta) -> ObjectInfo {
        ObjectInfo {
            key: self.relative(&meta.location),
            size: meta.size,
            etag: meta.e_tag,
            last_modified: meta.last_modified,
        }
    }

    /// Reads a whole (small) object.
    pub async fn get_bytes(&self, rel: &str) -> Result<Bytes> {
        let key = self.key(rel)?;
        let uri = self.object_uri(rel);
        with_retry(&self.retry, "reading", &uri, || async {
            let got = self.store.get(&key).await.map_err(|e| classify("reading", &uri, e))?;
            got.bytes().await.map_err(|e| classify("reading", &uri, e))
        })
        .await
    }

    /// Object metadata.
    pub async fn head(&self, rel: &str) -> Result<ObjectInfo> {
        let key = self.key(rel)?;
        let uri = self.object_uri(rel);
        let meta = with_retry(&self.retry, "inspecting", &uri, || async {
            self.store.head(&key).await.map_err(|e| classify("inspecting", &uri, e))
        })
        .await?;
        Ok(self.info(meta))
    }

    /// Writes (or overwrites) a small object.
    pub async fn put_bytes(&self, rel: &str, bytes: Bytes) -> Result<()> {
        let key = self.key(rel)?;
        let uri = self.object_uri(rel);
        with_retry(&self.retry, "writing", &uri, || async {
            self.store
                .put(&key, PutPayload::from_bytes(bytes.clone()))
                .await
                .map(|_| ())
                .map_err(|e| classify("writing", &uri, e))
        })
        .await
    }

    /// Writes `bytes` only if nothing exists at `rel` (S3/MinIO `If-None-Match: *`, GCS
    /// generation 0, Azure `If-None-Match`, local hard-link-no-replace).
    pub async fn create(&self, rel: &str, bytes: Bytes) -> Result<CreateOutcome> {
        let key = self.key(rel)?;
        let uri = self.object_uri(rel);
        let result = with_retry(&self.retry, "creating", &uri, || async {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match self
                .store
                .put_opts(&key, PutPayload::from_bytes(bytes.clone()), opts)
                .await
            {
                Ok(_) => Ok(CreateOutcome::Created),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(CreateOutcome::AlreadyExists),
                Err(object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. }) => {
                    Ok(CreateOutcome::Unsupported)
                }
                Err(e) => Err(classify("creating", &uri, e)),
            }
        })
        .await;
        result
    }

    /// Uploads a local file. Small files go in one request; large ones as a multipart upload,
    /// which object_store aborts if it is dropped unfinished. A failure retries the whole file.
    pub async fn put_file(&self, rel: &str, path: &Path, progress: Option<&ProgressFn>) -> Result<()> {
        const SINGLE_PUT_LIMIT: u64 = 32 << 20;
        const PART_SIZE: usize = 16 << 20;
        let key = self.key(rel)?;
        let uri = self.object_uri(rel);
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|e| StorageError::io("reading metadata of", path, e))?
            .len();
        with_retry(&self.retry, "uploading", &uri, || async {
            let mut tracker = Tracker::new(&uri, Some(size), progress);
            if size <= SINGLE_PUT_LIMIT {
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|e| StorageError::io("reading", path, e))?;
                self.store
                    .put(&key, PutPayload::from(bytes))
                    .await
                    .map_err(|e| classify("uploading", &uri, e))?;
                tracker.advance(size);
            } else {
                let upload = self
                    .store
                    .put_multipart(&key)
                    .await
                    .map_err(|e| classify("uploading", &uri, e))?;
                let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
                let mut file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| StorageError::io("opening", path, e))?;
                let mut buf = vec![0u8; PART_SIZE];
                loop {
                    let n = tokio::io::AsyncReadExt::read(&mut file, &mut buf)
                        .await
                        .map_err(|e| StorageError::io("reading", path, e))?;
                    if n == 0 {
                        break;
                    }
                    writer
                        .wait_for_capacity(4)
                        .await
                        .map_err(|e| classify("uploading", &uri, e))?;
                    writer.write(&buf[..n]);
                    tracker.advance(n as u64);
                }
                writer.finish().await.map_err(|e| classify("uploading", &uri, e))?;
            }
            tracker.finish();
            Ok(())
        })
        .await
    }

    /// Lists every object below `rel_prefix` (segment-wise: `a/b` does not match `a/bc`).
    pub async fn list(&self, rel_prefix: &str) -> Result<Vec<ObjectInfo>> {
        let key = self.key(rel_prefix)?;
        let uri = self.object_uri(rel_prefix);
        let metas: Vec<object_store::ObjectMeta> = with_retry(&self.retry, "listing", &uri, || async {
            self.store
                .list(Some(&key))
                .try_collect()
                .await
                .map_err(|e| classify("listing", &uri, e))
        })
        .await?;
        Ok(metas.into_iter().map(|m| self.info(m)).collect())
    }

    /// The immediate "directories" below `rel_prefix` (their last segment only).
    pub async fn list_dirs(&self, rel_prefix: &str) -> Result<Vec<String>> {
        let key = self.key(rel_prefix)?;
        let uri = self.object_uri(rel_prefix);
        let listed = with_retry(&self.retry, "listing", &uri, || async {
            self.store
                .list_with_delimiter(Some(&key))
                .await
                .map_err(|e| classify("listing", &uri, e))
        })
        .await?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// Deletes one object; a missing object is not an error (deletes are idempotent).
    pub async fn delete(&self, rel: &str) -> Result<()> {
        let key = self.key(rel)?;
        let uri = self.object_uri(rel);
        with_retry(&self.retry, "deleting", &uri, || async {
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(classify("deleting", &uri, e)),
            }
        })
        .await
    }

    /// Downloads `rel` to `dest` through a temporary sibling file that is renamed into place
    /// only after the bytes are complete, flushed and (if `expected` is given) verified, so no
    /// partial or corrupt file is ever visible at `dest`. Returns the object's metadata and
    /// the digest of what was written.
    pub async fn download_to(
        &self,
        rel: &str,
        dest: &Path,
        expected: Option<&Sha256Digest>,
        progress: Option<&ProgressFn>,
    ) -> Result<(ObjectInfo, Sha256Digest)> {
        let key = self.key(rel)?;
        let uri = self.object_uri(rel);
        with_retry(&self.retry, "downloading", &uri, || async {
            let tmp = temp_sibling(dest);
            let result = self.download_attempt(&key, &uri, &tmp, dest, expected, progress).await;
            if result.is_err() {
                // Best effort: the temp name is unique, so a leftover only wastes space.
                let _ = tokio::fs::remove_file(&tmp).await;
            }
            result
        })
        .await
    }

    async fn download_attempt(
        &self,
        key: &Key,
        uri: &str,
        tmp: &Path,
        dest: &Path,
        expected: Option<&Sha256Digest>,
        progress: Option<&ProgressFn>,
    ) -> std::result::Result<(ObjectInfo, Sha256Digest), Attempt> {
        let got = self.store.get(key).await.map_err(|e| classify("downloading", uri, e))?;
        let info = self.info(got.meta.clone());
        let mut tracker = Tracker::new(uri, Some(info.size), progress);
        let mut file = tokio::fs::File::create(tmp)
            .await
            .map_err(|e| StorageError::io("creating", tmp, e))?;
        let mut hasher = Sha256::new();
        let mut stream = got.into_stream();
        // A stream error mid-body (connection reset) is Generic, hence retried from scratch.
        while let Some(chunk) = stream.try_next().await.map_err(|e| classify("downloading", uri, e))? {
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| StorageError::io("writing", tmp, e))?;
            tracker.advance(chunk.len() as u64);
        }
        file.sync_all()
            .await
            .map_err(|e| StorageError::io("flushing", tmp, e))?;
        drop(file);
        let actual = Sha256Digest::from_hasher(hasher);
        if let Some(expected) = expected {
            expected.verify(uri, &actual)?;
        }
        tokio::fs::rename(tmp, dest)
            .await
            .map_err(|e| StorageError::io("renaming download into place at", dest, e))?;
        tracker.finish();
        Ok((info, actual))
    }
}
