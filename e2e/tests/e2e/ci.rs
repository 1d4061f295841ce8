//! What can be checked here of the CI pieces that need Docker and kind (which cannot run here):
//! actionlint passes the GitHub Actions workflow, which parses and hangs together, and the Dockerfiles are multi-stage,
//! end as non-root, and have the targets the workflow builds.

use crate::tools;
use anyhow::{anyhow, Result};
use kubetune_e2e::repo_root;
use serde_json::Value;
use std::process::Command;

fn workflow() -> Result<Value> {
    let text = std::fs::read_to_string(repo_root().join(".github/workflows/e2e.yaml"))?;
    Ok(serde_yaml::from_str(&text)?)
}

fn steps(job: &Value) -> Vec<&Value> {
    job["steps"].as_array().into_iter().flatten().collect()
}

fn all_runs(job: &Value) -> String {
    steps(job)
        .iter()
        .filter_map(|s| s["run"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn actionlint_finds_nothing() -> Result<()> {
    // Expressions, action inputs, runner labels and job wiring (and shell scripts, when shellcheck is installed).
    tools::run(
        Command::new(tools::tool("actionlint"))
            .arg("-no-color")
            .arg(repo_root().join(".github/workflows/e2e.yaml")),
    )?;
    Ok(())
}

#[test]
fn workflow_parses_and_every_step_is_well_formed() -> Result<()> {
    let wf = workflow()?;
    assert!(
        wf["on"]["pull_request"].is_null() && wf["on"].get("pull_request").is_some(),
        "runs on pull requests"
    );
    assert_eq!(wf["on"]["push"]["branches"][0], "main");
    let jobs = wf["jobs"].as_object().ok_or_else(|| anyhow!("no jobs"))?;
    assert!(
        jobs.contains_key("local") && jobs.contains_key("kind"),
        "{:?}",
        jobs.keys().collect::<Vec<_>>()
    );
    for (name, job) in jobs {
        assert!(job["runs-on"].is_string(), "{name}: runs-on");
        assert!(job["timeout-minutes"].as_u64().is_some(), "{name}: timeout-minutes");
        for step in steps(job) {
            let uses = step["uses"].as_str();
            let run = step["run"].as_str();
            assert!(
                uses.is_some() != run.is_some(),
                "{name}: a step needs exactly one of uses and run: {step}"
            );
            if let Some(action) = uses {
                let (_, version) = action
                    .split_once('@')
                    .ok_or_else(|| anyhow!("{action} is not pinned"))?;
                // dtolnay/rust-toolchain is versioned by toolchain branch (its documented usage).
                assert!(
                    version.starts_with('v') || action == "dtolnay/rust-toolchain@stable",
                    "{name}: {action} should name a release"
                );
            }
        }
    }
    assert!(all_runs(&jobs["local"]).contains("make test"));
    Ok(())
}

#[test]
fn kind_job_builds_the_images_it_installs_and_runs_the_e2e_suite() -> Result<()> {
    let wf = workflow()?;
    let job = &wf["jobs"]["kind"];
    let builds: Vec<&Value> = steps(job)
        .into_iter()
        .filter(|s| {
            s["uses"]
                .as_str()
                .is_some_and(|u| u.starts_with("docker/build-push-action@"))
        })
        .collect();
    let mut built = Vec::new();
    for b in &builds {
        let file = b["with"]["file"]
            .as_str()
            .ok_or_else(|| anyhow!("build without file"))?;
        let dockerfile = std::fs::read_to_string(repo_root().join(file)).map_err(|e| anyhow!("{file}: {e}"))?;
        if let Some(target) = b["with"]["target"].as_str() {
            assert!(
                dockerfile
                    .lines()
                    .any(|l| l.starts_with("FROM ") && l.ends_with(&format!(" AS {target}"))),
                "{file} has no stage {target}"
            );
        }
        assert_eq!(
            b["with"]["load"], true,
            "{file}: the image must reach the local Docker for kind load"
        );
        let tag = b["with"]["tags"].as_str().ok_or_else(|| anyhow!("no tag"))?;
        built.push(tag.split(':').next().unwrap_or_default().to_string());
    }
    assert_eq!(built, ["kubetune/operator", "kubetune/trainer", "kubetune/server"]);
    let runs = all_runs(job);
    for image in &built {
        assert!(
            runs.contains(&format!("{image}:$TAG")),
            "{image} is not loaded into kind"
        );
        let component = image.trim_start_matches("kubetune/");
        assert!(
            runs.contains(&format!("--set {component}.image.repository={image}")),
            "the chart does not get {image}"
        );
    }
    assert!(steps(job)
        .iter()
        .any(|s| s["uses"].as_str().is_some_and(|u| u.starts_with("helm/kind-action@"))));
    assert!(runs.contains("install kubetune charts/kubetune"));
    assert!(runs.contains("cargo test --locked -p kubetune-e2e") && runs.contains("KUBECONFIG="));
    // The values it sets exist in the chart.
    let values: Value = serde_yaml::from_str(&std::fs::read_to_string(
        repo_root().join("charts/kubetune/values.yaml"),
    )?)?;
    for set in runs.split("--set ").skip(1) {
        let key = set.split('=').next().unwrap_or_default();
        let mut v = &values;
        for part in key.split('.') {
            v = &v[part];
        }
        assert!(!v.is_null(), "--set {key}: no such value in values.yaml");
    }
    Ok(())
}

#[test]
fn dockerfiles_are_multi_stage_and_end_as_non_root() -> Result<()> {
    for name in ["operator", "trainer", "server"] {
        let path = repo_root().join(format!("docker/{name}.Dockerfile"));
        let text = std::fs::read_to_string(&path)?;
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        // Split into stages; every runtime stage (one that is not a build stage) must drop root.
        let mut stages: Vec<(String, Vec<&str>)> = Vec::new();
        for l in &lines {
            if let Some(from) = l.strip_prefix("FROM ") {
                let stage_name = from.split(" AS ").nth(1).unwrap_or("").to_string();
                stages.push((stage_name, Vec::new()));
            } else if let Some((_, body)) = stages.last_mut() {
                body.push(l);
            }
        }
        assert!(stages.len() >= 2, "{name}: not multi-stage");
        let runtime: Vec<&(String, Vec<&str>)> = stages.iter().filter(|(n, _)| !n.starts_with("build")).collect();
        assert!(!runtime.is_empty(), "{name}: no runtime stage");
        for (stage, body) in runtime {
            let user = body
                .iter()
                .rev()
                .find_map(|l| l.strip_prefix("USER "))
                .ok_or_else(|| anyhow!("{name}/{stage}: no USER"))?;
            let uid = user.split(':').next().unwrap_or_default();
            assert!(
                uid.parse::<u32>().is_ok_and(|u| u != 0),
                "{name}/{stage}: USER {user} is not a non-root uid"
            );
            assert!(
                body.iter().any(|l| l.starts_with("COPY --from=build")),
                "{name}/{stage}: copies no binary from a build stage"
            );
            assert!(
                body.iter().any(|l| l.starts_with("ENTRYPOINT [")),
                "{name}/{stage}: no exec-form ENTRYPOINT"
            );
        }
        assert!(text.contains("--locked"), "{name}: builds must use Cargo.lock");
    }
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore"))?;
    for path in ["/target", "/.kubetune", "/.git"] {
        assert!(ignore.lines().any(|l| l == path), ".dockerignore lacks {path}");
    }
    Ok(())
}
