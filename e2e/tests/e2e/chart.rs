//! The Helm chart (charts/kubetune): `helm lint`, `helm template` with default and non-default
//! values, the rendered manifests applied to the test cluster, and the operator's RBAC checked
//! verb by verb as its ServiceAccount (SubjectAccessReview, what `kubectl auth can-i --as` asks).

use crate::tools::{chart_dir, find, helm_template_cmd, kinds, output, render, run, scratch_dir, tool};
use anyhow::{anyhow, Result};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};
use kube::discovery::Discovery;
use kube::Client;
use kubetune_e2e::{apply_object, client, kubeconfig_path, kubectl_path, repo_root, ApplyMode, TestNamespace};
use serde_json::Value;
use std::process::Command;

fn nondefault() -> String {
    repo_root()
        .join("e2e/chart/nondefault-values.yaml")
        .display()
        .to_string()
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn env(container: &Value, name: &str) -> Value {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str).collect()
}

#[test]
fn helm_lint_passes_with_default_and_nondefault_values() -> Result<()> {
    let out = run(Command::new(tool("helm")).args(["lint", "--strict"]).arg(chart_dir()))?;
    assert!(out.contains("0 chart(s) failed"), "{out}");
    let out = run(Command::new(tool("helm"))
        .args(["lint", "--strict"])
        .arg(chart_dir())
        .args(["-f", &nondefault()]))?;
    assert!(out.contains("0 chart(s) failed"), "{out}");
    Ok(())
}

/// The rules of every ClusterRole in `objects` that grant something on Secrets.
fn cluster_secret_rules(objects: &[Value]) -> Vec<Value> {
    let cluster_roles = objects.iter().filter(|o| o["kind"] == "ClusterRole");
    let rules = cluster_roles.flat_map(|r| r["rules"].as_array().cloned().unwrap_or_default());
    rules
        .filter(|rule| strings(&rule["resources"]).contains(&"secrets"))
        .collect()
}

#[test]
fn secret_namespaces_move_secret_reads_out_of_the_cluster_roles_into_those_namespaces() -> Result<()> {
    let default = render("kt", "ops", &[])?;
    assert_eq!(
        cluster_secret_rules(&default).len(),
        2,
        "by default: get, and get/create of admin keys"
    );
    let objects = render("kt", "ops", &["--set", "rbac.secretNamespaces={team-a,team-b}"])?;
    assert_eq!(
        cluster_secret_rules(&objects),
        Vec::<Value>::new(),
        "no Secret rule cluster-wide"
    );
    for ns in ["team-a", "team-b"] {
        let in_ns = |kind: &str| {
            objects
                .iter()
                .find(|o| {
                    o["kind"] == kind
                        && o["metadata"]["name"] == "kt-kubetune-secrets"
                        && o["metadata"]["namespace"] == ns
                })
                .unwrap_or_else(|| panic!("a {kind} kt-kubetune-secrets in {ns}"))
        };
        let rules = &in_ns("Role")["rules"];
        assert_eq!(strings(&rules[0]["resources"]), ["secrets"]);
        assert_eq!(strings(&rules[0]["verbs"]), ["get", "create"], "never list or watch");
        let subject = &in_ns("RoleBinding")["subjects"][0];
        assert_eq!(
            (subject["name"].as_str(), subject["namespace"].as_str()),
            (Some("kt-kubetune"), Some("ops"))
        );
    }
    // Without the ModelDeployment role there are no admin keys to create.
    let fewer = render(
        "kt",
        "ops",
        &[
            "--set",
            "rbac.secretNamespaces={team-a}",
            "--set",
            "rbac.modelDeployments=false",
        ],
    )?;
    let role = fewer
        .iter()
        .find(|o| o["kind"] == "Role" && o["metadata"]["namespace"] == "team-a")
        .expect("Role");
    assert_eq!(strings(&role["rules"][0]["verbs"]), ["get"]);
    Ok(())
}

