//! Fails when the Helm chart's copy of the CRDs (charts/kubetune/crds/, which Helm installs from
//! there and cannot take from elsewhere) differs from what the Rust types generate.

use std::collections::BTreeSet;
use std::path::Path;

#[test]
fn chart_crds_are_the_generated_ones() {
    let chart_crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/kubetune/crds");
    let mut expected_files = BTreeSet::new();
    for crd in kubetune_crds::all_crds() {
        let generated = kubetune_crds::crd_file_name(&crd);
        let file = Path::new(&generated)
            .file_name()
            .expect("CRD file name")
            .to_string_lossy()
            .into_owned();
        let path = chart_crds.join(&file);
        let expected = kubetune_crds::crd_yaml(&crd).expect("CRD serialises to YAML");
        let actual = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            actual == expected,
            "{} is stale or missing: run `make crds` and commit the result",
            path.display()
        );
        expected_files.insert(file);
    }
    let present: BTreeSet<String> = std::fs::read_dir(&chart_crds)
        .unwrap_or_else(|e| panic!("reading {}: {e}", chart_crds.display()))
        .map(|e| e.expect("directory entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        present,
        expected_files,
        "{} holds CRDs that the Rust types no longer generate: run `make crds`",
        chart_crds.display()
    );
}
