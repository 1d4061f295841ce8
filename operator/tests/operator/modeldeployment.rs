//! The ModelDeployment reconcile against a mocked API server (tower-test): its children as a set
//! (applied when wanted, deleted when ours and no longer wanted, left alone when someone else's),
//! the autoscaler, and the served model name. Each test scripts every request the reconcile
//! makes and fails on one more.

use crate::common::*;
use futures::future::{BoxFuture, FutureExt};
use http::Method;
use kube::runtime::controller::Action;
use kubetune_crds::ModelDeployment;
use kubetune_operator::context::Context;
use kubetune_operator::modeldeployment;
use serde_json::{json, Value};
use std::sync::Arc;

const UID: &str = "3333-4444";
const NS: &str = "/api/v1/namespaces/team-a";
const APPS: &str = "/apis/apps/v1/namespaces/team-a";
const PDBS: &str = "/apis/policy/v1/namespaces/team-a/poddisruptionbudgets/support";
const HPAS: &str = "/apis/autoscaling/v2/namespaces/team-a/horizontalpodautoscalers/support";
const STATUS: &str = "/apis/kubetune.dev/v1alpha1/namespaces/team-a/modeldeployments/support/status";

/// A ModelDeployment with no adapters (so no registry traffic), plus `extra_spec`.
fn model_deployment(extra_spec: Value) -> ModelDeployment {
    let mut spec = json!({"baseModel": {"uri": "s3://kubetune/models/smollm2"}});
    if let (Some(s), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        s.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "support", "namespace": "team-a", "uid": UID, "generation": 1},
        "spec": spec,
    }))
    .expect("valid ModelDeployment")
}

/// Runs one ModelDeployment reconcile while `script` answers its requests (see [`run_scripted`]).
async fn reconcile_scripted<T, S>(
    md: &ModelDeployment,
    ctx: &Arc<Context>,
    api: &mut ApiHandle,
    script: S,
) -> (Action, T)
where
    S: for<'a> FnOnce(&'a mut ApiHandle) -> BoxFuture<'a, T>,
{
    run_scripted(
        modeldeployment::reconcile(Arc::new(md.clone()), ctx.clone()),
        api,
        script,
    )
    .await
}

fn deleted() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200})
}

/// An object of `kind` named support, owned by this ModelDeployment or (`owner` None) by no one.
fn existing(api_version: &str, kind: &str, owner: Option<&str>) -> Value {
    let refs: Vec<Value> = owner
        .map(|uid| json!({"apiVersion": "kubetune.dev/v1alpha1", "kind": "ModelDeployment", "name": "support", "uid": uid, "controller": true}))
        .into_iter()
        .collect();
    json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {"name": "support", "namespace": "team-a", "uid": format!("{kind}-uid"), "ownerReferences": refs},
        "spec": {},
    })
}

const ADMIN_KEY_SECRET: &str = "/api/v1/namespaces/team-a/secrets/support-admin-key";

/// The requests before the Deployment: the adapters ConfigMap read, the admin key Secret read
/// (absent) and created, the pods listed (none yet), the ConfigMap applied. Returns the Secret
/// created.
async fn script_until_deployment(api: &mut ApiHandle) -> Value {
    expect(
        api,
        Method::GET,
        &format!("{NS}/configmaps/support-adapters"),
        404,
        not_found(),
    )
    .await;
    expect(api, Method::GET, ADMIN_KEY_SECRET, 404, not_found()).await;
    let secret = expect(api, Method::POST, &format!("{NS}/secrets?"), 201, Value::Null).await;
    script_pods_and_config_map(api).await;
    secret
}

/// The pods listed (none yet) and the adapters ConfigMap applied.
async fn script_pods_and_config_map(api: &mut ApiHandle) {
    expect(
        api,
        Method::GET,
        &format!("{NS}/pods?"),
        200,
        json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []}),
    )
    .await;
    expect(
        api,
        Method::PATCH,
        &format!("{NS}/configmaps/support-adapters?"),
        200,
        Value::Null,
    )
    .await;
}

