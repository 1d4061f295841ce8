//! Pure validation of a ModelDeployment beyond what the CRD schema checks: what its inference
//! pods ask of a node, before anything is applied.

use super::resolve::Unresolved;
use crate::config::OperatorConfig;
use crate::workload::requested_gpus;
use kubetune_crds::ModelDeploymentSpec;

/// What the pods are built from, once the spec is known to be runnable.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidModelDeployment {
    /// GPUs each inference pod asks for: 0 (CPU serving) or 1, as validation refuses more.
    pub gpus: u64,
}

/// Checks a spec against the operator's settings. Err is the Ready condition's reason and message.
pub fn validate(spec: &ModelDeploymentSpec, config: &OperatorConfig) -> Result<ValidModelDeployment, Unresolved> {
    let gpus = requested_gpus(&spec.placement, &config.gpu_resource).map_err(|message| Unresolved {
        reason: "InvalidSpec",
        message,
    })?;
    Ok(ValidModelDeployment { gpus })
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
