//! Fails when the checked-in CRD YAML no longer matches the Rust types.

#[test]
fn checked_in_crd_yaml_is_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for crd in kubetune_crds::all_crds() {
        let path = dir.join(kubetune_crds::crd_file_name(&crd));
        let expected = kubetune_crds::crd_yaml(&crd).expect("CRD serialises to YAML");
        let actual = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            actual == expected,
            "{} is stale or missing: run `cargo run -p kubetune-crds --bin kubetune-crdgen` and commit the result",
            path.display()
        );
    }
}
