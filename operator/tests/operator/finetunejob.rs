//! The FineTuneJob and ModelDeployment reconcile sequences against a mocked API server
//! (tower-test): which calls they make, in which order, and what they send.

use crate::common::*;
use futures::future::{BoxFuture, FutureExt};
use http::Method;
use kube::runtime::controller::Action;
use kubetune_crds::{FineTuneJob, ModelDeployment};
use kubetune_operator::config::OperatorConfig;
use kubetune_operator::context::Context;
use kubetune_operator::finetunejob::{reconcile, RESYNC_INTERVAL};
use kubetune_operator::modeldeployment;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

fn finetunejob(extra_spec: Value) -> FineTuneJob {
    let mut spec = json!({
        // pvc:// models are not read by the operator (the trainer pod mounts the claim), so the
        // mock sees no storage traffic.
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

/// The FineTuneJob as the API server returns it after a status patch.
fn stored() -> Value {
    serde_json::to_value(finetunejob(json!({}))).expect("json")
}

fn empty_list(kind: &str) -> Value {
    json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []})
}

#[tokio::test]
async fn new_job_creates_the_trainer_job_and_reports_pending() {
    let (ctx, mut api) = context();
    let ftj = finetunejob(json!({}));
    let (action, ()) = reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        async move {
        expect(api, Method::GET, "/api/v1/nodes", 200, json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "items": [
            {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": "n1", "labels": {"nvidia.com/gpu.memory": "81920"}}}
        ]})).await;
        expect(
            api,
            Method::GET,
            "/apis/batch/v1/namespaces/team-a/jobs/tiny",
            404,
            not_found(),
        )
        .await;
        let job = expect(
            api,
            Method::POST,
            "/apis/batch/v1/namespaces/team-a/jobs?&fieldManager=kubetune-operator",
            201,
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
        // The pvc:// base model: its claim mounted read-only, the trainer told the mount.
        let pod = &job["spec"]["template"]["spec"];
        // No ServiceAccount named: the operator's default, and no API token in the pod.
        assert_eq!(pod["serviceAccountName"], "default");
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert!(
            pod["volumes"].as_array().into_iter().flatten().any(|v| v
                == &json!({"name": "pvc-0", "persistentVolumeClaim": {"claimName": "models", "readOnly": true}})),
            "{}",
            pod["volumes"]
        );
        assert!(
            pod["containers"][0]["volumeMounts"].as_array().into_iter().flatten().any(|m| m
                == &json!({"name": "pvc-0", "mountPath": "/mnt/kubetune/pvc/models", "readOnly": true})),
            "{}",
            pod["containers"][0]["volumeMounts"]
        );
        let request = env
            .iter()
            .find(|e| e["name"] == "KUBETUNE_TRAINER_JOB")
            .and_then(|e| e["value"].as_str())
            .expect("the trainer job");
        let request: Value = serde_json::from_str(request).expect("trainer job JSON");
        assert_eq!(request["baseModelUri"], "file:///mnt/kubetune/pvc/models/tiny");
        expect(
            api,
            Method::GET,
            "/api/v1/namespaces/team-a/pods?&labelSelector=kubetune.dev%2Ffinetunejob%3Dtiny",
            200,
            empty_list("PodList"),
        )
        .await;
        let status = expect(
            api,
            Method::PATCH,
            "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tiny/status",
            200,
            stored(),
        )
        .await;
        assert_eq!(status["status"]["phase"], "Pending");
        assert_eq!(status["status"]["observedGeneration"], 1);
        let event = expect_event(api).await;
        assert_eq!(event["reason"], "Pending");
        }
        .boxed()
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
}

#[tokio::test]
async fn a_job_asking_for_two_gpus_fails_naming_the_field_and_creates_no_job() {
    let (ctx, mut api) = context();
    let ftj = finetunejob(json!({"resources": {"limits": {"nvidia.com/gpu": "2"}}}));
    let (action, ()) = reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        async move {
            expect(
            api,
            Method::GET,
            "/api/v1/nodes",
            200,
            json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "items": []}),
        )
        .await;
            expect(
                api,
                Method::GET,
                "/apis/batch/v1/namespaces/team-a/jobs/tiny",
                404,
                not_found(),
            )
            .await;
            expect(
                api,
                Method::GET,
                "/api/v1/namespaces/team-a/pods",
                200,
                empty_list("PodList"),
            )
            .await;
            let status = expect(
                api,
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
            expect_event(api).await;
        }
        .boxed()
    })
    .await;
    assert_eq!(
        action,
        Action::requeue(RESYNC_INTERVAL),
        "an invalid spec waits for a change, looking again only now and then: no hot loop"
    );
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
        let event = expect_event(&mut api).await;
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