#[test]
fn default_values_render_the_operator_with_leader_election_and_a_locked_down_pod() -> Result<()> {
    let objects = render("kubetune", "kubetune-system", &[])?;
    assert_eq!(
        kinds(&objects),
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "ConfigMap",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
        ],
        "no Prometheus Operator objects by default"
    );
    // The chart's CRDs are the generated ones (crds/tests/chart_crds.rs checks the bytes).
    for crd in kubetune_crds::all_crds() {
        let name = crd.metadata.name.as_deref().expect("CRD name");
        assert_eq!(
            find(&objects, "CustomResourceDefinition", Some(name)),
            &serde_json::to_value(&crd)?
        );
    }

    let deployment = find(&objects, "Deployment", Some("kubetune"));
    assert_eq!(deployment["metadata"]["namespace"], "kubetune-system");
    assert_eq!(deployment["spec"]["replicas"], 1);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "kubetune");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = container(deployment);
    assert_eq!(c["image"], "ghcr.io/kubetune/operator:0.1.0");
    assert!(strings(&c["args"]).contains(&"--leader-election"), "{}", c["args"]);
    assert_eq!(
        env(c, "POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env(c, "POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        env(c, "KUBETUNE_TRAINER_IMAGE")["value"],
        "ghcr.io/kubetune/trainer:0.1.0-cuda"
    );
    assert_eq!(
        env(c, "KUBETUNE_SERVER_IMAGE")["value"],
        "ghcr.io/kubetune/server:0.1.0-cuda"
    );
    assert_eq!(env(c, "KUBETUNE_GPU_RESOURCE")["value"], "nvidia.com/gpu");
    assert_eq!(
        env(c, "KUBETUNE_TRAINER_TERMINATION_GRACE_SECONDS")["value"],
        "300",
        "trainer pods get time to upload a checkpoint on SIGTERM"
    );
    assert_eq!(
        env(c, "KUBETUNE_REGISTRY"),
        Value::Null,
        "no default registry unless set"
    );
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(
        (
            &c["livenessProbe"]["httpGet"]["path"],
            &c["livenessProbe"]["httpGet"]["port"]
        ),
        (&"/healthz".into(), &"http".into())
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let sc = &c["securityContext"];
    assert_eq!(
        (
            &sc["runAsNonRoot"],
            &sc["readOnlyRootFilesystem"],
            &sc["allowPrivilegeEscalation"]
        ),
        (&true.into(), &true.into(), &false.into())
    );
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);

    let service = find(&objects, "Service", None);
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(service["spec"]["ports"][0]["name"], "metrics");
    let lease_role = find(&objects, "Role", None);
    assert_eq!(lease_role["metadata"]["namespace"], "kubetune-system");
    assert!(find(&objects, "ConfigMap", None)["data"]["kubetune.json"].is_string());
    Ok(())
}

/// Every image the operator runs or starts: its own, and the trainer and server defaults.
fn images(objects: &[Value]) -> Vec<String> {
    let deployment = find(objects, "Deployment", Some("kubetune"));
    let c = container(deployment);
    let mut out = vec![c["image"].as_str().unwrap_or_default().to_string()];
    for name in ["KUBETUNE_TRAINER_IMAGE", "KUBETUNE_SERVER_IMAGE"] {
        out.push(env(c, name)["value"].as_str().unwrap_or_default().to_string());
    }
    out
}

#[test]
fn images_default_to_the_charts_app_version_also_when_only_the_repository_is_overridden() -> Result<()> {
    // A GitOps install pins what it runs: a moving `latest` would change pods with no commit.
    let objects = render("kubetune", "kubetune-system", &[])?;
    for image in images(&objects) {
        assert!(image.contains(":0.1.0"), "{image} is not the chart's appVersion");
    }
    // e2e/demo.sh and the tests override repositories only: the local node has kubetune/* images
    // under the chart's own tags (e2e/images/build.sh).
    let objects = render(
        "kubetune",
        "kubetune-system",
        &[
            "--set",
            "operator.image.repository=kubetune/operator",
            "--set",
            "trainer.image.repository=kubetune/trainer",
            "--set",
            "server.image.repository=kubetune/server",
        ],
    )?;
    assert_eq!(
        images(&objects),
        [
            "kubetune/operator:0.1.0",
            "kubetune/trainer:0.1.0-cuda",
            "kubetune/server:0.1.0-cuda"
        ]
    );
    Ok(())
}

