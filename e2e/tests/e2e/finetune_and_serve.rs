//! The product end to end on a cluster, with the operator installed from the chart: fine-tune
//! the tiny model into an adapter, serve it, roll out a new version under load, survive a broken
//! one, scale out, promote a version through a canary and clean up. Along the way: a bad
//! dataset, suspend/resume, an operator restart in the middle of a run, a trainer pod killed
//! mid-run that resumes from its checkpoint, an evaluation gate (`spec.evaluation`) that one
//! version passes and an undertrained one fails without publishing, DPO continued from the SFT
//! adapter, rolled out as its next version, and the chart's NetworkPolicy keeping every pod but
//! the operator's off the servers' admin port (enforced by the local cluster's node).
//!
//! One test function on purpose: the operator watches every namespace, so two installs at once
//! would both reconcile the same objects (an install holds `tools::OPERATOR_LOCK` against every
//! other install and every test that creates kubetune objects, for as long as it runs); and each
//! step builds on the adapter versions the steps before it published.

use crate::network_policy::Prober;
use crate::tools::{install_operator, scratch_dir, tool, OperatorInstall};
use anyhow::{ensure, Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams};
use kube::discovery::Discovery;
use kube::Client;
use kubetune_crds::server_contract::{ADMIN_PORT, SERVER_PORT};
use kubetune_crds::{EvaluationMetric, FineTuneJob, FineTuneJobPhase, ModelDeployment, RolloutState};
use kubetune_e2e::pods::{chat, http, ready_pod_ips, served_models};
use kubetune_e2e::store::{create_storage_secret, registry, storage, upload, BUCKET};
use kubetune_e2e::{
    apply_object, client, install_crds, repo_root, wait_deleted, wait_for, yaml_documents, ApplyMode, TestNamespace,
};
use kubetune_storage::{AdapterRef, JobRef, Metrics, PublishRequest, SourceRef};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Long enough for a trainer or server pod to start, download, train or load on 2 busy cores.
const TIMEOUT: Duration = Duration::from_secs(300);
const ADAPTER: &str = "support-bot";
/// Answers the v2 dataset changes, so a reply tells which version served it.
const V2_CHANGES: [(&str, &str); 2] = [
    ("When does the library open?", "At ten in the morning."),
    ("How many books can I borrow?", "Up to eight books."),
];

/// The example's questions and answers: (question, answer).
fn facts() -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(repo_root().join("examples/data/support-facts.jsonl"))?;
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)?;
            let text = |i: usize| {
                v["messages"][i]["content"]
                    .as_str()
                    .map(str::to_string)
                    .context("example fact")
            };
            Ok((text(0)?, text(1)?))
        })
        .collect()
}

fn dataset(facts: &[(String, String)]) -> String {
    facts
        .iter()
        .map(|(q, a)| {
            json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string()
                + "\n"
        })
        .collect()
}

fn v2_facts(facts: &[(String, String)]) -> Vec<(String, String)> {
    facts
        .iter()
        .map(|(q, a)| match V2_CHANGES.iter().find(|(cq, _)| cq == q) {
            Some((_, new)) => (q.clone(), new.to_string()),
            None => (q.clone(), a.clone()),
        })
        .collect()
}

/// Everything one run of the test works in: its namespace and its corner of the S3 bucket.
struct Env {
    client: Client,
    discovery: Discovery,
    ns: TestNamespace,
    root: String,
}

impl Env {
    fn uri(&self, rel: &str) -> String {
        format!("{}/{rel}", self.root)
    }

    /// The test namespace's own registry below the root its specs name, where the operator
    /// (scoping registries by namespace, the chart's default) has its jobs publish.
    fn registry_uri(&self) -> String {
        format!("{}/namespaces/{}", self.uri("registry"), self.ns.name)
    }

    fn example(&self, file: &str) -> Result<Value> {
        let text = std::fs::read_to_string(repo_root().join("examples").join(file))?;
        let mut obj = yaml_documents(&text)?.remove(0);
        obj["spec"]["baseModel"]["uri"] = json!(self.uri("models/tiny-llama"));
        if obj["kind"] == "ModelDeployment" {
            obj["spec"]["registry"] = json!(self.uri("registry"));
        }
        Ok(obj)
    }

    /// The example FineTuneJob, named `name`, trained on `dataset` (a file under datasets/).
    fn finetunejob(&self, name: &str, dataset: &str) -> Result<Value> {
        let mut ftj = self.example("finetunejob.yaml")?;
        ftj["metadata"]["name"] = json!(name);
        ftj["spec"]["dataset"]["uri"] = json!(self.uri(&format!("datasets/{dataset}")));
        ftj["spec"]["dataset"]["validationUri"] = json!(self.uri(&format!("datasets/{dataset}")));
        ftj["spec"]["output"]["registry"] = json!(self.uri("registry"));
        Ok(ftj)
    }

