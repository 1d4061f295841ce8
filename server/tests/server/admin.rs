//! The admin API, adapter caps and checks, the registry path, auth and operational endpoints.

use crate::common::*;
use kubetune_storage::{Registry, Storage};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

fn load_body(name: &str, dir: &std::path::Path) -> Value {
    json!({"name": name, "source": dir.display().to_string()})
}

#[tokio::test]
async fn hot_loading_and_unloading_adapters_under_traffic_drops_no_request() {
    let f = fixture();
    let s = server(&["--max-batch", "4", "--adapter", &adapter_flag("a", &f.adapter_a)]).await;
    let admin_done = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let traffic = tokio::spawn({
        let (app, admin_done, rounds) = (s.app.clone(), admin_done.clone(), rounds.clone());
        async move {
            let mut replies = Vec::new();
            // Keep going until the admin calls are done, and a few rounds beyond.
            let mut after = 0;
            while after < 3 {
                if admin_done.load(Ordering::SeqCst) {
                    after += 1;
                }
                let batch: Vec<_> = [BASE, "a", BASE, "a"]
                    .into_iter()
                    .map(|m| {
                        let app = app.clone();
                        let body = json!({"model": m, "prompt": "hello", "max_tokens": 6, "temperature": 0});
                        tokio::spawn(async move { post(&app, "/v1/completions", body).await })
                    })
                    .collect();
                for r in batch {
                    replies.push(r.await.expect("task"));
                }
                rounds.fetch_add(1, Ordering::SeqCst);
            }
            replies
        }
    });
    wait_until("traffic is flowing", || rounds.load(Ordering::SeqCst) >= 1).await;
    let loaded = load(
        &s.app,
        json!({"name": "b", "source": f.adapter_b.display().to_string(), "version": 2}),
    )
    .await;
    assert_eq!(loaded.status, 200, "{}", loaded.text);
    // Replace `a` with other weights while requests for `a` are running.
    let replaced = load(
        &s.app,
        json!({"name": "a", "source": f.adapter_b.display().to_string(), "version": 2}),
    )
    .await;
    assert_eq!(replaced.status, 200, "{}", replaced.text);
    let b = post(
        &s.app,
        "/v1/completions",
        json!({"model": "b@2", "prompt": "hello", "max_tokens": 3}),
    )
    .await;
    assert_eq!(b.status, 200, "{}", b.text);
    let deleted = admin_send(&s.app, "DELETE", "/v1/adapters/b", None).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    admin_done.store(true, Ordering::SeqCst);
    let replies = traffic.await.expect("traffic task");
    assert!(replies.len() >= 16);
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let models = send(&s.app, "GET", "/v1/models", None).await;
    let list: kubetune_crds::server_contract::ModelList =
        serde_json::from_str(&models.text).expect("the operator can read /v1/models");
    let ids: Vec<(String, Option<u32>)> = list.data.into_iter().map(|m| (m.id, m.version)).collect();
    assert_eq!(ids, vec![(BASE.to_string(), None), ("a".to_string(), Some(2))]);
    let gone = post(&s.app, "/v1/completions", json!({"model": "b", "prompt": "hi"})).await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json()["error"]["code"], "model_not_found");
    assert_eq!(admin_send(&s.app, "DELETE", "/v1/adapters/b", None).await.status, 404);
}