#[test]
fn specs_may_name_only_the_charts_own_images_unless_allowed_images_lists_more() -> Result<()> {
    let objects = render("kubetune", "kubetune-system", &[])?;
    let c = container(find(&objects, "Deployment", Some("kubetune")));
    assert_eq!(
        env(c, "KUBETUNE_ALLOWED_IMAGES")["value"],
        "ghcr.io/kubetune/trainer,ghcr.io/kubetune/server"
    );
    assert_eq!(env(c, "KUBETUNE_DEFAULT_SERVICE_ACCOUNT")["value"], "default");
    // The repositories follow an override of the trainer and server images.
    let objects = render(
        "kubetune",
        "kubetune-system",
        &[
            "--set",
            "trainer.image.repository=kubetune/trainer",
            "--set",
            "server.image.repository=kubetune/server",
        ],
    )?;
    let c = container(find(&objects, "Deployment", Some("kubetune")));
    assert_eq!(
        env(c, "KUBETUNE_ALLOWED_IMAGES")["value"],
        "kubetune/trainer,kubetune/server"
    );
    let objects = render(
        "kubetune",
        "kubetune-system",
        &[
            "--set",
            "workloads.allowedImages={registry.example.com/ml/,ghcr.io/kubetune/trainer}",
            "--set",
            "workloads.defaultServiceAccount=kubetune-workload",
        ],
    )?;
    let c = container(find(&objects, "Deployment", Some("kubetune")));
    assert_eq!(
        env(c, "KUBETUNE_ALLOWED_IMAGES")["value"],
        "registry.example.com/ml/,ghcr.io/kubetune/trainer"
    );
    assert_eq!(env(c, "KUBETUNE_DEFAULT_SERVICE_ACCOUNT")["value"], "kubetune-workload");
    Ok(())
}

#[test]
fn registries_are_scoped_by_namespace_unless_the_chart_shares_them() -> Result<()> {
    let objects = render("kubetune", "kubetune-system", &[])?;
    let c = container(find(&objects, "Deployment", Some("kubetune")));
    assert_eq!(env(c, "KUBETUNE_REGISTRY_SCOPE")["value"], "namespace");
    let objects = render("kubetune", "kubetune-system", &["--set", "registry.scope=shared"])?;
    let c = container(find(&objects, "Deployment", Some("kubetune")));
    assert_eq!(env(c, "KUBETUNE_REGISTRY_SCOPE")["value"], "shared");
    Ok(())
}

