//! Finding adapter files and reading them against the base model. A source is either a
//! registry reference (`name@N`, `name@latest`, `name@sha256:…`, resolved in `--registry`) or a
//! location: `s3://`, `gs://`, `az://`, `file://` (through kubetune-storage's cache) or a local
//! directory path. A location must hold an adapter version with its registry manifest (as the
//! registry stores it, or as `kubetune-adapters pull` writes it): its files are verified
//! against that manifest, and raw PEFT output with no manifest is refused.
//!
//! Limits: a load runs for at most `--adapter-load-timeout-s`; a registry version whose
//! manifest lists more than `--max-adapter-download-mb` of files, or whose
//! `adapter_config.json` (fetched alone first and checked against the manifest) asks for a
//! rank above `--max-adapter-rank` or names another base model, is refused before its weights
//! are downloaded; with `--adapter-cache-max-mb` the adapter entries of the download cache are
//! trimmed after each load, least recently used first.

use crate::adapters::{AdapterSet, LoadedAdapter};
use crate::error::ApiError;
use kubetune_model::{peft, Config};
use kubetune_storage::{
    AdapterRef, Cache, Credentials, Registry, ResolvedAdapter, Sha256Digest, Storage, StorageError,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What to load, as the admin API and the adapters file state it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub name: String,
    pub source: String,
    /// When set, the registry version the source must resolve to.
    pub version: Option<u32>,
    /// When set, the registry manifest digest the source must resolve to.
    pub digest: Option<String>,
}

pub struct AdapterLoader {
    pub config: Config,
    /// Names the base model goes by; an adapter naming another base is refused.
    pub base_names: Vec<String>,
    pub registry: Option<Registry>,
    pub cache: Option<Cache>,
    pub credentials: Credentials,
    pub device: candle_core::Device,
    pub limits: LoadLimits,
    /// Loads hold it shared from download to read; trimming the cache holds it exclusively,
    /// so no entry is deleted between its download and its read.
    pub cache_guard: tokio::sync::RwLock<()>,
}

/// Limits on one load and on the download cache.
#[derive(Debug, Clone)]
pub struct LoadLimits {
    /// The longest a load may take, download included (`--adapter-load-timeout-s`).
    pub timeout: Duration,
    /// The most bytes one adapter version may download (`--max-adapter-download-mb`).
    pub max_download_bytes: u64,
    /// The most bytes the cache's adapter entries may take together (`--adapter-cache-max-mb`);
    /// None: no cap.
    pub cache_max_bytes: Option<u64>,
}

impl Default for LoadLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            max_download_bytes: 1 << 30,
            cache_max_bytes: None,
        }
    }
}

fn storage_err(e: StorageError) -> ApiError {
    match e {
        StorageError::AdapterNotFound { .. } | StorageError::NotFound { .. } => ApiError::AdapterRejected {
            message: e.to_string(),
            param: Some("source".into()),
        },
        StorageError::InvalidName { .. } | StorageError::InvalidUri { .. } => ApiError::AdapterRejected {
            message: e.to_string(),
            param: Some("source".into()),
        },
        other => ApiError::Storage(other.to_string()),
    }
}

fn rejected(message: String) -> ApiError {
    ApiError::AdapterRejected {
        message,
        param: Some("source".into()),
    }
}

/// Refuses a request whose version or digest is not the manifest's, naming the field: the
/// operator verifies rollouts by what pods report, so a pod must never report a claim.
fn check_claims(spec: &AdapterSpec, version: u32, digest: &str) -> Result<(), ApiError> {
    let source = &spec.source;
    if let Some(v) = spec.version.filter(|v| *v != version) {
        return Err(ApiError::AdapterRejected {
            message: format!("`{source}` resolves to version {version}, but version {v} was asked for"),
            param: Some("version".into()),
        });
    }
    if let Some(d) = spec.digest.as_ref().filter(|d| *d != digest) {
        return Err(ApiError::AdapterRejected {
            message: format!("`{source}` (version {version}) has manifest digest {digest}, but {d} was asked for"),
            param: Some("digest".into()),
        });
    }
    Ok(())
}

/// Comparable form of a model name or URI: `hf://org/m`, `org/m` and `file:///x/` all say the
/// same thing as `org/m` and `/x`.
fn normalize(name: &str) -> &str {
    let n = name
        .strip_prefix("hf://")
        .or_else(|| name.strip_prefix("file://"))
        .unwrap_or(name);
    n.trim_end_matches('/')
}

