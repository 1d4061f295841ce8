//! The operator installed from the Helm chart, running in the cluster as a pod under exactly the
//! chart's RBAC, reconciling FineTuneJobs: the trainer Job it builds, the status it reports, a
//! spec it cannot run, and deletion.
//!
//! Then many FineTuneJobs created at once, every one of which must be reconciled (#18 §0: under
//! a burst of creates, a few were never seen again).
//!
//! The operator watches every namespace, so two installs at once would both reconcile the same
//! objects; an install holds `tools::OPERATOR_LOCK` against every other install and every test
//! that creates kubetune objects, for as long as it runs, so these tests never overlap.

use crate::tools::{install_operator, tool};
use anyhow::{bail, Result};
use futures::{stream, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, PostParams};
use kube::discovery::Discovery;
use kube::runtime::{reflector, watcher};
use kube::ResourceExt;
use kubetune_crds::{FineTuneJob, FineTuneJobPhase};
use kubetune_e2e::store::create_storage_secret;
use kubetune_e2e::{
    apply_object, client, install_crds, repo_root, wait_deleted, wait_for, yaml_documents, ApplyMode, TestNamespace,
};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

fn example_finetunejob() -> Result<Value> {
    let text = std::fs::read_to_string(repo_root().join("examples/finetunejob.yaml"))?;
    Ok(yaml_documents(&text)?.remove(0))
}

fn condition_reason(ftj: &FineTuneJob, type_: &str) -> Option<String> {
    ftj.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.clone())
}

#[tokio::test]
async fn operator_from_the_chart_reconciles_finetunejobs_under_its_own_rbac() -> Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    // Make sure helm exists before the clock starts on anything.
    let _helm = tool("helm");
    let system = TestNamespace::new(&client, "operator").await?;
    let _operator = install_operator(&client, &system.name).await?;
    let discovery = Discovery::new(client.clone()).run().await?;

    let ns = TestNamespace::new(&client, "ftj").await?;
    // The storage Secret the example names, with the local S3 store's credentials.
    create_storage_secret(&client, &ns.name, "kubetune-storage").await?;

    // A job it can run: the trainer Job appears, owned by the FineTuneJob, and status follows it.
    let ftjs: Api<FineTuneJob> = ns.api();
    apply_object(&client, &discovery, &ns.name, &example_finetunejob()?, ApplyMode::Apply).await?;
    let jobs: Api<Job> = ns.api();
    wait_for(&jobs, "support-bot", "created", TIMEOUT, |j: Option<&Job>| j.is_some()).await?;
    let job = jobs.get("support-bot").await?;
    let owner = job.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owner.first().map(|o| o.kind.as_str()), Some("FineTuneJob"));
    let ftj = wait_for(&ftjs, "support-bot", "observed", TIMEOUT, |f: Option<&FineTuneJob>| {
        f.and_then(|f| f.status.as_ref()).and_then(|s| s.observed_generation) == Some(1)
    })
    .await?;
    assert!(
        condition_reason(&ftj, "Ready").is_some(),
        "status has a Ready condition: {:?}",
        ftj.status
    );

    // A job whose Secret is missing waits for it (Argo CD often creates it a moment later):
    // Pending with reason SecretNotFound, no trainer Job, and it starts once the Secret exists.
    let mut waiting = example_finetunejob()?;
    waiting["metadata"]["name"] = json!("no-secret");
    waiting["spec"]["storageSecretRef"]["name"] = json!("late-secret");
    apply_object(&client, &discovery, &ns.name, &waiting, ApplyMode::Apply).await?;
    let pending = wait_for(
        &ftjs,
        "no-secret",
        "waiting for its Secret",
        TIMEOUT,
        |f: Option<&FineTuneJob>| f.is_some_and(|f| condition_reason(f, "Ready").as_deref() == Some("SecretNotFound")),
    )
    .await?;
    assert_eq!(
        pending.status.as_ref().and_then(|s| s.phase),
        Some(FineTuneJobPhase::Pending)
    );
    assert!(
        jobs.get_opt("no-secret").await?.is_none(),
        "no trainer Job while the Secret is missing"
    );
    create_storage_secret(&client, &ns.name, "late-secret").await?;
    wait_for(
        &jobs,
        "no-secret",
        "created once the Secret exists",
        TIMEOUT,
        |j: Option<&Job>| j.is_some(),
    )
    .await?;

    kueue_admits_a_queued_job_and_the_operator_leaves_it_running(&ftjs, &jobs).await?;

    // Deleting the FineTuneJob takes its Job with it (owner references; no finalizer).
    ftjs.delete("support-bot", &DeleteParams::foreground()).await?;
    wait_deleted(&jobs, "support-bot", TIMEOUT).await?;
    Ok(())
}