/// Deployment and Service absent, then applied; returns the applied Deployment.
async fn script_deployment_and_service(api: &mut ApiHandle, deployment_reply: Value) -> Value {
    expect(
        api,
        Method::GET,
        &format!("{APPS}/deployments/support"),
        404,
        not_found(),
    )
    .await;
    let deployment = expect(
        api,
        Method::PATCH,
        &format!("{APPS}/deployments/support?"),
        200,
        deployment_reply,
    )
    .await;
    expect(api, Method::GET, &format!("{NS}/services/support"), 404, not_found()).await;
    expect(api, Method::PATCH, &format!("{NS}/services/support?"), 200, Value::Null).await;
    deployment
}

#[tokio::test]
async fn a_pod_disruption_budget_switched_off_is_deleted_and_the_base_model_is_served_by_name() {
    let (ctx, mut api) = context();
    let md = model_deployment(json!({"podDisruptionBudget": false}));
    let (_, (deployment, delete, status)) = reconcile_scripted(&md, &ctx, &mut api, |api| {
        async move {
            script_until_deployment(api).await;
            let deployment = script_deployment_and_service(api, Value::Null).await;
            expect(
                api,
                Method::GET,
                PDBS,
                200,
                existing("policy/v1", "PodDisruptionBudget", Some(UID)),
            )
            .await;
            let delete = expect(api, Method::DELETE, PDBS, 200, deleted()).await;
            expect(api, Method::GET, HPAS, 404, not_found()).await;
            let status = expect(
                api,
                Method::PATCH,
                STATUS,
                200,
                serde_json::to_value(model_deployment(json!({}))).expect("json"),
            )
            .await;
            (deployment, delete, status)
        }
        .boxed()
    })
    .await;
    assert_eq!(
        delete["preconditions"]["uid"], "PodDisruptionBudget-uid",
        "only the object that was read is deleted: {delete}"
    );
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    let args: Vec<String> = serde_json::from_value(args).expect("args");
    assert!(
        args.windows(2).any(|w| w == ["--served-model-name", "smollm2"]),
        "{args:?}"
    );
    assert!(
        args.windows(2)
            .any(|w| w == ["--base-model-alias", "s3://kubetune/models/smollm2"]),
        "{args:?}"
    );
    assert_eq!(status["status"]["servedModelName"], "smollm2");
    assert_eq!(
        status["status"]["selector"],
        "app.kubernetes.io/name=kubetune-server,kubetune.dev/modeldeployment=support"
    );
}

#[tokio::test]
async fn a_new_model_deployment_gets_an_admin_key_secret_it_owns_and_its_pods_are_told_to_read_it() {
    let (ctx, mut api) = context();
    let md = model_deployment(json!({}));
    let (_, (secret, deployment)) = reconcile_scripted(&md, &ctx, &mut api, |api| {
        async move {
            let secret = script_until_deployment(api).await;
            let deployment = script_deployment_and_service(api, Value::Null).await;
            expect(api, Method::GET, PDBS, 404, not_found()).await;
            expect(api, Method::GET, HPAS, 404, not_found()).await;
            let md = serde_json::to_value(model_deployment(json!({}))).expect("json");
            expect(api, Method::PATCH, STATUS, 200, md).await;
            (secret, deployment)
        }
        .boxed()
    })
    .await;
    assert_eq!(secret["metadata"]["name"], "support-admin-key");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], UID);
    assert_eq!(secret["metadata"]["ownerReferences"][0]["controller"], true);
    let encoded = secret["data"]["key"].as_str().expect("data.key");
    // 32 random bytes, hex: 64 characters, 88 in base64.
    assert_eq!(encoded.len(), 88, "{encoded}");
    let pod = &deployment["spec"]["template"]["spec"];
    let args: Vec<String> = serde_json::from_value(pod["containers"][0]["args"].clone()).expect("args");
    assert!(
        args.windows(2)
            .any(|w| w == ["--admin-api-key-file", "/etc/kubetune/admin/key"]),
        "{args:?}"
    );
    // The server resolves references in the namespace's own registry, as the operator does.
    assert!(
        args.windows(2)
            .any(|w| w == ["--registry", "s3://kubetune/registry/namespaces/team-a"]),
        "{args:?}"
    );
    let volumes = pod["volumes"].as_array().expect("volumes");
    assert!(
        volumes.iter().any(|v| v["secret"]["secretName"] == "support-admin-key"),
        "{volumes:?}"
    );
    // No ServiceAccount named: the operator's default, and no API token in the server pods.
    assert_eq!(pod["serviceAccountName"], "default");
    assert_eq!(pod["automountServiceAccountToken"], false);
}