impl AdapterLoader {
    /// Downloads (if needed) and reads the adapter, checking it against the base and the caps.
    /// Nothing is installed here: the caller swaps it in atomically.
    pub async fn load(&self, spec: &AdapterSpec, caps: &AdapterSet) -> Result<LoadedAdapter, ApiError> {
        kubetune_storage::validate_adapter_name(&spec.name).map_err(|e| ApiError::AdapterRejected {
            message: e.to_string(),
            param: Some("name".into()),
        })?;
        let loaded = self.timed(spec, async {
            let _shared = self.cache_guard.read().await;
            let (dir, version, digest) = self.locate(spec, caps).await?;
            self.read(spec, &dir, version, digest, caps).await
        });
        let loaded = loaded.await?;
        self.trim_cache().await;
        Ok(loaded)
    }

    /// Loads a version already resolved in the registry (an on-demand load), under `name`.
    pub async fn load_resolved(
        &self,
        name: &str,
        resolved: &ResolvedAdapter,
        caps: &AdapterSet,
    ) -> Result<LoadedAdapter, ApiError> {
        let spec = AdapterSpec {
            name: name.to_string(),
            source: format!("{}@{}", resolved.name, resolved.version),
            version: Some(resolved.version),
            digest: Some(resolved.digest.to_string()),
        };
        let loaded = self.timed(&spec, async {
            let _shared = self.cache_guard.read().await;
            let registry = self.registry(&spec.source)?;
            let dir = self.fetch_resolved(&spec, registry, resolved, caps).await?;
            let digest = resolved.digest.to_string();
            self.read(&spec, &dir, Some(resolved.version), Some(digest), caps).await
        });
        let loaded = loaded.await?;
        self.trim_cache().await;
        Ok(loaded)
    }

