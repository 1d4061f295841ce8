//! The `kubetune-adapters` binary end to end on a file:// registry.

use std::process::Command;

fn cli(registry: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kubetune-adapters"))
        .arg("--registry")
        .arg(registry)
        .args(args)
        .output()
        .expect("run kubetune-adapters")
}

#[test]
fn push_list_show_pull() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = format!("file://{}", tmp.path().join("reg").display());
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("adapter_config.json"), "{}").unwrap();
    std::fs::write(src.join("adapter_model.safetensors"), "w").unwrap();

    let out = cli(
        &registry,
        &[
            "push",
            "bot",
            src.to_str().unwrap(),
            "--base-model",
            "hf://o/m",
            "--dataset",
            "s3://d/x",
            "--eval-loss",
            "0.5",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pushed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(pushed.starts_with("bot@1 sha256:"), "{pushed}");

    let out = cli(&registry, &["list"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bot\n");
    let out = cli(&registry, &["list", "bot"]);
    assert!(String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .is_some_and(|l| l.starts_with("1 ")));
    let out = cli(&registry, &["show", "bot@1"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"eval_loss\": 0.5"));

    let dest = tmp.path().join("pulled");
    let out = cli(&registry, &["pull", "bot@latest", dest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(dest.join("adapter_model.safetensors")).unwrap(), b"w");

    let out = cli(&registry, &["show", "../etc@1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("adapter name"));
}

#[test]
fn show_prints_the_model_card_of_a_version_and_the_manifest_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = format!("file://{}", tmp.path().join("reg").display());
    let push = |card: &str| {
        let src = tempfile::tempdir_in(tmp.path()).unwrap();
        std::fs::write(src.path().join("adapter_config.json"), "{}").unwrap();
        std::fs::write(src.path().join("README.md"), card).unwrap();
        let dir = src.path().to_str().unwrap();
        let out = cli(
            &registry,
            &["push", "bot", dir, "--base-model", "hf://o/m", "--dataset", "s3://d/x"],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    push("---\nlibrary_name: peft\n---\n# first card\n");
    push("---\nlibrary_name: peft\n---\n# second card\n");

    let out = cli(&registry, &["show", "bot@1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "---\nlibrary_name: peft\n---\n# first card\n",
        "the card, verbatim"
    );
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("# bot@1 sha256:"));

    let out = cli(&registry, &["show", "bot"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("# second card"),
        "the latest version's card"
    );

    let out = cli(&registry, &["show", "bot@1", "--manifest"]);
    let manifest = String::from_utf8_lossy(&out.stdout);
    assert!(
        manifest.starts_with("# bot@1 sha256:") && manifest.contains("\"README.md\""),
        "{manifest}"
    );
}
