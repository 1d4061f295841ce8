//! Merged models: a base model with an adapter version folded into its weights, for serving
//! stacks that cannot load adapters. Kept beside the adapters, one per adapter version:
//! `<root>/merged/<name>/v<N>/{HF model files, manifest.json}`, where `<name>@<N>` is the adapter
//! version folded in.
//!
//! The version number is the adapter's, which the registry hands out once ever (its claims are
//! never deleted), so the only writer of `merged/<name>/v<N>` is the job that published
//! `<name>@<N>`, or a retry of its pod. As in the registry, the files go first and the manifest,
//! which hashes every one of them, last and create-only: a reader sees a whole merged model or
//! none, and a retry that finds the manifest for the same adapter digest reports it as done.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;
use crate::error::{Result, StorageError};
use crate::manifest::{validate_file_path, FileEntry, SourceRef, MANIFEST_FILE};
use crate::names::validate_adapter_name;
use crate::registry::ResolvedAdapter;
use crate::store::{CreateOutcome, Storage};

/// Current schema of a merged model's manifest.
pub const MERGED_SCHEMA: u32 = 1;

/// `manifest.json` of a merged model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MergedManifest {
    pub schema: u32,
    /// The adapter folded in: its name, version and manifest digest.
    pub adapter: String,
    pub version: u32,
    pub adapter_digest: Sha256Digest,
    pub base_model: SourceRef,
    /// Relative path → digest and size, for every file except the manifest.
    pub files: BTreeMap<String, FileEntry>,
    pub created_at: DateTime<Utc>,
}

/// A merged model in the store.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishedMerged {
    /// URI of its directory.
    pub uri: String,
    /// `sha256:` of its manifest bytes.
    pub digest: Sha256Digest,
    pub manifest: MergedManifest,
}

fn merged_dir(name: &str, version: u32) -> String {
    format!("merged/{name}/v{version}")
}

/// Publishes the model in `source_dir` (flat, as HF lays a model out) as the merge of
/// `adapter` into `base_model`, under `root` (the registry's storage).
pub async fn publish_merged(
    root: &Storage,
    adapter: &ResolvedAdapter,
    base_model: &SourceRef,
    source_dir: &Path,
) -> Result<PublishedMerged> {
    validate_adapter_name(&adapter.name)?;
    let dir = merged_dir(&adapter.name, adapter.version);
    if let Some(done) = existing(root, &dir, adapter).await? {
        return Ok(done);
    }
    let files = flat_files(source_dir)?;
    let mut entries = BTreeMap::new();
    for (rel, path) in &files {
        let size = std::fs::metadata(path)
            .map_err(|e| StorageError::io("reading metadata of", path, e))?
            .len();
        let sha256 = Sha256Digest::of_file(path).await?;
        entries.insert(rel.clone(), FileEntry { sha256, size });
    }
    tracing::info!(adapter = %adapter.name, version = adapter.version, files = files.len(), "publishing merged model");
    for (rel, path) in &files {
        root.put_file(&format!("{dir}/{rel}"), path, None).await?;
    }
    let manifest = MergedManifest {
        schema: MERGED_SCHEMA,
        adapter: adapter.name.clone(),
        version: adapter.version,
        adapter_digest: adapter.digest.clone(),
        base_model: base_model.clone(),
        files: entries,
        created_at: Utc::now(),
    };
    let bytes = Bytes::from(serde_json::to_vec_pretty(&manifest).map_err(|e| invalid(root, &dir, e.to_string()))?);
    let rel = format!("{dir}/{MANIFEST_FILE}");
    match root.create(&rel, bytes.clone()).await? {
        CreateOutcome::Created => {}
        // A retry that raced its predecessor: fine if it describes the same adapter.
        CreateOutcome::AlreadyExists => {
            return existing(root, &dir, adapter)
                .await?
                .ok_or_else(|| StorageError::AlreadyExists {
                    uri: root.object_uri(&rel),
                })
        }
        CreateOutcome::Unsupported => root.put_bytes(&rel, bytes.clone()).await?,
    }
    Ok(PublishedMerged {
        uri: root.object_uri(&dir),
        digest: Sha256Digest::of(&bytes),
        manifest,
    })
}

