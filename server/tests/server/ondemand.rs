//! On-demand adapter loading (`--adapter-on-demand`): registry adapters a request names are
//! loaded, least recently used ones evicted, loads shared and bounded, oversized ones refused
//! before their weights are downloaded.

use crate::common::*;
use kubetune_storage::{Registry, Storage};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A registry in a temp dir holding `alpha@1` (r = 4), `beta@1` (r = 8) and `gamma@1` (r = 4),
/// and a cache directory beside it.
struct Registered {
    root: tempfile::TempDir,
    uri: String,
}

impl Registered {
    fn cache(&self) -> PathBuf {
        self.root.path().join("cache")
    }

    fn cache_flag(&self) -> String {
        self.cache().display().to_string()
    }

    /// The files of the registry's version directory of `name@1`.
    fn version_dir(&self, name: &str) -> PathBuf {
        self.root.path().join("registry/adapters").join(name).join("v1")
    }
}

async fn registry() -> Registered {
    let f = fixture();
    let root = tempfile::tempdir().expect("temp dir");
    let uri = format!("file://{}", root.path().join("registry").display());
    let registry = Registry::open(Storage::from_uri(&uri, &kubetune_storage::Credentials::none()).expect("storage"));
    for (name, dir) in [("alpha", &f.raw_a), ("beta", &f.raw_b), ("gamma", &f.raw_a)] {
        let request = publish_request(name, dir, &f.model);
        registry.publish(&request, None).await.expect("publish");
    }
    Registered { root, uri }
}

async fn on_demand_server(reg: &Registered, extra: &[&str]) -> TestServer {
    let cache = reg.cache_flag();
    let mut flags = vec!["--registry", &reg.uri, "--cache-dir", &cache, "--adapter-on-demand"];
    flags.extend_from_slice(extra);
    server(&flags).await
}

async fn complete(s: &TestServer, model: &str) -> Reply {
    post(
        &s.app,
        "/v1/completions",
        json!({"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0}),
    )
    .await
}

/// The adapters GET /v1/models lists, in its order (by name).
async fn served(s: &TestServer) -> Vec<String> {
    let models = send(&s.app, "GET", "/v1/models", None).await.json();
    models["data"]
        .as_array()
        .expect("a list")
        .iter()
        .skip(1)
        .map(|m| m["id"].as_str().expect("an id").to_string())
        .collect()
}

async fn metric(s: &TestServer, series: &str) -> f64 {
    let text = send(&s.app, "GET", "/metrics", None).await.text;
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map_or(0.0, |v| v.parse().expect("a number"))
}

const LOADED: &str = "kubetune_server_adapter_loads_total{outcome=\"loaded\"}";
const EVICTED: &str = "kubetune_server_adapter_evictions_total";

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let path = e.expect("entry").path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn holds_weights(dir: &Path) -> bool {
    files(dir)
        .iter()
        .any(|p| p.file_name().is_some_and(|n| n == "adapter_model.safetensors"))
}

#[tokio::test]
async fn a_registry_adapter_that_is_not_loaded_is_loaded_when_a_request_names_it_and_served() {
    let reg = registry().await;
    let s = on_demand_server(&reg, &[]).await;
    assert!(served(&s).await.is_empty());
    let r = complete(&s, "alpha").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["model"], "alpha");
    let listed = admin_send(&s.app, "GET", "/v1/adapters", None).await.json();
    assert_eq!(listed["data"][1]["id"], "alpha");
    assert_eq!(listed["data"][1]["pinned"], false);
    let models = send(&s.app, "GET", "/v1/models", None).await.json();
    assert_eq!(models["data"][1]["id"], "alpha");
    assert_eq!(models["data"][1]["version"], 1);
    // A version selector loads that version, served under the name.
    let r = complete(&s, "beta@1").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(served(&s).await, ["alpha", "beta"]);
    assert_eq!(metric(&s, LOADED).await, 2.0);
    // The same weights as the same version loaded through the admin API.
    let pinned = load(&s.app, json!({"name": "alpha-pinned", "source": "alpha@1"})).await;
    assert_eq!(pinned.status, 200, "{}", pinned.text);
    let listed = admin_send(&s.app, "GET", "/v1/adapters", None).await.json();
    assert_eq!(listed["data"][2]["id"], "alpha-pinned");
    assert_eq!(listed["data"][2]["pinned"], true);
    let body = |m: &str| json!({"model": m, "prompt": "hello", "max_tokens": 6, "temperature": 0});
    let a = post(&s.app, "/v1/completions", body("alpha")).await.json();
    let b = post(&s.app, "/v1/completions", body("alpha-pinned")).await.json();
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
}

#[tokio::test]
async fn with_two_adapter_slots_the_least_recently_used_is_evicted_and_comes_back_on_demand() {
    let reg = registry().await;
    let s = on_demand_server(&reg, &["--max-adapters", "2"]).await;
    for model in ["alpha", "beta", "alpha"] {
        let r = complete(&s, model).await;
        assert_eq!(r.status, 200, "{model}: {}", r.text);
    }
    // beta was used less recently than alpha: gamma takes its place.
    let r = complete(&s, "gamma").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(served(&s).await, ["alpha", "gamma"]);
    assert_eq!(metric(&s, EVICTED).await, 1.0);
    // beta comes back on demand, in alpha's place now.
    let r = complete(&s, "beta").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(served(&s).await, ["beta", "gamma"]);
    assert_eq!(metric(&s, LOADED).await, 4.0);
    assert_eq!(metric(&s, EVICTED).await, 2.0);
    assert_eq!(metric(&s, "kubetune_server_loaded_adapters").await, 2.0);
}

#[tokio::test]
async fn concurrent_requests_for_one_unloaded_adapter_load_it_once() {
    let reg = registry().await;
    let s = on_demand_server(&reg, &["--max-batch", "8"]).await;
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let app = s.app.clone();
            tokio::spawn(async move {
                post(
                    &app,
                    "/v1/completions",
                    json!({"model": "beta", "prompt": "hello", "max_tokens": 2}),
                )
                .await
            })
        })
        .collect();
    for r in requests {
        let r = r.await.expect("task");
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(metric(&s, LOADED).await, 1.0);
    assert_eq!(served(&s).await, ["beta"]);
}