#[test]
fn nondefault_values_reach_the_manifests() -> Result<()> {
    let objects = render("prod", "ml", &["-f", &nondefault()])?;
    let deployment = find(&objects, "Deployment", Some("prod-kubetune"));
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "tuner");
    assert_eq!(pod["imagePullSecrets"][0]["name"], "regcred");
    assert_eq!(pod["nodeSelector"]["node-role.kubernetes.io/control-plane"], "");
    assert_eq!(pod["tolerations"][0]["key"], "node-role.kubernetes.io/control-plane");
    assert_eq!(
        pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
            ["topologyKey"],
        "kubernetes.io/hostname",
        "two replicas prefer two nodes"
    );
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["team"],
        "ml-platform"
    );
    let c = container(deployment);
    assert_eq!(c["image"], "registry.example.com/kubetune/operator:1.2.3");
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(
        strings(&c["args"]),
        ["--leader-election", "--http-addr=$(POD_IP):8081", "--concurrency=16"]
    );
    for (name, value) in [
        ("KUBETUNE_TRAINER_IMAGE", "registry.example.com/kubetune/trainer:1.2.3"),
        (
            "KUBETUNE_SERVER_IMAGE",
            "registry.example.com/kubetune/server:1.2.3-cpu",
        ),
        ("KUBETUNE_REGISTRY", "s3://ml-bucket/kubetune"),
        ("KUBETUNE_GPU_RESOURCE", "amd.com/gpu"),
        ("KUBETUNE_GPU_MEMORY_LABEL", "amd.com/gpu.vram"),
        ("KUBETUNE_SCRATCH_SIZE", "200Gi"),
        ("KUBETUNE_TRAINER_METRICS_PORT", "9191"),
        ("KUBETUNE_TRAINER_TERMINATION_GRACE_SECONDS", "900"),
        ("RUST_LOG", "debug"),
        ("KUBETUNE_EXTRA", "1"),
    ] {
        assert_eq!(env(c, name)["value"], value, "{name}");
    }
    assert_eq!(c["ports"][0]["containerPort"], 8081);
    assert_eq!(
        find(&objects, "ServiceAccount", Some("tuner"))["metadata"]["annotations"]["iam.example.com/role"],
        "kubetune"
    );
    assert_eq!(find(&objects, "Service", None)["spec"]["ports"][0]["port"], 9100);

    // RBAC: the ModelDeployment controller's role is switched off.
    assert_eq!(objects.iter().filter(|o| o["kind"] == "ClusterRole").count(), 1);
    assert!(!serde_json::to_string(find(&objects, "ClusterRole", None))?.contains("modeldeployments"));

    // Prometheus Operator objects.
    let sm = find(&objects, "ServiceMonitor", None);
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    let trainer = find(&objects, "PodMonitor", Some("prod-kubetune-trainer"));
    assert_eq!(
        trainer["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "kubetune-trainer"
    );
    assert_eq!(trainer["spec"]["namespaceSelector"]["any"], true);
    let endpoint = &trainer["spec"]["podMetricsEndpoints"][0];
    assert_eq!(
        (&endpoint["port"], &endpoint["honorLabels"], &endpoint["interval"]),
        (&"metrics".into(), &true.into(), &"10s".into())
    );
    let server = find(&objects, "PodMonitor", Some("prod-kubetune-server"));
    assert_eq!(
        server["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "kubetune-server"
    );
    assert_eq!(
        server["spec"]["podMetricsEndpoints"][0]["port"], "http",
        "the server's /metrics is on its API port"
    );
    assert_eq!(
        find(&objects, "PrometheusRule", None)["metadata"]["labels"]["release"],
        "prom"
    );
    assert_eq!(
        find(&objects, "ConfigMap", None)["metadata"]["annotations"]["grafana_folder"],
        "kubetune"
    );
    Ok(())
}

#[test]
fn two_replicas_without_leader_election_are_refused() -> Result<()> {
    let out = output(&mut helm_template_cmd(
        "kt",
        "kt",
        &["--set", "operator.replicas=2", "--set", "operator.leaderElection=false"],
    ))?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("operator.replicas > 1 needs operator.leaderElection: true"),
        "{stderr}"
    );
    // One replica without leader election is fine, and then there is no Lease Role.
    let objects = render("kt", "kt", &["--set", "operator.leaderElection=false"])?;
    assert!(!objects.iter().any(|o| o["kind"] == "Role"));
    assert!(!strings(&container(find(&objects, "Deployment", None))["args"]).contains(&"--leader-election"));
    Ok(())
}

/// Every `kubetune_*` metric the dashboard and the alerts use is one that kubetune exports (or,
/// for the ModelDeployment controller and the server, one that docs/alerts.md's metrics contract names).
const KNOWN_METRICS: &[&str] = &[
    "kubetune_train_loss",
    "kubetune_eval_loss",
    "kubetune_train_step",
    "kubetune_train_total_steps",
    "kubetune_train_tokens_per_second",
    "kubetune_finetunejobs",
    "kubetune_operator_reconciles_total",
    "kubetune_operator_reconcile_errors_total",
    "kubetune_operator_reconcile_duration_seconds_bucket",
    "kubetune_modeldeployment_ready",
    "kubetune_modeldeployment_rollout_state",
    "kubetune_server_requests_total",
    "kubetune_server_request_duration_seconds_bucket",
];

fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("kubetune_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn dashboard_queries_parse_and_use_known_metrics() -> Result<()> {
    let objects = render("kt", "kt", &[])?;
    let json = find(&objects, "ConfigMap", None)["data"]["kubetune.json"]
        .as_str()
        .ok_or_else(|| anyhow!("no dashboard"))?
        .to_string();
    let dashboard: Value = serde_json::from_str(&json)?;
    let panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"] != "row")
        .collect();
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Training loss",
        "Eval loss",
        "Tokens per second",
        "Error ratio (5xx)",
        "Latency p50 / p99",
        "Rollout state",
    ] {
        assert!(titles.contains(&wanted), "dashboard lacks {wanted}: {titles:?}");
    }
    // Each query, with Grafana's variables filled in, as a recording rule: promtool parses them all.
    let mut rules = Vec::new();
    for (i, target) in panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .enumerate()
    {
        let expr = target["expr"].as_str().ok_or_else(|| anyhow!("target without expr"))?;
        for name in metric_names(expr) {
            assert!(
                KNOWN_METRICS.contains(&name.as_str()),
                "dashboard query uses unknown metric {name}: {expr}"
            );
        }
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$namespace", ".*")
            .replace("$finetunejob", ".*");
        rules.push(serde_json::json!({"record": format!("dashboard:query{i}"), "expr": expr}));
    }
    assert!(rules.len() >= 10, "{} queries", rules.len());
    let dir = scratch_dir("dashboard")?;
    let file = dir.join("queries.yaml");
    std::fs::write(
        &file,
        serde_yaml::to_string(&serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}))?,
    )?;
    run(Command::new(tool("promtool")).args(["check", "rules"]).arg(&file))?;
    std::fs::remove_dir_all(dir)?;

    let with_rules = render("kt", "kt", &["--set", "prometheusRule.enabled=true"])?;
    for group in find(&with_rules, "PrometheusRule", None)["spec"]["groups"]
        .as_array()
        .expect("groups")
    {
        for rule in group["rules"].as_array().expect("rules") {
            for name in metric_names(rule["expr"].as_str().unwrap_or_default()) {
                assert!(
                    KNOWN_METRICS.contains(&name.as_str()),
                    "alert {} uses unknown metric {name}",
                    rule["alert"]
                );
            }
        }
    }
    Ok(())
}

/// Deletes the cluster-scoped objects of a test release (the namespace takes the rest).
struct ClusterScoped(String);

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        let _ = Command::new(kubectl_path())
            .arg("--kubeconfig")
            .arg(kubeconfig_path())
            .args(["delete", "clusterrole,clusterrolebinding", "--ignore-not-found", "-l"])
            .arg(format!("app.kubernetes.io/instance={}", self.0))
            .output();
    }
}

