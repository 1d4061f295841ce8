//! Adapter registry behaviour against the filesystem backend and a real S3 server.

use std::collections::BTreeSet;

use crate::common::Env;
use kubetune_storage::{
    AdapterRef, Evaluation, Manifest, ModelScores, Registry, RegistryConfig, Sha256Digest, StorageError, CARD_FILE,
    MANIFEST_FILE,
};

both_backends!(
    round_trip,
    concurrent_publishers_get_distinct_versions,
    interrupted_upload_is_invisible_and_swept,
    digest_mismatch_is_detected,
    hostile_names_are_rejected,
    delete_and_retention_never_reuse_numbers,
    the_model_card_is_part_of_the_version_and_read_back_verified,
);

fn r(s: &str) -> AdapterRef {
    s.parse().unwrap()
}

async fn round_trip(env: &Env) {
    let reg = Registry::open(env.storage.clone());
    let req = env.adapter_source("support-bot", b"weights-v1");
    let published = reg.publish(&req, None).await.unwrap();
    assert_eq!(published.version, 1);

    for reference in [
        "support-bot",
        "support-bot@latest",
        "support-bot@1",
        &format!("support-bot@{}", published.digest),
    ] {
        let resolved = reg.resolve(&r(reference)).await.unwrap();
        assert_eq!(
            (resolved.version, &resolved.digest),
            (1, &published.digest),
            "{reference}"
        );
    }
    let resolved = reg.resolve(&r("support-bot")).await.unwrap();
    assert_eq!(resolved.manifest.hyperparameters["epochs"], 3);
    assert_eq!(resolved.manifest.metrics.eval_loss, Some(0.75));
    assert_eq!(resolved.manifest.files.len(), 3);

    let dest = env.scratch.path().join("fetched");
    reg.fetch(&resolved, &dest, None).await.unwrap();
    assert_eq!(
        std::fs::read(dest.join("adapter_model.safetensors")).unwrap(),
        b"weights-v1"
    );
    assert_eq!(std::fs::read(dest.join("tokenizer/vocab.json")).unwrap(), b"{}");
    let manifest_bytes = std::fs::read(dest.join(MANIFEST_FILE)).unwrap();
    assert_eq!(kubetune_storage::Sha256Digest::of(&manifest_bytes), published.digest);

    let v2 = reg
        .publish(&env.adapter_source("support-bot", b"weights-v2"), None)
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(reg.resolve(&r("support-bot@latest")).await.unwrap().version, 2);
    assert_eq!(reg.resolve(&r("support-bot@1")).await.unwrap().digest, published.digest);
    let versions: Vec<u32> = reg
        .list("support-bot")
        .await
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, [1, 2]);
    assert_eq!(reg.adapters().await.unwrap(), ["support-bot"]);

    let err = reg.fetch(&resolved, &dest, None).await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

async fn concurrent_publishers_get_distinct_versions(env: &Env) {
    const PUBLISHERS: usize = 8;
    let mut tasks = Vec::new();
    for i in 0..PUBLISHERS {
        let reg = Registry::open(env.storage.clone());
        let req = env.adapter_source("racer", format!("w{i}").as_bytes());
        tasks.push(tokio::spawn(
            async move { reg.publish(&req, None).await.map(|p| p.version) },
        ));
    }
    let mut versions = BTreeSet::new();
    for t in tasks {
        versions.insert(t.await.unwrap().unwrap());
    }
    assert_eq!(versions, (1..=PUBLISHERS as u32).collect::<BTreeSet<_>>());
    let reg = Registry::open(env.storage.clone());
    assert_eq!(reg.list("racer").await.unwrap().len(), PUBLISHERS);
}

async fn interrupted_upload_is_invisible_and_swept(env: &Env) {
    let reg = Registry::open(env.storage.clone());
    // A publisher that died after uploading files, before the manifest.
    env.storage
        .put_bytes("adapters/crashy/v1/.claim", "{}".into())
        .await
        .unwrap();
    env.storage
        .put_bytes("adapters/crashy/v1/adapter_config.json", "{}".into())
        .await
        .unwrap();
    env.storage
        .put_bytes("adapters/crashy/v1/adapter_model.safetensors", "partial".into())
        .await
        .unwrap();

    assert!(reg.list("crashy").await.unwrap().is_empty());
    for reference in ["crashy", "crashy@1"] {
        let err = reg.resolve(&r(reference)).await.unwrap_err();
        assert!(
            matches!(err, StorageError::AdapterNotFound { .. }),
            "{reference}: {err}"
        );
    }
    // The next publish does not reuse the abandoned number.
    assert_eq!(
        reg.publish(&env.adapter_source("crashy", b"w"), None)
            .await
            .unwrap()
            .version,
        2
    );

    // Recent leftovers are kept (they may be a live upload) ...
    assert!(reg.sweep("crashy").await.unwrap().is_empty());
    // ... and stale ones removed. A negative age makes everything count as stale.
    let eager = Registry::with_config(
        env.storage.clone(),
        RegistryConfig {
            stale_after: chrono::Duration::seconds(-60),
            ..RegistryConfig::default()
        },
    );
    assert_eq!(eager.sweep("crashy").await.unwrap(), [1]);
    let left: Vec<String> = env
        .storage
        .list("adapters/crashy/v1")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(
        left,
        ["adapters/crashy/v1/.claim"],
        "only the claim (number reservation) stays"
    );
    assert_eq!(
        reg.resolve(&r("crashy")).await.unwrap().version,
        2,
        "published versions are not swept"
    );
}