    async fn timed<T>(
        &self,
        spec: &AdapterSpec,
        load: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout(self.limits.timeout, load).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::Storage(format!(
                "loading adapter `{}` from `{}` took longer than {} s (--adapter-load-timeout-s) and was abandoned",
                spec.name,
                spec.source,
                self.limits.timeout.as_secs()
            ))),
        }
    }

    pub fn registry(&self, source: &str) -> Result<&Registry, ApiError> {
        self.registry.as_ref().ok_or_else(|| {
            rejected(format!(
                "source `{source}` is a registry reference but no --registry is configured"
            ))
        })
    }

    /// Checks a resolved version against the download limit and its adapter_config.json
    /// against the caps and the base model, then downloads it into the cache. The config is a
    /// few hundred bytes, fetched alone and checked against the manifest, so an adapter that
    /// would be refused costs no weights download.
    async fn fetch_resolved(
        &self,
        spec: &AdapterSpec,
        registry: &Registry,
        resolved: &ResolvedAdapter,
        caps: &AdapterSet,
    ) -> Result<PathBuf, ApiError> {
        let cache = self.cache(&spec.source)?;
        let total: u64 = resolved.manifest.files.values().map(|f| f.size).sum();
        if total > self.limits.max_download_bytes {
            return Err(rejected(format!(
                "`{}` (version {}) is {total} bytes according to its manifest, more than this server's adapter download limit of {} bytes (--max-adapter-download-mb); nothing was downloaded",
                spec.source, resolved.version, self.limits.max_download_bytes
            )));
        }
        let entry = resolved.manifest.files.get(peft::ADAPTER_CONFIG).ok_or_else(|| {
            rejected(format!(
                "`{}` (version {}) has no {} in its manifest",
                spec.source,
                resolved.version,
                peft::ADAPTER_CONFIG
            ))
        })?;
        let rel = format!(
            "adapters/{}/v{}/{}",
            resolved.name,
            resolved.version,
            peft::ADAPTER_CONFIG
        );
        let bytes = registry.storage().get_bytes(&rel).await.map_err(storage_err)?;
        entry
            .sha256
            .verify(&registry.storage().object_uri(&rel), &Sha256Digest::of(&bytes))
            .map_err(storage_err)?;
        let text = String::from_utf8_lossy(&bytes);
        self.check_config(spec, &rel, &text, caps)?;
        let dir = cache.fetch_adapter(registry, resolved).await.map_err(storage_err)?;
        touch(&dir).await;
        Ok(dir)
    }

    /// Deletes the least recently used adapter entries of the download cache until they take
    /// no more than `--adapter-cache-max-mb`. Entries are directories under `entries/` holding a
    /// manifest.json (models have none); last use is the manifest's modification time, which
    /// every load sets. Failures are logged: a cache over its cap must not fail a load.
    async fn trim_cache(&self) {
        let (Some(cap), Some(cache)) = (self.limits.cache_max_bytes, self.cache.as_ref()) else {
            return;
        };
        let _exclusive = self.cache_guard.write().await;
        let entries = cache.root().join("entries");
        let result = tokio::task::spawn_blocking(move || trim_entries(&entries, cap)).await;
        match result {
            Ok(Ok(removed)) if !removed.is_empty() => {
                tracing::info!(?removed, cap_bytes = cap, "adapter cache trimmed")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "adapter cache could not be trimmed"),
            Err(e) => tracing::warn!(error = %e, "adapter cache could not be trimmed"),
        }
    }

    /// Where the files are, with the version and digest of the manifest they were verified
    /// against. Every source is verified: a registry reference as the cache fetches it, a
    /// directory named directly against the manifest.json in it, so the version and digest a
    /// request claims are checked against what is actually loaded.
    async fn locate(
        &self,
        spec: &AdapterSpec,
        caps: &AdapterSet,
    ) -> Result<(PathBuf, Option<u32>, Option<String>), ApiError> {
        let source = spec.source.as_str();
        if source.starts_with('/') {
            return self.verified(spec, PathBuf::from(source)).await;
        }
        if source.contains("://") {
            let storage = Storage::from_uri(source, &self.credentials).map_err(storage_err)?;
            let dir = self
                .cache(source)?
                .download_prefix(&storage, "")
                .await
                .map_err(storage_err)?;
            return self.verified(spec, dir).await;
        }
        let reference: AdapterRef = source.parse().map_err(|e: StorageError| rejected(e.to_string()))?;
        let registry = self.registry(source)?;
        self.cache(source)?;
        let resolved = registry.resolve(&reference).await.map_err(storage_err)?;
        let digest = resolved.digest.to_string();
        check_claims(spec, resolved.version, &digest)?;
        let dir = self.fetch_resolved(spec, registry, &resolved, caps).await?;
        Ok((dir, Some(resolved.version), Some(digest)))
    }

    fn cache(&self, source: &str) -> Result<&Cache, ApiError> {
        self.cache
            .as_ref()
            .ok_or_else(|| rejected(format!("source `{source}` needs a download cache (--cache-dir)")))
    }

    /// Checks a directory named directly against its manifest, then the request's claims
    /// against that manifest.
    async fn verified(
        &self,
        spec: &AdapterSpec,
        dir: PathBuf,
    ) -> Result<(PathBuf, Option<u32>, Option<String>), ApiError> {
        let verified = kubetune_storage::verify_version_dir(&dir)
            .await
            .map_err(|e| rejected(format!("source `{}` cannot be verified: {e}", spec.source)))?;
        let digest = verified.digest.to_string();
        check_claims(spec, verified.manifest.version, &digest)?;
        Ok((dir, Some(verified.manifest.version), Some(digest)))
    }

    /// The checks adapter_config.json alone allows: rank cap and base model.
    fn check_config(&self, spec: &AdapterSpec, path: &str, text: &str, caps: &AdapterSet) -> Result<(), ApiError> {
        let peft_config: peft::PeftConfig = serde_json::from_str(text).map_err(|e| rejected(format!("{path}: {e}")))?;
        caps.check_rank(peft_config.r)?;
        if let Some(base) = peft_config.base_model_name_or_path.as_deref().filter(|b| !b.is_empty()) {
            if !self.base_names.iter().any(|n| normalize(n) == normalize(base)) {
                return Err(rejected(format!(
                    "adapter `{}` was trained on base model `{base}`, but this server serves {:?} (add an alias with --base-model-alias if they are the same model)",
                    spec.name, self.base_names
                )));
            }
        }
        Ok(())
    }

    async fn read(
        &self,
        spec: &AdapterSpec,
        dir: &Path,
        version: Option<u32>,
        digest: Option<String>,
        caps: &AdapterSet,
    ) -> Result<LoadedAdapter, ApiError> {
        let config_path = dir.join(peft::ADAPTER_CONFIG);
        let text = tokio::fs::read_to_string(&config_path)
            .await
            .map_err(|e| rejected(format!("{}: {e}", config_path.display())))?;
        // Cheap checks first, so a wrong or oversized adapter costs no tensor reads.
        self.check_config(spec, &config_path.display().to_string(), &text, caps)?;
        let (dir, config, device) = (dir.to_path_buf(), self.config.clone(), self.device.clone());
        // Reading safetensors and checking shapes is blocking work.
        let (_, weights) = tokio::task::spawn_blocking(move || peft::load(&dir, &config, &device))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| rejected(format!("adapter `{}` does not fit the base model: {e}", spec.name)))?;
        let bytes = weights
            .pairs()
            .map(|(_, p)| (p.a.elem_count() + p.b.elem_count()) * 4)
            .sum();
        Ok(LoadedAdapter {
            name: spec.name.clone(),
            version,
            digest,
            source: spec.source.clone(),
            loaded_at: crate::api::unix_now(),
            weights,
            bytes,
            released: Default::default(),
        })
    }
}

