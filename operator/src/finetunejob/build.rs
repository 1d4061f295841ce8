//! Pure construction of the trainer Job for a validated FineTuneJob.

use super::validate::ValidFineTuneJob;
use crate::config::OperatorConfig;
use crate::error::{Error, Result};
use crate::workload::{
    apply_identity, apply_placement, device_env, resources_or_one_gpu, restricted_container_security,
    restricted_pod_security,
};
use k8s_openapi::api::batch::v1::Job;
use kube::{Resource, ResourceExt};
use kubetune_crds::trainer_contract::{
    JobIdentity, TrainerJob, EXIT_EVALUATION_BELOW_THRESHOLD, EXIT_INVALID_INPUT, EXIT_LOSS_DIVERGED, TRAINER_JOB_ENV,
};
use kubetune_crds::FineTuneJob;
use serde_json::json;
use std::collections::BTreeMap;

/// Label on every child object, naming the FineTuneJob it belongs to.
pub const FINETUNEJOB_LABEL: &str = "kubetune.dev/finetunejob";

/// The label that hands a Job to a Kueue LocalQueue. Kueue then owns the Job's `suspend`: it
/// admits the Job by unsuspending it when quota is free.
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";

/// The Kueue queue the FineTuneJob names in its labels, if any.
pub fn kueue_queue(ftj: &FineTuneJob) -> Option<&str> {
    ftj.metadata.labels.as_ref()?.get(KUEUE_QUEUE_LABEL).map(String::as_str)
}
/// Name of the trainer container.
pub const TRAINER_CONTAINER: &str = "trainer";
/// Name of the trainer's metrics port.
pub const METRICS_PORT_NAME: &str = "metrics";
/// Mount path of the scratch volume (model, dataset, checkpoints, output).
pub const SCRATCH_PATH: &str = "/scratch";
/// Where the trainer writes its outcome; under the scratch volume so it is writable with a
/// read-only root filesystem.
pub const TERMINATION_LOG: &str = "/scratch/termination-log";

/// The trainer Job's name: the FineTuneJob's own, so `kubectl get jobs` reads naturally.
pub fn job_name(ftj: &FineTuneJob) -> String {
    ftj.name_any()
}

/// The request the trainer receives, every default resolved.
pub fn trainer_job(ftj: &FineTuneJob, valid: &ValidFineTuneJob) -> Result<TrainerJob> {
    let missing = |field| Error::MissingField {
        object: format!("FineTuneJob {}", ftj.name_any()),
        field,
    };
    let owner = JobIdentity {
        namespace: ftj.namespace().ok_or_else(|| missing("metadata.namespace"))?,
        name: ftj.name_any(),
        uid: ftj.uid().ok_or_else(|| missing("metadata.uid"))?,
    };
    let checkpoint_uri = format!(
        "{}/checkpoints/{}/{}-{}",
        valid.registry.trim_end_matches('/'),
        owner.namespace,
        owner.name,
        owner.uid
    );
    let namespace = owner.namespace.clone();
    Ok(TrainerJob {
        owner,
        base_model_uri: valid.base_model_uri.clone(),
        dataset: valid.dataset.clone(),
        method: valid.method,
        lora: valid.lora.clone(),
        quantization: valid.quantization.clone(),
        training: valid.training.clone(),
        adapter_name: ftj.spec.output.adapter_name.clone(),
        // Where the trainer publishes: the same namespace's registry that ModelDeployments of
        // this namespace resolve in.
        registry: kubetune_storage::scoped_registry_uri(&valid.registry, &namespace, valid.registry_scope)?,
        checkpoint_uri,
        evaluation: valid.evaluation.clone(),
        dpo: valid.dpo.clone(),
        init_from: valid.init_from.clone(),
        merge: valid.merge,
    })
}

/// Labels of the trainer pod, and the Job's own (see [`job_labels`]).
pub fn labels(ftj: &FineTuneJob) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "kubetune-trainer".into()),
        ("app.kubernetes.io/managed-by".into(), "kubetune-operator".into()),
        (FINETUNEJOB_LABEL.into(), ftj.name_any()),
    ])
}

/// Labels of the Job: the FineTuneJob's own labels (Kueue's `queue-name` and
/// `priority-class`, a team's cost labels), then ours, which win a clash.
pub fn job_labels(ftj: &FineTuneJob) -> BTreeMap<String, String> {
    let mut all = ftj.metadata.labels.clone().unwrap_or_default();
    all.extend(labels(ftj));
    all
}

