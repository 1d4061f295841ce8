//! Argo CD support (deploy/argocd/): the health checks under a Lua interpreter against their
//! status fixtures, the argocd-cm snippet that ships them, the Application example, and no
//! perpetual diff: what is applied reads back unchanged outside status.

use crate::tools::{no_operator, tool};
use anyhow::{anyhow, Result};
use kube::discovery::Discovery;
use kubetune_e2e::{apply_object, client, install_crds, repo_root, yaml_documents, ApplyMode, TestNamespace};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn argocd_dir() -> PathBuf {
    repo_root().join("deploy/argocd")
}

fn health_script(kind: &str) -> PathBuf {
    argocd_dir()
        .join("resource_customizations/kubetune.dev")
        .join(kind)
        .join("health.lua")
}

/// A JSON value as a Lua expression (objects and arrays as tables, as Argo CD hands them over).
fn lua_literal(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(items) => format!("{{{}}}", items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => {
            format!(
                "{{{}}}",
                map.iter()
                    .map(|(k, v)| format!("[{}] = {}", lua_string(k), lua_literal(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }
}

fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Runs a health script on `obj` the way Argo CD does (the object as global `obj`, the script's
/// returned table as the verdict); returns (status, message).
fn run_health(script: &Path, obj: &Value) -> Result<(String, String)> {
    let program = format!(
        "obj = {}\nlocal check = assert(loadfile({}))\nlocal hs = check()\nio.write(tostring(hs.status), \"\\n\", tostring(hs.message))\n",
        lua_literal(obj),
        lua_string(&script.display().to_string())
    );
    let mut child = Command::new(tool("lua"))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("no stdin"))?
        .write_all(program.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(anyhow!(
            "lua failed on {}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8(out.stdout)?;
    let (status, message) = text
        .split_once('\n')
        .ok_or_else(|| anyhow!("unexpected output {text:?}"))?;
    Ok((status.to_string(), message.to_string()))
}

fn check_fixtures(kind: &str, must_cover: &[&str]) -> Result<()> {
    let dir = argocd_dir().join("resource_customizations/kubetune.dev").join(kind);
    let fixtures: Value = serde_yaml::from_str(&std::fs::read_to_string(dir.join("health_test.yaml"))?)?;
    let tests = fixtures["tests"].as_array().ok_or_else(|| anyhow!("no tests"))?;
    let mut failures = Vec::new();
    let mut seen = Vec::new();
    for t in tests {
        let (status, message) = run_health(&health_script(kind), &t["object"])?;
        let (want_status, want_message) = (
            t["expect"]["status"].as_str().unwrap_or_default(),
            t["expect"]["message"].as_str().unwrap_or_default(),
        );
        if (status.as_str(), message.as_str()) != (want_status, want_message) {
            failures.push(format!(
                "{}: got {status} {message:?}, want {want_status} {want_message:?}",
                t["name"]
            ));
        }
        seen.push(status);
    }
    assert!(failures.is_empty(), "{kind} health:\n{}", failures.join("\n"));
    for status in must_cover {
        assert!(seen.iter().any(|s| s == status), "{kind}: no fixture is {status}");
    }
    Ok(())
}

#[test]
fn finetunejob_health_matches_the_fixtures() -> Result<()> {
    check_fixtures("FineTuneJob", &["Healthy", "Progressing", "Degraded", "Suspended"])
}

#[test]
fn modeldeployment_health_matches_the_fixtures() -> Result<()> {
    check_fixtures("ModelDeployment", &["Healthy", "Progressing", "Degraded", "Suspended"])
}

#[test]
fn lagging_observed_generation_is_progressing_whatever_the_phase() -> Result<()> {
    for (kind, phases) in [
        (
            "FineTuneJob",
            &["Pending", "Running", "Succeeded", "Failed", "Suspended"][..],
        ),
        (
            "ModelDeployment",
            &["Pending", "Progressing", "Ready", "Degraded", "Failed"][..],
        ),
    ] {
        for phase in phases {
            let obj = serde_json::json!({
                "metadata": {"name": "x", "generation": 5},
                "status": {"phase": phase, "observedGeneration": 4,
                           "conditions": [{"type": "Ready", "status": "True", "reason": "Done", "message": "done"}]}
            });
            let (status, message) = run_health(&health_script(kind), &obj)?;
            assert_eq!(status, "Progressing", "{kind} {phase}: {message}");
            assert_eq!(message, "The operator has not observed generation 5 yet");
        }
    }
    Ok(())
}

#[test]
fn argocd_cm_ships_exactly_the_health_scripts() -> Result<()> {
    let cm: Value = serde_yaml::from_str(&std::fs::read_to_string(argocd_dir().join("argocd-cm.yaml"))?)?;
    assert_eq!(
        (&cm["kind"], &cm["metadata"]["name"]),
        (&"ConfigMap".into(), &"argocd-cm".into())
    );
    let data = cm["data"].as_object().ok_or_else(|| anyhow!("no data"))?;
    assert_eq!(data.len(), 2, "{:?}", data.keys().collect::<Vec<_>>());
    for kind in ["FineTuneJob", "ModelDeployment"] {
        let key = format!("resource.customizations.health.kubetune.dev_{kind}");
        let embedded = data
            .get(&key)
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("argocd-cm lacks {key}"))?;
        assert!(
            embedded == std::fs::read_to_string(health_script(kind))?,
            "deploy/argocd/argocd-cm.yaml is stale for {kind}: run deploy/argocd/gen-argocd-cm.sh"
        );
    }
    assert!(
        !data.keys().any(|k| k.contains("ignoreDifferences")),
        "the CRDs need no ignoreDifferences"
    );
    Ok(())
}

#[test]
fn application_example_points_at_the_chart() -> Result<()> {
    let apps = yaml_documents(&std::fs::read_to_string(argocd_dir().join("application.yaml"))?)?;
    assert_eq!(apps.len(), 2);
    for app in &apps {
        assert_eq!(
            (&app["apiVersion"], &app["kind"]),
            (&"argoproj.io/v1alpha1".into(), &"Application".into())
        );
        let path = app["spec"]["source"]["path"]
            .as_str()
            .ok_or_else(|| anyhow!("no source path"))?;
        assert!(
            repo_root().join(path).is_dir(),
            "{path} is not a directory of this repository"
        );
        assert!(app["spec"]["ignoreDifferences"].is_null());
    }
    // The chart Application's values are values the chart has.
    let values: Value = serde_yaml::from_str(&std::fs::read_to_string(
        repo_root().join("charts/kubetune/values.yaml"),
    )?)?;
    fn known(values: &Value, given: &Value, path: &str) {
        if let Some(map) = given.as_object() {
            for (k, v) in map {
                assert!(
                    !values[k].is_null(),
                    "the Application sets {path}{k}, which values.yaml does not have"
                );
                known(&values[k], v, &format!("{path}{k}."));
            }
        }
    }
    known(&values, &apps[0]["spec"]["source"]["helm"]["valuesObject"], "");
    Ok(())
}

/// Every field of `manifest` equals the live object's, so Argo CD sees no diff; in `spec` the live
/// object has nothing more either (nothing defaulted behind the user's back).
fn assert_reads_back(manifest: &Value, live: &Value, path: &str) {
    match (manifest, live) {
        (Value::Object(m), Value::Object(l)) => {
            for (k, v) in m {
                assert_reads_back(v, l.get(k).unwrap_or(&Value::Null), &format!("{path}.{k}"));
            }
            if path.starts_with(".spec") {
                let extra: Vec<&String> = l.keys().filter(|k| !m.contains_key(*k)).collect();
                assert!(extra.is_empty(), "{path}: the API server added {extra:?}");
            }
        }
        _ => assert_eq!(manifest, live, "{path} differs"),
    }
}

#[tokio::test]
async fn applied_examples_read_back_without_a_diff() -> Result<()> {
    // Creates FineTuneJobs and ModelDeployments that an operator would reconcile.
    let _no_operator = no_operator().await;
    let client = client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::new(&client, "argocd").await?;
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_root().join("examples"))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        for mut doc in yaml_documents(&std::fs::read_to_string(&path)?)? {
            // Labels and annotations as Argo CD adds them (its tracking label).
            doc["metadata"]["labels"]["app.kubernetes.io/instance"] = "team-a-models".into();
            doc["metadata"]["annotations"]["example.com/owner"] = "ml-platform".into();
            let live = apply_object(&client, &discovery, &ns.name, &doc, ApplyMode::Apply).await?;
            let live = serde_json::to_value(&live)?;
            assert_reads_back(&doc, &live, "");
            checked += 1;
        }
    }
    assert!(checked >= 4, "checked {checked} manifests");
    Ok(())
}
