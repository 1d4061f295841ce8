//! The adapter registry: `<root>/adapters/<name>/v<N>/{PEFT files, manifest.json, .claim}`.
//!
//! Protocol, and why it is safe with many writers:
//! 1. **Claim** `v<N>/.claim` with a create-only put (S3/MinIO `If-None-Match: *`, GCS
//!    generation 0, Azure `If-None-Match`, local no-replace link). Exactly one publisher wins
//!    each N; losers try N+1. Claims are never deleted, so numbers are never reused, even after
//!    `delete` or `retain` (a version number always means the same bytes).
//! 2. **Upload** the files.
//! 3. **Manifest last**, also create-only. Readers only see versions with a manifest, so a
//!    crashed or in-progress publish is invisible; `sweep` later removes its files.
//!
//! Where the backend cannot do create-only puts (S3-compatible stores without conditional
//! writes, configured with `AWS_CONDITIONAL_PUT=disabled`), claims fall back to
//! write-then-read-back: this catches most collisions, but two publishers whose writes and
//! read-backs interleave exactly can both believe they own N, and the later manifest wins.
//! A warning is logged each time the fallback is used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use chrono::Utc;

use crate::digest::Sha256Digest;
use crate::error::{Result, StorageError};
use crate::fs::temp_sibling;
use crate::manifest::validate_file_path;
use crate::manifest::{FileEntry, JobRef, Manifest, Metrics, SourceRef, CARD_FILE, MANIFEST_FILE, MANIFEST_SCHEMA};
use crate::names::validate_adapter_name;
use crate::progress::ProgressFn;
use crate::store::{CreateOutcome, ObjectInfo, Storage};
use crate::{AdapterRef, VersionSelector};

const CLAIM_FILE: &str = ".claim";
/// PEFT cannot load an adapter without it, so publishing one without it is a mistake.
const REQUIRED_FILE: &str = "adapter_config.json";

/// Registry tuning.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// How many version numbers a publisher tries before giving up.
    pub max_claim_attempts: u32,
    /// Unfinished versions whose newest object is older than this are removed by `sweep`.
    /// It must exceed the longest upload, or `sweep` could remove a live publish's files.
    pub stale_after: chrono::Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            max_claim_attempts: 1000,
            stale_after: chrono::Duration::hours(6),
        }
    }
}

/// What to publish.
#[derive(Clone, Debug)]
pub struct PublishRequest {
    pub name: String,
    /// Local directory with the PEFT output (adapter_config.json, adapter_model.safetensors, ...).
    pub source_dir: PathBuf,
    pub base_model: SourceRef,
    pub dataset: SourceRef,
    pub hyperparameters: serde_json::Value,
    pub metrics: Metrics,
    pub job: Option<JobRef>,
}

/// A published version, resolved.
#[derive(Clone, Debug)]
pub struct ResolvedAdapter {
    pub name: String,
    pub version: u32,
    /// `sha256:` of the manifest bytes.
    pub digest: Sha256Digest,
    pub manifest: Manifest,
    /// The exact manifest bytes (re-serialising could change the digest).
    pub manifest_bytes: Bytes,
    /// URI of the version directory.
    pub uri: String,
}

/// The adapter registry on one storage root.
#[derive(Clone, Debug)]
pub struct Registry {
    storage: Storage,
    config: RegistryConfig,
}

fn version_dir(name: &str, version: u32) -> String {
    format!("adapters/{name}/v{version}")
}

