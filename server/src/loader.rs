//! Finding adapter files and reading them against the base model. A source is either a
//! registry reference (`name@N`, `name@latest`, `name@sha256:…`, resolved in `--registry`) or a
//! location: `s3://`, `gs://`, `az://`, `file://` (through kubetune-storage's cache) or a local
//! directory path. A location must hold an adapter version with its registry manifest (as the
//! registry stores it, or as `kubetune-adapters pull` writes it): its files are verified
//! against that manifest, and raw PEFT output with no manifest is refused.

use crate::adapters::{AdapterSet, LoadedAdapter};
use crate::error::ApiError;
use kubetune_model::{peft, Config};
use kubetune_storage::{AdapterRef, Cache, Credentials, Registry, Storage, StorageError};
use std::path::{Path, PathBuf};

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
        let (dir, version, digest) = self.locate(spec).await?;
        self.read(spec, &dir, version, digest, caps).await
    }

    /// Where the files are, with the version and digest of the manifest they were verified
    /// against. Every source is verified: a registry reference as the cache fetches it, a
    /// directory named directly against the manifest.json in it, so the version and digest a
    /// request claims are checked against what is actually loaded.
    async fn locate(&self, spec: &AdapterSpec) -> Result<(PathBuf, Option<u32>, Option<String>), ApiError> {
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
        let registry = self.registry.as_ref().ok_or_else(|| {
            rejected(format!(
                "source `{source}` is a registry reference but no --registry is configured"
            ))
        })?;
        let cache = self.cache(source)?;
        let resolved = registry.resolve(&reference).await.map_err(storage_err)?;
        let digest = resolved.digest.to_string();
        check_claims(spec, resolved.version, &digest)?;
        let dir = cache.fetch_adapter(registry, &resolved).await.map_err(storage_err)?;
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
        let peft_config: peft::PeftConfig =
            serde_json::from_str(&text).map_err(|e| rejected(format!("{}: {e}", config_path.display())))?;
        // Cheap checks first, so a wrong or oversized adapter costs no tensor reads.
        caps.check_rank(peft_config.r)?;
        if let Some(base) = peft_config.base_model_name_or_path.as_deref().filter(|b| !b.is_empty()) {
            if !self.base_names.iter().any(|n| normalize(n) == normalize(base)) {
                return Err(rejected(format!(
                    "adapter `{}` was trained on base model `{base}`, but this server serves {:?} (add an alias with --base-model-alias if they are the same model)",
                    spec.name, self.base_names
                )));
            }
        }
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
        })
    }
}
