//! Download cache behaviour against the filesystem backend and a real S3 server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::common::Env;
use kubetune_storage::{Cache, CreateOutcome, Registry, Sha256Digest, StorageError};

both_backends!(
    create_only_puts_refuse_to_overwrite,
    concurrent_readers_share_one_complete_entry,
    changed_object_gets_new_entry,
    expected_digest_is_verified,
    model_prefix_downloads_as_directory,
    gguf_model_downloads_as_its_one_file,
    concurrent_adapter_fetches,
);

fn entries(cache: &Cache) -> usize {
    std::fs::read_dir(cache.root().join("entries")).unwrap().count()
}

fn tmp_is_empty(cache: &Cache) -> bool {
    std::fs::read_dir(cache.root().join("tmp")).unwrap().next().is_none()
}

async fn create_only_puts_refuse_to_overwrite(env: &Env) {
    assert_eq!(
        env.storage.create("x/once", "a".into()).await.unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        env.storage.create("x/once", "b".into()).await.unwrap(),
        CreateOutcome::AlreadyExists
    );
    assert_eq!(env.storage.get_bytes("x/once").await.unwrap(), "a");
}

async fn concurrent_readers_share_one_complete_entry(env: &Env) {
    let body: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    env.storage
        .put_bytes("models/big.bin", body.clone().into())
        .await
        .unwrap();
    let root = env.scratch.path().join("cache");
    let reported = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        // Separate Cache values, as separate processes would have; they share only the directory.
        let seen = reported.clone();
        let cache = Cache::new(&root).unwrap().with_progress(Arc::new(move |e| {
            seen.fetch_max(e.bytes_done, Ordering::Relaxed);
        }));
        let storage = env.storage.clone();
        tasks.push(tokio::spawn(async move {
            cache.download_object(&storage, "models/big.bin", None).await
        }));
    }
    let mut paths = Vec::new();
    for t in tasks {
        paths.push(t.await.unwrap().unwrap());
    }
    paths.dedup();
    assert_eq!(paths.len(), 1, "every reader gets the same entry");
    assert!(
        std::fs::read(&paths[0]).unwrap() == body,
        "entry is complete and intact"
    );
    let cache = Cache::new(&root).unwrap();
    assert_eq!(entries(&cache), 1, "the object was stored once");
    assert!(tmp_is_empty(&cache), "no temporary files left behind");
    assert_eq!(
        reported.load(Ordering::Relaxed),
        body.len() as u64,
        "progress reached the full size"
    );
}

async fn changed_object_gets_new_entry(env: &Env) {
    let cache = Cache::new(env.scratch.path().join("cache")).unwrap();
    env.storage.put_bytes("data/train.jsonl", "v1".into()).await.unwrap();
    let first = cache
        .download_object(&env.storage, "data/train.jsonl", None)
        .await
        .unwrap();
    env.storage
        .put_bytes("data/train.jsonl", "version two".into())
        .await
        .unwrap();
    let second = cache
        .download_object(&env.storage, "data/train.jsonl", None)
        .await
        .unwrap();
    assert_ne!(first, second);
    assert_eq!(std::fs::read(&first).unwrap(), b"v1");
    assert_eq!(std::fs::read(&second).unwrap(), b"version two");
}

async fn expected_digest_is_verified(env: &Env) {
    let cache = Cache::new(env.scratch.path().join("cache")).unwrap();
    env.storage.put_bytes("data/d.jsonl", "actual".into()).await.unwrap();
    let wrong = Sha256Digest::of(b"promised");
    let err = cache
        .download_object(&env.storage, "data/d.jsonl", Some(&wrong))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::DigestMismatch { uri, .. } if uri.ends_with("data/d.jsonl")),
        "{err}"
    );
    assert_eq!(entries(&cache), 0, "nothing is cached under a digest it does not have");
    assert!(tmp_is_empty(&cache));
    let right = Sha256Digest::of(b"actual");
    let path = cache
        .download_object(&env.storage, "data/d.jsonl", Some(&right))
        .await
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), b"actual");
}

async fn model_prefix_downloads_as_directory(env: &Env) {
    env.storage
        .put_bytes("models/tiny/config.json", "{}".into())
        .await
        .unwrap();
    env.storage
        .put_bytes("models/tiny/weights/model.safetensors", "w".into())
        .await
        .unwrap();
    env.storage
        .put_bytes("models/tiny/.gitattributes", "x".into())
        .await
        .unwrap();
    let cache = Cache::new(env.scratch.path().join("cache")).unwrap();
    let model_uri = env.storage.object_uri("models/tiny");
    let dir = cache.download_model(&model_uri, &env.creds).await.unwrap();
    assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), b"{}");
    assert_eq!(std::fs::read(dir.join("weights/model.safetensors")).unwrap(), b"w");
    assert!(!dir.join(".gitattributes").exists());
    assert_eq!(
        cache.download_model(&model_uri, &env.creds).await.unwrap(),
        dir,
        "second call is a cache hit"
    );

    let missing = env.storage.object_uri("models/none");
    let err = cache.download_model(&missing, &env.creds).await.unwrap_err();
    assert!(
        matches!(&err, StorageError::NotFound { uri } if uri == &missing),
        "{err}"
    );
}

async fn gguf_model_downloads_as_its_one_file(env: &Env) {
    env.storage
        .put_bytes("models/smol/model.Q4_1.gguf", "GGUF".into())
        .await
        .unwrap();
    env.storage
        .put_bytes("models/smol/other.gguf", "not this one".into())
        .await
        .unwrap();
    let cache = Cache::new(env.scratch.path().join("cache")).unwrap();
    let uri = env.storage.object_uri("models/smol/model.Q4_1.gguf");
    let path = cache.download_model(&uri, &env.creds).await.unwrap();
    assert!(path.is_file(), "{} is the file itself", path.display());
    assert_eq!(path.file_name().unwrap(), "model.Q4_1.gguf");
    assert_eq!(std::fs::read(&path).unwrap(), b"GGUF");
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1,
        "no other object of the prefix is fetched"
    );
    let missing = env.storage.object_uri("models/smol/none.gguf");
    let err = cache.download_model(&missing, &env.creds).await.unwrap_err();
    assert!(matches!(&err, StorageError::NotFound { .. }), "{err}");
}

async fn concurrent_adapter_fetches(env: &Env) {
    let reg = Registry::open(env.storage.clone());
    let published = reg
        .publish(&env.adapter_source("shared", b"weights"), None)
        .await
        .unwrap();
    let root = env.scratch.path().join("cache");
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (reg, adapter, cache) = (reg.clone(), published.clone(), Cache::new(&root).unwrap());
        tasks.push(tokio::spawn(async move { cache.fetch_adapter(&reg, &adapter).await }));
    }
    let mut dirs = Vec::new();
    for t in tasks {
        dirs.push(t.await.unwrap().unwrap());
    }
    dirs.dedup();
    assert_eq!(dirs.len(), 1);
    assert_eq!(
        std::fs::read(dirs[0].join("adapter_model.safetensors")).unwrap(),
        b"weights"
    );
}
