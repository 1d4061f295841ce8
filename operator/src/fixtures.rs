//! Test fixtures: kubetune objects from YAML files under tests/fixtures/.

use kube::Resource;
use kubetune_crds::{FineTuneJob, ModelDeployment};
use serde::de::DeserializeOwned;

/// Loads tests/fixtures/<name>, with the namespace, uid and generation the API server would add.
fn fixture<K: Resource + DeserializeOwned>(name: &str, uid: &str) -> K {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut obj: K = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    let meta = obj.meta_mut();
    meta.namespace.get_or_insert_with(|| "team-a".into());
    meta.uid.get_or_insert_with(|| uid.into());
    meta.generation.get_or_insert(1);
    obj
}

pub fn finetunejob(name: &str) -> FineTuneJob {
    fixture(name, "0b5e7c1e-0000-4000-8000-000000000001")
}

pub fn modeldeployment(name: &str) -> ModelDeployment {
    fixture(name, "0b5e7c1e-0000-4000-8000-000000000002")
}