#[tokio::test]
async fn with_admin_policy_from_set_a_network_policy_admits_only_the_operator_to_the_admin_port() {
    let (ctx, mut api) = context_with(kubetune_operator::config::OperatorConfig {
        admin_policy_from: Some(kubetune_operator::config::AdminPolicyFrom {
            namespace: "kubetune-system".into(),
            labels: [("app.kubernetes.io/name".to_string(), "kubetune-operator".to_string())].into(),
        }),
        ..kubetune_operator::config::OperatorConfig::for_tests()
    });
    let md = model_deployment(json!({}));
    let policies = "/apis/networking.k8s.io/v1/namespaces/team-a/networkpolicies/support";
    let (_, policy) = reconcile_scripted(&md, &ctx, &mut api, |api| {
        async move {
            script_until_deployment(api).await;
            script_deployment_and_service(api, Value::Null).await;
            expect(api, Method::GET, PDBS, 404, not_found()).await;
            expect(api, Method::GET, HPAS, 404, not_found()).await;
            expect(api, Method::GET, policies, 404, not_found()).await;
            let policy = expect(api, Method::PATCH, &format!("{policies}?"), 200, Value::Null).await;
            let md = serde_json::to_value(model_deployment(json!({}))).expect("json");
            expect(api, Method::PATCH, STATUS, 200, md).await;
            policy
        }
        .boxed()
    })
    .await;
    assert_eq!(policy["metadata"]["ownerReferences"][0]["uid"], UID);
    let admin_rule = &policy["spec"]["ingress"][1];
    assert_eq!(admin_rule["ports"][0]["port"], 8001);
    assert_eq!(
        admin_rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "kubetune-system"
    );
    assert_eq!(policy["spec"]["ingress"][0]["ports"][0]["port"], 8000);
    assert!(
        policy["spec"]["ingress"][0].get("from").is_none(),
        "clients keep the inference port"
    );
}

/// The admin key Secret as this ModelDeployment (or, `owner` None, no one) left it.
fn admin_key_secret(owner: Option<&str>) -> Value {
    let refs: Vec<Value> = owner
        .map(|uid| json!({"apiVersion": "kubetune.dev/v1alpha1", "kind": "ModelDeployment", "name": "support", "uid": uid, "controller": true}))
        .into_iter()
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "support-admin-key", "namespace": "team-a", "uid": "secret-uid", "ownerReferences": refs},
        // base64 of "existing-key"
        "data": {"key": "ZXhpc3Rpbmcta2V5"},
    })
}

#[tokio::test]
async fn an_existing_admin_key_secret_is_kept_as_it_is_never_recreated_or_rewritten() {
    let (ctx, mut api) = context();
    let md = model_deployment(json!({}));
    let (_, deployment) = reconcile_scripted(&md, &ctx, &mut api, |api| {
        async move {
            expect(
                api,
                Method::GET,
                &format!("{NS}/configmaps/support-adapters"),
                404,
                not_found(),
            )
            .await;
            // Read, and then straight on to the pods: a create or patch would be a request more.
            expect(api, Method::GET, ADMIN_KEY_SECRET, 200, admin_key_secret(Some(UID))).await;
            script_pods_and_config_map(api).await;
            let deployment = script_deployment_and_service(api, Value::Null).await;
            expect(api, Method::GET, PDBS, 404, not_found()).await;
            expect(api, Method::GET, HPAS, 404, not_found()).await;
            let md = serde_json::to_value(model_deployment(json!({}))).expect("json");
            expect(api, Method::PATCH, STATUS, 200, md).await;
            deployment
        }
        .boxed()
    })
    .await;
    // The pods are tied to this Secret: a recreated one (a new key) would roll them.
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["annotations"]["kubetune.dev/admin-key-secret-uid"],
        "secret-uid"
    );
}