/// Runs one FineTuneJob reconcile while `script` answers its requests (see [`run_scripted`]).
async fn reconcile_scripted<T, S>(ftj: &FineTuneJob, ctx: &Arc<Context>, api: &mut ApiHandle, script: S) -> (Action, T)
where
    S: for<'a> FnOnce(&'a mut ApiHandle) -> BoxFuture<'a, T>,
{
    run_scripted(reconcile(Arc::new(ftj.clone()), ctx.clone()), api, script).await
}

/// The FineTuneJob with a status, as the informer hands it to the next reconcile.
fn with_status(mut ftj: FineTuneJob, status: Value) -> FineTuneJob {
    ftj.status = Some(serde_json::from_value(status).expect("valid status"));
    ftj
}

fn finished_status(phase: &str, reason: &str) -> Value {
    json!({
        "phase": phase,
        "observedGeneration": 1,
        "startTime": "2026-01-01T00:00:00Z",
        "completionTime": "2026-01-01T01:00:00Z",
        "progress": {"step": 120, "totalSteps": 120, "display": "120/120 (100%)"},
        "conditions": [
            {"type": "Ready", "status": if phase == "Succeeded" { "True" } else { "False" }, "reason": reason, "message": "", "lastTransitionTime": "2026-01-01T01:00:00Z", "observedGeneration": 1},
        ],
    })
}

#[tokio::test]
async fn a_succeeded_job_whose_job_is_gone_asks_for_no_job_and_stays_succeeded() {
    let (ctx, mut api) = context();
    // The Job went with its TTL, or the operator restarted: the status is all that is left.
    let ftj = with_status(finetunejob(json!({})), finished_status("Succeeded", "AdapterPublished"));
    let (action, ()) = reconcile_scripted(&ftj, &ctx, &mut api, |_| async {}.boxed()).await;
    assert_eq!(
        action,
        Action::requeue(RESYNC_INTERVAL),
        "finished: looked at again only now and then"
    );
    let metrics = ctx.metrics.render();
    assert!(
        metrics.contains(r#"kubetune_finetunejobs{namespace="team-a",phase="Succeeded"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_failed_job_edited_afterwards_only_records_the_generation_and_runs_no_job() {
    let (ctx, mut api) = context();
    let mut ftj = with_status(
        finetunejob(json!({})),
        finished_status("Failed", "BackoffLimitExceeded"),
    );
    ftj.metadata.generation = Some(2);
    let (action, status) = reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        async move {
            expect(
                api,
                Method::PATCH,
                "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tiny/status",
                200,
                stored(),
            )
            .await
        }
        .boxed()
    })
    .await;
    assert_eq!(status["status"]["phase"], "Failed");
    assert_eq!(status["status"]["observedGeneration"], 2);
    assert_eq!(ready_condition(&status)["reason"], "BackoffLimitExceeded");
    assert_eq!(action, Action::requeue(RESYNC_INTERVAL));
}

#[tokio::test]
async fn a_missing_service_account_leaves_the_job_pending_naming_the_field_and_creates_no_job() {
    let (ctx, mut api) = context();
    let ftj = finetunejob(json!({"serviceAccountName": "trainer"}));
    let (action, status) = reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        async move {
            expect(
                api,
                Method::GET,
                "/api/v1/namespaces/team-a/serviceaccounts/trainer",
                404,
                not_found(),
            )
            .await;
            // Only read: no Job is created for a ServiceAccount that does not exist.
            expect(
                api,
                Method::GET,
                "/apis/batch/v1/namespaces/team-a/jobs/tiny",
                404,
                not_found(),
            )
            .await;
            expect(
                api,
                Method::GET,
                "/api/v1/namespaces/team-a/pods",
                200,
                empty_list("PodList"),
            )
            .await;
            let status = expect(
                api,
                Method::PATCH,
                "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tiny/status",
                200,
                stored(),
            )
            .await;
            let event = expect_event(api).await;
            assert_eq!(event["reason"], "ServiceAccountNotFound");
            status
        }
        .boxed()
    })
    .await;
    assert_eq!(
        status["status"]["phase"], "Pending",
        "waiting for a ServiceAccount is not final"
    );
    let ready = ready_condition(&status);
    assert_eq!(ready["reason"], "ServiceAccountNotFound");
    assert_eq!(
        ready["message"],
        "spec.serviceAccountName: waiting for ServiceAccount team-a/trainer to exist"
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
}