/// `v<N>` with N ≥ 1 and no leading zeros; anything else is not a version directory.
fn parse_version(segment: &str) -> Option<u32> {
    let digits = segment.strip_prefix('v')?;
    if digits.is_empty() || digits.starts_with('0') || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Objects of one adapter grouped by version.
struct VersionObjects {
    has_manifest: bool,
    objects: Vec<ObjectInfo>,
}

impl Registry {
    /// Opens the registry rooted at `storage` (nothing is created until the first publish).
    pub fn open(storage: Storage) -> Self {
        Self::with_config(storage, RegistryConfig::default())
    }

    /// Opens with explicit tuning.
    pub fn with_config(storage: Storage, config: RegistryConfig) -> Self {
        Self { storage, config }
    }

    /// The underlying storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    fn not_found(&self, reference: impl ToString, reason: impl Into<String>) -> StorageError {
        StorageError::AdapterNotFound {
            registry: self.storage.uri(),
            reference: reference.to_string(),
            reason: reason.into(),
        }
    }

    /// Publishes `req.source_dir` as the next version of `req.name`.
    pub async fn publish(&self, req: &PublishRequest, progress: Option<&ProgressFn>) -> Result<ResolvedAdapter> {
        validate_adapter_name(&req.name)?;
        let files = collect_files(&req.source_dir)?;
        if !files.iter().any(|(rel, _)| rel == REQUIRED_FILE) {
            return Err(StorageError::invalid_name(
                "adapter source directory",
                &req.source_dir.display().to_string(),
                format!("has no {REQUIRED_FILE}; it must hold the PEFT output of a LoRA run"),
            ));
        }
        let mut entries = BTreeMap::new();
        for (rel, path) in &files {
            let size = std::fs::metadata(path)
                .map_err(|e| StorageError::io("reading metadata of", path, e))?
                .len();
            entries.insert(
                rel.clone(),
                FileEntry {
                    sha256: Sha256Digest::of_file(path).await?,
                    size,
                },
            );
        }

        let version = self.claim_version(&req.name).await?;
        let dir = version_dir(&req.name, version);
        tracing::info!(adapter = %req.name, version, files = files.len(), "publishing adapter");
        for (rel, path) in &files {
            self.storage.put_file(&format!("{dir}/{rel}"), path, progress).await?;
        }
        let manifest = Manifest {
            schema: MANIFEST_SCHEMA,
            name: req.name.clone(),
            version,
            files: entries,
            base_model: req.base_model.clone(),
            dataset: req.dataset.clone(),
            hyperparameters: req.hyperparameters.clone(),
            metrics: req.metrics.clone(),
            job: req.job.clone(),
            created_at: Utc::now(),
        };
        let bytes = Bytes::from(manifest.to_bytes()?);
        let manifest_rel = format!("{dir}/{MANIFEST_FILE}");
        match self.storage.create(&manifest_rel, bytes.clone()).await? {
            CreateOutcome::Created => {}
            CreateOutcome::AlreadyExists => {
                return Err(StorageError::AlreadyExists {
                    uri: self.storage.object_uri(&manifest_rel),
                })
            }
            CreateOutcome::Unsupported => self.storage.put_bytes(&manifest_rel, bytes.clone()).await?,
        }
        // A sweep that misjudged this publish as stale could have removed files before the
        // manifest landed; check, and withdraw the version rather than leave it broken.
        let present: Vec<String> = self.storage.list(&dir).await?.into_iter().map(|o| o.key).collect();
        if let Some(missing) = manifest.files.keys().find(|f| !present.contains(&format!("{dir}/{f}"))) {
            self.storage.delete(&manifest_rel).await?;
            return Err(StorageError::NotFound {
                uri: self.storage.object_uri(&format!("{dir}/{missing}")),
            });
        }
        Ok(ResolvedAdapter {
            name: req.name.clone(),
            version,
            digest: Manifest::digest_of(&bytes),
            manifest,
            manifest_bytes: bytes,
            uri: self.storage.object_uri(&dir),
        })
    }

    /// Claims the lowest free version number above every existing one.
    async fn claim_version(&self, name: &str) -> Result<u32> {
        let existing = self.storage.list_dirs(&format!("adapters/{name}")).await?;
        let mut candidate = existing.iter().filter_map(|d| parse_version(d)).max().unwrap_or(0) + 1;
        let token = format!(
            "{}-{}-{}",
            std::process::id(),
            Utc::now().timestamp_nanos_opt().unwrap_or_default(),
            temp_sibling(Path::new("claim")).display()
        );
        let body = Bytes::from(serde_json::json!({"claimed_by": token, "at": Utc::now()}).to_string());
        for _ in 0..self.config.max_claim_attempts {
            let rel = format!("{}/{CLAIM_FILE}", version_dir(name, candidate));
            match self.storage.create(&rel, body.clone()).await? {
                CreateOutcome::Created => return Ok(candidate),
                CreateOutcome::AlreadyExists => candidate += 1,
                CreateOutcome::Unsupported => {
                    tracing::warn!(registry = %self.storage.uri(), "backend has no create-only puts; version claims fall back to write-then-read-back (see crate docs)");
                    match self.storage.head(&rel).await {
                        Ok(_) => candidate += 1,
                        Err(StorageError::NotFound { .. }) => {
                            self.storage.put_bytes(&rel, body.clone()).await?;
                            if self.storage.get_bytes(&rel).await? == body {
                                return Ok(candidate);
                            }
                            candidate += 1;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Err(StorageError::VersionContention {
            registry: self.storage.uri(),
            name: name.to_string(),
            attempts: self.config.max_claim_attempts,
        })
    }

    async fn objects_by_version(&self, name: &str) -> Result<BTreeMap<u32, VersionObjects>> {
        let prefix = format!("adapters/{name}/");
        let mut versions: BTreeMap<u32, VersionObjects> = BTreeMap::new();
        for obj in self.storage.list(&format!("adapters/{name}")).await? {
            let Some(rest) = obj.key.strip_prefix(&prefix) else {
                continue;
            };
            let (dir, file) = rest.split_once('/').unwrap_or((rest, ""));
            let Some(v) = parse_version(dir) else {
                tracing::warn!(key = %obj.key, "object in the registry outside any v<N>/ directory; ignored");
                continue;
            };
            let entry = versions.entry(v).or_insert(VersionObjects {
                has_manifest: false,
                objects: Vec::new(),
            });
            entry.has_manifest |= file == MANIFEST_FILE;
            entry.objects.push(obj);
        }
        Ok(versions)
    }

    /// Adapter names present in the registry.
    pub async fn adapters(&self) -> Result<Vec<String>> {
        let mut names = self.storage.list_dirs("adapters").await?;
        names.retain(|n| validate_adapter_name(n).is_ok());
        names.sort();
        Ok(names)
    }

    /// Published (manifest-bearing) versions of `name`, oldest first.
    pub async fn list(&self, name: &str) -> Result<Vec<ResolvedAdapter>> {
        validate_adapter_name(name)?;
        let mut out = Vec::new();
        for (v, objs) in self.objects_by_version(name).await? {
            if objs.has_manifest {
                out.push(self.load(name, v).await?);
            }
        }
        Ok(out)
    }

    async fn load(&self, name: &str, version: u32) -> Result<ResolvedAdapter> {
        let dir = version_dir(name, version);
        let rel = format!("{dir}/{MANIFEST_FILE}");
        let bytes = self.storage.get_bytes(&rel).await.map_err(|e| match e {
            StorageError::NotFound { .. } => self.not_found(
                format!("{name}@{version}"),
                "no manifest: never published, deleted, or still uploading",
            ),
            other => other,
        })?;
        let manifest = Manifest::parse(&self.storage.object_uri(&rel), &bytes, name, version)?;
        Ok(ResolvedAdapter {
            name: name.to_string(),
            version,
            digest: Manifest::digest_of(&bytes),
            manifest,
            manifest_bytes: bytes,
            uri: self.storage.object_uri(&dir),
        })
    }

    /// Resolves `name`, `name@latest`, `name@N` or `name@sha256:…` to a published version.
    pub async fn resolve(&self, reference: &AdapterRef) -> Result<ResolvedAdapter> {
        validate_adapter_name(&reference.name)?;
        match &reference.version {
            VersionSelector::Number(n) => self.load(&reference.name, *n).await,
            VersionSelector::Latest => {
                let versions = self.objects_by_version(&reference.name).await?;
                let latest = versions.iter().rev().find(|(_, o)| o.has_manifest).map(|(v, _)| *v);
                let v = latest.ok_or_else(|| self.not_found(reference, "no published versions"))?;
                self.load(&reference.name, v).await
            }
            VersionSelector::Digest(d) => self
                .list(&reference.name)
                .await?
                .into_iter()
                .find(|r| &r.digest == d)
                .ok_or_else(|| self.not_found(reference, "no version has this manifest digest")),
        }
    }

    /// The version's model card (README.md), checked against the manifest's digest; None for a
    /// version published without one (before cards existed, or pushed by hand).
    pub async fn card(&self, adapter: &ResolvedAdapter) -> Result<Option<String>> {
        let Some(entry) = adapter.manifest.files.get(CARD_FILE) else {
            return Ok(None);
        };
        let rel = format!("{}/{CARD_FILE}", version_dir(&adapter.name, adapter.version));
        let bytes = self.storage.get_bytes(&rel).await?;
        let uri = self.storage.object_uri(&rel);
        // The manifest is what a digest reference pins; a card that differs from it is not
        // this version's card.
        entry.sha256.verify(&uri, &Sha256Digest::of(&bytes))?;
        String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|_| StorageError::InvalidManifest {
                uri,
                reason: "the model card is not UTF-8".into(),
            })
    }

    /// Downloads a resolved version into `dest` (which must not exist), verifying every file
    /// against the manifest. Files land in a temporary sibling directory that is renamed to
    /// `dest` only when complete, so `dest` is either absent or whole.
    pub async fn fetch(&self, adapter: &ResolvedAdapter, dest: &Path, progress: Option<&ProgressFn>) -> Result<()> {
        if tokio::fs::try_exists(dest)
            .await
            .map_err(|e| StorageError::io("checking", dest, e))?
        {
            return Err(StorageError::io(
                "fetch destination",
                dest,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "already exists; choose a new directory",
                ),
            ));
        }
        let tmp = temp_sibling(dest);
        let result = self.fetch_into(adapter, &tmp, progress).await;
        let result = match result {
            Ok(()) => tokio::fs::rename(&tmp, dest)
                .await
                .map_err(|e| StorageError::io("renaming fetched adapter into place at", dest, e)),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
        }
        result
    }

    async fn fetch_into(&self, adapter: &ResolvedAdapter, tmp: &Path, progress: Option<&ProgressFn>) -> Result<()> {
        let dir = version_dir(&adapter.name, adapter.version);
        tokio::fs::create_dir_all(tmp)
            .await
            .map_err(|e| StorageError::io("creating", tmp, e))?;
        for (rel, entry) in &adapter.manifest.files {
            // Names were validated when the manifest was parsed; re-check since this is where
            // a hostile name would do harm.
            validate_file_path(rel)?;
            let local = tmp.join(rel);
            if let Some(parent) = local.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| StorageError::io("creating", parent, e))?;
            }
            let (info, _) = self
                .storage
                .download_to(&format!("{dir}/{rel}"), &local, Some(&entry.sha256), progress)
                .await?;
            if info.size != entry.size {
                return Err(StorageError::InvalidManifest {
                    uri: adapter.uri.clone(),
                    reason: format!("{rel} is {} bytes but the manifest says {}", info.size, entry.size),
                });
            }
        }
        let manifest_path = tmp.join(MANIFEST_FILE);
        tokio::fs::write(&manifest_path, &adapter.manifest_bytes)
            .await
            .map_err(|e| StorageError::io("writing", &manifest_path, e))
    }

    /// Deletes a version. The manifest goes first, so readers stop seeing the version before
    /// any file disappears; the claim stays so the number is never handed out again.
    pub async fn delete(&self, name: &str, version: u32) -> Result<()> {
        validate_adapter_name(name)?;
        let versions = self.objects_by_version(name).await?;
        let objs = versions
            .get(&version)
            .filter(|o| o.has_manifest)
            .ok_or_else(|| self.not_found(format!("{name}@{version}"), "no such published version"))?;
        let dir = version_dir(name, version);
        self.storage.delete(&format!("{dir}/{MANIFEST_FILE}")).await?;
        self.delete_files(&dir, &objs.objects).await
    }

    async fn delete_files(&self, dir: &str, objects: &[ObjectInfo]) -> Result<()> {
        let claim = format!("{dir}/{CLAIM_FILE}");
        for obj in objects.iter().filter(|o| o.key != claim) {
            self.storage.delete(&obj.key).await?;
        }
        Ok(())
    }

    /// Keeps the newest `keep` published versions of `name` and deletes the rest; returns the
    /// deleted version numbers. `keep` must be at least 1 (use `delete` to remove everything).
    pub async fn retain(&self, name: &str, keep: usize) -> Result<Vec<u32>> {
        validate_adapter_name(name)?;
        if keep == 0 {
            return Err(StorageError::invalid_name(
                "retention count",
                "0",
                "must keep at least 1 version",
            ));
        }
        let published: Vec<u32> = self
            .objects_by_version(name)
            .await?
            .into_iter()
            .filter(|(_, o)| o.has_manifest)
            .map(|(v, _)| v)
            .collect();
        let doomed: Vec<u32> = published.iter().rev().skip(keep).rev().copied().collect();
        for v in &doomed {
            self.delete(name, *v).await?;
        }
        Ok(doomed)
    }

    /// Removes the files of unfinished versions (no manifest) of `name` whose newest object is
    /// older than `stale_after`; returns the swept version numbers.
    pub async fn sweep(&self, name: &str) -> Result<Vec<u32>> {
        validate_adapter_name(name)?;
        let cutoff = Utc::now() - self.config.stale_after;
        let mut swept = Vec::new();
        for (v, objs) in self.objects_by_version(name).await? {
            let has_files = objs.objects.iter().any(|o| !o.key.ends_with(CLAIM_FILE));
            let newest = objs.objects.iter().map(|o| o.last_modified).max();
            if !objs.has_manifest && has_files && newest.is_some_and(|t| t < cutoff) {
                tracing::info!(adapter = name, version = v, "sweeping unfinished version");
                self.delete_files(&version_dir(name, v), &objs.objects).await?;
                swept.push(v);
            }
        }
        Ok(swept)
    }
}

/// Regular files below `dir` as (relative path with '/', absolute path), validated.
/// Symlinks are refused: following them could publish files from outside the directory.
fn collect_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        let entries = std::fs::read_dir(&path).map_err(|e| StorageError::io("reading directory", &path, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StorageError::io("reading directory", &path, e))?;
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| {
                StorageError::invalid_name("adapter file path", &entry.path().display().to_string(), "not UTF-8")
            })?;
            let child_rel = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let kind = entry
                .file_type()
                .map_err(|e| StorageError::io("inspecting", entry.path(), e))?;
            if kind.is_dir() {
                stack.push((entry.path(), child_rel));
            } else if kind.is_file() {
                validate_file_path(&child_rel)?;
                out.push((child_rel, entry.path()));
            } else {
                return Err(StorageError::invalid_name(
                    "adapter file path",
                    &child_rel,
                    "is a symlink or special file; only regular files can be published",
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}
