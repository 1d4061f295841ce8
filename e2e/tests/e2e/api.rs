//! The kubetune API on a real API server: the CRDs install, every example applies, invalid specs
//! are rejected with the field named, and `kubectl get` shows the printer columns.

use crate::tools::no_operator;
use anyhow::Result;
use kube::discovery::Discovery;
use kubetune_e2e::{apply_object, client, install_crds, repo_root, yaml_documents, ApplyMode, TestNamespace};
use serde_json::{json, Value};

fn example(name: &str) -> Value {
    let path = repo_root().join("examples").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    yaml_documents(&text).expect("example is YAML").remove(0)
}

#[tokio::test]
async fn crds_and_every_example_apply() -> Result<()> {
    // Creates FineTuneJobs and ModelDeployments that an operator would reconcile.
    let _no_operator = no_operator().await;
    let client = client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::new(&client, "examples").await?;
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut applied = 0;
    for entry in std::fs::read_dir(repo_root().join("examples"))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        for doc in yaml_documents(&std::fs::read_to_string(&path)?)? {
            let stored = apply_object(&client, &discovery, &ns.name, &doc, ApplyMode::Apply)
                .await
                .map_err(|e| anyhow::anyhow!("{} does not apply: {e:#}", path.display()))?;
            // What comes back is what was sent: the schema defaults nothing the user didn't write.
            assert_eq!(
                stored.data["spec"],
                doc["spec"],
                "{}: the stored spec differs from the manifest",
                path.display()
            );
            applied += 1;
        }
    }
    assert!(applied >= 4, "expected the four example manifests, applied {applied}");
    Ok(())
}

/// One invalid manifest: an example with one change, and what the rejection must mention.
struct Invalid {
    what: &'static str,
    base: &'static str,
    pointer: &'static str,
    /// The new value; `Value::Null` removes the field.
    value: Value,
    expect: &'static [&'static str],
}

fn invalid_table() -> Vec<Invalid> {
    const FTJ: &str = "finetunejob.yaml";
    const MDEP: &str = "modeldeployment.yaml";
    let case = |what, base, pointer, value, expect| Invalid {
        what,
        base,
        pointer,
        value,
        expect,
    };
    vec![
        case(
            "rank 0",
            FTJ,
            "/spec/lora/r",
            json!(0),
            &["spec.lora.r", "greater than or equal to 1"],
        ),
        case(
            "rank 300",
            FTJ,
            "/spec/lora/r",
            json!(300),
            &["spec.lora.r", "less than or equal to 256"],
        ),
        case(
            "alpha 0",
            FTJ,
            "/spec/lora/alpha",
            json!(0),
            &["spec.lora.alpha", "greater than 0"],
        ),
        case(
            "dropout 1",
            FTJ,
            "/spec/lora/dropout",
            json!(1.0),
            &["spec.lora.dropout", "less than 1"],
        ),
        case(
            "dropout negative",
            FTJ,
            "/spec/lora/dropout",
            json!(-0.1),
            &["spec.lora.dropout"],
        ),
        case(
            "learning rate 0",
            FTJ,
            "/spec/training/learningRate",
            json!(0),
            &["spec.training.learningRate", "greater than 0"],
        ),
        case(
            "learning rate 1",
            FTJ,
            "/spec/training/learningRate",
            json!(1),
            &["spec.training.learningRate", "less than 1"],
        ),
        case(
            "epochs 0",
            FTJ,
            "/spec/training/epochs",
            json!(0),
            &["spec.training.epochs"],
        ),
        case(
            "neither epochs nor maxSteps",
            FTJ,
            "/spec/training/epochs",
            Value::Null,
            &["spec.training", "epochs", "maxSteps"],
        ),
        case(
            "unknown method",
            FTJ,
            "/spec/method",
            json!("full"),
            &["spec.method", "lora", "qlora"],
        ),
        case(
            "qlora without quantization",
            FTJ,
            "/spec/method",
            json!("qlora"),
            &["spec.quantization", "4-bit"],
        ),
        case(
            "unknown target module",
            FTJ,
            "/spec/lora/targetModules",
            json!(["q_proj", "lm_head"]),
            &["spec.lora.targetModules[1]", "q_proj"],
        ),
        case(
            "unknown URI scheme",
            FTJ,
            "/spec/baseModel/uri",
            json!("ftp://models/x"),
            &["spec.baseModel.uri", "s3|gs|az|file|pvc|hf"],
        ),
        case(
            "dataset URI without scheme",
            FTJ,
            "/spec/dataset/uri",
            json!("/data/x.jsonl"),
            &["spec.dataset.uri"],
        ),
        case(
            "unknown dataset format",
            FTJ,
            "/spec/dataset/format",
            json!("csv"),
            &["spec.dataset.format", "instruction"],
        ),
        case(
            "adapter name not DNS-1123",
            FTJ,
            "/spec/output/adapterName",
            json!("Support_Bot"),
            &["spec.output.adapterName"],
        ),
        case(
            "adapter name too long",
            FTJ,
            "/spec/output/adapterName",
            json!("a".repeat(64)),
            &["spec.output.adapterName", "63"],
        ),
        case(
            "both validation split and file",
            FTJ,
            "/spec/dataset/validationSplit",
            json!(0.1),
            &[
                "spec.dataset.validationUri",
                "at most one of validationSplit and validationUri",
            ],
        ),
        case(
            "negative backoffLimit",
            FTJ,
            "/spec/backoffLimit",
            json!(-1),
            &["spec.backoffLimit"],
        ),
        case(
            "missing base model",
            FTJ,
            "/spec/baseModel",
            Value::Null,
            &["spec.baseModel", "Required"],
        ),
        case(
            "negative replicas",
            MDEP,
            "/spec/replicas",
            json!(-1),
            &["spec.replicas", "greater than or equal to 0"],
        ),
        case(
            "adapter version 0",
            MDEP,
            "/spec/adapters/0/version",
            json!(0),
            &["spec.adapters[0].version"],
        ),
        case(
            "adapter version word",
            MDEP,
            "/spec/adapters/0/version",
            json!("newest"),
            &["spec.adapters[0].version", "latest"],
        ),
        case(
            "adapter with no source",
            MDEP,
            "/spec/adapters/0/version",
            Value::Null,
            &["spec.adapters[0]", "exactly one of version and fromFineTuneJob"],
        ),
        case(
            "served adapter name invalid",
            MDEP,
            "/spec/adapters/0/name",
            json!("-bad"),
            &["spec.adapters[0].name"],
        ),
        case(
            "model deployment URI scheme",
            MDEP,
            "/spec/baseModel/uri",
            json!("http://x"),
            &["spec.baseModel.uri"],
        ),
    ]
}