/// The merged model of `name@version`, from its manifest.
pub async fn resolve_merged(root: &Storage, name: &str, version: u32) -> Result<PublishedMerged> {
    validate_adapter_name(name)?;
    let dir = merged_dir(name, version);
    let bytes = root.get_bytes(&format!("{dir}/{MANIFEST_FILE}")).await?;
    let manifest = parse(root, &dir, &bytes)?;
    if manifest.adapter != name || manifest.version != version {
        return Err(invalid(
            root,
            &dir,
            format!("describes {}@{}", manifest.adapter, manifest.version),
        ));
    }
    Ok(PublishedMerged {
        uri: root.object_uri(&dir),
        digest: Sha256Digest::of(&bytes),
        manifest,
    })
}

/// Downloads a merged model into `dest` (created), checking every file against its manifest.
pub async fn fetch_merged(root: &Storage, merged: &PublishedMerged, dest: &Path) -> Result<()> {
    let dir = merged_dir(&merged.manifest.adapter, merged.manifest.version);
    tokio::fs::create_dir_all(dest)
        .await
        .map_err(|e| StorageError::io("creating", dest, e))?;
    for (rel, entry) in &merged.manifest.files {
        validate_file_path(rel)?;
        let (info, _) = root
            .download_to(&format!("{dir}/{rel}"), &dest.join(rel), Some(&entry.sha256), None)
            .await?;
        if info.size != entry.size {
            return Err(invalid(
                root,
                &dir,
                format!("{rel} is {} bytes but the manifest says {}", info.size, entry.size),
            ));
        }
    }
    Ok(())
}

/// The merged model already published for this very adapter version, if any; an error when
/// one is there for another adapter digest (a number means the same bytes, always).
async fn existing(root: &Storage, dir: &str, adapter: &ResolvedAdapter) -> Result<Option<PublishedMerged>> {
    let bytes = match root.get_bytes(&format!("{dir}/{MANIFEST_FILE}")).await {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let manifest = parse(root, dir, &bytes)?;
    if manifest.adapter_digest != adapter.digest {
        return Err(StorageError::AlreadyExists {
            uri: root.object_uri(dir),
        });
    }
    Ok(Some(PublishedMerged {
        uri: root.object_uri(dir),
        digest: Sha256Digest::of(&bytes),
        manifest,
    }))
}

fn parse(root: &Storage, dir: &str, bytes: &[u8]) -> Result<MergedManifest> {
    let manifest: MergedManifest = serde_json::from_slice(bytes).map_err(|e| invalid(root, dir, e.to_string()))?;
    if manifest.schema != MERGED_SCHEMA {
        return Err(invalid(
            root,
            dir,
            format!("schema {} is not supported", manifest.schema),
        ));
    }
    for rel in manifest.files.keys() {
        validate_file_path(rel).map_err(|e| invalid(root, dir, e.to_string()))?;
    }
    Ok(manifest)
}

fn invalid(root: &Storage, dir: &str, reason: String) -> StorageError {
    StorageError::InvalidManifest {
        uri: root.object_uri(&format!("{dir}/{MANIFEST_FILE}")),
        reason,
    }
}

/// The regular files directly in `dir`, sorted. A model in HF layout is flat; anything else
/// (a directory, a symlink) is refused rather than published half.
fn flat_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| StorageError::io("reading directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("reading directory", dir, e))?;
        let kind = entry
            .file_type()
            .map_err(|e| StorageError::io("inspecting", entry.path(), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !kind.is_file() {
            return Err(StorageError::invalid_name(
                "merged model file",
                &name,
                "is not a regular file; a merged model is a flat directory of files",
            ));
        }
        validate_file_path(&name)?;
        out.push((name, entry.path()));
    }
    out.sort();
    Ok(out)
}