#[tokio::test]
async fn a_name_the_registry_does_not_have_is_404_model_not_found_and_without_the_flag_nothing_loads() {
    let reg = registry().await;
    let s = on_demand_server(&reg, &[]).await;
    for model in ["nope", "alpha@9", "Not A Name", "alpha@sha256:00"] {
        let r = complete(&s, model).await;
        assert_eq!(r.status, 404, "{model}: {}", r.text);
        assert_eq!(r.json()["error"]["code"], "model_not_found", "{model}");
        assert_eq!(r.json()["error"]["param"], "model", "{model}");
    }
    assert!(served(&s).await.is_empty());
    assert_eq!(metric(&s, LOADED).await, 0.0);

    let cache = reg.cache_flag();
    let off = server(&["--registry", &reg.uri, "--cache-dir", &cache]).await;
    let r = complete(&off, "alpha").await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(served(&off).await.is_empty());
}

#[tokio::test]
async fn an_oversized_adapter_is_refused_before_its_weights_are_downloaded() {
    let reg = registry().await;
    // gamma's manifest now lists a 2 GiB weights file (nothing pins its digest here).
    let manifest_path = reg.version_dir("gamma").join("manifest.json");
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(&manifest_path).expect("manifest")).expect("JSON");
    manifest["files"]["adapter_model.safetensors"]["size"] = json!(2u64 << 30);
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&manifest).expect("JSON")).expect("write");
    let s = on_demand_server(&reg, &["--max-adapter-download-mb", "1024", "--max-adapter-rank", "4"]).await;

    let r = complete(&s, "gamma").await;
    assert_eq!(r.status, 400, "{}", r.text);
    let message = r.json()["error"]["message"].as_str().expect("message").to_string();
    assert!(
        message.contains("--max-adapter-download-mb") && message.contains("1073741824"),
        "{message}"
    );
    // beta has rank 8: its adapter_config.json alone refuses it.
    let r = complete(&s, "beta").await;
    assert_eq!(r.status, 400, "{}", r.text);
    let message = r.json()["error"]["message"].as_str().expect("message").to_string();
    assert!(message.contains("--max-adapter-rank"), "{message}");
    assert!(!holds_weights(&reg.cache()), "{:?}", files(&reg.cache()));
    assert_eq!(
        metric(&s, "kubetune_server_adapter_loads_total{outcome=\"failed\"}").await,
        2.0
    );
    // The admin API refuses it the same way.
    let r = load(&s.app, json!({"name": "g", "source": "gamma@1"})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(!holds_weights(&reg.cache()));
    // What fits still loads.
    let r = complete(&s, "alpha").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(holds_weights(&reg.cache()));
}

/// A gated server (see `gated_server`) loading on demand from `reg`.
async fn gated_on_demand_server(reg: &Registered, extra: &[&str]) -> (TestServer, Arc<Probe>) {
    let cache = reg.cache_flag();
    let mut flags = vec!["--registry", &reg.uri, "--cache-dir", &cache, "--adapter-on-demand"];
    flags.extend_from_slice(extra);
    gated_server(&flags).await
}

/// A completion for `model`, sent in a task of its own.
fn spawn_completion(s: &TestServer, model: &str) -> tokio::task::JoinHandle<Reply> {
    let app = s.app.clone();
    let body = json!({"model": model, "prompt": "hello", "max_tokens": 2});
    tokio::spawn(async move { post(&app, "/v1/completions", body).await })
}

/// Holds a request for `model` in the gated engine (its prefill waits for `release`); returns
/// the request's task once it is in the engine.
async fn hold_in_engine(
    s: &TestServer,
    probe: &Probe,
    model: &str,
) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<Reply>) {
    let release = probe.arm_prefill();
    let held = spawn_completion(s, model);
    wait_until("the held request reaches the engine", || probe.prefill_reached()).await;
    (release, held)
}