/// Kueue, played by hand (this cluster has no Kueue): a FineTuneJob labelled with a queue gets
/// its Job created suspended and reports `Queued`; Kueue admits it by un-suspending the Job as
/// another field manager, and the operator must not suspend it again (#18 §13).
async fn kueue_admits_a_queued_job_and_the_operator_leaves_it_running(
    ftjs: &Api<FineTuneJob>,
    jobs: &Api<Job>,
) -> Result<()> {
    let mut queued = unschedulable_finetunejob("queued")?;
    queued.metadata.labels = Some([("kueue.x-k8s.io/queue-name".to_string(), "team-a".to_string())].into());
    ftjs.create(&PostParams::default(), &queued).await?;
    let suspended = |j: Option<&Job>| j.and_then(|j| j.spec.as_ref()).and_then(|s| s.suspend);
    wait_for(
        jobs,
        "queued",
        "created suspended for Kueue",
        TIMEOUT,
        move |j: Option<&Job>| suspended(j) == Some(true),
    )
    .await?;
    wait_for(ftjs, "queued", "Queued", TIMEOUT, |f: Option<&FineTuneJob>| {
        f.is_some_and(|f| condition_reason(f, "Ready").as_deref() == Some("Queued"))
    })
    .await?;
    let admit = json!({"spec": {"suspend": false}});
    let params = kube::api::PatchParams::apply("kueue-admission").force();
    let job_patch = json!({"apiVersion": "batch/v1", "kind": "Job", "spec": admit["spec"]});
    jobs.patch("queued", &params, &kube::api::Patch::Apply(&job_patch))
        .await?;
    // The operator sees the admitted Job (its status leaves Queued) and leaves it running.
    wait_for(ftjs, "queued", "past Queued", TIMEOUT, |f: Option<&FineTuneJob>| {
        f.is_some_and(|f| !matches!(condition_reason(f, "Ready").as_deref(), Some("Queued") | None))
    })
    .await?;
    let job = jobs.get("queued").await?;
    assert_eq!(
        suspended(Some(&job)),
        Some(false),
        "the operator suspended an admitted Job again"
    );
    ftjs.delete("queued", &DeleteParams::foreground()).await?;
    wait_deleted(jobs, "queued", TIMEOUT).await?;
    Ok(())
}

/// How many FineTuneJobs the burst test creates at once.
const BURST: usize = 150;
/// Room for the burst on a loaded 2-core machine: it takes seconds when nothing is lost.
const BURST_TIMEOUT: Duration = Duration::from_secs(300);

/// A FineTuneJob whose pod no node can take (a nodeSelector nothing has): the operator creates
/// its trainer Job and reports status, but no trainer runs and no GPU is taken.
fn unschedulable_finetunejob(name: &str) -> Result<FineTuneJob> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "s3://kubetune/models/tiny-llama"},
            "method": "lora",
            "lora": {"r": 8, "alpha": 16},
            "dataset": {"uri": "s3://kubetune/datasets/support-facts.jsonl", "format": "chat"},
            "training": {"maxSteps": 10, "learningRate": 0.001},
            "output": {"adapterName": name, "registry": "s3://kubetune/registry"},
            "nodeSelector": {"kubetune.dev/pool": "nowhere"},
        },
    }))?)
}