#[tokio::test]
async fn a_job_naming_an_existing_service_account_runs_its_pods_as_that_one() {
    let (ctx, mut api) = context();
    let ftj = finetunejob(json!({"serviceAccountName": "trainer"}));
    let (_, job) = reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        async move {
            expect(
                api,
                Method::GET,
                "/api/v1/namespaces/team-a/serviceaccounts/trainer",
                200,
                json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": "trainer", "namespace": "team-a"}}),
            )
            .await;
            expect(api, Method::GET, "/api/v1/nodes", 200, json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "items": []})).await;
            expect(api, Method::GET, "/apis/batch/v1/namespaces/team-a/jobs/tiny", 404, not_found()).await;
            let job = expect(api, Method::POST, "/apis/batch/v1/namespaces/team-a/jobs?", 201, Value::Null).await;
            expect(api, Method::GET, "/api/v1/namespaces/team-a/pods", 200, empty_list("PodList")).await;
            expect(
                api,
                Method::PATCH,
                "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tiny/status",
                200,
                stored(),
            )
            .await;
            expect_event(api).await;
            job
        }
        .boxed()
    })
    .await;
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "trainer");
    assert_eq!(
        pod.get("automountServiceAccountToken"),
        None,
        "a named ServiceAccount's own setting decides about its token"
    );
}

fn secret_ref() -> Value {
    json!({"storageSecretRef": {"name": "s3-creds"}})
}

/// The requests of a reconcile that finds no Secret and no Job: the status patch, if
/// `status_changes`, and the event of the phase change, if `first`.
async fn script_secret_missing(api: &mut ApiHandle, status_changes: bool, first: bool) -> Option<Value> {
    let missing = (404, not_found(), "SecretNotFound");
    script_secret_unreadable(api, missing, status_changes, first).await
}

/// As [`script_secret_missing`], for a Secret read answered with `(code, body)`, whose event
/// has `reason`.
async fn script_secret_unreadable(
    api: &mut ApiHandle,
    (code, reply, reason): (u16, Value, &str),
    status_changes: bool,
    first: bool,
) -> Option<Value> {
    expect(
        api,
        Method::GET,
        "/api/v1/namespaces/team-a/secrets/s3-creds",
        code,
        reply,
    )
    .await;
    expect(
        api,
        Method::GET,
        "/apis/batch/v1/namespaces/team-a/jobs/tiny",
        404,
        not_found(),
    )
    .await;
    expect(
        api,
        Method::GET,
        "/api/v1/namespaces/team-a/pods",
        200,
        empty_list("PodList"),
    )
    .await;
    let status = if status_changes {
        let status = expect(
            api,
            Method::PATCH,
            "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tiny/status",
            200,
            stored(),
        )
        .await;
        Some(status)
    } else {
        None
    };
    if first {
        let event = expect_event(api).await;
        assert_eq!(
            (event["type"].as_str(), event["reason"].as_str()),
            (Some("Warning"), Some(reason))
        );
    }
    status
}

#[tokio::test]
async fn a_missing_secret_leaves_the_job_pending_and_looks_again_backing_off() {
    let (ctx, mut api) = context();
    let ftj = finetunejob(secret_ref());
    let (action, status) = reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        script_secret_missing(api, true, true).boxed()
    })
    .await;
    let status = status.expect("status written");
    assert_eq!(
        status["status"]["phase"], "Pending",
        "waiting for a Secret is not final"
    );
    let ready = ready_condition(&status);
    assert_eq!(ready["reason"], "SecretNotFound");
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.storageSecretRef.name") && m.contains("team-a/s3-creds")),
        "{ready}"
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));

    // Still missing: the same status (no write), and a longer wait.
    let ftj = with_status(ftj, status["status"].clone());
    let (action, status) = reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        script_secret_missing(api, false, false).boxed()
    })
    .await;
    assert_eq!(status, None);
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn a_secret_the_operator_may_not_read_leaves_the_job_pending_saying_what_grants_it() {
    // The chart's rbac.secretNamespaces grants Secret reads only in the namespaces listed.
    let (ctx, mut api) = context();
    let ftj = finetunejob(secret_ref());
    let (action, status) = reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        script_secret_unreadable(api, (403, forbidden(), "SecretForbidden"), true, true).boxed()
    })
    .await;
    let status = status.expect("status written");
    assert_eq!(status["status"]["phase"], "Pending", "not final: the grant may come");
    let ready = ready_condition(&status);
    assert_eq!(ready["reason"], "SecretForbidden");
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("team-a/s3-creds") && m.contains("rbac.secretNamespaces")),
        "{ready}"
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
}