/// Renders the chart as release `ns.name` into that namespace and server-side applies every
/// object (the CRDs as a dry run); the Prometheus Operator kinds only where the cluster serves
/// them, which the local cluster does not. Returns the objects.
///
/// Needs no lock against the operator tests: it creates no kubetune object, its release has
/// cluster-scoped objects of its own name, and its operator never starts (the default images
/// are not on the local node, which cannot pull), so `install_operator` does not count it as a
/// rival.
async fn install(client: &Client, ns: &TestNamespace, args: &[&str]) -> Result<Vec<Value>> {
    let objects = render(&ns.name, &ns.name, args)?;
    let discovery = Discovery::new(client.clone()).run().await?;
    let serves_monitoring = discovery.groups().any(|g| g.name() == "monitoring.coreos.com");
    for obj in &objects {
        let monitoring = obj["apiVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("monitoring.coreos.com/"));
        if monitoring && !serves_monitoring {
            continue;
        }
        // The CRDs are shared by every test on the cluster: validated (dry run), not replaced.
        let mode = if obj["kind"] == "CustomResourceDefinition" {
            ApplyMode::DryRun
        } else {
            ApplyMode::Apply
        };
        apply_object(client, &discovery, &ns.name, obj, mode)
            .await
            .map_err(|e| anyhow!("{} {} does not apply: {e:#}", obj["kind"], obj["metadata"]["name"]))?;
    }
    Ok(objects)
}

async fn allowed(
    client: &Client,
    user: &str,
    namespace: &str,
    verb: &str,
    resource: &str,
    name: Option<&str>,
) -> Result<bool> {
    let (group, resource) = resource.split_once('/').map_or(("", resource), |(g, r)| (g, r));
    let (resource, subresource) = resource
        .split_once(':')
        .map_or((resource, None), |(r, s)| (r, Some(s.to_string())));
    let sa_namespace = user.split(':').nth(2).unwrap_or_default();
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_string()),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{sa_namespace}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                group: Some(group.to_string()),
                resource: Some(resource.to_string()),
                subresource,
                verb: Some(verb.to_string()),
                namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
                name: name.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// (verb, "group/resource[:subresource]", namespace ("" = all namespaces / cluster), name).
type Check = (&'static str, &'static str, &'static str, Option<&'static str>);

async fn check_all(client: &Client, user: &str, release_ns: &str, checks: &[Check], want: bool) -> Result<()> {
    let mut wrong = Vec::new();
    for (verb, resource, namespace, name) in checks {
        let namespace = if *namespace == "$release" {
            release_ns
        } else {
            namespace
        };
        if allowed(client, user, namespace, verb, resource, *name).await? != want {
            wrong.push(format!("{verb} {resource} in {namespace:?} {name:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{user} should {}be allowed: {wrong:#?}",
        if want { "" } else { "not " }
    );
    Ok(())
}

/// What the FineTuneJob controller calls (operator/src): each must be allowed.
const OPERATOR_NEEDS: &[Check] = &[
    ("list", "kubetune.dev/finetunejobs", "", None),
    ("watch", "kubetune.dev/finetunejobs", "", None),
    (
        "patch",
        "kubetune.dev/finetunejobs:status",
        "team-a",
        Some("support-bot"),
    ),
    ("get", "batch/jobs", "team-a", Some("support-bot-train")),
    ("list", "batch/jobs", "", None),
    ("watch", "batch/jobs", "", None),
    ("create", "batch/jobs", "team-a", None),
    ("patch", "batch/jobs", "team-a", Some("support-bot-train")),
    ("list", "/pods", "team-a", None),
    ("get", "/secrets", "team-a", Some("kubetune-storage")),
    // The ServiceAccount a spec names, checked to exist before pods run as it.
    ("get", "/serviceaccounts", "team-a", Some("trainer")),
    ("list", "/nodes", "", None),
    ("create", "events.k8s.io/events", "team-a", None),
    ("patch", "events.k8s.io/events", "team-a", Some("support-bot.1")),
    ("create", "coordination.k8s.io/leases", "$release", None),
    (
        "get",
        "coordination.k8s.io/leases",
        "$release",
        Some("kubetune-operator"),
    ),
    (
        "update",
        "coordination.k8s.io/leases",
        "$release",
        Some("kubetune-operator"),
    ),
];

/// What the operator must never be able to do.
const OPERATOR_MUST_NOT: &[Check] = &[
    ("list", "/secrets", "team-a", None),
    ("list", "/secrets", "", None),
    ("watch", "/secrets", "team-a", None),
    ("list", "/serviceaccounts", "", None),
    ("create", "/serviceaccounts:token", "team-a", Some("trainer")),
    ("delete", "kubetune.dev/finetunejobs", "team-a", Some("support-bot")),
    ("create", "kubetune.dev/finetunejobs", "team-a", None),
    ("update", "kubetune.dev/finetunejobs", "team-a", Some("support-bot")),
    ("patch", "kubetune.dev/finetunejobs", "team-a", Some("support-bot")),
    (
        "update",
        "kubetune.dev/finetunejobs:status",
        "team-a",
        Some("support-bot"),
    ),
    ("delete", "batch/jobs", "team-a", Some("support-bot-train")),
    ("delete", "/pods", "team-a", Some("x")),
    ("create", "/pods:exec", "team-a", Some("x")),
    ("patch", "/nodes", "", Some("gpu-1")),
    ("get", "/persistentvolumeclaims", "team-a", Some("x")),
    (
        "get",
        "coordination.k8s.io/leases",
        "default",
        Some("kubetune-operator"),
    ),
    ("update", "coordination.k8s.io/leases", "$release", Some("someone-else")),
    (
        "delete",
        "coordination.k8s.io/leases",
        "$release",
        Some("kubetune-operator"),
    ),
    ("escalate", "rbac.authorization.k8s.io/clusterroles", "", None),
    ("create", "rbac.authorization.k8s.io/rolebindings", "team-a", None),
];

/// The coming ModelDeployment controller's grants (rbac.modelDeployments).
const MODELDEPLOYMENT_NEEDS: &[Check] = &[
    ("watch", "kubetune.dev/modeldeployments", "", None),
    ("patch", "kubetune.dev/modeldeployments:status", "team-a", Some("chat")),
    ("get", "kubetune.dev/finetunejobs", "team-a", Some("support-bot")),
    ("create", "apps/deployments", "team-a", None),
    ("patch", "apps/deployments", "team-a", Some("chat")),
    ("watch", "/services", "", None),
    ("delete", "policy/poddisruptionbudgets", "team-a", Some("chat")),
    ("patch", "autoscaling/horizontalpodautoscalers", "team-a", Some("chat")),
    ("delete", "autoscaling/horizontalpodautoscalers", "team-a", Some("chat")),
    ("create", "/configmaps", "team-a", None),
    ("patch", "/configmaps", "team-a", Some("chat-adapters")),
    ("watch", "/pods", "", None),
    // Each ModelDeployment's admin key: read by name, created once when absent.
    ("get", "/secrets", "team-a", Some("chat-admin-key")),
    ("create", "/secrets", "team-a", None),
];

const MODELDEPLOYMENT_MUST_NOT: &[Check] = &[
    ("delete", "apps/deployments", "team-a", Some("chat")),
    ("delete", "kubetune.dev/modeldeployments", "team-a", Some("chat")),
    ("update", "apps/deployments", "team-a", Some("chat")),
    ("delete", "/configmaps", "team-a", Some("chat-adapters")),
    // A new admin key would lock the operator out of the running pods: never rewritten.
    ("update", "/secrets", "team-a", Some("chat-admin-key")),
    ("patch", "/secrets", "team-a", Some("chat-admin-key")),
    ("delete", "/secrets", "team-a", Some("chat-admin-key")),
];

#[tokio::test]
async fn default_install_applies_and_grants_exactly_what_the_operator_uses() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "chart").await?;
    let _cleanup = ClusterScoped(ns.name.clone());
    let objects = install(&client, &ns, &[]).await?;
    assert!(objects.iter().any(|o| o["kind"] == "Deployment"));
    let sa = format!("system:serviceaccount:{}:{}-kubetune", ns.name, ns.name);
    check_all(&client, &sa, &ns.name, OPERATOR_NEEDS, true).await?;
    check_all(&client, &sa, &ns.name, MODELDEPLOYMENT_NEEDS, true).await?;
    check_all(&client, &sa, &ns.name, OPERATOR_MUST_NOT, false).await?;
    check_all(&client, &sa, &ns.name, MODELDEPLOYMENT_MUST_NOT, false).await?;
    // Applying the same render again changes nothing the API server would report as a conflict.
    install(&client, &ns, &[]).await?;
    Ok(())
}

#[tokio::test]
async fn with_secret_namespaces_the_operator_reads_secrets_only_in_the_namespaces_listed() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "chart-sec").await?;
    let _cleanup = ClusterScoped(ns.name.clone());
    // The release namespace is the one listed: Roles can only be made in namespaces that exist.
    let listed = format!("rbac.secretNamespaces={{{}}}", ns.name);
    install(&client, &ns, &["--set", &listed]).await?;
    let sa = format!("system:serviceaccount:{}:{}-kubetune", ns.name, ns.name);
    let here = [
        ("get", "/secrets", "$release", Some("kubetune-storage")),
        ("create", "/secrets", "$release", None),
    ];
    check_all(&client, &sa, &ns.name, &here, true).await?;
    let elsewhere = [
        ("get", "/secrets", "team-a", Some("kubetune-storage")),
        ("create", "/secrets", "team-a", None),
        ("list", "/secrets", "$release", None),
    ];
    check_all(&client, &sa, &ns.name, &elsewhere, false).await?;
    Ok(())
}

#[tokio::test]
async fn nondefault_install_applies_without_the_modeldeployment_role() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "chart-nd").await?;
    let _cleanup = ClusterScoped(ns.name.clone());
    install(&client, &ns, &["-f", &nondefault()]).await?;
    let sa = format!("system:serviceaccount:{}:tuner", ns.name);
    check_all(&client, &sa, &ns.name, OPERATOR_NEEDS, true).await?;
    check_all(&client, &sa, &ns.name, OPERATOR_MUST_NOT, false).await?;
    check_all(&client, &sa, &ns.name, &MODELDEPLOYMENT_NEEDS[..2], false).await?;
    // Without the ModelDeployment role there is no admin key to create: no Secret is created.
    check_all(&client, &sa, &ns.name, &[("create", "/secrets", "team-a", None)], false).await?;
    Ok(())
}