/// The FineTuneJobs among `names` that are not reconciled: without their trainer Job (named as
/// the FineTuneJob and owned by it), or with a status older than their spec.
fn stragglers(
    names: &[String],
    ftjs: &reflector::Store<FineTuneJob>,
    jobs: &reflector::Store<Job>,
) -> BTreeSet<String> {
    let ftjs: HashMap<String, _> = ftjs.state().into_iter().map(|f| (f.name_any(), f)).collect();
    let jobs: HashMap<String, _> = jobs.state().into_iter().map(|j| (j.name_any(), j)).collect();
    names
        .iter()
        .filter(|name| {
            let Some(ftj) = ftjs.get(*name) else { return true };
            let has_job = jobs.get(*name).is_some_and(|j| {
                j.owner_references()
                    .iter()
                    .any(|o| o.kind == "FineTuneJob" && Some(&o.uid) == ftj.metadata.uid.as_ref())
            });
            let current = ftj.metadata.generation.is_some()
                && ftj.status.as_ref().and_then(|s| s.observed_generation) == ftj.metadata.generation;
            !(has_job && current)
        })
        .cloned()
        .collect()
}

/// Waits, watching FineTuneJobs and Jobs (no polling), until every one of `names` is
/// reconciled; on timeout the error names the ones that are not.
async fn wait_all_reconciled(
    ftjs: &Api<FineTuneJob>,
    jobs: &Api<Job>,
    names: &[String],
    timeout: Duration,
) -> Result<()> {
    let (ftj_store, ftj_writer) = reflector::store();
    let (job_store, job_writer) = reflector::store();
    // Every event counts, the end of each initial list included: the stores change then too.
    let ftj_events = reflector(ftj_writer, watcher(ftjs.clone(), watcher::Config::default())).map(|e| e.map(drop));
    let job_events = reflector(job_writer, watcher(jobs.clone(), watcher::Config::default())).map(|e| e.map(drop));
    let mut events = stream::select(ftj_events.boxed(), job_events.boxed());
    let all = async {
        while let Some(event) = events.next().await {
            event?;
            if stragglers(names, &ftj_store, &job_store).is_empty() {
                return Ok(());
            }
        }
        bail!("the watches ended")
    };
    match tokio::time::timeout(timeout, all).await {
        Ok(done) => done,
        Err(_) => {
            let late = stragglers(names, &ftj_store, &job_store);
            bail!(
                "{} of {} FineTuneJobs not reconciled (no trainer Job, or status.observedGeneration behind \
                 metadata.generation) after {timeout:?}: {}",
                late.len(),
                names.len(),
                late.into_iter().collect::<Vec<_>>().join(" ")
            )
        }
    }
}

/// #18 §0: of 1,000 FineTuneJobs created at once, 5 never got a Job, a status or a log line.
/// Every one of a burst created concurrently must get its trainer Job and a current status.
#[tokio::test]
async fn operator_reconciles_every_finetunejob_of_a_burst() -> Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    let _helm = tool("helm");
    let system = TestNamespace::new(&client, "operator-burst").await?;
    let _operator = install_operator(&client, &system.name).await?;

    let ns = TestNamespace::new(&client, "ftj-burst").await?;
    let ftjs: Api<FineTuneJob> = ns.api();
    let jobs: Api<Job> = ns.api();
    let names: Vec<String> = (0..BURST).map(|i| format!("burst-{i}")).collect();
    let objects = names
        .iter()
        .map(|n| unschedulable_finetunejob(n))
        .collect::<Result<Vec<_>>>()?;
    // All creates in flight together, as `kubectl create -f` of many objects or Argo CD's sync
    // sends them, so their events reach the operator in one burst.
    let pp = PostParams::default();
    let created = futures::future::join_all(objects.iter().map(|o| ftjs.create(&pp, o))).await;
    let failed: Vec<String> = names
        .iter()
        .zip(&created)
        .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e}")))
        .collect();
    assert!(failed.is_empty(), "creating FineTuneJobs failed: {failed:?}");

    wait_all_reconciled(&ftjs, &jobs, &names, BURST_TIMEOUT).await?;
    // The namespace goes with its FineTuneJobs, their Jobs and pods, before the operator does.
    drop(ns);
    Ok(())
}