#[tokio::test]
async fn adapters_that_do_not_fit_are_refused_with_the_reason() {
    let f = fixture();
    let s = server(&[
        "--max-adapters",
        "2",
        "--max-adapter-rank",
        "6",
        "--adapter",
        &adapter_flag("a", &f.adapter_a),
    ])
    .await;
    let dir = tempfile::tempdir().expect("temp dir");

    // Shapes of another model (hidden 32 instead of 64).
    let other = kubetune_model::tiny::TinySpec {
        hidden_size: 32,
        ..Default::default()
    }
    .config();
    let wrong_shape = dir.path().join("wrong-shape");
    write_adapter(&wrong_shape, &other, 4, 3, &f.model.display().to_string());
    seal(&wrong_shape, "x", 1);
    let r = load(&s.app, load_body("x", &wrong_shape)).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("shape"),
        "{}",
        r.text
    );

    let config = kubetune_model::tiny::TinySpec::default().config();
    let other_base = dir.path().join("other-base");
    write_adapter(&other_base, &config, 4, 3, "meta-llama/Llama-3.1-8B");
    seal(&other_base, "x", 1);
    let r = load(&s.app, load_body("x", &other_base)).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("meta-llama/Llama-3.1-8B"));

    // Rank 8 over a cap of 6 (adapter_b has r = 8).
    let r = load(&s.app, load_body("x", &f.adapter_b)).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("--max-adapter-rank"));

    // Count cap: a + c fit, d does not; replacing a loaded name does not count twice.
    assert_eq!(load(&s.app, load_body("c", &f.adapter_a)).await.status, 200);
    let r = load(&s.app, load_body("d", &f.adapter_a)).await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "adapter_limit");
    assert_eq!(load(&s.app, load_body("c", &f.adapter_a)).await.status, 200);

    for (body, param) in [
        (json!({"source": "/x"}), "name"),
        (json!({"name": "c"}), "source"),
        (json!({"name": "c", "source": "/x", "version": 0}), "version"),
        (json!({"name": "c", "source": "/x", "digest": "md5:1"}), "digest"),
        (json!({"name": "Bad Name!", "source": "/x"}), "name"),
        (json!({"name": "c", "source": "no-registry@1"}), "source"),
    ] {
        let r = load(&s.app, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert_eq!(r.json()["error"]["param"], param, "{body}: {}", r.text);
    }
    let metrics = send(&s.app, "GET", "/metrics", None).await.text;
    assert!(metrics.contains("kubetune_server_loaded_adapters 2"), "{metrics}");
}

