//! Shared by the chart, alert and Argo CD tests: the external tools (through e2e/tools.sh, which
//! builds or unpacks what is missing) and rendering the chart with helm.

#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use kubetune_e2e::{repo_root, yaml_documents};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Path of a tool that e2e/tools.sh provides: helm, promtool, lua or actionlint.
pub fn tool(name: &str) -> PathBuf {
    static TOOLS: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    let tools = TOOLS.get_or_init(|| {
        let names = ["helm", "promtool", "lua", "actionlint"];
        let out = Command::new(repo_root().join("e2e/tools.sh"))
            .args(names)
            .output()
            .expect("running e2e/tools.sh");
        assert!(out.status.success(), "e2e/tools.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let paths: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from).collect();
        assert_eq!(paths.len(), names.len(), "e2e/tools.sh printed {paths:?}");
        names.iter().map(|n| n.to_string()).zip(paths).collect()
    });
    tools.iter().find(|(n, _)| n == name).map(|(_, p)| p.clone()).unwrap_or_else(|| panic!("no tool {name}"))
}

pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/kubetune")
}

/// Runs a command, failing with its output when it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

/// `helm template <release> charts/kubetune -n <namespace> --include-crds <args>`.
pub fn helm_template_cmd(release: &str, namespace: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(["template", release]).arg(chart_dir()).args(["--namespace", namespace, "--include-crds"]).args(args);
    cmd
}

/// The chart rendered into objects.
pub fn render(release: &str, namespace: &str, args: &[&str]) -> Result<Vec<Value>> {
    let text = run(&mut helm_template_cmd(release, namespace, args))?;
    yaml_documents(&text)
}

/// The one rendered object of a kind (and name, when given).
pub fn find<'a>(objects: &'a [Value], kind: &str, name: Option<&str>) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && name.is_none_or(|n| o["metadata"]["name"] == n))
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} {name:?}, found {}", found.len());
    found[0]
}

pub fn kinds(objects: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = objects.iter().map(|o| o["kind"].as_str().unwrap_or("?").to_string()).collect();
    kinds.sort();
    kinds
}

/// A fresh scratch directory under the system temp dir.
pub fn scratch_dir(prefix: &str) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let dir = std::env::temp_dir().join(format!("kubetune-{prefix}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
