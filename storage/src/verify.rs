//! Checking an adapter version directory on local disk against the `manifest.json` in it.
//!
//! A registry fetch verifies each file as it downloads. A directory named directly (a local
//! path, or a store prefix the cache copied as it was) has had no such check; this one makes
//! its version and digest those of the manifest whose every file is on disk as listed, so a
//! loader never reports a digest for bytes it did not read.

use std::path::Path;

use crate::digest::Sha256Digest;
use crate::error::{Result, StorageError};
use crate::manifest::{FileEntry, Manifest, MANIFEST_FILE};

/// A version directory whose files match its manifest.
#[derive(Clone, Debug)]
pub struct VerifiedVersion {
    pub manifest: Manifest,
    /// `sha256:` of the manifest bytes, as the registry reports it.
    pub digest: Sha256Digest,
}

/// Verifies `dir` against `dir/manifest.json`: every listed file has its size and sha256, and
/// no other file is there (hidden files aside, which nothing loads). A directory without a
/// manifest is refused: nothing would say what its bytes should be.
pub async fn verify_version_dir(dir: &Path) -> Result<VerifiedVersion> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let uri = manifest_path.display().to_string();
    let bytes = match tokio::fs::read(&manifest_path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StorageError::InvalidManifest {
                uri,
                reason: "missing: only an adapter version with its registry manifest can be loaded \
                         (`kubetune-adapters push` publishes PEFT output, `kubetune-adapters pull` \
                         writes a version with its manifest)"
                    .into(),
            })
        }
        Err(e) => return Err(StorageError::io("reading", &manifest_path, e)),
    };
    let manifest = Manifest::parse_unplaced(&uri, &bytes)?;
    for (rel, entry) in &manifest.files {
        verify_file(dir, rel, entry).await?;
    }
    if let Some(extra) = unlisted_files(dir, &manifest)?.first() {
        return Err(StorageError::InvalidManifest {
            uri,
            reason: format!("{extra} is in the directory but not in the manifest, so nothing vouches for it"),
        });
    }
    Ok(VerifiedVersion {
        digest: Manifest::digest_of(&bytes),
        manifest,
    })
}

async fn verify_file(dir: &Path, rel: &str, entry: &FileEntry) -> Result<()> {
    let path = dir.join(rel);
    let size = tokio::fs::metadata(&path)
        .await
        .map_err(|e| StorageError::io("reading metadata of", &path, e))?
        .len();
    let uri = path.display().to_string();
    if size != entry.size {
        return Err(StorageError::InvalidManifest {
            uri,
            reason: format!("{size} bytes, but the manifest says {}", entry.size),
        });
    }
    entry.sha256.verify(&uri, &Sha256Digest::of_file(&path).await?)
}

/// Relative paths of the files below `dir` that the manifest does not list; hidden segments
/// (VCS or tool metadata, skipped by downloads too) and the manifest itself are left out.
fn unlisted_files(dir: &Path, manifest: &Manifest) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        let entries = std::fs::read_dir(&path).map_err(|e| StorageError::io("reading directory", &path, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StorageError::io("reading directory", &path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let is_dir = entry
                .file_type()
                .map_err(|e| StorageError::io("inspecting", entry.path(), e))?
                .is_dir();
            if is_dir {
                stack.push((entry.path(), child));
            } else if child != MANIFEST_FILE && !manifest.files.contains_key(&child) {
                out.push(child);
            }
        }
    }
    out.sort();
    Ok(out)
}