#[tokio::test]
async fn an_admin_key_secret_someone_else_owns_is_not_used_and_nothing_is_applied() {
    let (ctx, mut api) = context();
    let md = model_deployment(json!({}));
    let reconcile = modeldeployment::reconcile(Arc::new(md), ctx.clone());
    let script = async {
        expect(
            &mut api,
            Method::GET,
            &format!("{NS}/configmaps/support-adapters"),
            404,
            not_found(),
        )
        .await;
        expect(&mut api, Method::GET, ADMIN_KEY_SECRET, 200, admin_key_secret(None)).await;
    };
    let (result, ()) = tokio::join!(reconcile, script);
    match result {
        Err(kubetune_operator::error::Error::NotOwned(what)) => {
            assert_eq!(what, "Secret team-a/support-admin-key")
        }
        other => panic!("expected NotOwned, got {other:?}"),
    }
}

#[tokio::test]
async fn a_service_someone_else_owns_is_not_overwritten_and_ready_says_child_not_owned() {
    let (ctx, mut api) = context();
    let md = model_deployment(json!({}));
    let (_, status) = reconcile_scripted(&md, &ctx, &mut api, |api| {
        async move {
            script_until_deployment(api).await;
            expect(
                api,
                Method::GET,
                &format!("{APPS}/deployments/support"),
                404,
                not_found(),
            )
            .await;
            expect(
                api,
                Method::PATCH,
                &format!("{APPS}/deployments/support?"),
                200,
                Value::Null,
            )
            .await;
            // A hand-made Service of the same name: no apply follows its read.
            expect(
                api,
                Method::GET,
                &format!("{NS}/services/support"),
                200,
                existing("v1", "Service", None),
            )
            .await;
            // Nor is a PDB someone else made deleted, though this spec wants none.
            expect(
                api,
                Method::GET,
                PDBS,
                200,
                existing("policy/v1", "PodDisruptionBudget", Some("someone-else")),
            )
            .await;
            expect(api, Method::GET, HPAS, 404, not_found()).await;
            expect(
                api,
                Method::PATCH,
                STATUS,
                200,
                serde_json::to_value(model_deployment(json!({}))).expect("json"),
            )
            .await
        }
        .boxed()
    })
    .await;
    let ready = ready_condition(&status);
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("ChildNotOwned"))
    );
    let message = ready["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("Service team-a/support exists and is not owned"),
        "{message}"
    );
}

