//! Verifying a version directory named directly (not fetched through the registry) against
//! its own manifest.

use crate::common::{fs_env, Env};
use kubetune_storage::{verify_version_dir, Registry, ResolvedAdapter, StorageError, MANIFEST_FILE};
use std::path::PathBuf;

/// Publishes one version and pulls it into a fresh directory, as `kubetune-adapters pull` does.
async fn pulled(env: &Env) -> (ResolvedAdapter, PathBuf) {
    let reg = Registry::open(env.storage.clone());
    let published = reg
        .publish(&env.adapter_source("support-bot", b"weights-v1"), None)
        .await
        .unwrap();
    let dir = env.scratch.path().join("pulled");
    reg.fetch(&published, &dir, None).await.unwrap();
    (published, dir)
}

#[tokio::test]
async fn a_pulled_version_verifies_with_the_registrys_version_and_digest() {
    let env = fs_env();
    let (published, dir) = pulled(&env).await;
    // Hidden files are tool metadata that nothing loads; they do not make the version unverifiable.
    std::fs::write(dir.join(".DS_Store"), b"x").unwrap();
    let verified = verify_version_dir(&dir).await.unwrap();
    assert_eq!(verified.digest, published.digest);
    assert_eq!(verified.manifest.version, published.version);
    assert_eq!(verified.manifest.name, "support-bot");
}

#[tokio::test]
async fn a_directory_without_a_manifest_is_refused_naming_the_manifest() {
    let env = fs_env();
    let (_, dir) = pulled(&env).await;
    std::fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
    let err = verify_version_dir(&dir).await.unwrap_err();
    assert!(matches!(err, StorageError::InvalidManifest { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(MANIFEST_FILE) && message.contains("missing"),
        "{message}"
    );
}

#[tokio::test]
async fn a_file_changed_after_its_manifest_was_written_is_refused() {
    let env = fs_env();
    let (_, dir) = pulled(&env).await;
    // Same size, other bytes: only the sha256 tells.
    std::fs::write(dir.join("adapter_model.safetensors"), b"weights-v9").unwrap();
    let err = verify_version_dir(&dir).await.unwrap_err();
    assert!(matches!(err, StorageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("adapter_model.safetensors"), "{err}");
    // Another size is refused before hashing.
    std::fs::write(dir.join("adapter_model.safetensors"), b"longer weights").unwrap();
    let err = verify_version_dir(&dir).await.unwrap_err().to_string();
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("the manifest says 10"),
        "{err}"
    );
}

#[tokio::test]
async fn a_listed_file_that_is_missing_is_refused_naming_it() {
    let env = fs_env();
    let (_, dir) = pulled(&env).await;
    std::fs::remove_file(dir.join("tokenizer/vocab.json")).unwrap();
    let err = verify_version_dir(&dir).await.unwrap_err().to_string();
    assert!(err.contains("tokenizer/vocab.json"), "{err}");
}

#[tokio::test]
async fn a_file_the_manifest_does_not_list_is_refused_naming_it() {
    let env = fs_env();
    let (_, dir) = pulled(&env).await;
    std::fs::write(dir.join("tokenizer/merges.txt"), b"a b").unwrap();
    let err = verify_version_dir(&dir).await.unwrap_err().to_string();
    assert!(
        err.contains("tokenizer/merges.txt") && err.contains("not in the manifest"),
        "{err}"
    );
}

#[tokio::test]
async fn a_manifest_edited_to_claim_another_version_has_another_digest() {
    let env = fs_env();
    let (published, dir) = pulled(&env).await;
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"version\": 1", "\"version\": 7")).unwrap();
    let verified = verify_version_dir(&dir).await.unwrap();
    assert_eq!(verified.manifest.version, 7);
    assert_ne!(verified.digest, published.digest, "the digest is of the bytes on disk");
}
