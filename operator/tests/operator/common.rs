//! The mocked API server (tower-test) the reconcile tests script: a context whose client talks
//! to it, answers checked by method and path, and a runner that fails on a request the script
//! did not expect.

use futures::future::BoxFuture;
use http::{Method, Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use kubetune_operator::config::OperatorConfig;
use kubetune_operator::context::{Backoff, Context};
use kubetune_operator::finetunejob::progress::MetricsReader;
use kubetune_operator::metrics::Metrics;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::Arc;
use tower_test::mock::{self, Handle};

pub type ApiHandle = Handle<Request<Body>, Response<Body>>;

pub fn context() -> (Arc<Context>, ApiHandle) {
    context_with(OperatorConfig::for_tests())
}

pub fn context_with(config: OperatorConfig) -> (Arc<Context>, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context {
        client: client.clone(),
        config,
        metrics: Arc::new(Metrics::new()),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "kubetune-operator".into(),
                instance: None,
            },
        ),
        metrics_reader: MetricsReader::default(),
        backoff: Backoff::default(),
        model_shapes: Default::default(),
        pod_http: kubetune_operator::podhttp::PodHttp::new(std::time::Duration::from_secs(5)),
        finetunejob_pace: Default::default(),
        modeldeployment_pace: Default::default(),
    };
    (Arc::new(ctx), handle)
}

/// Answers the next request, checking its method and path, and returns its JSON body. A null
/// reply echoes the request body back, as the API server does for a create or apply.
pub async fn expect(handle: &mut ApiHandle, method: Method, path_prefix: &str, status: u16, reply: Value) -> Value {
    expect_reply(handle, method, path_prefix, status, |body| {
        if reply.is_null() {
            body.clone()
        } else {
            reply
        }
    })
    .await
}

/// The Event the reconciler posts next in namespace team-a, as it posted it.
pub async fn expect_event(handle: &mut ApiHandle) -> Value {
    expect(
        handle,
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/team-a/events",
        200,
        Value::Null,
    )
    .await
}

/// Like [`expect`], replying with what `reply` makes of the request body.
pub async fn expect_reply(
    handle: &mut ApiHandle,
    method: Method,
    path_prefix: &str,
    status: u16,
    reply: impl FnOnce(&Value) -> Value,
) -> Value {
    let (request, send) = handle
        .next_request()
        .await
        .expect("the reconciler made another request");
    assert_eq!(request.method(), method, "request to {}", request.uri());
    let uri = request.uri().to_string();
    assert!(
        uri.starts_with(path_prefix),
        "expected {method} {path_prefix}..., got {uri}"
    );
    let body = request.into_body().collect_bytes().await.expect("request body");
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).expect("JSON body")
    };
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&reply(&body)).expect("json")))
            .expect("response"),
    );
    body
}

/// Runs one reconcile while `script` answers its requests in order, and returns the
/// reconcile's action with what the script returned. Fails on any request after the script
/// (rather than hanging on it), and when the reconcile ended before the script did.
pub async fn run_scripted<T, S, E>(
    reconcile: impl Future<Output = Result<Action, E>>,
    api: &mut ApiHandle,
    script: S,
) -> (Action, T)
where
    S: for<'a> FnOnce(&'a mut ApiHandle) -> BoxFuture<'a, T>,
    E: std::fmt::Debug,
{
    let played = std::cell::Cell::new(None);
    let server = async {
        played.set(Some(script(&mut *api).await));
        if let Some((request, _)) = api.next_request().await {
            panic!("unexpected request: {} {}", request.method(), request.uri());
        }
        // The client lives on in the context: the reconcile ending is what ends this.
        std::future::pending::<()>().await;
    };
    // The script first: it has played its part when it waits for a request and none came.
    let action = tokio::select! {
        biased;
        () = server => unreachable!("the script waits for the reconcile"),
        action = reconcile => action.expect("reconcile succeeds"),
    };
    let returned = played
        .take()
        .expect("the reconcile made every request the script expected");
    (action, returned)
}

pub fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

/// The API server's answer to a request RBAC does not allow.
pub fn forbidden() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "forbidden"})
}

/// The Ready condition a status patch sends.
pub fn ready_condition(status_patch: &Value) -> Value {
    status_patch["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready").cloned())
        .expect("Ready condition")
}