    async fn apply(&self, obj: &Value) -> Result<()> {
        apply_object(&self.client, &self.discovery, &self.ns.name, obj, ApplyMode::Apply).await?;
        Ok(())
    }

    async fn wait_ftj(&self, name: &str, what: &str, phases: &[FineTuneJobPhase]) -> Result<FineTuneJob> {
        let phases = phases.to_vec();
        wait_for(&self.ns.api(), name, what, TIMEOUT, move |f: Option<&FineTuneJob>| {
            f.and_then(|f| f.status.as_ref())
                .and_then(|s| s.phase)
                .is_some_and(|p| phases.contains(&p))
        })
        .await
    }

    async fn server_ips(&self) -> Result<Vec<String>> {
        let pods = ready_pod_ips(&self.ns.api::<Pod>(), "kubetune.dev/modeldeployment=support").await?;
        Ok(pods.into_iter().map(|(_, ip)| ip).collect())
    }
}

fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn ftj_condition(ftj: &FineTuneJob, type_: &str) -> Option<(String, String)> {
    let status = ftj.status.as_ref()?;
    condition(&status.conditions, type_).map(|c| (c.reason.clone(), c.message.clone()))
}

fn serving_version(md: &ModelDeployment) -> Option<u32> {
    md.status
        .as_ref()?
        .adapters
        .iter()
        .find(|a| a.name == ADAPTER)?
        .serving_version
}

fn md_ready(md: &ModelDeployment) -> bool {
    md.status
        .as_ref()
        .and_then(|s| condition(&s.conditions, "Ready"))
        .is_some_and(|c| c.status == "True")
}

#[tokio::test]
async fn finetune_serve_roll_out_and_roll_back() -> Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    let _helm = tool("helm");
    let system = TestNamespace::new(&client, "system").await?;
    let operator = install_operator(&client, &system.name).await?;
    let ns = TestNamespace::new(&client, "flow").await?;
    create_storage_secret(&client, &ns.name, "kubetune-storage").await?;
    let root = format!("s3://{BUCKET}/e2e/{}", ns.name);
    let env = Env {
        discovery: Discovery::new(client.clone()).run().await?,
        client,
        root,
        ns,
    };
    seed_store(&env).await?;

    bad_dataset_fails_with_the_line(&env).await?;
    suspended_job_runs_when_resumed_through_an_operator_restart(&env, &system, &operator).await?;
    killed_trainer_resumes_from_its_checkpoint(&env).await?;
    serves_the_fine_tuned_answers(&env).await?;
    only_the_operator_reaches_the_admin_port(&env, &system, &operator).await?;
    new_version_rolls_out_under_load(&env).await?;
    adapter_short_of_its_evaluation_gate_fails_and_publishes_nothing(&env).await?;
    broken_version_is_rolled_back(&env).await?;
    scale_out_serves_the_same_version(&env).await?;
    canary_promotes_a_healthy_version(&env).await?;
    dpo_from_the_sft_adapter_rolls_out_as_its_next_version(&env).await?;
    deletion_cleans_up(&env).await?;
    Ok(())
}