/// Sets (or, for null, removes) the value at a JSON pointer.
fn mutate(doc: &mut Value, pointer: &str, value: Value) {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
    let target = doc
        .pointer_mut(parent)
        .unwrap_or_else(|| panic!("no {parent} in the example"));
    match (target, value) {
        (Value::Object(map), Value::Null) => {
            map.remove(key);
        }
        (Value::Object(map), v) => {
            map.insert(key.to_string(), v);
        }
        (Value::Array(items), Value::Null) => {
            items.remove(key.parse::<usize>().expect("array index"));
        }
        (Value::Array(items), v) => items[key.parse::<usize>().expect("array index")] = v,
        (other, _) => panic!("{parent} is not an object or array: {other}"),
    }
}

#[tokio::test]
async fn invalid_specs_are_rejected_naming_the_field() -> Result<()> {
    // No lock against an operator: dry runs store nothing for one to reconcile.
    let client = client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::new(&client, "invalid").await?;
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut failures = Vec::new();
    for case in invalid_table() {
        let mut doc = example(case.base);
        mutate(&mut doc, case.pointer, case.value.clone());
        match apply_object(&client, &discovery, &ns.name, &doc, ApplyMode::DryRun).await {
            Ok(_) => failures.push(format!("{}: accepted", case.what)),
            Err(e) => {
                let message = format!("{e:#}");
                for needle in case.expect {
                    if !message.contains(needle) {
                        failures.push(format!("{}: message lacks {needle:?}: {message}", case.what));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid manifests misjudged:\n{}",
        failures.len(),
        invalid_table().len(),
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test]
async fn training_spec_is_immutable_but_suspend_is_not() -> Result<()> {
    // Creates a FineTuneJob that an operator would reconcile.
    let _no_operator = no_operator().await;
    let client = client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::new(&client, "immutable").await?;
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut doc = example("finetunejob.yaml");
    apply_object(&client, &discovery, &ns.name, &doc, ApplyMode::Apply).await?;

    let mut suspended = doc.clone();
    mutate(&mut suspended, "/spec/suspend", json!(true));
    apply_object(&client, &discovery, &ns.name, &suspended, ApplyMode::Apply).await?;

    mutate(&mut doc, "/spec/training/learningRate", json!(0.5));
    let err = apply_object(&client, &discovery, &ns.name, &doc, ApplyMode::Apply)
        .await
        .expect_err("changing spec.training must be rejected");
    let message = format!("{err:#}");
    assert!(
        message.contains("spec.training") && message.contains("immutable"),
        "unexpected message: {message}"
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() -> Result<()> {
    // Creates FineTuneJobs and ModelDeployments that an operator would reconcile.
    let _no_operator = no_operator().await;
    let client = client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::new(&client, "columns").await?;
    let discovery = Discovery::new(client.clone()).run().await?;
    for (file, resource, columns) in [
        (
            "finetunejob.yaml",
            "ftj",
            vec!["NAME", "PHASE", "PROGRESS", "LOSS", "ADAPTER", "EVALUATION", "AGE"],
        ),
        (
            "modeldeployment.yaml",
            "mdep",
            vec!["NAME", "MODEL", "PHASE", "READY", "SERVING", "URL", "AGE"],
        ),
    ] {
        apply_object(&client, &discovery, &ns.name, &example(file), ApplyMode::Apply).await?;
        let out = std::process::Command::new(kubetune_e2e::kubectl_path())
            .args([
                "--kubeconfig",
                &kubetune_e2e::kubeconfig_path().to_string_lossy(),
                "get",
                resource,
                "-n",
                &ns.name,
            ])
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "kubectl get {resource} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let header: Vec<&str> = stdout.lines().next().unwrap_or_default().split_whitespace().collect();
        assert_eq!(header, columns, "kubectl get {resource} printed:\n{stdout}");
    }
    Ok(())
}
