//! The engine under load: a full queue answers 429, a disconnect cancels generation, a request
//! past its deadline is cancelled, and a quiet stream sends keep-alive comments.

use crate::common::*;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

fn body(max_tokens: usize, stream: bool) -> serde_json::Value {
    json!({"model": BASE, "prompt": "hello", "max_tokens": max_tokens, "temperature": 0, "stream": stream})
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after_and_admitted_requests_still_finish() {
    let (s, probe) = gated_server(&["--max-batch", "1", "--max-queue", "1", "--retry-after-s", "3"]).await;
    let release = probe.arm_prefill();
    let spawn = |app: axum::Router| tokio::spawn(async move { post(&app, "/v1/completions", body(4, false)).await });
    let running = spawn(s.app.clone());
    wait_until("first request in prefill", || probe.prefill_reached()).await;
    let queued = spawn(s.app.clone());
    wait_until("second request queued", || s.state.engine.in_flight() == 2).await;

    let refused = post(&s.app, "/v1/completions", body(4, false)).await;
    assert_eq!(refused.status, 429, "{}", refused.text);
    assert_eq!(refused.headers["retry-after"], "3");
    assert_eq!(refused.json()["error"]["code"], "queue_full");
    assert_eq!(refused.json()["error"]["type"], "rate_limit_error");

    release.send(()).expect("engine waits");
    assert_eq!(running.await.expect("task").status, 200);
    assert_eq!(queued.await.expect("task").status, 200);
    wait_until("permits returned", || s.state.engine.in_flight() == 0).await;
    let metrics = send(&s.app, "GET", "/metrics", None).await.text;
    assert!(
        metrics.contains(r#"kubetune_server_requests_total{model="tiny",status="429"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"kubetune_server_requests_total{model="tiny",status="200"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_disconnect_cancels_its_generation() {
    let (s, probe) = gated_server(&[]).await;
    let step = probe.gate_steps();
    let tokens_before = s.state.metrics.generated_tokens.get();
    let request = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(body(400, true).to_string()))
        .expect("request");
    let response = s.app.clone().oneshot(request).await.expect("router");
    assert_eq!(response.status(), 200);
    let mut stream = response.into_body();
    // A few decode steps, in case the first tokens are bytes of one character that the
    // detokenizer holds back until it is complete; then the engine waits at the gate.
    for _ in 0..5 {
        step.send(()).expect("engine alive");
    }
    let first = tokio::time::timeout(std::time::Duration::from_secs(60), stream.frame())
        .await
        .expect("text arrives within five decode steps")
        .expect("a frame")
        .expect("no error");
    assert!(first.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
    assert_eq!(s.state.engine.in_flight(), 1);
    drop(stream);
    // Let the engine step freely: it must notice the closed stream and stop.
    drop(step);
    wait_until("the cancelled sequence left the engine", || {
        s.state.engine.in_flight() == 0
    })
    .await;
    let generated = s.state.metrics.generated_tokens.get() - tokens_before;
    assert!(
        generated < 10,
        "generation went on after the disconnect: {generated} tokens"
    );
}

#[tokio::test]
async fn new_requests_join_a_running_batch_between_decode_steps() {
    let (s, probe) = gated_server(&["--max-batch", "4"]).await;
    let step = probe.gate_steps();
    let first = tokio::spawn({
        let app = s.app.clone();
        async move { post(&app, "/v1/completions", body(8, false)).await }
    });
    wait_until("first request running", || s.state.engine.in_flight() == 1).await;
    // The first sequence is now decoding one step per message; a second request arrives
    // while it runs and must be decoded alongside it, not after it.
    step.send(()).expect("engine steps");
    let second = tokio::spawn({
        let app = s.app.clone();
        async move { post(&app, "/v1/completions", body(4, false)).await }
    });
    wait_until("second request admitted", || s.state.engine.in_flight() == 2).await;
    drop(step);
    assert_eq!(first.await.expect("task").status, 200);
    assert_eq!(second.await.expect("task").status, 200);
    assert_eq!(probe.max_batch_in_step.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn shutdown_refuses_new_requests_and_readiness_drops() {
    let s = server(&[]).await;
    assert_eq!(send(&s.app, "GET", "/ready", None).await.status, 200);
    s.state.set_ready(false);
    s.state.engine.close();
    assert_eq!(send(&s.app, "GET", "/ready", None).await.status, 503);
    let reply = post(&s.app, "/v1/completions", body(2, false)).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"]["code"], "shutting_down");
    assert_eq!(send(&s.app, "GET", "/health", None).await.status, 200);
}

/// One HTTP/1.1 request over a real socket; returns the raw response.
async fn raw_post(addr: std::net::SocketAddr, path: &str, body: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.expect("write head");
    conn.write_all(body.as_bytes()).await.expect("write body");
    let mut out = Vec::new();
    conn.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn graceful_shutdown_lets_in_flight_requests_finish() {
    let (s, probe) = gated_server(&[]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let deadline = std::time::Duration::from_secs(600);
    let serving = tokio::spawn(kubetune_server::server::serve(
        s.state.clone(),
        listener,
        None,
        deadline,
        async move {
            let _ = stopped.await;
        },
    ));
    let release = probe.arm_prefill();
    let client = tokio::spawn(raw_post(addr, "/v1/completions", body(5, false).to_string()));
    wait_until("request in the engine", || probe.prefill_reached()).await;

    stop.send(()).expect("server listens for the signal");
    wait_until("readiness dropped", || !s.state.is_ready()).await;
    let late = post(&s.app, "/v1/completions", body(2, false)).await;
    assert_eq!(late.status, 503, "new work is refused once shutdown began");

    release.send(()).expect("engine waits");
    let reply = client.await.expect("client task");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"text_completion\""), "{reply}");
    // serve returns once the in-flight request is done, long before the 600 s deadline.
    let finished = tokio::time::timeout(std::time::Duration::from_secs(120), serving).await;
    finished
        .expect("serve returned after draining")
        .expect("task")
        .expect("serve ok");
}

#[tokio::test]
async fn a_failed_engine_step_fails_only_its_request_and_health_stays_up() {
    let (s, probe) = gated_server(&[]).await;
    probe.fail_next.store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = post(&s.app, "/v1/completions", body(3, false)).await;
    assert_eq!(failed.status, 500, "{}", failed.text);
    assert_eq!(failed.json()["error"]["code"], "internal_error");
    assert!(failed.headers.contains_key("x-request-id"));
    assert_eq!(post(&s.app, "/v1/completions", body(3, false)).await.status, 200);
    assert_eq!(send(&s.app, "GET", "/health", None).await.status, 200);
    assert_eq!(send(&s.app, "GET", "/ready", None).await.status, 200);
}

#[tokio::test]
async fn a_dead_engine_thread_fails_health_and_readiness() {
    let (s, probe) = gated_server(&[]).await;
    assert_eq!(send(&s.app, "GET", "/health", None).await.status, 200);
    probe.panic_next.store(true, std::sync::atomic::Ordering::SeqCst);
    let lost = post(&s.app, "/v1/completions", body(3, false)).await;
    assert_eq!(lost.status, 500, "{}", lost.text);
    wait_until("the engine thread has ended", || !s.state.engine.is_alive()).await;
    for path in ["/health", "/ready"] {
        assert_eq!(send(&s.app, "GET", path, None).await.status, 503, "{path}");
    }
    let refused = post(&s.app, "/v1/completions", body(3, false)).await;
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(refused.json()["error"]["code"], "engine_stopped");
}

#[tokio::test]
async fn with_an_admin_listener_the_admin_api_answers_there_and_not_on_the_client_port() {
    let s = server(&[]).await;
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let (listener, admin) = (bind().await.expect("bind"), bind().await.expect("bind"));
    let (addr, admin_addr) = (listener.local_addr().expect("addr"), admin.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(kubetune_server::server::serve(
        s.state.clone(),
        listener,
        Some(admin),
        std::time::Duration::from_secs(5),
        async move {
            let _ = stopped.await;
        },
    ));
    let load = json!({"name": "a", "source": "/nowhere"}).to_string();
    let reply = raw_post(addr, "/v1/adapters", load.clone()).await;
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    // No key sent: the admin port has the route, and it still wants the admin key.
    let reply = raw_post(admin_addr, "/v1/adapters", load).await;
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    let reply = raw_post(admin_addr, "/v1/completions", body(2, false).to_string()).await;
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    stop.send(()).expect("server listens for the signal");
    tokio::time::timeout(std::time::Duration::from_secs(60), serving)
        .await
        .expect("serve returned")
        .expect("task")
        .expect("serve ok");
}

#[tokio::test]
async fn a_request_past_the_deadline_is_cancelled_and_answered_504_while_one_within_it_is_served() {
    let (s, probe) = gated_server(&["--request-timeout-s", "1"]).await;
    assert_eq!(post(&s.app, "/v1/completions", body(4, false)).await.status, 200);

    let step = probe.gate_steps();
    let late = post(&s.app, "/v1/completions", body(400, false)).await;
    assert_eq!(late.status, 504, "{}", late.text);
    let error = &late.json()["error"];
    assert_eq!(
        (&error["code"], &error["type"]),
        (&json!("request_timeout"), &json!("server_error"))
    );
    assert!(error["message"].as_str().is_some_and(|m| m.contains("1 s")), "{error}");
    // The engine, released, finds the sequence cancelled instead of decoding 400 tokens.
    drop(step);
    wait_until("the late sequence left the engine", || s.state.engine.in_flight() == 0).await;
    let metrics = send(&s.app, "GET", "/metrics", None).await.text;
    assert!(
        metrics.contains(r#"kubetune_server_requests_total{model="tiny",status="504"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_stream_past_the_deadline_ends_with_an_error_event_then_done() {
    let (s, probe) = gated_server(&["--request-timeout-s", "1"]).await;
    let step = probe.gate_steps();
    let late = post(&s.app, "/v1/completions", body(400, true)).await;
    assert_eq!(late.status, 200, "the stream had started");
    let data: Vec<&str> = late.text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{}", late.text);
    let error: Value = serde_json::from_str(data[data.len() - 2]).expect("the error event is JSON");
    assert_eq!(error["error"]["code"], "request_timeout", "{}", late.text);
    drop(step);
    wait_until("the late sequence left the engine", || s.state.engine.in_flight() == 0).await;
}

#[tokio::test]
async fn a_stream_waiting_for_its_prefill_sends_keep_alive_comments() {
    let (s, probe) = gated_server(&["--sse-keep-alive-s", "1"]).await;
    let release = probe.arm_prefill();
    let request = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(body(4, true).to_string()))
        .expect("request");
    let response = s.app.clone().oneshot(request).await.expect("router");
    let mut stream = response.into_body();
    wait_until("the request in prefill", || probe.prefill_reached()).await;
    let first = tokio::time::timeout(std::time::Duration::from_secs(60), stream.frame())
        .await
        .expect("a frame while the prefill waits")
        .expect("a frame")
        .expect("no error");
    let bytes = first.data_ref().expect("data").clone();
    assert!(bytes.starts_with(b":"), "an SSE comment, not data: {bytes:?}");
    release.send(()).expect("engine waits");
    let mut rest = Vec::new();
    while let Some(frame) = stream.frame().await {
        if let Some(d) = frame.expect("no error").data_ref() {
            rest.extend_from_slice(d);
        }
    }
    assert!(String::from_utf8_lossy(&rest).contains("data: [DONE]"));
}