#[tokio::test]
async fn adapters_load_from_the_registry_and_the_operators_adapters_file() {
    let f = fixture();
    let root = tempfile::tempdir().expect("temp dir");
    let registry_uri = format!("file://{}", root.path().join("registry").display());
    let registry =
        Registry::open(Storage::from_uri(&registry_uri, &kubetune_storage::Credentials::none()).expect("storage"));
    let publish = |dir: &std::path::Path| publish_request("support-bot", dir, &f.model);
    let v1 = registry.publish(&publish(&f.raw_a), None).await.expect("publish v1");
    let v2 = registry.publish(&publish(&f.raw_b), None).await.expect("publish v2");
    let adapters_file = root.path().join("adapters.json");
    let file = json!({"adapters": [{"name": "bot", "source": "support-bot@1", "version": 1, "digest": v1.digest.to_string()}]});
    std::fs::write(&adapters_file, file.to_string()).expect("write adapters file");
    let cache = root.path().join("cache");
    let s = server(&[
        "--registry",
        &registry_uri,
        "--cache-dir",
        cache.to_str().expect("utf-8"),
        "--adapters-file",
        adapters_file.to_str().expect("utf-8"),
    ])
    .await;
    let models = send(&s.app, "GET", "/v1/models", None).await.json();
    assert_eq!(models["data"][1]["id"], "bot");
    assert_eq!(models["data"][1]["version"], 1);
    assert_eq!(models["data"][1]["digest"], json!(v1.digest.to_string()));

    // The operator's hot swap: the next version, pinned by digest.
    let swap = json!({"name": "bot", "source": "support-bot@2", "version": 2, "digest": v2.digest.to_string()});
    let r = load(&s.app, swap).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = post(
        &s.app,
        "/v1/completions",
        json!({"model": format!("bot@{}", v2.digest), "prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // A digest that is not the version's is refused and the loaded version stays.
    let wrong = json!({"name": "bot", "source": "support-bot@1", "version": 1, "digest": v2.digest.to_string()});
    let r = load(&s.app, wrong).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"]["param"], "digest");
    let missing = load(&s.app, json!({"name": "bot", "source": "support-bot@9"})).await;
    assert_eq!(missing.status, 400, "{}", missing.text);
    assert_eq!(
        send(&s.app, "GET", "/v1/models", None).await.json()["data"][1]["version"],
        2
    );
}

/// What GET /v1/adapters reports for `name`: (version, digest), or None when not loaded.
async fn loaded(app: &axum::Router, name: &str) -> Option<(Value, Value)> {
    let list = admin_send(app, "GET", "/v1/adapters", None).await.json();
    let data = list["data"].as_array().cloned().unwrap_or_default();
    data.into_iter()
        .find(|e| e["id"] == name)
        .map(|e| (e["version"].clone(), e["digest"].clone()))
}

#[tokio::test]
async fn a_location_loads_only_as_the_version_and_digest_its_manifest_verifies() {
    let f = fixture();
    let s = server(&[]).await;
    // Without claims, the version and digest are the manifest's, not absent or made up.
    let r = load(&s.app, load_body("a", &f.adapter_a)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(loaded(&s.app, "a").await, Some((json!(1), json!(f.digest_a))));

    let a = f.adapter_a.display().to_string();
    for (body, param, says) in [
        (
            json!({"name": "c", "source": a, "version": 2}),
            "version",
            "version 2 was asked for",
        ),
        (
            json!({"name": "c", "source": a, "digest": f.digest_b}),
            "digest",
            "was asked for",
        ),
        (
            json!({"name": "c", "source": a, "version": 1, "digest": f.digest_b}),
            "digest",
            "was asked for",
        ),
    ] {
        let r = load(&s.app, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert_eq!(r.json()["error"]["param"], param, "{body}: {}", r.text);
        assert!(
            r.json()["error"]["message"].as_str().unwrap_or_default().contains(says),
            "{}",
            r.text
        );
        assert_eq!(loaded(&s.app, "c").await, None, "{body}: nothing is loaded");
    }
    // A refused replacement leaves the loaded version serving.
    let r = load(&s.app, json!({"name": "a", "source": a, "version": 7})).await;
    assert_eq!(r.json()["error"]["param"], "version", "{}", r.text);
    assert_eq!(loaded(&s.app, "a").await, Some((json!(1), json!(f.digest_a))));
}

#[tokio::test]
async fn files_no_manifest_vouches_for_are_refused_at_the_source() {
    let f = fixture();
    let root = tempfile::tempdir().expect("temp dir");
    let cache = root.path().join("cache");
    let s = server(&["--cache-dir", cache.to_str().expect("utf-8")]).await;
    let refused = |what: &'static str, body: Value, says: &'static str| {
        let app = s.app.clone();
        async move {
            let r = load(&app, body).await;
            assert_eq!(r.status, 400, "{what}: {}", r.text);
            assert_eq!(r.json()["error"]["param"], "source", "{what}: {}", r.text);
            let message = r.json()["error"]["message"].as_str().unwrap_or_default().to_string();
            assert!(message.contains(says), "{what}: {message}");
        }
    };
    // Raw PEFT output, named as a path or through the cache, has no manifest: nothing says what
    // its version is, so it is refused rather than loaded unverified.
    refused("raw path", load_body("x", &f.raw_a), "manifest.json").await;
    let raw_uri = format!("file://{}", f.raw_a.display());
    refused("raw URI", json!({"name": "x", "source": raw_uri}), "manifest.json").await;
    // Weights changed after the manifest was written (same size, other bytes).
    let tampered = root.path().join("tampered");
    std::fs::create_dir(&tampered).expect("mkdir");
    for entry in std::fs::read_dir(&f.adapter_a).expect("read adapter") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, tampered.join(path.file_name().expect("name"))).expect("copy");
    }
    let weights = tampered.join(kubetune_model::peft::ADAPTER_WEIGHTS);
    let mut bytes = std::fs::read(&weights).expect("weights");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).expect("write weights");
    refused("tampered weights", load_body("x", &tampered), "digest mismatch").await;
    assert_eq!(loaded(&s.app, "x").await, None);
    // A version directory named by URI is verified like a path, and reports its manifest.
    let uri = format!("file://{}", f.adapter_b.display());
    let r = load(
        &s.app,
        json!({"name": "b", "source": uri, "version": 2, "digest": f.digest_b}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(loaded(&s.app, "b").await, Some((json!(2), json!(f.digest_b))));
}

#[tokio::test]
async fn api_keys_guard_v1_but_not_probes_or_metrics() {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "# comment\nsecret-1\n\nsecret-2\n").expect("write keys");
    let s = server(&["--api-keys-file", keys.to_str().expect("utf-8")]).await;
    let body = json!({"model": BASE, "prompt": "hi", "max_tokens": 2}).to_string();
    let none = send(&s.app, "POST", "/v1/completions", Some(body.clone())).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.json()["error"]["code"], "invalid_api_key");
    assert_eq!(
        send_with(&s.app, "POST", "/v1/completions", Some(body.clone()), Some("wrong"))
            .await
            .status,
        401
    );
    assert_eq!(
        send_with(&s.app, "POST", "/v1/completions", Some(body), Some("secret-2"))
            .await
            .status,
        200
    );
    assert_eq!(send(&s.app, "GET", "/v1/models", None).await.status, 401);
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(send(&s.app, "GET", path, None).await.status, 200, "{path}");
    }
}

fn keys_file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write keys");
    path.to_str().expect("utf-8").to_string()
}