/// The Job as it is first created: suspended when Kueue will admit it (Kueue's webhook would
/// suspend it anyway; where that webhook is missing, a Job created running would start past
/// the queue). Afterwards `suspend` is Kueue's, except that the user's stop wins.
pub fn job_to_create(ftj: &FineTuneJob, mut desired: Job) -> Job {
    if kueue_queue(ftj).is_some() {
        if let Some(spec) = desired.spec.as_mut() {
            spec.suspend = Some(true);
        }
    }
    desired
}

/// Builds the batch/v1 Job that runs one trainer pod for the FineTuneJob.
pub fn build_job(ftj: &FineTuneJob, valid: &ValidFineTuneJob, config: &OperatorConfig) -> Result<Job> {
    let spec = &ftj.spec;
    let request = serde_json::to_string(&trainer_job(ftj, valid)?).map_err(|source| Error::Serialize {
        what: "trainer job",
        source,
    })?;
    let owner = ftj.controller_owner_ref(&()).ok_or_else(|| Error::MissingField {
        object: format!("FineTuneJob {}", ftj.name_any()),
        field: "metadata.uid",
    })?;
    let labels = labels(ftj);

    let env = vec![
        json!({"name": TRAINER_JOB_ENV, "value": request}),
        json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        json!({"name": "KUBETUNE_JOB_NAME", "value": format!("{}/{}", ftj.namespace().unwrap_or_default(), ftj.name_any())}),
        device_env(valid.gpus),
    ];
    let env_from = spec
        .storage_secret_ref
        .as_ref()
        .map(|s| vec![json!({"secretRef": {"name": s.name}})])
        .unwrap_or_default();
    let resources = resources_or_one_gpu(&spec.placement, &config.gpu_resource)?;
    let mounts = [
        vec![
            json!({"name": "scratch", "mountPath": SCRATCH_PATH}),
            json!({"name": "tmp", "mountPath": "/tmp"}),
        ],
        valid.claims.volume_mounts(),
    ]
    .concat();
    let volumes = [
        vec![
            json!({"name": "scratch", "emptyDir": {"sizeLimit": config.scratch_size}}),
            json!({"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}),
        ],
        valid.claims.volumes(),
    ]
    .concat();
    let container = json!({
        "name": TRAINER_CONTAINER,
        "image": valid.image,
        "args": [
            "--work-dir", SCRATCH_PATH,
            "--metrics-addr", format!("$(POD_IP):{}", config.trainer_metrics_port),
            "--termination-log", TERMINATION_LOG,
        ],
        "env": env,
        "envFrom": env_from,
        "resources": resources,
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": config.trainer_metrics_port, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": restricted_container_security(),
    });
    let mut pod_spec = json!({
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes,
        "securityContext": restricted_pod_security(),
        // On SIGTERM (deletion, preemption, a node drain) the trainer checkpoints and uploads
        // before it exits; Kubernetes' default of 30 s would kill it mid-upload.
        "terminationGracePeriodSeconds": config.trainer_termination_grace_seconds,
    });
    apply_placement(&mut pod_spec, &spec.placement)?;
    apply_identity(&mut pod_spec, &spec.placement, &config.default_service_account);

    let job = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(ftj),
            "namespace": ftj.namespace(),
            "labels": job_labels(ftj),
            "ownerReferences": [owner],
        },
        "spec": {
            "backoffLimit": valid.backoff_limit,
            "activeDeadlineSeconds": spec.active_deadline_seconds,
            "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
            "suspend": spec.suspend.unwrap_or(false),
            // Bad input and divergence cannot be fixed by a retry: fail the Job at once. Evictions
            // and preemptions do not count against the backoff limit; the retry resumes anyway.
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In", "values": [EXIT_INVALID_INPUT, EXIT_LOSS_DIVERGED, EXIT_EVALUATION_BELOW_THRESHOLD]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]},
            "template": {
                "metadata": {"labels": labels},
                "spec": pod_spec,
            },
        },
    });
    // Unset optionals are null here and None after parsing, so they are left out of the apply.
    serde_json::from_value(job).map_err(|source| Error::Serialize { what: "job", source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finetunejob::validate::{validate, Facts};
    use crate::fixtures::finetunejob;
    use kubetune_crds::trainer_contract::TrainerJob;

    fn built(fixture: &str) -> (FineTuneJob, Job) {
        let ftj = finetunejob(fixture);
        let config = OperatorConfig::for_tests();
        let valid = validate(&ftj.spec, &config, &Facts::default()).expect("fixture is valid");
        let job = build_job(&ftj, &valid, &config).expect("job builds");
        (ftj, job)
    }

    fn pod_spec(job: &Job) -> &k8s_openapi::api::core::v1::PodSpec {
        job.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec")
    }

    /// Kueue finds its queue on the Job, the Job starts suspended for Kueue to admit, and
    /// afterwards the operator never resumes it (Kueue does) but still suspends it when asked.
    #[test]
    fn a_job_for_a_kueue_queue_carries_the_label_starts_suspended_and_is_resumed_only_by_kueue() {
        let mut ftj = finetunejob("minimal.yaml");
        ftj.metadata.labels = Some(
            [
                (KUEUE_QUEUE_LABEL.to_string(), "team-a".to_string()),
                (FINETUNEJOB_LABEL.to_string(), "spoofed".to_string()),
            ]
            .into(),
        );
        let config = OperatorConfig::for_tests();
        let valid = validate(&ftj.spec, &config, &Facts::default()).expect("fixture is valid");
        let desired = build_job(&ftj, &valid, &config).expect("job builds");
        let labels = desired.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get(KUEUE_QUEUE_LABEL).map(String::as_str), Some("team-a"));
        assert_eq!(
            labels.get(FINETUNEJOB_LABEL).map(String::as_str),
            Some("minimal"),
            "ours win a clash"
        );
        let created = job_to_create(&ftj, desired.clone());
        assert_eq!(created.spec.as_ref().and_then(|s| s.suspend), Some(true));

        let mut admitted = created.clone();
        admitted.spec.as_mut().expect("spec").suspend = Some(false);
        use crate::finetunejob::mutable_changes;
        assert_eq!(mutable_changes(&created, &desired, true), None, "queued: left to Kueue");
        assert_eq!(
            mutable_changes(&admitted, &desired, true),
            None,
            "admitted: not touched"
        );
        let mut stop = desired.clone();
        stop.spec.as_mut().expect("spec").suspend = Some(true);
        assert_eq!(
            mutable_changes(&admitted, &stop, true),
            Some(serde_json::json!({"spec": {"suspend": true}})),
            "the user's stop wins"
        );
        assert_eq!(
            mutable_changes(&created, &desired, false),
            Some(serde_json::json!({"spec": {"suspend": false}})),
            "without Kueue the operator owns suspend"
        );
        let (plain, plain_job) = built("minimal.yaml");
        assert_eq!(
            job_to_create(&plain, plain_job).spec.and_then(|s| s.suspend),
            Some(false)
        );
    }

    #[test]
    fn job_is_owned_and_labelled() {
        let (ftj, job) = built("minimal.yaml");
        let owners = job.metadata.owner_references.clone().unwrap_or_default();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].uid, ftj.metadata.uid.clone().unwrap_or_default());
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(
            job.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(FINETUNEJOB_LABEL))
                .map(String::as_str),
            Some("minimal")
        );
        assert_eq!(job.metadata.namespace.as_deref(), Some("team-a"));
    }

    #[test]
    fn trainer_pod_is_locked_down() {
        let (_, job) = built("minimal.yaml");
        let pod = pod_spec(&job);
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(
            pod.security_context.as_ref().and_then(|s| s.run_as_non_root),
            Some(true)
        );
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().expect("container security context");
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()])
        );
        let port = &c.ports.as_ref().expect("ports")[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some(METRICS_PORT_NAME), 9090)
        );
        let mounts: Vec<_> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(mounts, [SCRATCH_PATH, "/tmp"]);
        let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref()).expect("limits");
        assert_eq!(
            limits.get("nvidia.com/gpu").map(|q| q.0.as_str()),
            Some("1"),
            "one GPU by default"
        );
    }

    #[test]
    fn trainer_pods_have_the_configured_grace_period_to_upload_a_checkpoint_on_sigterm() {
        let (_, job) = built("minimal.yaml");
        assert_eq!(
            pod_spec(&job).termination_grace_period_seconds,
            Some(crate::config::DEFAULT_TRAINER_TERMINATION_GRACE_SECONDS)
        );
        let ftj = finetunejob("minimal.yaml");
        let config = OperatorConfig {
            trainer_termination_grace_seconds: 1200,
            ..OperatorConfig::for_tests()
        };
        let valid = validate(&ftj.spec, &config, &Facts::default()).expect("fixture is valid");
        let job = build_job(&ftj, &valid, &config).expect("job builds");
        assert_eq!(pod_spec(&job).termination_grace_period_seconds, Some(1200));
    }

    #[test]
    fn every_placement_and_job_setting_reaches_the_job() {
        let (_, job) = built("full.yaml");
        let spec = job.spec.as_ref().expect("spec");
        assert_eq!(spec.suspend, Some(true));
        assert_eq!(spec.backoff_limit, Some(5));
        assert_eq!(spec.active_deadline_seconds, Some(86400));
        assert_eq!(spec.ttl_seconds_after_finished, Some(600));
        let pod = pod_spec(&job);
        assert_eq!(
            pod.node_selector
                .as_ref()
                .and_then(|n| n.get("nvidia.com/gpu.product"))
                .map(String::as_str),
            Some("H100")
        );
        assert_eq!(pod.tolerations.as_ref().map(Vec::len), Some(1));
        assert_eq!(pod.priority_class_name.as_deref(), Some("training"));
        assert_eq!(pod.service_account_name.as_deref(), Some("trainer"));
        assert_eq!(
            pod.image_pull_secrets.as_ref().map(|s| s[0].name.clone()),
            Some("regcred".into())
        );
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.example.com/kubetune/trainer:v1"));
        let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref()).expect("limits");
        assert_eq!(limits.get("nvidia.com/gpu").map(|q| q.0.as_str()), Some("1"));
        let env_from = c.env_from.as_ref().expect("envFrom");
        assert_eq!(
            env_from[0].secret_ref.as_ref().map(|s| s.name.clone()),
            Some("s3-creds".into())
        );
    }

    #[test]
    fn the_trainer_publishes_into_its_namespaces_registry_unless_the_registry_is_shared() {
        let ftj = finetunejob("full.yaml");
        let config = OperatorConfig::for_tests();
        let mut valid = validate(&ftj.spec, &config, &Facts::default()).expect("valid");
        let scoped = trainer_job(&ftj, &valid).expect("builds");
        assert_eq!(scoped.registry, "s3://registry/kubetune/namespaces/team-a");
        valid.registry_scope = kubetune_storage::RegistryScope::Shared;
        let shared = trainer_job(&ftj, &valid).expect("builds");
        assert_eq!(shared.registry, "s3://registry/kubetune");
        assert_eq!(
            scoped.checkpoint_uri, shared.checkpoint_uri,
            "checkpoints stay where they were, already per namespace and job"
        );
    }

    #[test]
    fn init_from_and_merge_reach_the_trainer_and_init_from_is_read_in_the_namespaces_registry() {
        let mut ftj = finetunejob("full.yaml");
        ftj.spec.init_from = Some(kubetune_crds::InitFromSpec {
            adapter_name: "support-bot".into(),
            version: 2,
        });
        ftj.spec.output.merge = Some(true);
        let config = OperatorConfig::for_tests();
        let valid = validate(&ftj.spec, &config, &Facts::default()).expect("valid");
        let request = trainer_job(&ftj, &valid).expect("builds");
        let from = request.init_from.expect("initFrom");
        assert_eq!((from.adapter_name.as_str(), from.version), ("support-bot", 2));
        assert_eq!(from.lora, ftj.spec.lora, "spec.lora as written");
        assert!(request.merge);
        // The trainer resolves initFrom in `registry`, which is the namespace's own.
        assert_eq!(request.registry, "s3://registry/kubetune/namespaces/team-a");
    }

    #[test]
    fn trainer_receives_every_resolved_setting() {
        let (_, job) = built("full.yaml");
        let c = &pod_spec(&job).containers[0];
        let raw = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == TRAINER_JOB_ENV)
            .and_then(|e| e.value.clone())
            .expect("job env");
        let request: TrainerJob = serde_json::from_str(&raw).expect("trainer job JSON");
        assert_eq!(request.owner.namespace, "team-a");
        assert_eq!(request.registry, "s3://registry/kubetune/namespaces/team-a");
        assert_eq!(
            request.checkpoint_uri,
            "s3://registry/kubetune/checkpoints/team-a/full-0b5e7c1e-0000-4000-8000-000000000001"
        );
        assert_eq!(
            (
                request.training.batch_size,
                request.training.gradient_accumulation_steps
            ),
            (8, 4)
        );
        assert_eq!(request.training.seed, 7);
        assert!(request.dataset.skip_invalid);
        assert_eq!(
            request.evaluation,
            Some(kubetune_crds::trainer_contract::TrainerEvaluation {
                metric: Some(kubetune_crds::EvaluationMetric::Contains),
                max_examples: 50,
                max_new_tokens: crate::finetunejob::validate::DEFAULT_EVAL_MAX_NEW_TOKENS,
                min_improvement: Some(0.02),
            })
        );
        assert_eq!(request.lora.target_modules.len(), 4);
        assert_eq!(request.quantization, None);
    }

    #[test]
    fn the_trainer_reads_a_model_on_a_claim_from_its_read_only_mount() {
        let mut ftj = finetunejob("minimal.yaml");
        ftj.spec.base_model.uri = "pvc://models/smollm2".into();
        let config = OperatorConfig::for_tests();
        let valid = validate(&ftj.spec, &config, &Facts::default()).expect("valid");
        let job = build_job(&ftj, &valid, &config).expect("job builds");
        let pod = pod_spec(&job);
        let claim = pod
            .volumes
            .iter()
            .flatten()
            .find_map(|v| Some((v.name.as_str(), v.persistent_volume_claim.as_ref()?)))
            .expect("a claim volume");
        assert_eq!((claim.1.claim_name.as_str(), claim.1.read_only), ("models", Some(true)));
        let c = &pod.containers[0];
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == claim.0)
            .expect("the claim is mounted");
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/mnt/kubetune/pvc/models", Some(true))
        );
        let raw = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == TRAINER_JOB_ENV)
            .and_then(|e| e.value.clone())
            .expect("job env");
        let request: TrainerJob = serde_json::from_str(&raw).expect("trainer job JSON");
        assert_eq!(request.base_model_uri, "file:///mnt/kubetune/pvc/models/smollm2");
        assert_eq!(
            request.dataset.uri, ftj.spec.dataset.uri,
            "an object-store dataset as it is"
        );
    }

    #[test]
    fn bad_input_divergence_and_a_failed_evaluation_fail_the_job_without_retries() {
        let (_, job) = built("minimal.yaml");
        let policy = job
            .spec
            .as_ref()
            .and_then(|s| s.pod_failure_policy.as_ref())
            .expect("pod failure policy");
        let fail_codes = policy.rules[0].on_exit_codes.as_ref().expect("exit codes");
        assert_eq!(policy.rules[0].action, "FailJob");
        assert_eq!(
            fail_codes.values,
            vec![EXIT_INVALID_INPUT, EXIT_LOSS_DIVERGED, EXIT_EVALUATION_BELOW_THRESHOLD]
        );
    }

    #[test]
    fn checkpoint_steps_reach_the_trainer_with_a_default() {
        let steps = |ftj: &FineTuneJob| {
            let config = OperatorConfig::for_tests();
            let valid = validate(&ftj.spec, &config, &Facts::default()).expect("fixture is valid");
            let job = build_job(ftj, &valid, &config).expect("job builds");
            let c = &pod_spec(&job).containers[0];
            let raw = c
                .env
                .iter()
                .flatten()
                .find(|e| e.name == TRAINER_JOB_ENV)
                .and_then(|e| e.value.clone())
                .expect("job env");
            serde_json::from_str::<TrainerJob>(&raw)
                .expect("trainer job JSON")
                .training
                .checkpoint_steps
        };
        let mut ftj = finetunejob("minimal.yaml");
        assert_eq!(steps(&ftj), Some(50));
        ftj.spec.training.checkpoint_steps = Some(7);
        assert_eq!(steps(&ftj), Some(7));
    }

    fn device(job: &Job) -> Option<String> {
        let c = &pod_spec(job).containers[0];
        let mut set = c.env.iter().flatten().filter(|e| e.name == "KUBETUNE_DEVICE");
        let device = set.next().and_then(|e| e.value.clone());
        assert!(set.next().is_none(), "KUBETUNE_DEVICE is set once");
        device
    }

    #[test]
    fn cpu_jobs_request_no_gpu_and_train_on_the_cpu() {
        let (_, job) = built("cpu.yaml");
        let c = &pod_spec(&job).containers[0];
        let r = c.resources.as_ref().expect("resources");
        assert!(r.limits.as_ref().is_none_or(|l| !l.contains_key("nvidia.com/gpu")));
        assert_eq!(device(&job).as_deref(), Some("cpu"));
    }

    #[test]
    fn gpu_jobs_train_on_cuda_whether_the_gpu_is_the_default_or_asked_for() {
        for fixture in ["minimal.yaml", "full.yaml"] {
            let (_, job) = built(fixture);
            assert_eq!(device(&job).as_deref(), Some("cuda"), "{fixture}");
        }
    }
}