#[tokio::test]
async fn pinned_adapters_and_adapters_in_use_are_never_evicted_and_a_load_waits_for_a_slot_in_use() {
    let f = fixture();
    let reg = registry().await;
    let pinned = adapter_flag("pinned", &f.adapter_a);
    let (s, probe) = gated_on_demand_server(&reg, &["--max-adapters", "2", "--adapter", &pinned]).await;
    let r = complete(&s, "alpha").await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Hold a request for alpha in the engine: alpha is in use and may not be evicted.
    let (release, held) = hold_in_engine(&s, &probe, "alpha").await;
    // beta's request waits for alpha's slot instead of being refused.
    let waiting = spawn_completion(&s, "beta");
    wait_until("beta waits for a slot", || {
        s.state.metrics.adapter_loads_waiting.get() == 1
    })
    .await;
    assert_eq!(served(&s).await, ["alpha", "pinned"]);
    release.send(()).expect("engine waits");
    let r = held.await.expect("task");
    assert_eq!(r.status, 200, "{}", r.text);
    // Once the engine lets alpha go, beta takes its place; the pinned adapter stays whatever
    // its last use.
    let r = waiting.await.expect("task");
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(served(&s).await, ["beta", "pinned"]);
    assert_eq!(metric(&s, "kubetune_server_adapter_loads_waiting").await, 0.0);
    let r = complete(&s, "gamma").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(served(&s).await, ["gamma", "pinned"]);
    // A pinned load through the admin API evicts an on-demand adapter too.
    let r = load(&s.app, json!({"name": "pinned-2", "source": "alpha@1"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(served(&s).await, ["pinned", "pinned-2"]);
    // With every slot pinned, an on-demand load is refused at once, naming the cap.
    let r = complete(&s, "beta").await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "adapter_limit");
    assert!(r.json()["error"]["message"]
        .as_str()
        .expect("message")
        .contains("--max-adapters"));
}

#[tokio::test]
async fn a_load_that_finds_no_free_slot_within_the_load_timeout_is_refused_naming_the_flag() {
    let reg = registry().await;
    let (s, probe) = gated_on_demand_server(&reg, &["--max-adapters", "1", "--adapter-load-timeout-s", "1"]).await;
    let (release, held) = hold_in_engine(&s, &probe, "alpha").await;
    let r = complete(&s, "beta").await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "adapter_limit");
    let message = r.json()["error"]["message"].as_str().expect("message").to_string();
    assert!(message.contains("--adapter-load-timeout-s"), "{message}");
    assert_eq!(served(&s).await, ["alpha"]);
    assert_eq!(metric(&s, "kubetune_server_adapter_loads_waiting").await, 0.0);
    release.send(()).expect("engine waits");
    assert_eq!(held.await.expect("task").status, 200);
}

#[tokio::test]
async fn on_demand_loading_without_a_registry_and_a_cache_fails_at_start_naming_the_flag() {
    let reg = registry().await;
    let cache = reg.cache_flag();
    for flags in [
        vec!["--adapter-on-demand"],
        vec!["--adapter-on-demand", "--registry", &reg.uri],
        vec!["--adapter-on-demand", "--cache-dir", &cache],
    ] {
        let error = match kubetune_server::server::build(&args(&flags)).await {
            Ok(_) => panic!("{flags:?} started"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains("--adapter-on-demand"), "{flags:?}: {error}");
    }
}

#[tokio::test]
async fn a_load_past_its_timeout_is_abandoned_with_an_error_naming_the_flag_and_a_later_request_loads() {
    let reg = registry().await;
    let s = on_demand_server(&reg, &["--adapter-load-timeout-s", "1"]).await;
    // Hold the cache's fill lock of alpha@1 as another process filling the same entry would
    // (kubetune-storage's key: sha256 over "adapter", the manifest digest's hex, each ended by
    // NUL), so the download cannot start.
    let manifest = std::fs::read(reg.version_dir("alpha").join("manifest.json")).expect("manifest");
    let digest = kubetune_storage::Sha256Digest::of(&manifest);
    let key = kubetune_storage::Sha256Digest::of(format!("adapter\0{}\0", digest.hex()).as_bytes());
    let locks = reg.cache().join("locks");
    std::fs::create_dir_all(&locks).expect("locks dir");
    let lock = std::fs::File::create(locks.join(format!("{}.lock", key.hex()))).expect("lock file");
    lock.lock().expect("lock");

    let r = complete(&s, "alpha").await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "storage_error");
    let message = r.json()["error"]["message"].as_str().expect("message").to_string();
    assert!(message.contains("--adapter-load-timeout-s"), "{message}");
    assert_eq!(
        metric(&s, "kubetune_server_adapter_loads_total{outcome=\"timeout\"}").await,
        1.0
    );
    assert!(served(&s).await.is_empty());

    drop(lock);
    let r = complete(&s, "alpha").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(served(&s).await, ["alpha"]);
}