#[tokio::test]
async fn a_job_waiting_for_its_secret_starts_once_the_secret_exists() {
    let (ctx, mut api) = context();
    let ftj = finetunejob(secret_ref());
    let (_, status) = reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        script_secret_missing(api, true, true).boxed()
    })
    .await;
    let ftj = with_status(ftj, status.expect("status written")["status"].clone());

    let (action, status) = reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        async move {
            expect(
                api,
                Method::GET,
                "/api/v1/namespaces/team-a/secrets/s3-creds",
                200,
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": "team-a"}, "data": {}}),
            )
            .await;
            expect(api, Method::GET, "/api/v1/nodes", 200, json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "items": []})).await;
            expect(
                api,
                Method::GET,
                "/apis/batch/v1/namespaces/team-a/jobs/tiny",
                404,
                not_found(),
            )
            .await;
            let job = expect(api, Method::POST, "/apis/batch/v1/namespaces/team-a/jobs?", 201, Value::Null).await;
            assert_eq!(
                job["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["secretRef"]["name"],
                "s3-creds"
            );
            expect(
                api,
                Method::GET,
                "/api/v1/namespaces/team-a/pods",
                200,
                empty_list("PodList"),
            )
            .await;
            // Pending before and after: a status patch, and no event.
            expect(
                api,
                Method::PATCH,
                "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tiny/status",
                200,
                stored(),
            )
            .await
        }
        .boxed()
    })
    .await;
    assert_eq!(status["status"]["phase"], "Pending");
    assert_eq!(
        ready_condition(&status)["reason"],
        "Pending",
        "no longer waiting for the Secret"
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
}

/// The trainer Job as the API server holds it: built for `ftj`'s spec earlier, with the
/// server's defaults and a template that differs from what the operator builds today.
fn existing_job(suspend: bool) -> Value {
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "tiny", "namespace": "team-a", "uid": "5555", "labels": {"kubetune.dev/finetunejob": "tiny"}},
        "spec": {
            "suspend": suspend,
            "backoffLimit": 3,
            "completions": 1,
            "parallelism": 1,
            "selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": "5555"}},
            "template": {
                "metadata": {"labels": {"batch.kubernetes.io/controller-uid": "5555", "kubetune.dev/finetunejob": "tiny"}},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "trainer", "image": "kubetune/trainer:an-older-operator"}]},
            },
        },
        "status": {},
    })
}

/// The requests of a reconcile of a suspended job after its Job was brought up to date.
async fn script_suspended_status(api: &mut ApiHandle) {
    expect(
        api,
        Method::GET,
        "/api/v1/namespaces/team-a/pods",
        200,
        empty_list("PodList"),
    )
    .await;
    let status = expect(
        api,
        Method::PATCH,
        "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tiny/status",
        200,
        stored(),
    )
    .await;
    assert_eq!(status["status"]["phase"], "Suspended");
    expect_event(api).await;
}

fn no_nodes() -> Value {
    json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "items": []})
}

#[tokio::test]
async fn an_existing_job_is_sent_only_its_changed_mutable_fields_never_its_template() {
    let (ctx, mut api) = context();
    let ftj = finetunejob(json!({"suspend": true}));
    let (_, patch) = reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        async move {
            expect(api, Method::GET, "/api/v1/nodes", 200, no_nodes()).await;
            expect(
                api,
                Method::GET,
                "/apis/batch/v1/namespaces/team-a/jobs/tiny",
                200,
                existing_job(false),
            )
            .await;
            let patch = expect(
                api,
                Method::PATCH,
                "/apis/batch/v1/namespaces/team-a/jobs/tiny?&fieldManager=kubetune-operator",
                200,
                existing_job(true),
            )
            .await;
            script_suspended_status(api).await;
            patch
        }
        .boxed()
    })
    .await;
    assert_eq!(
        patch,
        json!({"spec": {"suspend": true}}),
        "a merge patch of suspend alone"
    );
}