async fn digest_mismatch_is_detected(env: &Env) {
    let reg = Registry::open(env.storage.clone());
    let published = reg
        .publish(&env.adapter_source("tampered", b"good weights"), None)
        .await
        .unwrap();
    env.storage
        .put_bytes("adapters/tampered/v1/adapter_model.safetensors", "evil weights".into())
        .await
        .unwrap();
    let dest = env.scratch.path().join("tampered");
    let err = reg.fetch(&published, &dest, None).await.unwrap_err();
    match &err {
        StorageError::DigestMismatch { uri, expected, actual } => {
            assert!(uri.ends_with("adapters/tampered/v1/adapter_model.safetensors"), "{uri}");
            assert_eq!(
                expected,
                &published.manifest.files["adapter_model.safetensors"].sha256.to_string()
            );
            assert_ne!(expected, actual);
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(!dest.exists(), "a failed fetch leaves no destination behind");
    let leftovers: Vec<_> = std::fs::read_dir(env.scratch.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".part-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary directories are removed");
}

async fn hostile_names_are_rejected(env: &Env) {
    let reg = Registry::open(env.storage.clone());
    for name in ["../escape", "a/b", "/abs", "%2e%2e", "..", "UPPER", "a\\b", ""] {
        let err = reg.list(name).await.unwrap_err();
        assert!(matches!(err, StorageError::InvalidName { .. }), "{name}: {err}");
        let err = reg.publish(&env.adapter_source(name, b"w"), None).await.unwrap_err();
        assert!(err.to_string().contains("adapter name"), "{name}: {err}");
        assert!(format!("{name}@1").parse::<AdapterRef>().is_err(), "{name}");
    }
    // A manifest in the registry is outside input too: a hostile file name in it is refused
    // before anything is written locally.
    env.storage
        .put_bytes("adapters/evil/v1/.claim", "{}".into())
        .await
        .unwrap();
    let manifest = serde_json::json!({
        "schema": 1, "name": "evil", "version": 1,
        "files": {"../../escape": {"sha256": kubetune_storage::Sha256Digest::of(b"x"), "size": 1}},
        "base_model": {"uri": "hf://o/b"}, "dataset": {"uri": "s3://d/x"},
        "hyperparameters": {}, "metrics": {}, "created_at": "2026-01-01T00:00:00Z"
    });
    env.storage
        .put_bytes("adapters/evil/v1/manifest.json", manifest.to_string().into())
        .await
        .unwrap();
    let err = reg.resolve(&r("evil@1")).await.unwrap_err();
    assert!(
        matches!(err, StorageError::InvalidManifest { .. }) && err.to_string().contains("../../escape"),
        "{err}"
    );
    // Nothing outside the registry prefix was touched.
    for obj in env.storage.list("").await.unwrap() {
        assert!(obj.key.starts_with("adapters/"), "{}", obj.key);
    }
}

async fn delete_and_retention_never_reuse_numbers(env: &Env) {
    let reg = Registry::open(env.storage.clone());
    for i in 0..4 {
        reg.publish(&env.adapter_source("kept", format!("w{i}").as_bytes()), None)
            .await
            .unwrap();
    }
    assert_eq!(reg.retain("kept", 2).await.unwrap(), [1, 2]);
    let versions = |list: Vec<kubetune_storage::ResolvedAdapter>| list.iter().map(|v| v.version).collect::<Vec<_>>();
    assert_eq!(versions(reg.list("kept").await.unwrap()), [3, 4]);
    assert!(matches!(
        reg.resolve(&r("kept@1")).await.unwrap_err(),
        StorageError::AdapterNotFound { .. }
    ));

    reg.delete("kept", 4).await.unwrap();
    assert_eq!(reg.resolve(&r("kept")).await.unwrap().version, 3);
    assert_eq!(
        reg.publish(&env.adapter_source("kept", b"w5"), None)
            .await
            .unwrap()
            .version,
        5
    );
    assert!(matches!(
        reg.delete("kept", 4).await.unwrap_err(),
        StorageError::AdapterNotFound { .. }
    ));
    assert!(reg.retain("kept", 0).await.is_err(), "keeping zero versions is refused");
}

async fn the_model_card_is_part_of_the_version_and_read_back_verified(env: &Env) {
    let reg = Registry::open(env.storage.clone());
    let without = reg.publish(&env.adapter_source("bot", b"w1"), None).await.unwrap();
    assert_eq!(
        reg.card(&without).await.unwrap(),
        None,
        "a version without a card has none"
    );

    let req = env.adapter_source("bot", b"w2");
    let card = "---\nlibrary_name: peft\n---\n# bot\n";
    std::fs::write(req.source_dir.join(CARD_FILE), card).unwrap();
    let with = reg.publish(&req, None).await.unwrap();
    let entry = &with.manifest.files[CARD_FILE];
    assert_eq!(
        (&entry.sha256, entry.size),
        (&Sha256Digest::of(card.as_bytes()), card.len() as u64),
        "the manifest, and so the version's digest, covers the card"
    );
    assert_eq!(reg.card(&with).await.unwrap().as_deref(), Some(card));
    let fetched = env.scratch.path().join("fetched-with-card");
    reg.fetch(&with, &fetched, None).await.unwrap();
    assert_eq!(std::fs::read_to_string(fetched.join(CARD_FILE)).unwrap(), card);

    // A card replaced after publishing is not the one the digest pins.
    let rel = format!("adapters/bot/v{}/{CARD_FILE}", with.version);
    env.storage.put_bytes(&rel, "# forged\n".into()).await.unwrap();
    let err = reg.card(&with).await.unwrap_err();
    assert!(matches!(err, StorageError::DigestMismatch { .. }), "{err}");
}

#[test]
fn manifests_without_an_evaluation_still_parse_and_one_with_it_round_trips() {
    let old = br#"{"schema": 1, "name": "bot", "version": 1, "files": {},
        "base_model": {"uri": "hf://o/m"}, "dataset": {"uri": "s3://d/x"},
        "hyperparameters": {}, "metrics": {"train_loss": 0.5}, "created_at": "2026-01-01T00:00:00Z"}"#;
    let mut m = Manifest::parse("test", old, "bot", 1).unwrap();
    assert_eq!((m.metrics.train_loss, &m.metrics.evaluation), (Some(0.5), &None));
    assert!(
        !String::from_utf8(m.to_bytes().unwrap()).unwrap().contains("evaluation"),
        "an absent evaluation is not written, so older readers see the same manifest"
    );

    m.metrics.evaluation = Some(Evaluation {
        metric: Some("exactMatch".into()),
        examples: 20,
        base: ModelScores {
            loss: Some(2.5),
            score: Some(0.1),
        },
        adapter: ModelScores {
            loss: Some(0.5),
            score: Some(0.9),
        },
    });
    let again = Manifest::parse("test", &m.to_bytes().unwrap(), "bot", 1).unwrap();
    assert_eq!(again, m);
}

/// Two namespaces publish an adapter of the same name into one shared root: each resolves its
/// own, a name only the other published is not found, and the shared scope still reads what
/// was published at the root itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_namespace_resolves_only_its_own_adapters_in_a_shared_root() {
    use kubetune_storage::{scoped_registry_uri, Credentials, RegistryScope, Storage};
    let env = crate::common::fs_env();
    let root = env.storage.uri();
    let open = |ns: &str, scope| {
        let uri = scoped_registry_uri(&root, ns, scope).unwrap();
        Registry::open(Storage::from_uri(&uri, &Credentials::none()).unwrap())
    };
    let (team_a, team_b) = (
        open("team-a", RegistryScope::Namespace),
        open("team-b", RegistryScope::Namespace),
    );
    let a = team_a
        .publish(&env.adapter_source("support-bot", b"a-weights"), None)
        .await
        .unwrap();
    let b = team_b
        .publish(&env.adapter_source("support-bot", b"b-weights"), None)
        .await
        .unwrap();
    assert_eq!((a.version, b.version), (1, 1), "each namespace counts its own versions");
    assert_ne!(a.digest, b.digest);
    assert_eq!(team_a.resolve(&r("support-bot@latest")).await.unwrap().digest, a.digest);
    assert_eq!(team_b.resolve(&r("support-bot@latest")).await.unwrap().digest, b.digest);
    // B's digest is not a version of A's adapter.
    let err = team_a
        .resolve(&r(&format!("support-bot@{}", b.digest)))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::AdapterNotFound { .. }), "{err}");

    team_b
        .publish(&env.adapter_source("only-b", b"b-only"), None)
        .await
        .unwrap();
    let err = team_a.resolve(&r("only-b")).await.unwrap_err();
    assert!(matches!(err, StorageError::AdapterNotFound { .. }), "{err}");
    assert_eq!(team_a.adapters().await.unwrap(), ["support-bot"]);

    // What was published at the root before scoping stays readable with the shared scope, and
    // is no namespace's.
    let shared = open("team-a", RegistryScope::Shared);
    let old = shared
        .publish(&env.adapter_source("legacy", b"old"), None)
        .await
        .unwrap();
    assert_eq!(shared.resolve(&r("legacy@1")).await.unwrap().digest, old.digest);
    assert!(team_a.resolve(&r("legacy")).await.is_err());
}