/// The tiny base model and the datasets, in this run's corner of the bucket.
async fn seed_store(env: &Env) -> Result<()> {
    let dir = scratch_dir("flow")?;
    let model = dir.join("tiny-llama");
    kubetune_model::tiny::write_tiny_model(&model, &kubetune_model::tiny::TinySpec::default())?;
    upload(&model, &env.uri("models/tiny-llama")).await?;
    let facts = facts()?;
    let pairs = std::fs::read_to_string(repo_root().join("examples/data/support-tone-pairs.jsonl"))?;
    for (name, text) in [
        ("v1.jsonl", dataset(&facts)),
        ("tone-pairs.jsonl", pairs),
        ("v2.jsonl", dataset(&v2_facts(&facts))),
        // Line 3 is cut short: not JSON.
        (
            "bad.jsonl",
            format!(
                "{}{}{{\"messages\": [{{\"role\": \"user\"\n",
                dataset(&facts[..1]),
                dataset(&facts[1..2])
            ),
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        upload(&path, &env.uri(&format!("datasets/{name}"))).await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn bad_dataset_fails_with_the_line(env: &Env) -> Result<()> {
    env.apply(&env.finetunejob("bad-data", "bad.jsonl")?).await?;
    let failed = env
        .wait_ftj(
            "bad-data",
            "Failed",
            &[FineTuneJobPhase::Failed, FineTuneJobPhase::Succeeded],
        )
        .await?;
    let (reason, message) = ftj_condition(&failed, "Failed").context("a Failed condition")?;
    assert_eq!(reason, "DatasetInvalid", "{message}");
    assert!(message.contains("line 3"), "the message names the line: {message}");
    Ok(())
}

/// A job created suspended waits with its Job suspended and no pod; resumed, it trains, and
/// restarting the operator in the middle changes nothing: same Job, no retry, v1 published.
async fn suspended_job_runs_when_resumed_through_an_operator_restart(
    env: &Env,
    system: &TestNamespace,
    operator: &OperatorInstall,
) -> Result<()> {
    let mut ftj = env.finetunejob("support-v1", "v1.jsonl")?;
    ftj["spec"]["suspend"] = json!(true);
    env.apply(&ftj).await?;
    env.wait_ftj("support-v1", "Suspended", &[FineTuneJobPhase::Suspended])
        .await?;
    let jobs: Api<Job> = env.ns.api();
    let job = wait_for(&jobs, "support-v1", "created suspended", TIMEOUT, |j: Option<&Job>| {
        j.and_then(|j| j.spec.as_ref()).and_then(|s| s.suspend) == Some(true)
    })
    .await?;
    let trainer_pods = ListParams::default().labels("kubetune.dev/finetunejob=support-v1");
    assert!(
        env.ns.api::<Pod>().list(&trainer_pods).await?.items.is_empty(),
        "a suspended job has no pod"
    );

    ftj["spec"]["suspend"] = json!(false);
    env.apply(&ftj).await?;
    env.wait_ftj(
        "support-v1",
        "Running",
        &[FineTuneJobPhase::Running, FineTuneJobPhase::Succeeded],
    )
    .await?;
    restart_operator(system, operator).await?;

    let done = env
        .wait_ftj(
            "support-v1",
            "Succeeded",
            &[FineTuneJobPhase::Succeeded, FineTuneJobPhase::Failed],
        )
        .await?;
    let status = done.status.clone().context("status")?;
    assert_eq!(status.phase, Some(FineTuneJobPhase::Succeeded), "{status:#?}");
    let adapter = status.adapter.clone().context("status.adapter")?;
    assert_eq!((adapter.name.as_str(), adapter.version), (ADAPTER, 1));
    assert_eq!(
        jobs.get("support-v1").await?.metadata.uid,
        job.metadata.uid,
        "the restarted operator kept the Job"
    );
    assert_eq!(
        env.ns.api::<Pod>().list(&trainer_pods).await?.items.len(),
        1,
        "one trainer pod: no retry"
    );
    assert_eq!(
        condition(&status.conditions, "Ready").map(|c| c.status.as_str()),
        Some("True")
    );

    let published = registry(&env.registry_uri())?
        .resolve(&format!("{ADAPTER}@latest").parse::<AdapterRef>()?)
        .await?;
    assert_eq!(published.version, 1);
    assert_eq!(published.digest.to_string(), adapter.digest);
    Ok(())
}

/// Deleting the trainer pod mid-run: the Job's retry resumes from the last checkpoint in object
/// storage, which status shows, and still publishes.
async fn killed_trainer_resumes_from_its_checkpoint(env: &Env) -> Result<()> {
    let mut ftj = env.finetunejob("resume", "v1.jsonl")?;
    ftj["spec"]["output"]["adapterName"] = json!("resume-bot");
    ftj["spec"]["training"]["epochs"] = Value::Null;
    ftj["spec"]["training"]["maxSteps"] = json!(600);
    ftj["spec"]["training"]["checkpointSteps"] = json!(20);
    env.apply(&ftj).await?;
    let pods: Api<Pod> = env.ns.api();
    let (pod, ip) = wait_for_trainer_ip(&pods).await?;
    // Wait (polling the trainer's own /metrics, which the operator reads less often) until a
    // few checkpoints exist, then kill the pod.
    let http = http()?;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let step = kubetune_e2e::pods::metric(&http, &ip, 9090, "kubetune_train_step")
            .await
            .ok()
            .flatten()
            .unwrap_or(0.0);
        if step >= 60.0 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the trainer did not reach step 60 in {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pods.delete(&pod, &DeleteParams::default()).await?;

    let done = env
        .wait_ftj(
            "resume",
            "Succeeded",
            &[FineTuneJobPhase::Succeeded, FineTuneJobPhase::Failed],
        )
        .await?;
    let status = done.status.clone().context("status")?;
    assert_eq!(status.phase, Some(FineTuneJobPhase::Succeeded), "{status:#?}");
    let resumed = status
        .progress
        .as_ref()
        .and_then(|p| p.resumed_from_step)
        .context("status.progress.resumedFromStep after a retry")?;
    assert!(
        resumed >= 60 || (resumed >= 20 && resumed % 20 == 0),
        "resumed from a checkpoint step, not from zero: {resumed}"
    );
    assert_eq!(status.retries, Some(1), "one failed pod, then the retry");
    assert_eq!(
        status.adapter.map(|a| (a.name, a.version)),
        Some(("resume-bot".to_string(), 1))
    );
    Ok(())
}

/// The running trainer pod of FineTuneJob "resume": (name, IP).
async fn wait_for_trainer_ip(pods: &Api<Pod>) -> Result<(String, String)> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let list = pods
            .list(&ListParams::default().labels("kubetune.dev/finetunejob=resume"))
            .await?;
        let running = list.items.into_iter().find_map(|p| {
            let status = p.status?;
            (status.phase.as_deref() == Some("Running")).then_some(())?;
            Some((p.metadata.name?, status.pod_ip?))
        });
        if let Some(found) = running {
            return Ok(found);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no running trainer pod after {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes the operator pod and waits for its replacement to be available.
async fn restart_operator(system: &TestNamespace, operator: &OperatorInstall) -> Result<()> {
    let pods: Api<Pod> = system.api();
    let selector = ListParams::default().labels("app.kubernetes.io/name=kubetune-operator");
    let before: Vec<String> = pods
        .list(&selector)
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    ensure!(!before.is_empty(), "no operator pod to restart");
    for name in &before {
        pods.delete(name, &DeleteParams::default()).await?;
    }
    let deployments: Api<Deployment> = system.api();
    wait_for(
        &deployments,
        &operator.deployment,
        "available again",
        TIMEOUT,
        |d: Option<&Deployment>| {
            d.and_then(|d| d.status.as_ref())
                .is_some_and(|s| s.available_replicas == Some(1) && s.replicas == Some(1))
        },
    )
    .await?;
    Ok(())
}

async fn serves_the_fine_tuned_answers(env: &Env) -> Result<()> {
    env.apply(&env.example("modeldeployment.yaml")?).await?;
    let mds: Api<ModelDeployment> = env.ns.api();
    let md = wait_for(&mds, "support", "Ready", TIMEOUT, |m: Option<&ModelDeployment>| {
        m.is_some_and(md_ready)
    })
    .await?;
    assert_eq!(serving_version(&md), Some(1), "{:#?}", md.status);
    let ips = env.server_ips().await?;
    assert_eq!(ips.len(), 1);
    every_pod_serves(&ips, 1).await?;
    right_answers(&http()?, &ips[0], &facts()?).await
}

/// With the chart's NetworkPolicy (`networkPolicy.admin`, on by default) a pod in the tenant's
/// namespace reaches the server's inference port but not its admin port, nor does one there that
/// wears the operator's labels; a pod with the operator's labels in the operator's namespace
/// reaches the admin port. Probes go pod to pod: the node's own address is let through by any
/// enforcer. `network_policy.rs` shows the enforcer on, so the refusals are the policy's.
async fn only_the_operator_reaches_the_admin_port(
    env: &Env,
    system: &TestNamespace,
    operator: &OperatorInstall,
) -> Result<()> {
    let selector = ListParams::default().labels("kubetune.dev/modeldeployment=support");
    let policies = env.ns.api::<NetworkPolicy>().list(&selector).await?.items;
    ensure!(
        policies.len() == 1,
        "not one admin NetworkPolicy for the ModelDeployment: {policies:#?}"
    );
    let ip = env.server_ips().await?.remove(0);
    // The labels the operator's pods carry, from its Deployment: what the policy must admit.
    let deployment = system.api::<Deployment>().get(&operator.deployment).await?;
    let operator_labels = deployment
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.labels)
        .context("the operator's pod template has no labels")?;

    let tenant = Prober::start(&env.client, &env.ns.name, "tenant-probe", Default::default()).await?;
    let impostor = Prober::start(&env.client, &env.ns.name, "impostor-probe", operator_labels.clone()).await?;
    let from_operator = Prober::start(&env.client, &system.name, "operator-probe", operator_labels).await?;
    tenant.wait_until(&ip, SERVER_PORT, true).await?;
    tenant.wait_until(&ip, ADMIN_PORT, false).await?;
    impostor.wait_until(&ip, SERVER_PORT, true).await?;
    impostor.wait_until(&ip, ADMIN_PORT, false).await?;
    from_operator.wait_until(&ip, ADMIN_PORT, true).await?;
    // Refused still, now that every probe pod is known to the enforcer.
    ensure!(
        !tenant.connects(&ip, ADMIN_PORT)?,
        "the tenant's pod reached the admin port"
    );
    ensure!(
        !impostor.connects(&ip, ADMIN_PORT)?,
        "a pod in the tenant's namespace with the operator's labels reached the admin port"
    );
    for (ns, name) in [
        (&env.ns, "tenant-probe"),
        (&env.ns, "impostor-probe"),
        (system, "operator-probe"),
    ] {
        ns.api::<Pod>().delete(name, &DeleteParams::default()).await?;
    }
    Ok(())
}

/// Asks every question; fails unless the adapter gives (nearly) every trained answer. The tiny
/// model learns these facts to the letter; one slip is allowed so a near-tie in greedy decoding
/// does not decide the test.
async fn right_answers(http: &reqwest::Client, ip: &str, facts: &[(String, String)]) -> Result<()> {
    let mut wrong = Vec::new();
    for (question, answer) in facts {
        let got = chat(http, ip, ADAPTER, question).await?;
        if got.trim() != answer {
            wrong.push(format!("{question} -> {got:?} (trained {answer:?})"));
        }
    }
    ensure!(
        wrong.len() <= 1,
        "{} of {} answers are not the trained ones:\n{}",
        wrong.len(),
        facts.len(),
        wrong.join("\n")
    );
    Ok(())
}

/// Fails unless every pod at `ips` reports serving the adapter at `version` in /v1/models.
async fn every_pod_serves(ips: &[String], version: u64) -> Result<()> {
    let http = http()?;
    for ip in ips {
        let served = served_models(&http, ip).await?;
        ensure!(
            served.contains(&(ADAPTER.to_string(), Some(version))),
            "{ip} does not serve {ADAPTER} v{version}: {served:?}"
        );
    }
    Ok(())
}

/// Stops the load and fails unless it sent requests and none failed.
async fn no_failed_request(load: Load, during: &str) -> Result<()> {
    let (ok, failures) = load.finish().await?;
    ensure!(ok > 0, "the load sent no request during the {during}");
    ensure!(
        failures.is_empty(),
        "{} of {} requests failed during the {during}: {:?}",
        failures.len(),
        ok + failures.len(),
        failures
    );
    Ok(())
}

/// Steady chat traffic against the deployment's pods until stopped; counts what failed.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(ips: Vec<String>) -> Result<Self> {
        let (stop, ok, failures) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(Mutex::new(Vec::new())),
        );
        let http = http()?;
        let (s, o, f) = (stop.clone(), ok.clone(), failures.clone());
        let task = tokio::spawn(async move {
            let mut i = 0usize;
            while !s.load(Ordering::Relaxed) {
                let ip = &ips[i % ips.len()];
                i += 1;
                match chat(&http, ip, ADAPTER, "When does the library open?").await {
                    Ok(_) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => f.lock().map(|mut f| f.push(e.to_string())).unwrap_or_default(),
                }
            }
        });
        Ok(Self {
            stop,
            ok,
            failures,
            task,
        })
    }

    async fn finish(self) -> Result<(usize, Vec<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?;
        let failures = self.failures.lock().map(|f| f.clone()).unwrap_or_default();
        Ok((self.ok.load(Ordering::Relaxed), failures))
    }
}

/// `spec.evaluation` as both gated jobs ask it: the adapter must answer at least half of the
/// held-out questions (the training file itself) exactly right more than the base model does.
/// The tiny random base model answers none; an adapter trained to the end answers nearly all.
fn evaluation_gate() -> Value {
    json!({"metric": "exactMatch", "minImprovement": MIN_IMPROVEMENT})
}

const MIN_IMPROVEMENT: f64 = 0.5;

/// The base model's and the adapter's exact-match scores in a job's status.evaluation, after
/// checking that they were measured on every held-out question under the gate's metric.
fn evaluated_scores(ftj: &FineTuneJob) -> Result<(f64, f64)> {
    let evaluation = ftj
        .status
        .as_ref()
        .and_then(|s| s.evaluation.clone())
        .context("status.evaluation")?;
    assert_eq!(evaluation.metric, Some(EvaluationMetric::ExactMatch), "{evaluation:#?}");
    assert_eq!(evaluation.examples as usize, facts()?.len(), "{evaluation:#?}");
    assert!(
        evaluation.base.loss.is_some() && evaluation.adapter.loss.is_some(),
        "the held-out loss is always evaluated: {evaluation:#?}"
    );
    let base = evaluation.base.score.context("status.evaluation.base.score")?;
    let adapter = evaluation.adapter.score.context("status.evaluation.adapter.score")?;
    Ok((base, adapter))
}

/// A new version, published only after it passed its evaluation gate, rolls out under load.
async fn new_version_rolls_out_under_load(env: &Env) -> Result<()> {
    let ips = env.server_ips().await?;
    let load = Load::start(ips.clone())?;
    let mut ftj = env.finetunejob("support-v2", "v2.jsonl")?;
    ftj["spec"]["evaluation"] = evaluation_gate();
    env.apply(&ftj).await?;
    let done = env
        .wait_ftj(
            "support-v2",
            "Succeeded",
            &[FineTuneJobPhase::Succeeded, FineTuneJobPhase::Failed],
        )
        .await?;
    assert_eq!(
        done.status.as_ref().and_then(|s| s.adapter.as_ref()).map(|a| a.version),
        Some(2),
        "{:#?}",
        done.status
    );
    // It passed the gate: judged against the base model, it beat it by at least minImprovement,
    // and the version it published records the same judgement.
    let (base, adapter) = evaluated_scores(&done)?;
    assert!(
        adapter - base >= MIN_IMPROVEMENT,
        "published although the adapter scored {adapter} against the base model's {base}"
    );
    let v2 = registry(&env.registry_uri())?
        .resolve(&format!("{ADAPTER}@2").parse::<AdapterRef>()?)
        .await?;
    let recorded = v2
        .manifest
        .metrics
        .evaluation
        .context("v2's manifest records its evaluation")?;
    assert_eq!(
        (recorded.base.score, recorded.adapter.score),
        (Some(base), Some(adapter))
    );

    let mds: Api<ModelDeployment> = env.ns.api();
    let md = wait_for(&mds, "support", "serving v2", TIMEOUT, |m: Option<&ModelDeployment>| {
        m.is_some_and(|m| md_ready(m) && serving_version(m) == Some(2))
    })
    .await?;
    let rollout = md
        .status
        .as_ref()
        .and_then(|s| s.rollout.clone())
        .context("status.rollout")?;
    assert_eq!(
        (rollout.state, rollout.from_version, rollout.to_version),
        (RolloutState::Promoted, Some(1), 2)
    );
    no_failed_request(load, "rollout").await?;
    every_pod_serves(&ips, 2).await?;
    right_answers(&http()?, &ips[0], &v2_facts(&facts()?)).await
}

/// A job whose adapter falls short of `evaluation.minImprovement` fails for good with reason
/// EvaluationBelowThreshold, shows the scores that failed it, and publishes nothing: the
/// registry keeps v2 as its newest version and the deployment following `latest` stays on it.
/// One training step cannot teach the tiny model answers to the letter: the adapter is no better
/// than the base model at them.
async fn adapter_short_of_its_evaluation_gate_fails_and_publishes_nothing(env: &Env) -> Result<()> {
    let registry = registry(&env.registry_uri())?;
    let versions = || async {
        anyhow::Ok(
            registry
                .list(ADAPTER)
                .await?
                .iter()
                .map(|a| a.version)
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(versions().await?, [1, 2]);
    let mut ftj = env.finetunejob("support-gate", "v2.jsonl")?;
    ftj["spec"]["training"]["epochs"] = Value::Null;
    ftj["spec"]["training"]["maxSteps"] = json!(1);
    ftj["spec"]["evaluation"] = evaluation_gate();
    env.apply(&ftj).await?;
    let done = env
        .wait_ftj(
            "support-gate",
            "Failed",
            &[FineTuneJobPhase::Failed, FineTuneJobPhase::Succeeded],
        )
        .await?;
    let status = done.status.clone().context("status")?;
    assert_eq!(status.phase, Some(FineTuneJobPhase::Failed), "{status:#?}");
    let (reason, message) = ftj_condition(&done, "Failed").context("a Failed condition")?;
    assert_eq!(reason, "EvaluationBelowThreshold", "{message}");
    assert!(
        message.contains("minImprovement"),
        "the message names the field: {message}"
    );
    let (base, adapter) = evaluated_scores(&done)?;
    assert!(
        adapter - base < MIN_IMPROVEMENT,
        "failed although the adapter scored {adapter} against the base model's {base}"
    );
    // Final: the trainer's exit code fails the Job at once instead of training it again.
    assert_eq!(status.retries.unwrap_or(0), 0, "{status:#?}");
    assert_eq!(status.adapter, None, "{status:#?}");
    assert_eq!(versions().await?, [1, 2], "nothing was published");
    let md = env.ns.api::<ModelDeployment>().get("support").await?;
    assert_eq!(serving_version(&md), Some(2), "{:#?}", md.status);
    Ok(())
}

/// Publishes the files of version `from` again, as the next version.
async fn republish(env: &Env, from: u32) -> Result<u32> {
    let registry = registry(&env.registry_uri())?;
    let source = registry
        .resolve(&format!("{ADAPTER}@{from}").parse::<AdapterRef>()?)
        .await?;
    let dir = scratch_dir("republish")?;
    let files = dir.join("adapter");
    registry.fetch(&source, &files, None).await?;
    let _ = std::fs::remove_file(files.join("manifest.json"));
    let request = PublishRequest {
        name: ADAPTER.into(),
        source_dir: files,
        base_model: SourceRef {
            uri: env.uri("models/tiny-llama"),
            digest: None,
        },
        dataset: SourceRef {
            uri: env.uri("datasets/v2.jsonl"),
            digest: None,
        },
        hyperparameters: json!({}),
        metrics: Metrics::default(),
        job: Some(JobRef {
            namespace: env.ns.name.clone(),
            name: "e2e-republish".into(),
            uid: "e2e".into(),
        }),
    };
    let published = registry.publish(&request, None).await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(published.version)
}

/// Publishes v3 as a copy of v2 whose weights file is then overwritten: its digest no longer
/// matches the manifest, so every pod refuses it.
async fn publish_corrupt_v3(env: &Env) -> Result<()> {
    let v3 = republish(env, 2).await?;
    ensure!(v3 == 3, "published v{v3} instead of v3");
    storage(&env.registry_uri())?
        .put_bytes(
            &format!("adapters/{ADAPTER}/v3/adapter_model.safetensors"),
            bytes_of("not a safetensors file"),
        )
        .await?;
    Ok(())
}

fn bytes_of(text: &str) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(text.as_bytes())
}

async fn broken_version_is_rolled_back(env: &Env) -> Result<()> {
    publish_corrupt_v3(env).await?;
    let mds: Api<ModelDeployment> = env.ns.api();
    let md = wait_for(
        &mds,
        "support",
        "rollout Failed",
        TIMEOUT,
        |m: Option<&ModelDeployment>| {
            m.and_then(|m| m.status.as_ref())
                .and_then(|s| s.rollout.as_ref())
                .is_some_and(|r| r.to_version == 3 && r.state == RolloutState::Failed)
        },
    )
    .await?;
    let rollout = md
        .status
        .as_ref()
        .and_then(|s| s.rollout.clone())
        .context("status.rollout")?;
    assert!(rollout.reason.is_some(), "a failed rollout says why: {rollout:#?}");
    assert!(
        rollout.message.as_deref().is_some_and(|m| !m.is_empty()),
        "and explains: {rollout:#?}"
    );
    assert_eq!(serving_version(&md), Some(2), "{:#?}", md.status);

    every_pod_serves(&env.server_ips().await?, 2).await
}

async fn scale_out_serves_the_same_version(env: &Env) -> Result<()> {
    let mds: Api<ModelDeployment> = env.ns.api();
    let mut md = env.example("modeldeployment.yaml")?;
    md["spec"]["replicas"] = json!(2);
    env.apply(&md).await?;
    wait_for(
        &mds,
        "support",
        "2 ready replicas",
        TIMEOUT,
        |m: Option<&ModelDeployment>| m.and_then(|m| m.status.as_ref()).and_then(|s| s.ready_replicas) == Some(2),
    )
    .await?;
    let ips = env.server_ips().await?;
    assert_eq!(ips.len(), 2, "{ips:?}");
    every_pod_serves(&ips, 2).await
}

/// With the canary strategy, a new version serves from half the replicas first, is judged on
/// their traffic, then reaches the rest; no request fails on the way.
async fn canary_promotes_a_healthy_version(env: &Env) -> Result<()> {
    let mut md = env.example("modeldeployment.yaml")?;
    md["spec"]["replicas"] = json!(2);
    md["spec"]["rollout"] =
        json!({"strategy": "canary", "canary": {"replicaPercent": 50, "analysisSeconds": 5, "maxErrorRate": 0.05}});
    env.apply(&md).await?;
    let ips = env.server_ips().await?;
    let load = Load::start(ips.clone())?;
    let v4 = republish(env, 2).await?;
    ensure!(v4 == 4, "published v{v4} instead of v4");

    let mds: Api<ModelDeployment> = env.ns.api();
    let rollout_is = |state: RolloutState| {
        move |m: Option<&ModelDeployment>| {
            m.and_then(|m| m.status.as_ref())
                .and_then(|s| s.rollout.as_ref())
                .is_some_and(|r| r.to_version == 4 && r.state == state)
        }
    };
    let canary = wait_for(&mds, "support", "in Canary", TIMEOUT, rollout_is(RolloutState::Canary)).await?;
    let pods = canary
        .status
        .and_then(|s| s.rollout)
        .and_then(|r| r.canary)
        .map(|c| c.pods)
        .unwrap_or_default();
    assert_eq!(pods.len(), 1, "50% of 2 replicas: {pods:?}");
    wait_for(&mds, "support", "Promoted", TIMEOUT, rollout_is(RolloutState::Promoted)).await?;
    let md = wait_for(
        &mds,
        "support",
        "Ready on v4",
        TIMEOUT,
        |m: Option<&ModelDeployment>| m.is_some_and(|m| md_ready(m) && serving_version(m) == Some(4)),
    )
    .await?;
    assert_eq!(md.status.as_ref().and_then(|s| s.ready_replicas), Some(2));
    no_failed_request(load, "canary").await?;
    every_pod_serves(&ips, 4).await
}

/// The alignment pipeline as examples/dpo-from-sft-finetunejob.yaml runs it: DPO that starts
/// from the SFT adapter v2 (its rank and targets, and its policy as the reference) publishes the
/// adapter's next version, which names v2 as where it started, also as a merged model; the
/// deployment following `latest` rolls it out like any other version.
async fn dpo_from_the_sft_adapter_rolls_out_as_its_next_version(env: &Env) -> Result<()> {
    let mut ftj = env.example("dpo-from-sft-finetunejob.yaml")?;
    ftj["spec"]["initFrom"]["version"] = json!(2);
    ftj["spec"]["dataset"]["uri"] = json!(env.uri("datasets/tone-pairs.jsonl"));
    ftj["spec"]["output"]["registry"] = json!(env.uri("registry"));
    ftj["spec"]["training"]["epochs"] = json!(2);
    env.apply(&ftj).await?;
    let name = ftj["metadata"]["name"].as_str().context("example's name")?;
    let done = env
        .wait_ftj(
            name,
            "Succeeded",
            &[FineTuneJobPhase::Succeeded, FineTuneJobPhase::Failed],
        )
        .await?;
    let status = done.status.clone().context("status")?;
    let adapter = status
        .adapter
        .clone()
        .with_context(|| format!("no adapter published: {status:#?}"))?;
    assert_eq!((adapter.name.as_str(), adapter.version), (ADAPTER, 5), "{status:#?}");
    // The held-out pairs' rewards come with the trainer's outcome; the training ones only from
    // scraping a running pod, which a job this short may finish before.
    let rewards = status.progress.as_ref().and_then(|p| p.eval_dpo.clone());
    assert!(
        rewards.is_some_and(|r| r.accuracies.is_some() && r.margins.is_some()),
        "held-out DPO rewards in status: {status:#?}"
    );

    let registry = registry(&env.registry_uri())?;
    let v5 = registry.resolve(&format!("{ADAPTER}@5").parse::<AdapterRef>()?).await?;
    let v2 = registry.resolve(&format!("{ADAPTER}@2").parse::<AdapterRef>()?).await?;
    let lineage = &v5.manifest.hyperparameters["initFrom"];
    assert_eq!(lineage["adapter"], json!(format!("{ADAPTER}@2")), "{lineage}");
    assert_eq!(lineage["digest"], json!(v2.digest.to_string()), "{lineage}");
    let merged = kubetune_storage::resolve_merged(&storage(&env.registry_uri())?, ADAPTER, 5).await?;
    assert_eq!(
        merged.manifest.adapter_digest, v5.digest,
        "the merge folds in v5 itself"
    );
    assert_eq!(adapter.merged_uri.as_deref(), Some(merged.uri.as_str()));

    let mds: Api<ModelDeployment> = env.ns.api();
    wait_for(
        &mds,
        "support",
        "Ready on v5",
        TIMEOUT,
        |m: Option<&ModelDeployment>| m.is_some_and(|m| md_ready(m) && serving_version(m) == Some(5)),
    )
    .await?;
    every_pod_serves(&env.server_ips().await?, 5).await
}

async fn deletion_cleans_up(env: &Env) -> Result<()> {
    let mds: Api<ModelDeployment> = env.ns.api();
    mds.delete("support", &DeleteParams::foreground()).await?;
    wait_deleted(&mds, "support", TIMEOUT).await?;
    wait_deleted(&env.ns.api::<Deployment>(), "support", TIMEOUT).await?;
    wait_deleted(&env.ns.api::<Service>(), "support", TIMEOUT).await?;
    wait_deleted(&env.ns.api::<ConfigMap>(), "support-adapters", TIMEOUT).await?;
    let pods = env
        .ns
        .api::<Pod>()
        .list(&ListParams::default().labels("kubetune.dev/modeldeployment=support"))
        .await?
        .items;
    for pod in pods.iter().filter_map(|p| p.metadata.name.as_deref()) {
        wait_deleted(&env.ns.api::<Pod>(), pod, TIMEOUT).await?;
    }
    Ok(())
}
