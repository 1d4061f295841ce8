//! Shared test helpers: a tiny model on disk, seeded adapters in PEFT layout, a server built
//! through the real start-up path, and request helpers that go through the router.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use candle_core::{Device, Tensor};
use clap::Parser;
use http_body_util::BodyExt;
use kubetune_model::lora::{LoraPair, TargetModule};
use kubetune_model::tiny::{write_tiny_model, TinySpec};
use kubetune_model::{peft, LoraAdapter, LoraConfig};
use kubetune_server::api::{router, AppState};
use kubetune_server::engine::backend::{Backend, CandleBackend};
use kubetune_server::server::{build_with, warm_up, Args};
use kubetune_storage::{Sha256Digest, MANIFEST_FILE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

pub const BASE: &str = "tiny";

/// The tiny model and two adapters, written once per test binary.
pub struct Fixture {
    _dir: tempfile::TempDir,
    pub model: PathBuf,
    /// Adapter versions with their manifest, as the server loads them: `a@1` (r = 4) and `b@2`
    /// (r = 8), with their manifest digests.
    pub adapter_a: PathBuf,
    pub adapter_b: PathBuf,
    pub digest_a: String,
    pub digest_b: String,
    /// The same adapters as the trainer writes them, without a manifest: what gets published.
    pub raw_a: PathBuf,
    pub raw_b: PathBuf,
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let model = dir.path().join("model");
        write_tiny_model(&model, &TinySpec::default()).expect("tiny model");
        let config = TinySpec::default().config();
        let base = model.display().to_string();
        let [adapter_a, adapter_b, raw_a, raw_b] =
            ["adapter-a", "adapter-b", "raw-a", "raw-b"].map(|name| dir.path().join(name));
        for (path, r, seed) in [(&adapter_a, 4, 1), (&raw_a, 4, 1), (&adapter_b, 8, 2), (&raw_b, 8, 2)] {
            write_adapter(path, &config, r, seed, &base);
        }
        let digest_a = seal(&adapter_a, "a", 1);
        let digest_b = seal(&adapter_b, "b", 2);
        Fixture {
            _dir: dir,
            model,
            adapter_a,
            adapter_b,
            digest_a,
            digest_b,
            raw_a,
            raw_b,
        }
    })
}

/// Writes the `manifest.json` the registry would write for the files in `dir` as
/// `name@version`, so the server (which loads only verified versions) takes the directory;
/// returns the manifest digest.
pub fn seal(dir: &Path, name: &str, version: u32) -> String {
    let mut files = serde_json::Map::new();
    for entry in std::fs::read_dir(dir).expect("adapter directory") {
        let path = entry.expect("directory entry").path();
        let bytes = std::fs::read(&path).expect("a flat adapter directory of files");
        let file = path.file_name().expect("file name").to_string_lossy().into_owned();
        let sha256 = Sha256Digest::of(&bytes).to_string();
        files.insert(file, serde_json::json!({"sha256": sha256, "size": bytes.len()}));
    }
    let manifest = serde_json::json!({
        "schema": 1, "name": name, "version": version, "files": files,
        "base_model": {"uri": BASE}, "dataset": {"uri": "file:///data/train.jsonl"},
        "hyperparameters": {}, "metrics": {}, "created_at": "2025-01-01T00:00:00Z",
    });
    let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest JSON");
    std::fs::write(dir.join(MANIFEST_FILE), &bytes).expect("write manifest");
    Sha256Digest::of(&bytes).to_string()
}

/// A PEFT adapter on every projection with seeded random A and B (B non-zero, so it changes
/// the output), recording `base` as base_model_name_or_path.
pub fn write_adapter(dir: &Path, config: &kubetune_model::Config, r: usize, seed: u64, base: &str) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut random = |rows: usize, cols: usize, std: f32| {
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-std..std)).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("tensor")
    };
    let mut pairs = BTreeMap::new();
    for layer in 0..config.num_hidden_layers {
        for m in TargetModule::ALL {
            let (fan_in, out) = m.shape(config);
            pairs.insert(
                (layer, m),
                LoraPair {
                    a: random(r, fan_in, 0.3),
                    b: random(out, r, 0.3),
                },
            );
        }
    }
    let lora = LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        dropout: 0.0,
        target_modules: TargetModule::ALL.to_vec(),
    };
    peft::save(dir, &LoraAdapter::from_pairs(lora, pairs), config, base).expect("save adapter");
}

