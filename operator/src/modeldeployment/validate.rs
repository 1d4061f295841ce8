//! Pure validation of a ModelDeployment beyond what the CRD schema checks: what its inference
//! pods ask of a node, before anything is applied.

use super::resolve::Unresolved;
use crate::config::OperatorConfig;
use crate::pvc::{self, ClaimMounts};
use crate::workload::{check_image, requested_gpus};
use kubetune_crds::ModelDeploymentSpec;
use kubetune_storage::scoped_registry_uri;

/// What the pods are built from, once the spec is known to be runnable.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidModelDeployment {
    /// GPUs each inference pod asks for: 0 (CPU serving) or 1, as validation refuses more.
    pub gpus: u64,
    /// spec.baseModel.uri as the server reads it (a claim's `file://` mount for `pvc://`).
    pub model_uri: String,
    /// The claims `pvc://` URIs name, mounted read-only into the server pods.
    pub claims: ClaimMounts,
}

/// Checks a spec against the operator's settings. Err is the Ready condition's reason and message.
pub fn validate(spec: &ModelDeploymentSpec, config: &OperatorConfig) -> Result<ValidModelDeployment, Unresolved> {
    let invalid = |message| Unresolved {
        reason: "InvalidSpec",
        message,
    };
    let gpus = requested_gpus(&spec.placement, &config.gpu_resource).map_err(invalid)?;
    let image = spec.server.as_ref().and_then(|s| s.image.as_deref());
    check_image("spec.server.image", image, &config.allowed_images).map_err(|message| Unresolved {
        reason: "ImageNotAllowed",
        message,
    })?;
    let server = spec.server.clone().unwrap_or_default();
    if server.on_demand_adapters == Some(true) && server.merge == Some(true) {
        return Err(invalid(
            "spec.server.onDemandAdapters: a merged server serves its one adapter only; drop spec.server.merge to load others on demand".into(),
        ));
    }
    // The schema no longer allows it; objects stored before it did are refused here.
    if let Some(uri) = spec.registry.as_ref().filter(|uri| pvc::is_pvc(uri)) {
        return Err(invalid(pvc::registry_refused("spec.registry", uri)));
    }
    let mut claims = ClaimMounts::default();
    let model_uri = claims
        .local_uri("spec.baseModel.uri", &spec.base_model.uri)
        .map_err(invalid)?;
    Ok(ValidModelDeployment {
        gpus,
        model_uri,
        claims,
    })
}