#[tokio::test]
async fn autoscaling_applies_an_owned_hpa_and_no_replicas_and_turning_it_off_deletes_the_hpa() {
    let (ctx, mut api) = context();
    let md = model_deployment(json!({"replicas": 5, "autoscaling": {"minReplicas": 2, "maxReplicas": 4}}));
    let (_, (deployment, hpa, status)) = reconcile_scripted(&md, &ctx, &mut api, |api| {
        async move {
            script_until_deployment(api).await;
            // The API server answers with the replicas the autoscaler set.
            let mut scaled = existing("apps/v1", "Deployment", Some(UID));
            scaled["spec"] = json!({"replicas": 3, "selector": {}, "template": {}});
            let deployment = script_deployment_and_service(api, scaled).await;
            expect(api, Method::GET, PDBS, 404, not_found()).await;
            expect(api, Method::GET, HPAS, 404, not_found()).await;
            let hpa = expect(api, Method::PATCH, &format!("{HPAS}?"), 200, Value::Null).await;
            let status = expect(
                api,
                Method::PATCH,
                STATUS,
                200,
                serde_json::to_value(model_deployment(json!({}))).expect("json"),
            )
            .await;
            (deployment, hpa, status)
        }
        .boxed()
    })
    .await;
    assert!(
        deployment["spec"].get("replicas").is_none(),
        "the autoscaler's replicas are not applied over: {}",
        deployment["spec"]
    );
    assert_eq!(hpa["metadata"]["ownerReferences"][0]["uid"], UID);
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "support");
    assert_eq!(
        hpa["spec"]["metrics"][0]["pods"]["metric"]["name"],
        "vllm:num_requests_running"
    );
    assert_eq!(
        status["status"]["readyDisplay"], "0/3",
        "desired is the autoscaler's choice"
    );

    let md = model_deployment(json!({"replicas": 5}));
    let (_, (deployment, delete)) = reconcile_scripted(&md, &ctx, &mut api, |api| {
        async move {
            script_until_deployment(api).await;
            let deployment = script_deployment_and_service(api, Value::Null).await;
            expect(api, Method::GET, PDBS, 404, not_found()).await;
            let mut hpa = existing("autoscaling/v2", "HorizontalPodAutoscaler", Some(UID));
            hpa["spec"] = json!({"scaleTargetRef": {"kind": "Deployment", "name": "support"}, "maxReplicas": 4});
            expect(api, Method::GET, HPAS, 200, hpa).await;
            let delete = expect(api, Method::DELETE, HPAS, 200, deleted()).await;
            expect(
                api,
                Method::PATCH,
                STATUS,
                200,
                serde_json::to_value(model_deployment(json!({}))).expect("json"),
            )
            .await;
            (deployment, delete)
        }
        .boxed()
    })
    .await;
    assert_eq!(
        deployment["spec"]["replicas"], 5,
        "spec.replicas again once nothing autoscales"
    );
    assert_eq!(delete["preconditions"]["uid"], "HorizontalPodAutoscaler-uid");
}

#[tokio::test]
async fn turning_autoscaling_on_hands_the_current_replicas_to_another_field_manager_before_dropping_them() {
    let (ctx, mut api) = context();
    let md = model_deployment(json!({"replicas": 4, "autoscaling": {"minReplicas": 2, "maxReplicas": 8}}));
    // The Deployment as our earlier applies left it: 4 replicas, set by our field manager.
    let mut ours = existing("apps/v1", "Deployment", Some(UID));
    ours["spec"] = json!({"replicas": 4, "selector": {}, "template": {}});
    ours["metadata"]["managedFields"] = json!([{
        "manager": "kubetune-operator", "operation": "Apply", "apiVersion": "apps/v1", "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {"f:replicas": {}, "f:selector": {}}},
    }]);
    let (_, (claim, deployment)) = reconcile_scripted(&md, &ctx, &mut api, |api| {
        async move {
            script_until_deployment(api).await;
            expect(
                api,
                Method::GET,
                &format!("{APPS}/deployments/support"),
                200,
                ours.clone(),
            )
            .await;
            let claim = expect(
                api,
                Method::PATCH,
                &format!("{APPS}/deployments/support?&fieldManager=kubetune-operator-replicas-handover"),
                200,
                ours.clone(),
            )
            .await;
            let deployment = expect(
                api,
                Method::PATCH,
                &format!("{APPS}/deployments/support?&force=true&fieldManager=kubetune-operator"),
                200,
                ours,
            )
            .await;
            expect(api, Method::GET, &format!("{NS}/services/support"), 404, not_found()).await;
            expect(api, Method::PATCH, &format!("{NS}/services/support?"), 200, Value::Null).await;
            expect(api, Method::GET, PDBS, 404, not_found()).await;
            expect(api, Method::GET, HPAS, 404, not_found()).await;
            expect(api, Method::PATCH, &format!("{HPAS}?"), 200, Value::Null).await;
            expect(
                api,
                Method::PATCH,
                STATUS,
                200,
                serde_json::to_value(model_deployment(json!({}))).expect("json"),
            )
            .await;
            (claim, deployment)
        }
        .boxed()
    })
    .await;
    assert_eq!(
        claim,
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "support"}, "spec": {"replicas": 4}}),
        "the handover claims the replicas alone, at their current value"
    );
    assert!(deployment["spec"].get("replicas").is_none(), "{}", deployment["spec"]);
}

