//! Merged models beside the registry's adapters, on the filesystem backend (the S3 paths are
//! the registry's own calls: put_file, create, get_bytes, download_to).

use crate::common::fs_env;
use kubetune_storage::{fetch_merged, publish_merged, resolve_merged, Registry, SourceRef, StorageError};

fn model_dir(root: &std::path::Path, weights: &[u8]) -> std::path::PathBuf {
    let dir = root.join(format!("merged-src-{}", weights.len()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), br#"{"model_type": "llama"}"#).unwrap();
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    dir
}

#[tokio::test]
async fn a_merged_model_lands_beside_its_adapter_version_hashed_and_a_retry_finds_it_done() {
    let env = fs_env();
    let registry = Registry::open(env.storage.clone());
    let adapter = registry
        .publish(&env.adapter_source("support-bot", b"weights"), None)
        .await
        .unwrap();
    let base = SourceRef {
        uri: "s3://models/tiny".into(),
        digest: None,
    };
    let source = model_dir(env.scratch.path(), b"merged weights");
    let published = publish_merged(&env.storage, &adapter, &base, &source).await.unwrap();
    assert!(published.uri.ends_with("/merged/support-bot/v1"), "{}", published.uri);
    assert_eq!(published.manifest.adapter_digest, adapter.digest);
    assert_eq!(published.manifest.files.len(), 3);

    let again = publish_merged(&env.storage, &adapter, &base, &source).await.unwrap();
    assert_eq!(
        again.digest, published.digest,
        "a retried pod reports the merged model it made"
    );

    let resolved = resolve_merged(&env.storage, "support-bot", 1).await.unwrap();
    assert_eq!(resolved.digest, published.digest);
    let dest = env.scratch.path().join("fetched");
    fetch_merged(&env.storage, &resolved, &dest).await.unwrap();
    assert_eq!(
        std::fs::read(dest.join("model.safetensors")).unwrap(),
        b"merged weights"
    );
}

#[tokio::test]
async fn a_merged_file_changed_in_the_store_is_refused_on_fetch() {
    let env = fs_env();
    let registry = Registry::open(env.storage.clone());
    let adapter = registry
        .publish(&env.adapter_source("support-bot", b"weights"), None)
        .await
        .unwrap();
    let base = SourceRef {
        uri: "s3://models/tiny".into(),
        digest: None,
    };
    let source = model_dir(env.scratch.path(), b"merged weights");
    publish_merged(&env.storage, &adapter, &base, &source).await.unwrap();
    env.storage
        .put_bytes("merged/support-bot/v1/model.safetensors", "tampered weights".into())
        .await
        .unwrap();
    let resolved = resolve_merged(&env.storage, "support-bot", 1).await.unwrap();
    let err = fetch_merged(&env.storage, &resolved, &env.scratch.path().join("fetched"))
        .await
        .expect_err("digest mismatch");
    assert!(matches!(err, StorageError::DigestMismatch { .. }), "{err}");
}
