//! The chart's PrometheusRule under `promtool test rules`: the rules file tested is the one
//! `helm template` renders, run against the synthetic series in e2e/alerts/*_test.yaml.

use crate::tools::{find, render, run, scratch_dir, tool};
use anyhow::Result;
use kubetune_e2e::repo_root;
use serde_json::Value;
use std::process::Command;

/// Renders the chart's PrometheusRule with `args` and writes its spec (the rule groups) as a
/// Prometheus rules file, next to a copy of the promtool test file `test_file`; returns the test file.
fn rendered_rules_with_test(args: &[&str], test_file: &str) -> Result<std::path::PathBuf> {
    let mut all = vec!["--set", "prometheusRule.enabled=true"];
    all.extend_from_slice(args);
    let objects = render("kt", "kubetune-system", &all)?;
    let rule = find(&objects, "PrometheusRule", None);
    let dir = scratch_dir("alerts")?;
    std::fs::write(dir.join("rules.yaml"), serde_yaml::to_string(&rule["spec"])?)?;
    let test = dir.join(test_file);
    std::fs::copy(repo_root().join("e2e/alerts").join(test_file), &test)?;
    Ok(test)
}

fn alert_names(objects: &[Value]) -> Vec<String> {
    let rule = find(objects, "PrometheusRule", None);
    rule["spec"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn default_rules_pass_promtool_check_and_unit_tests() -> Result<()> {
    let test = rendered_rules_with_test(&[], "rules_test.yaml")?;
    let dir = test.parent().expect("scratch dir");
    let checked = run(Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(dir.join("rules.yaml")))?;
    assert!(checked.contains("SUCCESS: 9 rules found"), "{checked}");
    let tested = run(Command::new(tool("promtool")).args(["test", "rules"]).arg(&test))?;
    assert!(tested.contains("SUCCESS"), "{tested}");
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn thresholds_come_from_values() -> Result<()> {
    // The same series as in rules_test.yaml, under thresholds raised through values, stay quiet.
    let test = rendered_rules_with_test(
        &[
            "--set",
            "alerts.lossDiverging.risePercent=100",
            "--set",
            "alerts.trainingStalled.window=30m",
            "--set",
            "alerts.overfitting.evalRisePercent=20",
            "--set",
            "alerts.servingErrorRate.ratio=0.1",
            "--set",
            "alerts.servingLatency.seconds=10",
            "--set",
            "alerts.modelDeploymentNotReady.for=30m",
            "--set",
            "alerts.fineTuneJobFailed.threshold=1",
        ],
        "thresholds_test.yaml",
    )?;
    let tested = run(Command::new(tool("promtool")).args(["test", "rules"]).arg(&test))?;
    assert!(tested.contains("SUCCESS"), "{tested}");
    std::fs::remove_dir_all(test.parent().expect("scratch dir"))?;
    Ok(())
}

#[test]
fn each_alert_can_be_switched_off_and_labelled() -> Result<()> {
    let all = render("kt", "kubetune-system", &["--set", "prometheusRule.enabled=true"])?;
    let names = alert_names(&all);
    assert_eq!(
        names,
        [
            "KubetuneTrainingLossNotFinite",
            "KubetuneTrainingLossDiverging",
            "KubetuneTrainingStalled",
            "KubetuneTrainingOverfitting",
            "KubetuneFineTuneJobFailed",
            "KubetuneModelDeploymentNotReady",
            "KubetuneModelDeploymentRolloutFailed",
            "KubetuneServingErrorRate",
            "KubetuneServingLatency",
        ]
    );
    let fewer = render(
        "kt",
        "kubetune-system",
        &[
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "alerts.overfitting.enabled=false",
            "--set",
            "alerts.servingLatency.enabled=false",
            "--set",
            "prometheusRule.alertLabels.team=ml",
            "--set",
            "alerts.lossNotFinite.severity=page",
        ],
    )?;
    let remaining = alert_names(&fewer);
    assert_eq!(remaining.len(), 7);
    assert!(!remaining
        .iter()
        .any(|n| n == "KubetuneTrainingOverfitting" || n == "KubetuneServingLatency"));
    let rule = find(&fewer, "PrometheusRule", None);
    for group in rule["spec"]["groups"].as_array().expect("groups") {
        for r in group["rules"].as_array().expect("rules") {
            assert_eq!(r["labels"]["team"], "ml", "{}", r["alert"]);
            if r["alert"] == "KubetuneTrainingLossNotFinite" {
                assert_eq!(r["labels"]["severity"], "page");
            }
        }
    }
    // Off by default: the chart installs on clusters without the Prometheus Operator.
    let default = render("kt", "kubetune-system", &[])?;
    assert!(!default.iter().any(|o| o["kind"] == "PrometheusRule"));
    Ok(())
}
