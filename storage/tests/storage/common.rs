//! Test backends: a temporary directory (`file://`) and the real S3 server (MinIO) that
//! `e2e/cluster/s3-up.sh` starts. The S3 tests fail, never skip, when that server is missing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use kubetune_storage::{Credentials, Metrics, PublishRequest, SourceRef, Storage};

pub struct Env {
    pub storage: Storage,
    pub creds: Credentials,
    /// Local scratch space (sources, fetch destinations, caches); the fs backend lives here too.
    pub scratch: tempfile::TempDir,
}

pub fn fs_env() -> Env {
    let scratch = tempfile::tempdir().expect("temp dir");
    let root = scratch.path().join("store");
    let storage = Storage::from_uri(&format!("file://{}", root.display()), &Credentials::none()).expect("fs storage");
    Env {
        storage,
        creds: Credentials::none(),
        scratch,
    }
}

/// Where s3-up.sh writes its settings (overridable with KUBETUNE_S3_ENV).
fn s3_env_path() -> PathBuf {
    std::env::var_os("KUBETUNE_S3_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.kubetune/s3.env"))
}

pub fn s3_env() -> Env {
    let path = s3_env_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "S3 tests need the local S3 server: cannot read {} ({e}). Run e2e/cluster/s3-up.sh first \
             (or point KUBETUNE_S3_ENV at an env file with AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, \
             AWS_SECRET_ACCESS_KEY, AWS_REGION, KUBETUNE_S3_BUCKET).",
            path.display()
        )
    });
    let vars: Vec<(String, String)> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: line without '=': key {:?}", path.display(), l.split('=').next()));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let bucket = vars
        .iter()
        .find(|(k, _)| k == "KUBETUNE_S3_BUCKET")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| {
            panic!(
                "{} has no KUBETUNE_S3_BUCKET; re-run e2e/cluster/s3-up.sh",
                path.display()
            )
        });
    let creds = Credentials::from_vars(vars);
    let uri = format!("s3://{bucket}/{}", unique_prefix());
    let storage = Storage::from_uri(&uri, &creds).expect("s3 storage");
    Env {
        storage,
        creds,
        scratch: tempfile::tempdir().expect("temp dir"),
    }
}

/// A prefix no other test (or earlier run) uses.
fn unique_prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "tests/run-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl Env {
    /// Removes everything the test wrote below its prefix.
    pub async fn cleanup(&self) {
        for obj in self.storage.list("").await.expect("list for cleanup") {
            self.storage.delete(&obj.key).await.expect("cleanup delete");
        }
    }

    /// Writes a PEFT-like adapter directory and returns a publish request for it.
    pub fn adapter_source(&self, name: &str, weights: &[u8]) -> PublishRequest {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = self
            .scratch
            .path()
            .join(format!("src-{}", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(dir.join("tokenizer")).unwrap();
        std::fs::write(dir.join("adapter_config.json"), br#"{"r": 8, "lora_alpha": 16}"#).unwrap();
        std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
        std::fs::write(dir.join("tokenizer/vocab.json"), b"{}").unwrap();
        PublishRequest {
            name: name.to_string(),
            source_dir: dir,
            base_model: SourceRef {
                uri: "hf://org/base@main".into(),
                digest: None,
            },
            dataset: SourceRef {
                uri: "s3://data/chat.jsonl".into(),
                digest: None,
            },
            hyperparameters: serde_json::json!({"lr": 2e-4, "epochs": 3}),
            metrics: Metrics {
                train_loss: Some(0.5),
                eval_loss: Some(0.75),
                evaluation: None,
                dpo: None,
            },
            job: None,
        }
    }
}

/// Runs one async test body against both backends, as `<name>::fs` and `<name>::s3`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn fs() {
                let env = $crate::common::fs_env();
                super::$name(&env).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn s3() {
                let env = $crate::common::s3_env();
                super::$name(&env).await;
                env.cleanup().await;
            }
        }
    )*};
}