#[tokio::test]
async fn the_admin_api_takes_only_admin_keys_and_model_listing_takes_either() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("temp dir");
    let (api, admin) = (
        keys_file(&dir, "api", "client-key\n"),
        keys_file(&dir, "admin", "operator-key\n"),
    );
    let s = server(&["--api-keys-file", &api, "--admin-api-key-file", &admin]).await;
    let load = Some(load_body("a", &f.adapter_a).to_string());
    for key in [None, Some("client-key"), Some("wrong")] {
        let r = send_with(&s.app, "POST", "/v1/adapters", load.clone(), key).await;
        assert_eq!(r.status, 401, "{key:?}: {}", r.text);
        assert_eq!(
            send_with(&s.app, "DELETE", "/v1/adapters/a", None, key).await.status,
            401,
            "{key:?}"
        );
        assert_eq!(
            send_with(&s.app, "GET", "/v1/adapters", None, key).await.status,
            401,
            "{key:?}"
        );
    }
    let r = send_with(&s.app, "POST", "/v1/adapters", load, Some("operator-key")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(send(&s.app, "GET", "/v1/models", None).await.status, 401);
    for key in ["client-key", "operator-key"] {
        let r = send_with(&s.app, "GET", "/v1/models", None, Some(key)).await;
        assert_eq!(r.status, 200, "{key}: {}", r.text);
        assert_eq!(r.json()["data"][1]["id"], "a");
    }
    // An admin key is not an inference credential.
    let body = Some(json!({"model": "a", "prompt": "hi", "max_tokens": 2}).to_string());
    assert_eq!(
        send_with(&s.app, "POST", "/v1/completions", body.clone(), Some("operator-key"))
            .await
            .status,
        401
    );
    assert_eq!(
        send_with(&s.app, "POST", "/v1/completions", body, Some("client-key"))
            .await
            .status,
        200
    );
    assert_eq!(
        send_with(&s.app, "DELETE", "/v1/adapters/a", None, Some("operator-key"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn without_an_admin_key_file_every_admin_route_is_refused_as_disabled() {
    let f = fixture();
    let s = server_without_admin_key(&["--adapter", &adapter_flag("a", &f.adapter_a)]).await;
    let requests = [
        ("POST", "/v1/adapters", Some(load_body("b", &f.adapter_b).to_string())),
        ("GET", "/v1/adapters", None),
        ("DELETE", "/v1/adapters/a", None),
    ];
    for (method, path, body) in requests {
        let r = send(&s.app, method, path, body).await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text);
        assert_eq!(r.json()["error"]["code"], "admin_api_disabled", "{method} {path}");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("--admin-api-key-file"),
            "{}",
            r.text
        );
    }
    // Nothing changed: `a` still serves, `b` was never loaded.
    let ids: Vec<Value> = send(&s.app, "GET", "/v1/models", None).await.json()["data"]
        .as_array()
        .expect("list")
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!(BASE), json!("a")]);
}