#[tokio::test]
async fn an_existing_job_that_is_up_to_date_is_left_alone() {
    let (ctx, mut api) = context();
    let ftj = finetunejob(json!({"suspend": true}));
    reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        async move {
            expect(api, Method::GET, "/api/v1/nodes", 200, no_nodes()).await;
            // Its template is not what the operator builds today; no matter, it cannot change.
            expect(
                api,
                Method::GET,
                "/apis/batch/v1/namespaces/team-a/jobs/tiny",
                200,
                existing_job(true),
            )
            .await;
            script_suspended_status(api).await;
        }
        .boxed()
    })
    .await;
}

#[tokio::test]
async fn a_job_created_since_the_reconcile_looked_is_updated_not_created_again() {
    let (ctx, mut api) = context();
    let ftj = finetunejob(json!({"suspend": true}));
    let (_, patch) = reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        async move {
            expect(api, Method::GET, "/api/v1/nodes", 200, no_nodes()).await;
            expect(
                api,
                Method::GET,
                "/apis/batch/v1/namespaces/team-a/jobs/tiny",
                404,
                not_found(),
            )
            .await;
            let exists = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "jobs.batch \"tiny\" already exists"});
            expect(api, Method::POST, "/apis/batch/v1/namespaces/team-a/jobs?", 409, exists).await;
            expect(
                api,
                Method::GET,
                "/apis/batch/v1/namespaces/team-a/jobs/tiny",
                200,
                existing_job(false),
            )
            .await;
            let patch = expect(
                api,
                Method::PATCH,
                "/apis/batch/v1/namespaces/team-a/jobs/tiny?",
                200,
                existing_job(true),
            )
            .await;
            script_suspended_status(api).await;
            patch
        }
        .boxed()
    })
    .await;
    assert_eq!(patch, json!({"spec": {"suspend": true}}));
}

/// Serves fixed trainer metrics on 127.0.0.1, as a trainer pod would on its pod IP; returns the
/// port.
async fn trainer_metrics(text: &'static str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        }
    });
    port
}

fn running_pods() -> Value {
    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": [{
        "metadata": {"name": "tiny-x1", "namespace": "team-a", "creationTimestamp": "2026-01-01T00:00:00Z", "labels": {"kubetune.dev/finetunejob": "tiny"}},
        "status": {"phase": "Running", "podIP": "127.0.0.1"},
    }]})
}

#[tokio::test]
async fn a_running_job_whose_progress_did_not_move_gets_no_status_write() {
    let port =
        trainer_metrics("kubetune_train_step 30\nkubetune_train_total_steps 120\nkubetune_train_loss 1.25\n").await;
    let (ctx, mut api) = context_with(OperatorConfig {
        trainer_metrics_port: port,
        ..OperatorConfig::for_tests()
    });
    let ftj = finetunejob(json!({}));
    let (action, (job, status)) = reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        async move {
            expect(api, Method::GET, "/api/v1/nodes", 200, no_nodes()).await;
            expect(
                api,
                Method::GET,
                "/apis/batch/v1/namespaces/team-a/jobs/tiny",
                404,
                not_found(),
            )
            .await;
            // The created Job, started (as the next GET will return it too).
            let mut job = Value::Null;
            expect_reply(
                api,
                Method::POST,
                "/apis/batch/v1/namespaces/team-a/jobs?",
                201,
                |body| {
                    job = body.clone();
                    job["status"] = json!({"startTime": "2026-01-01T00:00:00Z", "active": 1});
                    job.clone()
                },
            )
            .await;
            expect(api, Method::GET, "/api/v1/namespaces/team-a/pods", 200, running_pods()).await;
            let status = expect(
                api,
                Method::PATCH,
                "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tiny/status",
                200,
                stored(),
            )
            .await;
            expect_event(api).await;
            (job, status)
        }
        .boxed()
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    let progress = &status["status"]["progress"];
    assert_eq!(
        (progress["step"].as_u64(), progress["totalSteps"].as_u64()),
        (Some(30), Some(120))
    );
    assert!(progress["lastProgressTime"].is_string(), "{progress}");

    // The trainer is still at step 30: the status derived again is the same, so nothing is written.
    let ftj = with_status(ftj, status["status"].clone());
    let (action, ()) = reconcile_scripted(&ftj, &ctx, &mut api, |api| {
        async move {
            expect(api, Method::GET, "/api/v1/nodes", 200, no_nodes()).await;
            expect(api, Method::GET, "/apis/batch/v1/namespaces/team-a/jobs/tiny", 200, job).await;
            expect(api, Method::GET, "/api/v1/namespaces/team-a/pods", 200, running_pods()).await;
        }
        .boxed()
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}