#[tokio::test]
async fn a_missing_service_account_leaves_the_deployment_pending_and_applies_nothing() {
    let (ctx, mut api) = context();
    let md = model_deployment(json!({"serviceAccountName": "server"}));
    let (action, status) = reconcile_scripted(&md, &ctx, &mut api, |api| {
        async move {
            expect(
                api,
                Method::GET,
                &format!("{NS}/serviceaccounts/server"),
                404,
                not_found(),
            )
            .await;
            let stored = serde_json::to_value(model_deployment(json!({}))).expect("json");
            let status = expect(api, Method::PATCH, STATUS, 200, stored).await;
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
        "spec.serviceAccountName: waiting for ServiceAccount team-a/server to exist"
    );
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(15)));
}

#[tokio::test]
async fn a_registry_endpoint_the_platform_did_not_allow_is_refused_naming_the_secret_and_key() {
    let (ctx, mut api) = context();
    let md = model_deployment(json!({
        "adapters": [{"name": "bot", "version": 1}],
        "storageSecretRef": {"name": "s3"},
    }));
    // base64 of http://169.254.169.254: the Secret points the operator's registry reads elsewhere.
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "s3", "namespace": "team-a"},
        "data": {"AWS_ENDPOINT_URL": "aHR0cDovLzE2OS4yNTQuMTY5LjI1NA=="},
    });
    let (_, status) = reconcile_scripted(&md, &ctx, &mut api, |api| {
        async move {
            expect(
                api,
                Method::GET,
                &format!("{NS}/configmaps/support-adapters"),
                404,
                not_found(),
            )
            .await;
            expect(api, Method::GET, &format!("{NS}/secrets/s3"), 200, secret).await;
            // No storage request follows: the next requests are the reconcile's own.
            expect(api, Method::GET, ADMIN_KEY_SECRET, 404, not_found()).await;
            expect(api, Method::POST, &format!("{NS}/secrets?"), 201, Value::Null).await;
            script_pods_and_config_map(api).await;
            script_deployment_and_service(api, Value::Null).await;
            expect(api, Method::GET, PDBS, 404, not_found()).await;
            expect(api, Method::GET, HPAS, 404, not_found()).await;
            let md = serde_json::to_value(model_deployment(json!({}))).expect("json");
            expect(api, Method::PATCH, STATUS, 200, md).await
        }
        .boxed()
    })
    .await;
    let conditions = status["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let refused = conditions
        .iter()
        .find(|c| c["reason"] == "StorageEndpointNotAllowed")
        .unwrap_or_else(|| panic!("no StorageEndpointNotAllowed condition in {status}"));
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message
            .contains("spec.storageSecretRef.name: Secret team-a/s3 sets AWS_ENDPOINT_URL to http://169.254.169.254"),
        "{message}"
    );
}

#[tokio::test]
async fn secrets_the_operator_may_not_read_leave_the_deployment_pending_and_nothing_applied() {
    // The chart's rbac.secretNamespaces grants Secret reads only in the namespaces listed.
    let (ctx, mut api) = context();
    let md = model_deployment(json!({
        "adapters": [{"name": "bot", "version": 1}],
        "storageSecretRef": {"name": "s3"},
    }));
    let (action, (status, event)) = reconcile_scripted(&md, &ctx, &mut api, |api| {
        async move {
            expect(
                api,
                Method::GET,
                &format!("{NS}/configmaps/support-adapters"),
                404,
                not_found(),
            )
            .await;
            expect(api, Method::GET, &format!("{NS}/secrets/s3"), 403, forbidden()).await;
            // The admin key cannot be read either: nothing is applied, no pod is asked.
            expect(api, Method::GET, ADMIN_KEY_SECRET, 403, forbidden()).await;
            let stored = serde_json::to_value(model_deployment(json!({}))).expect("json");
            let status = expect(api, Method::PATCH, STATUS, 200, stored).await;
            (status, expect_event(api).await)
        }
        .boxed()
    })
    .await;
    assert_eq!(event["reason"], "SecretForbidden");
    let ready = ready_condition(&status);
    assert_eq!(ready["reason"], "SecretForbidden");
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("admin key: ") && m.contains("rbac.secretNamespaces")),
        "{ready}"
    );
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(15)));
}