pub fn args(extra: &[&str]) -> Args {
    let f = fixture();
    let model = f.model.display().to_string();
    let mut argv = vec!["kubetune-server", "--model", &model, "--served-model-name", BASE];
    argv.extend_from_slice(extra);
    Args::try_parse_from(argv).expect("valid test flags")
}

pub struct TestServer {
    pub state: Arc<AppState>,
    pub app: Router,
}

pub async fn server(extra: &[&str]) -> TestServer {
    server_with(extra, |b| b).await
}

/// The admin key test servers take unless a test names its own `--admin-api-key-file`.
pub const ADMIN_KEY: &str = "test-admin-key";

pub async fn server_with<B: Backend>(extra: &[&str], wrap: impl FnOnce(CandleBackend) -> B) -> TestServer {
    // Without a key file the admin API is off, and most tests load adapters through it.
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("admin-keys");
    std::fs::write(&key_file, ADMIN_KEY).expect("write admin key");
    let key_file = key_file.display().to_string();
    let mut extra = extra.to_vec();
    if !extra.contains(&"--admin-api-key-file") {
        extra.extend(["--admin-api-key-file", &key_file]);
    }
    start(&args(&extra), wrap).await
}

/// A copy of the tiny model whose chat template is `template` (as chat_template.jinja).
pub fn model_with_template(template: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(&fixture().model).expect("model dir") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
    }
    std::fs::write(dir.path().join("chat_template.jinja"), template).expect("write template");
    dir
}

/// A test server for the model in `model`, not the fixture's.
pub async fn server_for_model(model: &Path, extra: &[&str]) -> TestServer {
    let model = model.display().to_string();
    let mut argv = vec!["kubetune-server", "--model", &model, "--served-model-name", BASE];
    argv.extend_from_slice(extra);
    start(&Args::try_parse_from(argv).expect("valid test flags"), |b| b).await
}

/// A test server with no admin key: its admin API is off.
pub async fn server_without_admin_key(extra: &[&str]) -> TestServer {
    start(&args(extra), |b| b).await
}

async fn start<B: Backend>(args: &Args, wrap: impl FnOnce(CandleBackend) -> B) -> TestServer {
    let state = build_with(args, wrap).await.expect("server builds");
    warm_up(&state).await.expect("warm-up");
    state.set_ready(true);
    let app = router(state.clone());
    TestServer { state, app }
}

pub fn adapter_flag(name: &str, dir: &Path) -> String {
    format!("{name}={}", dir.display())
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text))
    }

    /// The `data:` payloads of an SSE body.
    pub fn sse_data(&self) -> Vec<String> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

pub async fn send(app: &Router, method: &str, path: &str, body: Option<String>) -> Reply {
    send_with(app, method, path, body, None).await
}

pub async fn send_with(app: &Router, method: &str, path: &str, body: Option<String>, key: Option<&str>) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req
        .body(body.map(Body::from).unwrap_or_else(Body::empty))
        .expect("request");
    let response = app.clone().oneshot(req).await.expect("router never fails");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

pub async fn post(app: &Router, path: &str, body: Value) -> Reply {
    send(app, "POST", path, Some(body.to_string())).await
}

/// A request to the admin API with the test servers' admin key.
pub async fn admin_send(app: &Router, method: &str, path: &str, body: Option<String>) -> Reply {
    send_with(app, method, path, body, Some(ADMIN_KEY)).await
}

/// POST /v1/adapters with the test servers' admin key.
pub async fn load(app: &Router, body: Value) -> Reply {
    admin_send(app, "POST", "/v1/adapters", Some(body.to_string())).await
}

/// Waits (yielding, not sleeping a fixed time) until `cond` holds; fails after a generous
/// bound so a broken condition shows as a failure instead of a hang.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let poll = async {
        while !cond() {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    };
    if tokio::time::timeout(std::time::Duration::from_secs(120), poll)
        .await
        .is_err()
    {
        panic!("condition never held: {what}");
    }
}

/// Wraps the real backend so a test can hold the engine at a known point:
/// - `arm_prefill()`: the next forward call blocks until `release()`;
/// - `step_gate`: while set, each decode step waits for one message (dropping the sender
///   lets every later step run freely).
///
/// It also records the most distinct adapters seen in one decode step.
pub struct TestBackend {
    inner: CandleBackend,
    pub probe: Arc<Probe>,
}