/// The registry a ModelDeployment's adapters resolve in, for the operator and its server pods
/// alike: spec.registry or the operator's default, scoped to the object's namespace (unless the
/// operator shares the root), exactly as its FineTuneJobs publish. None when neither names one.
pub fn registry_for(
    spec: &ModelDeploymentSpec,
    config: &OperatorConfig,
    namespace: &str,
) -> Result<Option<String>, Unresolved> {
    let Some(root) = spec.registry.as_ref().or(config.default_registry.as_ref()) else {
        return Ok(None);
    };
    scoped_registry_uri(root, namespace, config.registry_scope)
        .map(Some)
        .map_err(|e| Unresolved {
            reason: "InvalidSpec",
            message: format!("metadata.namespace: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::modeldeployment;
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use std::collections::BTreeMap;

    fn with_limits(limits: &[(&str, &str)]) -> ModelDeploymentSpec {
        let mut spec = modeldeployment("modeldeployment.yaml").spec;
        spec.placement.resources = Some(ResourceRequirements {
            limits: Some(
                limits
                    .iter()
                    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        });
        spec
    }

    #[test]
    fn a_server_image_outside_the_allowed_images_is_refused_naming_the_field() {
        let mut spec = modeldeployment("modeldeployment.yaml").spec;
        spec.server.get_or_insert_with(Default::default).image = Some("docker.io/evil/server:1".into());
        let err = validate(&spec, &OperatorConfig::for_tests()).expect_err("not an allowed image");
        assert_eq!(err.reason, "ImageNotAllowed");
        assert!(
            err.message
                .starts_with("spec.server.image: docker.io/evil/server:1 is not in the operator's allowed images ("),
            "{}",
            err.message
        );
        spec.server.get_or_insert_with(Default::default).image = Some("kubetune/server@sha256:00".into());
        validate(&spec, &OperatorConfig::for_tests()).expect("an allowed repository");
    }

    #[test]
    fn on_demand_adapters_with_a_merged_server_are_refused_naming_the_field() {
        let mut spec = modeldeployment("modeldeployment.yaml").spec;
        let server = spec.server.get_or_insert_with(Default::default);
        server.on_demand_adapters = Some(true);
        validate(&spec, &OperatorConfig::for_tests()).expect("on demand alone is fine");
        spec.server.get_or_insert_with(Default::default).merge = Some(true);
        let err = validate(&spec, &OperatorConfig::for_tests()).expect_err("merged");
        assert_eq!(err.reason, "InvalidSpec");
        assert!(
            err.message.starts_with("spec.server.onDemandAdapters: "),
            "{}",
            err.message
        );
    }

    #[test]
    fn adapters_resolve_in_the_namespaces_registry_unless_the_registry_is_shared() {
        let mut spec = modeldeployment("modeldeployment.yaml").spec;
        spec.registry = None;
        let mut config = OperatorConfig::for_tests();
        assert_eq!(
            registry_for(&spec, &config, "team-a"),
            Ok(Some("s3://kubetune/registry/namespaces/team-a".into()))
        );
        assert_eq!(
            registry_for(&spec, &config, "team-b"),
            Ok(Some("s3://kubetune/registry/namespaces/team-b".into())),
            "team-b's support-bot is not team-a's"
        );
        spec.registry = Some("s3://team-bucket/reg/".into());
        assert_eq!(
            registry_for(&spec, &config, "team-a"),
            Ok(Some("s3://team-bucket/reg/namespaces/team-a".into())),
            "a registry the spec names is scoped too: its FineTuneJobs publish there"
        );
        config.registry_scope = kubetune_storage::RegistryScope::Shared;
        assert_eq!(
            registry_for(&spec, &config, "team-a"),
            Ok(Some("s3://team-bucket/reg/".into()))
        );
        spec.registry = None;
        config.default_registry = None;
        assert_eq!(registry_for(&spec, &config, "team-a"), Ok(None));
    }

    #[test]
    fn no_resources_serve_on_one_gpu() {
        let spec = modeldeployment("modeldeployment.yaml").spec;
        let valid = validate(&spec, &OperatorConfig::for_tests()).expect("valid");
        assert_eq!(valid.gpus, 1);
    }

    #[test]
    fn resources_without_a_gpu_serve_on_the_cpu() {
        let valid = validate(&with_limits(&[("cpu", "4")]), &OperatorConfig::for_tests()).expect("valid");
        assert_eq!(valid.gpus, 0);
    }

    #[test]
    fn a_base_model_on_a_claim_is_read_from_its_mount() {
        let mut spec = modeldeployment("modeldeployment.yaml").spec;
        spec.base_model.uri = "pvc://models/smollm2".into();
        let valid = validate(&spec, &OperatorConfig::for_tests()).expect("valid");
        assert_eq!(valid.model_uri, "file:///mnt/kubetune/pvc/models/smollm2");
        assert_eq!(valid.claims.claims().collect::<Vec<_>>(), ["models"]);
    }

    #[test]
    fn a_registry_on_a_claim_is_refused_naming_the_field() {
        let mut spec = modeldeployment("modeldeployment.yaml").spec;
        spec.registry = Some("pvc://registry/kubetune".into());
        let err = validate(&spec, &OperatorConfig::for_tests()).expect_err("a claim holds no registry");
        assert_eq!(err.reason, "InvalidSpec");
        assert!(
            err.message
                .starts_with("spec.registry: pvc://registry/kubetune is on a PersistentVolumeClaim"),
            "{}",
            err.message
        );
    }

    #[test]
    fn two_gpus_are_refused_naming_the_field_and_saying_one_is_supported() {
        let err =
            validate(&with_limits(&[("nvidia.com/gpu", "2")]), &OperatorConfig::for_tests()).expect_err("two GPUs");
        assert_eq!(err.reason, "InvalidSpec");
        assert!(
            err.message
                .starts_with(r#"spec.resources.limits["nvidia.com/gpu"]: 2 GPUs"#),
            "{}",
            err.message
        );
        assert!(err.message.contains("one GPU per pod is supported"), "{}", err.message);
    }
}
