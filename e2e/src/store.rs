//! The test cluster's object store, as the tests seed and inspect it: the local S3 server's
//! credentials (written by e2e/cluster/s3-up.sh, or any `KEY=VALUE` file named by
//! `KUBETUNE_S3_ENV`), uploads of models and datasets, and the adapter registry.

use crate::repo_root;
use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kubetune_storage::{Credentials, Registry, Storage};
use std::path::{Path, PathBuf};

/// The bucket the local cluster's S3 server creates.
pub const BUCKET: &str = "kubetune";

/// The store's credentials as `KEY=VALUE` pairs.
pub fn s3_env() -> Result<Vec<(String, String)>> {
    let path = std::env::var_os("KUBETUNE_S3_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".kubetune/s3.env"));
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading the S3 credentials at {} (e2e/cluster/s3-up.sh writes them)",
            path.display()
        )
    })?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}

/// Storage rooted at `uri`, with the store's credentials.
pub fn storage(uri: &str) -> Result<Storage> {
    Ok(Storage::from_uri(uri, &Credentials::from_vars(s3_env()?))?)
}

/// The adapter registry rooted at `uri`.
pub fn registry(uri: &str) -> Result<Registry> {
    Ok(Registry::open(storage(uri)?))
}

/// Uploads a file to the object `uri`, or a directory's files below the prefix `uri`.
pub async fn upload(local: &Path, uri: &str) -> Result<()> {
    let store = storage(uri)?;
    if local.is_file() {
        store.put_file("", local, None).await?;
        return Ok(());
    }
    let mut count = 0;
    for entry in std::fs::read_dir(local).with_context(|| format!("reading {}", local.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry
                .file_name()
                .into_string()
                .map_err(|n| anyhow::anyhow!("file name {n:?} is not UTF-8"))?;
            store.put_file(&name, &entry.path(), None).await?;
            count += 1;
        }
    }
    if count == 0 {
        bail!("{} holds no files to upload", local.display());
    }
    Ok(())
}

/// Creates Secret `name` in `namespace` holding the store's credentials, as FineTuneJobs and
/// ModelDeployments reference it in `storageSecretRef`.
pub async fn create_storage_secret(client: &kube::Client, namespace: &str, name: &str) -> Result<()> {
    let data: serde_json::Map<String, serde_json::Value> = s3_env()?
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    let secret: Secret = serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "stringData": data}))?;
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(())
}
