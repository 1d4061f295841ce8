//! Test fixtures: FineTuneJobs from YAML files under tests/fixtures/.

use kubetune_crds::{FineTuneJob, ModelDeployment};

/// Loads tests/fixtures/<name> as a FineTuneJob with the uid and namespace the API server would add.
pub fn finetunejob(name: &str) -> FineTuneJob {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut ftj: FineTuneJob = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    ftj.metadata.namespace.get_or_insert_with(|| "team-a".into());
    ftj.metadata.uid.get_or_insert_with(|| "0b5e7c1e-0000-4000-8000-000000000001".into());
    ftj.metadata.generation.get_or_insert(1);
    ftj
}

/// Loads tests/fixtures/<name> as a ModelDeployment, with the uid and namespace the API server would add.
pub fn modeldeployment(name: &str) -> ModelDeployment {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut md: ModelDeployment = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    md.metadata.namespace.get_or_insert_with(|| "team-a".into());
    md.metadata.uid.get_or_insert_with(|| "0b5e7c1e-0000-4000-8000-000000000002".into());
    md.metadata.generation.get_or_insert(1);
    md
}