#[derive(Default)]
pub struct Probe {
    prefill_gate: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    step_gate: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    /// The next forward call returns an error (a failed step, the engine lives on).
    pub fail_next: std::sync::atomic::AtomicBool,
    /// The next forward call panics, which ends the engine thread.
    pub panic_next: std::sync::atomic::AtomicBool,
    pub max_adapters_in_step: std::sync::atomic::AtomicUsize,
    pub max_batch_in_step: std::sync::atomic::AtomicUsize,
}

impl Probe {
    /// Makes the next forward call wait; returns the sender that releases it.
    pub fn arm_prefill(&self) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.prefill_gate.lock().expect("lock") = Some(rx);
        tx
    }

    /// True once the engine has reached the armed forward call (it took the gate).
    pub fn prefill_reached(&self) -> bool {
        self.prefill_gate.lock().expect("lock").is_none()
    }

    pub fn gate_steps(&self) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.step_gate.lock().expect("lock") = Some(rx);
        tx
    }
}

impl TestBackend {
    pub fn wrap(inner: CandleBackend) -> (Self, Arc<Probe>) {
        let probe = Arc::new(Probe::default());
        (
            Self {
                inner,
                probe: probe.clone(),
            },
            probe,
        )
    }
}

impl Backend for TestBackend {
    type Cache = <CandleBackend as Backend>::Cache;

    fn new_cache(&self, positions: usize) -> Self::Cache {
        self.inner.new_cache(positions)
    }

    fn reserve(&self, cache: &mut Self::Cache, positions: usize) -> Result<(), String> {
        self.inner.reserve(cache, positions)
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.inner.kv_bytes_per_token()
    }

    // The prefix cache's copies, so that gated servers cache prompts as real ones do.
    fn copy_positions(&self, cache: &Self::Cache, start: usize, len: usize) -> Result<Self::Cache, String> {
        self.inner.copy_positions(cache, start, len)
    }

    fn extend_from(&self, cache: &mut Self::Cache, blocks: &[&Self::Cache]) -> Result<(), String> {
        self.inner.extend_from(cache, blocks)
    }

    fn forward(
        &self,
        tokens: &[u32],
        cache: &mut Self::Cache,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Vec<f32>, String> {
        use std::sync::atomic::Ordering;
        let gate = self.probe.prefill_gate.lock().expect("lock").take();
        if let Some(rx) = gate {
            let _ = rx.recv();
        }
        if self.probe.fail_next.swap(false, Ordering::SeqCst) {
            return Err("scripted backend failure".into());
        }
        if self.probe.panic_next.swap(false, Ordering::SeqCst) {
            panic!("scripted engine panic");
        }
        self.inner.forward(tokens, cache, adapter)
    }

    fn decode(
        &self,
        batch: &mut [kubetune_server::engine::backend::DecodeItem<'_, Self::Cache>],
    ) -> Vec<Result<Vec<f32>, String>> {
        use std::sync::atomic::Ordering;
        if let Some(rx) = self.probe.step_gate.lock().expect("lock").as_ref() {
            let _ = rx.recv();
        }
        let distinct: std::collections::BTreeSet<usize> = batch
            .iter()
            .map(|i| i.adapter.map_or(0, |a| a as *const LoraAdapter as usize))
            .collect();
        self.probe
            .max_adapters_in_step
            .fetch_max(distinct.len(), Ordering::SeqCst);
        self.probe.max_batch_in_step.fetch_max(batch.len(), Ordering::SeqCst);
        self.inner.decode(batch)
    }
}

pub async fn gated_server(extra: &[&str]) -> (TestServer, Arc<Probe>) {
    let mut probe = None;
    let s = server_with(extra, |b| {
        let (backend, p) = TestBackend::wrap(b);
        probe = Some(p);
        backend
    })
    .await;
    (s, probe.expect("backend built"))
}

/// A registry publish of the PEFT output in `dir` as `name`, trained on the base at `model`.
pub fn publish_request(name: &str, dir: &Path, model: &Path) -> kubetune_storage::PublishRequest {
    use kubetune_storage::{Metrics, PublishRequest, SourceRef};
    PublishRequest {
        name: name.into(),
        source_dir: dir.to_path_buf(),
        base_model: SourceRef {
            uri: model.display().to_string(),
            digest: None,
        },
        dataset: SourceRef {
            uri: "file:///data/train.jsonl".into(),
            digest: None,
        },
        hyperparameters: serde_json::json!({}),
        metrics: Metrics::default(),
        job: None,
    }
}
