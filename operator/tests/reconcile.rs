//! The FineTuneJob and ModelDeployment reconcile sequences against a mocked API server
//! (tower-test): which calls they make, in which order, and what they send.

use http::{Method, Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use kubetune_crds::{FineTuneJob, ModelDeployment};
use kubetune_operator::config::OperatorConfig;
use kubetune_operator::context::{Backoff, Context};
use kubetune_operator::finetunejob::{progress::MetricsReader, reconcile};
use kubetune_operator::metrics::Metrics;
use kubetune_operator::modeldeployment;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tower_test::mock::{self, Handle};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

fn finetunejob(extra_spec: Value) -> FineTuneJob {
    let mut spec = json!({
        // pvc:// models are not read by the operator, so the mock sees no storage traffic.
        "baseModel": {"uri": "pvc://models/tiny"},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8},
        "dataset": {"uri": "s3://data/train.jsonl", "format": "text"},
        "training": {"epochs": 1, "learningRate": 0.001},
        "output": {"adapterName": "tiny"},
    });
    if let (Some(s), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        s.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "tiny", "namespace": "team-a", "uid": "1111-2222", "generation": 1},
        "spec": spec,
    }))
    .expect("valid FineTuneJob")
}

fn context() -> (Arc<Context>, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context {
        client: client.clone(),
        config: OperatorConfig::for_tests(),
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
    };
    (Arc::new(ctx), handle)
}

/// Answers the next request, checking its method and path, and returns its JSON body. A null
/// reply echoes the request body back, as the API server does for a create or apply.
async fn expect(handle: &mut ApiHandle, method: Method, path_prefix: &str, status: u16, reply: Value) -> Value {
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
    let reply = if reply.is_null() {
        serde_json::from_slice(&body).expect("JSON body")
    } else {
        reply
    };
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&reply).expect("json")))
            .expect("response"),
    );
    if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).expect("JSON body")
    }
}

/// The FineTuneJob as the API server returns it after a status patch.
fn stored() -> Value {
    serde_json::to_value(finetunejob(json!({}))).expect("json")
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

fn empty_list(kind: &str) -> Value {
    json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []})
}

#[tokio::test]
async fn new_job_creates_the_trainer_job_and_reports_pending() {
    let (ctx, mut api) = context();
    let ftj = Arc::new(finetunejob(json!({})));
    let server = tokio::spawn(async move {
        expect(&mut api, Method::GET, "/api/v1/nodes", 200, json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "items": [
            {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": "n1", "labels": {"nvidia.com/gpu.memory": "81920"}}}
        ]})).await;
        expect(
            &mut api,
            Method::GET,
            "/apis/batch/v1/namespaces/team-a/jobs/tiny",
            404,
            not_found(),
        )
        .await;
        let job = expect(
            &mut api,
            Method::PATCH,
            "/apis/batch/v1/namespaces/team-a/jobs/tiny?&force=true&fieldManager=kubetune-operator",
            200,
            Value::Null,
        )
        .await;
        assert_eq!(job["metadata"]["ownerReferences"][0]["uid"], "1111-2222");
        assert_eq!(job["spec"]["suspend"], false);
        assert_eq!(
            job["spec"]["template"]["spec"]["containers"][0]["image"],
            "kubetune/trainer:test"
        );
        let env = job["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            env.contains(&json!({"name": "KUBETUNE_DEVICE", "value": "cuda"})),
            "no resources: one GPU, and the trainer is told to use it: {env:?}"
        );
        expect(
            &mut api,
            Method::GET,
            "/api/v1/namespaces/team-a/pods?&labelSelector=kubetune.dev%2Ffinetunejob%3Dtiny",
            200,
            empty_list("PodList"),
        )
        .await;
        let status = expect(
            &mut api,
            Method::PATCH,
            "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tiny/status",
            200,
            stored(),
        )
        .await;
        assert_eq!(status["status"]["phase"], "Pending");
        assert_eq!(status["status"]["observedGeneration"], 1);
        let event = expect(
            &mut api,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/team-a/events",
            200,
            Value::Null,
        )
        .await;
        assert_eq!(event["reason"], "Pending");
        api
    });
    let action = reconcile(ftj, ctx).await.expect("reconcile succeeds");
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let mut api = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("mock finished")
        .expect("mock passed");
    // Nothing else was asked of the API server (the client is gone, or at least silent).
    let extra = tokio::time::timeout(Duration::from_millis(50), api.next_request()).await;
    assert!(
        matches!(extra, Err(_) | Ok(None)),
        "unexpected extra request: {:?}",
        extra.ok().flatten().map(|(r, _)| r.uri().clone())
    );
}