#[tokio::test]
async fn each_key_file_guards_only_its_own_routes() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("temp dir");
    // API keys only: inference is guarded, and the admin API is off whatever key is sent.
    let s = server_without_admin_key(&["--api-keys-file", &keys_file(&dir, "api", "client-key\n")]).await;
    let load = Some(load_body("a", &f.adapter_a).to_string());
    for key in [None, Some("client-key"), Some(ADMIN_KEY)] {
        let r = send_with(&s.app, "POST", "/v1/adapters", load.clone(), key).await;
        assert_eq!(r.status, 403, "{key:?}: {}", r.text);
        assert_eq!(r.json()["error"]["code"], "admin_api_disabled");
        assert_eq!(r.json()["error"]["type"], "permission_error");
    }
    assert_eq!(send(&s.app, "GET", "/v1/models", None).await.status, 401);
    // Admin key only: inference and the listing stay open, the admin API does not.
    let s = server(&["--admin-api-key-file", &keys_file(&dir, "admin", "operator-key\n")]).await;
    let r = send(&s.app, "POST", "/v1/adapters", load).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert_eq!(send(&s.app, "GET", "/v1/models", None).await.status, 200);
    let r = post(
        &s.app,
        "/v1/completions",
        json!({"model": BASE, "prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);

    let empty = keys_file(&dir, "empty", "# no keys yet\n");
    let err = kubetune_server::server::build(&args(&["--admin-api-key-file", &empty]))
        .await
        .err()
        .expect("empty key file");
    assert!(err.to_string().contains("--admin-api-key-file"), "{err}");
}

#[tokio::test]
async fn metrics_expose_the_documented_series() {
    let s = server(&[]).await;
    let r = post(
        &s.app,
        "/v1/completions",
        json!({"model": BASE, "prompt": "hello", "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200);
    let text = send(&s.app, "GET", "/metrics", None).await.text;
    for name in [
        r#"kubetune_server_requests_total{model="tiny",status="200"} 1"#,
        "kubetune_server_time_to_first_token_seconds_count",
        "kubetune_server_inter_token_latency_seconds_count",
        r#"kubetune_server_request_duration_seconds_count{model="tiny"} 1"#,
        "kubetune_server_generated_tokens_total",
        "kubetune_server_queue_depth",
        "kubetune_server_batch_size_count",
        "kubetune_server_loaded_adapters 0",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
}

#[tokio::test]
async fn startup_fails_with_the_flag_or_adapter_named() {
    let f = fixture();
    let err = |extra: &[&str]| {
        let args = args(extra);
        async move {
            kubetune_server::server::build(&args)
                .await
                .err()
                .expect("start-up must fail")
                .to_string()
        }
    };
    assert!(err(&["--max-context", "100000"]).await.contains("--max-context"));
    assert!(err(&["--merge"]).await.contains("--merge"));
    let bad_quantize = <kubetune_server::server::Args as clap::Parser>::try_parse_from([
        "kubetune-server",
        "--model",
        "m",
        "--quantize",
        "int4",
    ]);
    let message = bad_quantize.expect_err("int4 is not offered").to_string();
    assert!(message.contains("--quantize") && message.contains("int8"), "{message}");
    let bad = err(&["--adapter", "x=/nonexistent/adapter"]).await;
    assert!(
        bad.contains("adapter `x`") && bad.contains("/nonexistent/adapter"),
        "{bad}"
    );
    let twice = err(&[
        "--adapter",
        &adapter_flag("a", &f.adapter_a),
        "--adapter",
        &adapter_flag("a", &f.adapter_b),
    ])
    .await;
    assert!(twice.contains("listed twice"), "{twice}");
    // Start-up loads are verified as hot loads are.
    let raw = err(&["--adapter", &adapter_flag("x", &f.raw_a)]).await;
    assert!(raw.contains("adapter `x`") && raw.contains("manifest.json"), "{raw}");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("adapters.json");
    let claims = json!({"adapters": [{"name": "a", "source": f.adapter_a, "version": 2, "digest": f.digest_a}]});
    std::fs::write(&file, claims.to_string()).expect("write adapters file");
    let wrong = err(&["--adapters-file", file.to_str().expect("utf-8")]).await;
    assert!(wrong.contains("version 2 was asked for"), "{wrong}");
}

/// The value of the series written exactly as `series` (name and labels) in `text`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .expect("a number")
}

#[tokio::test]
async fn vllm_named_series_count_what_requests_did() {
    let (s, probe) = gated_server(&[]).await;
    let before = send(&s.app, "GET", "/metrics", None).await.text;
    let label = r#"{model_name="tiny"}"#;
    let series = |name: &str| format!("{name}{label}");

    // A request held at its first decode step shows as running, with KV cache reserved.
    let step = probe.gate_steps();
    let running = tokio::spawn({
        let app = s.app.clone();
        async move {
            let body = json!({"model": BASE, "prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": true});
            post(&app, "/v1/completions", body).await
        }
    });
    wait_until("the request is counted as running", || {
        s.state.metrics.vllm.num_requests_running.get() == 1
    })
    .await;
    let during = send(&s.app, "GET", "/metrics", None).await.text;
    assert!(sample(&during, &series("vllm:kv_cache_usage_perc")) > 0.0, "{during}");
    drop(step);
    let done = running.await.expect("task").json();
    wait_until("the engine is idle", || {
        s.state.metrics.vllm.num_requests_running.get() == 0
    })
    .await;

    let after = send(&s.app, "GET", "/metrics", None).await.text;
    let delta = |name: &str| sample(&after, name) - sample(&before, name);
    assert_eq!(
        delta(&series("vllm:prompt_tokens_total")),
        done["usage"]["prompt_tokens"].as_f64().expect("usage")
    );
    assert_eq!(delta(&series("vllm:generation_tokens_total")), 4.0);
    assert_eq!(delta(&series("vllm:time_to_first_token_seconds_count")), 1.0);
    assert_eq!(sample(&after, &series("vllm:e2e_request_latency_seconds_count")), 1.0);
    assert_eq!(
        sample(
            &after,
            r#"vllm:request_success_total{finished_reason="length",model_name="tiny"}"#
        ),
        1.0
    );
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ] {
        assert_eq!(sample(&after, &series(name)), 0.0, "{name}");
    }
}

#[tokio::test]
async fn vllm_lora_requests_info_names_the_adapters_of_running_requests() {
    let f = fixture();
    let (s, probe) = gated_server(&["--adapter", &adapter_flag("a", &f.adapter_a)]).await;
    let info = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("vllm:lora_requests_info{"))
            .map(str::to_string)
            .collect()
    };
    // A request of adapter `a`, held at a decode step.
    let step = probe.gate_steps();
    let held = tokio::spawn({
        let app = s.app.clone();
        async move {
            let body = json!({"model": "a", "prompt": "hello", "max_tokens": 2, "temperature": 0, "ignore_eos": true});
            post(&app, "/v1/completions", body).await
        }
    });
    wait_until("the adapter request runs", || {
        s.state.metrics.vllm.num_requests_running.get() == 1
    })
    .await;
    let during = info(&send(&s.app, "GET", "/metrics", None).await.text);
    assert_eq!(during.len(), 1, "one series at a time: {during:?}");
    assert!(
        during[0].contains(r#"max_lora="16""#)
            && during[0].contains(r#"running_lora_adapters="a""#)
            && during[0].contains(r#"waiting_lora_adapters="""#),
        "{during:?}"
    );
    let since: f64 = during[0].rsplit(' ').next().expect("value").parse().expect("a number");
    assert!(since > 1.7e9, "when it last changed, in Unix seconds: {since}");
    drop(step);
    assert_eq!(held.await.expect("task").status, 200);
    wait_until("the engine is idle", || {
        s.state.metrics.vllm.num_requests_running.get() == 0
    })
    .await;
    let after = info(&send(&s.app, "GET", "/metrics", None).await.text);
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(after[0].contains(r#"running_lora_adapters="""#), "{after:?}");
}

#[tokio::test]
async fn with_a_separate_admin_port_the_client_port_has_no_admin_api_and_the_admin_port_only_it() {
    let f = fixture();
    let s = server(&[]).await;
    let public = kubetune_server::api::public_router(s.state.clone());
    let admin = kubetune_server::api::admin_router(s.state.clone());
    let r = send_with(
        &public,
        "POST",
        "/v1/adapters",
        Some(load_body("a", &f.adapter_a).to_string()),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "not_found");

    let r = send(
        &admin,
        "POST",
        "/v1/adapters",
        Some(load_body("a", &f.adapter_a).to_string()),
    )
    .await;
    assert_eq!(
        r.status, 401,
        "the admin port still takes only the admin key: {}",
        r.text
    );
    let r = send_with(
        &admin,
        "POST",
        "/v1/adapters",
        Some(load_body("a", &f.adapter_a).to_string()),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Clients reach the adapter through the client port; the admin port serves no inference.
    let body = json!({"model": "a", "prompt": "hi", "max_tokens": 2});
    assert_eq!(post(&public, "/v1/completions", body.clone()).await.status, 200);
    assert_eq!(post(&admin, "/v1/completions", body).await.status, 404);
}
