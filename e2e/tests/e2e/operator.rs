//! The operator installed from the Helm chart, running in the cluster as a pod under exactly the
//! chart's RBAC, reconciling FineTuneJobs: the trainer Job it builds, the status it reports, a
//! spec it cannot run, and deletion.
//!
//! One test function on purpose: the operator watches every namespace, so two installs at once
//! would both reconcile the same objects; an install holds `tools::OPERATOR_LOCK` against every
//! other install and every test that creates kubetune objects, for as long as it runs.

use crate::tools::{install_operator, tool};
use anyhow::Result;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams};
use kube::discovery::Discovery;
use kubetune_crds::{FineTuneJob, FineTuneJobPhase};
use kubetune_e2e::store::create_storage_secret;
use kubetune_e2e::{
    apply_object, client, install_crds, repo_root, wait_deleted, wait_for, yaml_documents, ApplyMode, TestNamespace,
};
use serde_json::{json, Value};
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

    // Deleting the FineTuneJob takes its Job with it (owner references; no finalizer).
    ftjs.delete("support-bot", &DeleteParams::foreground()).await?;
    wait_deleted(&jobs, "support-bot", TIMEOUT).await?;
    Ok(())
}