/// Marks a cache entry as just used (its manifest's modification time), for [`trim_entries`].
async fn touch(dir: &Path) {
    let manifest = dir.join(kubetune_storage::MANIFEST_FILE);
    let _ = tokio::task::spawn_blocking(move || {
        std::fs::File::options()
            .write(true)
            .open(&manifest)
            .and_then(|f| f.set_modified(SystemTime::now()))
    })
    .await;
}

/// Total size of the files under `dir`.
fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// Removes the adapter entries under `entries` least recently used first until the rest take
/// at most `cap` bytes; returns the removed directories.
fn trim_entries(entries: &Path, cap: u64) -> std::io::Result<Vec<PathBuf>> {
    let mut adapters = Vec::new();
    for entry in std::fs::read_dir(entries)? {
        let dir = entry?.path();
        let manifest = dir.join(kubetune_storage::MANIFEST_FILE);
        let Ok(meta) = std::fs::metadata(&manifest) else {
            continue;
        };
        let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        adapters.push((used, dir_bytes(&dir)?, dir));
    }
    adapters.sort();
    let mut total: u64 = adapters.iter().map(|(_, b, _)| b).sum();
    let mut removed = Vec::new();
    for (_, bytes, dir) in adapters {
        if total <= cap {
            break;
        }
        std::fs::remove_dir_all(&dir)?;
        total -= bytes;
        removed.push(dir);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(entries: &Path, name: &str, bytes: usize, used: u64) -> PathBuf {
        let dir = entries.join(name);
        std::fs::create_dir_all(&dir).expect("entry");
        std::fs::write(dir.join("adapter_model.safetensors"), vec![0u8; bytes]).expect("weights");
        let manifest = dir.join(kubetune_storage::MANIFEST_FILE);
        std::fs::write(&manifest, b"{}").expect("manifest");
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + used);
        std::fs::File::options()
            .write(true)
            .open(&manifest)
            .and_then(|f| f.set_modified(at))
            .expect("mtime");
        dir
    }

    #[test]
    fn the_adapter_cache_is_trimmed_least_recently_used_first_and_model_entries_are_left_alone() {
        let root = tempfile::tempdir().expect("temp dir");
        let entries = root.path().join("entries");
        let old = entry(&entries, "old", 1000, 1);
        let middle = entry(&entries, "middle", 1000, 2);
        let new = entry(&entries, "new", 1000, 3);
        // A model download: no manifest.json, never counted or deleted.
        let model = entries.join("model");
        std::fs::create_dir_all(&model).expect("model");
        std::fs::write(model.join("model.safetensors"), vec![0u8; 10_000]).expect("model weights");

        assert!(
            trim_entries(&entries, 3 * 1002).expect("trim").is_empty(),
            "under the cap"
        );
        let removed = trim_entries(&entries, 1500).expect("trim");
        assert_eq!(removed, vec![old.clone(), middle.clone()]);
        assert!(!old.exists() && !middle.exists() && new.exists() && model.exists());
        // A cap below one entry leaves nothing: the adapter is in memory by then.
        assert_eq!(trim_entries(&entries, 10).expect("trim"), vec![new.clone()]);
        assert!(model.join("model.safetensors").exists());
    }
}