#[tokio::test]
async fn missing_storage_secret_fails_without_creating_anything_and_waits_for_a_change() {
    let (ctx, mut api) = context();
    let ftj = Arc::new(finetunejob(json!({"storageSecretRef": {"name": "s3-creds"}})));
    let server = tokio::spawn(async move {
        expect(
            &mut api,
            Method::GET,
            "/api/v1/namespaces/team-a/secrets/s3-creds",
            404,
            not_found(),
        )
        .await;
        expect(
            &mut api,
            Method::GET,
            "/apis/batch/v1/namespaces/team-a/jobs/tiny",
            404,
            not_found(),
        )
        .await;
        expect(
            &mut api,
            Method::GET,
            "/api/v1/namespaces/team-a/pods",
            200,
            empty_list("PodList"),
        )
        .await;
        let status = expect(
            &mut api,
            Method::PATCH,
            "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tiny/status",
            200,
            stored(),
        )
        .await;
        assert_eq!(status["status"]["phase"], "Failed");
        let ready = status["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready").cloned());
        let ready = ready.expect("Ready condition");
        assert_eq!(ready["reason"], "SecretNotFound");
        assert!(ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.storageSecretRef.name")));
        let event = expect(
            &mut api,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/team-a/events",
            200,
            Value::Null,
        )
        .await;
        assert_eq!(event["type"], "Warning");
    });
    let action = reconcile(ftj, ctx).await.expect("reconcile succeeds");
    assert_eq!(
        action,
        Action::await_change(),
        "an invalid spec waits for a change: no hot loop"
    );
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("mock finished")
        .expect("mock passed");
}

/// The Ready condition a status patch sends.
fn ready_condition(status_patch: &Value) -> Value {
    status_patch["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready").cloned())
        .expect("Ready condition")
}

#[tokio::test]
async fn a_job_asking_for_two_gpus_fails_naming_the_field_and_creates_no_job() {
    let (ctx, mut api) = context();
    let ftj = Arc::new(finetunejob(json!({"resources": {"limits": {"nvidia.com/gpu": "2"}}})));
    let server = tokio::spawn(async move {
        expect(
            &mut api,
            Method::GET,
            "/api/v1/nodes",
            200,
            json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "items": []}),
        )
        .await;
        expect(
            &mut api,
            Method::GET,
            "/apis/batch/v1/namespaces/team-a/jobs/tiny",
            404,
            not_found(),
        )
        .await;
        expect(
            &mut api,
            Method::GET,
            "/api/v1/namespaces/team-a/pods",
            200,
            empty_list("PodList"),
        )
        .await;
        let status = expect(
            &mut api,
            Method::PATCH,
            "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tiny/status",
            200,
            stored(),
        )
        .await;
        assert_eq!(status["status"]["phase"], "Failed");
        let ready = ready_condition(&status);
        assert_eq!(ready["reason"], "InvalidSpec");
        let message = ready["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(r#"spec.resources.limits["nvidia.com/gpu"]: 2 GPUs"#),
            "{message}"
        );
        assert!(message.contains("one GPU per pod is supported"), "{message}");
        expect(
            &mut api,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/team-a/events",
            200,
            Value::Null,
        )
        .await;
    });
    let action = reconcile(ftj, ctx).await.expect("reconcile succeeds");
    assert_eq!(action, Action::await_change());
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("mock finished")
        .expect("mock passed");
}

#[tokio::test]
async fn a_model_deployment_asking_for_two_gpus_is_refused_in_its_status_and_applies_nothing() {
    let (ctx, mut api) = context();
    let md: ModelDeployment = serde_json::from_value(json!({
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "support", "namespace": "team-a", "uid": "3333-4444", "generation": 1},
        "spec": {
            "baseModel": {"uri": "s3://kubetune/models/tiny-llama"},
            "resources": {"limits": {"nvidia.com/gpu": "2"}},
        },
    }))
    .expect("valid ModelDeployment");
    let stored_md = serde_json::to_value(&md).expect("json");
    let server = tokio::spawn(async move {
        // The first request is the status: no ConfigMap read, no Deployment applied.
        let status = expect(
            &mut api,
            Method::PATCH,
            "/apis/kubetune.dev/v1alpha1/namespaces/team-a/modeldeployments/support/status",
            200,
            stored_md,
        )
        .await;
        assert_eq!(status["status"]["phase"], "Failed");
        let ready = ready_condition(&status);
        assert_eq!(
            (ready["status"].as_str(), ready["reason"].as_str()),
            (Some("False"), Some("InvalidSpec"))
        );
        let message = ready["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(r#"spec.resources.limits["nvidia.com/gpu"]: 2 GPUs"#),
            "{message}"
        );
        let event = expect(
            &mut api,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/team-a/events",
            200,
            Value::Null,
        )
        .await;
        assert_eq!(event["type"], "Warning");
        api
    });
    let action = modeldeployment::reconcile(Arc::new(md), ctx)
        .await
        .expect("reconcile succeeds");
    assert_eq!(action, Action::await_change(), "a refused spec waits for a change");
    let mut api = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("mock finished")
        .expect("mock passed");
    let extra = tokio::time::timeout(Duration::from_millis(50), api.next_request()).await;
    assert!(
        matches!(extra, Err(_) | Ok(None)),
        "unexpected extra request: {:?}",
        extra.ok().flatten().map(|(r, _)| r.uri().clone())
    );
}
