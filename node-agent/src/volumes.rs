//! Pod directories, volumes and the container-path → host-path rewriting.
//!
//! Pods run as plain processes, so they see the host filesystem, not their container's mount
//! namespace. Each volume therefore becomes a host directory, and every argument, command word
//! and env value that *starts with* a volumeMount's `mountPath` (or has the form
//! `something=<mountPath>...`, as in `--out=/data/x` or `DIR=/data`) is rewritten to point into
//! that directory before the process starts. Paths built at runtime inside the program from
//! other pieces are not rewritten: a program must take its paths from args or env.
//!
//! Layout: `<state-dir>/pods/<namespace>_<name>_<uid>/` holds `volumes/<volume>/`, the
//! container logs `<container>.log`, the kubeconfig and the service-account token.
//! `hostPath` volumes use the host path itself; `persistentVolumeClaim` volumes share
//! `<state-dir>/pvcs/<namespace>/<claim>/` so data outlives the pod, as a PV would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod, Volume};

use crate::env::{self, EnvInputs};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volumeMount {mount:?} of container {container:?} names no volume of the pod")]
    UnknownVolume { container: String, mount: String },
    #[error("volume {volume:?}: {detail}")]
    Source { volume: String, detail: String },
    #[error("volume {volume:?}: cannot write {path}: {source}")]
    Io {
        volume: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn pod_dir(state_dir: &Path, pod: &Pod) -> PathBuf {
    let meta = &pod.metadata;
    state_dir.join("pods").join(format!(
        "{}_{}_{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("unnamed"),
        meta.uid.as_deref().unwrap_or("nouid"),
    ))
}

/// Host directory backing each volume of the pod, by volume name.
pub fn volume_paths(state_dir: &Path, pod_dir: &Path, pod: &Pod) -> BTreeMap<String, PathBuf> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    volumes
        .into_iter()
        .flatten()
        .map(|v| {
            let path = if let Some(host) = &v.host_path {
                PathBuf::from(&host.path)
            } else if let Some(pvc) = &v.persistent_volume_claim {
                state_dir.join("pvcs").join(namespace).join(&pvc.claim_name)
            } else {
                pod_dir.join("volumes").join(&v.name)
            };
            (v.name.clone(), path)
        })
        .collect()
}

/// The mountPath → host directory table of one container.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MountMap {
    /// Longest mount path first, so `/data/models` wins over `/data`.
    entries: Vec<(String, PathBuf)>,
}

impl MountMap {
    pub fn for_container(container: &Container, volume_paths: &BTreeMap<String, PathBuf>) -> Result<Self, VolumeError> {
        let mut entries = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let base = volume_paths
                .get(&mount.name)
                .ok_or_else(|| VolumeError::UnknownVolume {
                    container: container.name.clone(),
                    mount: mount.name.clone(),
                })?;
            let host = match mount.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => base.join(sub),
                _ => base.clone(),
            };
            let mount_path = mount.mount_path.trim_end_matches('/').to_owned();
            // Mounting over "/" would rewrite every absolute path; there is no sane meaning.
            if !mount_path.is_empty() {
                entries.push((mount_path, host));
            }
        }
        entries.sort_by_key(|(mount, _)| std::cmp::Reverse(mount.len()));
        Ok(Self { entries })
    }

    /// Host directories that need to exist (subPaths included).
    pub fn host_dirs(&self) -> impl Iterator<Item = &Path> {
        self.entries.iter().map(|(_, host)| host.as_path())
    }

    /// `value` as a host path if it is a path under one of the mounts.
    pub fn rewrite_path(&self, value: &str) -> Option<String> {
        self.entries.iter().find_map(|(mount, host)| {
            let rest = value.strip_prefix(mount.as_str())?;
            if rest.is_empty() || rest.starts_with('/') {
                Some(format!("{}{rest}", host.display()))
            } else {
                None
            }
        })
    }

    /// Rewrites `value` if it is a mounted path or `prefix=<mounted path>`; else returns it as is.
    pub fn rewrite(&self, value: &str) -> String {
        if let Some(rewritten) = self.rewrite_path(value) {
            return rewritten;
        }
        if let Some((key, path)) = value.split_once('=') {
            if let Some(rewritten) = self.rewrite_path(path) {
                return format!("{key}={rewritten}");
            }
        }
        value.to_owned()
    }
}

/// One file a volume should contain.
#[derive(Debug, PartialEq)]
pub struct VolumeFile {
    pub path: String,
    pub contents: String,
    pub mode: u32,
}

/// Inputs volume contents may need, fetched beforehand by the caller.
pub struct VolumeInputs<'a> {
    pub env: EnvInputs<'a>,
    /// Service-account tokens by audience ("" = the API server's default audience).
    pub tokens: &'a BTreeMap<String, String>,
}

/// Files of a secret, configMap, downwardAPI or projected volume; empty for directory volumes.
pub fn volume_files(volume: &Volume, inputs: &VolumeInputs) -> Result<Vec<VolumeFile>, VolumeError> {
    let err = |detail: String| VolumeError::Source {
        volume: volume.name.clone(),
        detail,
    };
    let mut files = Vec::new();
    if let Some(s) = &volume.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let mode = s.default_mode.map_or(0o644, |m| m as u32);
        object_files(
            &name,
            "secret",
            inputs.env.secrets.get(&name),
            s.items.as_deref(),
            s.optional,
            mode,
            &mut files,
        )
        .map_err(err)?;
    }
    if let Some(c) = &volume.config_map {
        let mode = c.default_mode.map_or(0o644, |m| m as u32);
        let data = inputs.env.config_maps.get(&c.name);
        object_files(
            &c.name,
            "configmap",
            data,
            c.items.as_deref(),
            c.optional,
            mode,
            &mut files,
        )
        .map_err(err)?;
    }
    if let Some(d) = &volume.downward_api {
        let mode = d.default_mode.map_or(0o644, |m| m as u32);
        for item in d.items.iter().flatten() {
            let path = item.field_ref.as_ref().map(|f| f.field_path.as_str()).unwrap_or("");
            let contents = env::field_value(path, &inputs.env)
                .ok_or_else(|| err(format!("unsupported downward API field {path:?}")))?;
            files.push(VolumeFile {
                path: item.path.clone(),
                contents,
                mode: item.mode.map_or(mode, |m| m as u32),
            });
        }
    }
    if let Some(p) = &volume.projected {
        let mode = p.default_mode.map_or(0o644, |m| m as u32);
        for source in p.sources.iter().flatten() {
            if let Some(s) = &source.secret {
                let data = inputs.env.secrets.get(&s.name);
                object_files(
                    &s.name,
                    "secret",
                    data,
                    s.items.as_deref(),
                    s.optional,
                    mode,
                    &mut files,
                )
                .map_err(err)?;
            }
            if let Some(c) = &source.config_map {
                let data = inputs.env.config_maps.get(&c.name);
                object_files(
                    &c.name,
                    "configmap",
                    data,
                    c.items.as_deref(),
                    c.optional,
                    mode,
                    &mut files,
                )
                .map_err(err)?;
            }
            if let Some(d) = &source.downward_api {
                for item in d.items.iter().flatten() {
                    let path = item.field_ref.as_ref().map(|f| f.field_path.as_str()).unwrap_or("");
                    let contents = env::field_value(path, &inputs.env)
                        .ok_or_else(|| err(format!("unsupported downward API field {path:?}")))?;
                    files.push(VolumeFile {
                        path: item.path.clone(),
                        contents,
                        mode,
                    });
                }
            }
            if let Some(t) = &source.service_account_token {
                let audience = t.audience.clone().unwrap_or_default();
                let token = inputs
                    .tokens
                    .get(&audience)
                    .ok_or_else(|| err(format!("no service-account token for audience {audience:?}")))?;
                files.push(VolumeFile {
                    path: t.path.clone(),
                    contents: token.clone(),
                    mode: 0o600,
                });
            }
        }
    }
    for file in &files {
        // Item paths come from the pod spec: never let them escape the volume directory.
        if file.path.starts_with('/') || file.path.split('/').any(|part| part == "..") {
            return Err(err(format!(
                "file path {:?} must be relative and stay inside the volume",
                file.path
            )));
        }
    }
    Ok(files)
}

fn object_files(
    name: &str,
    kind: &str,
    data: Option<&BTreeMap<String, String>>,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
    mode: u32,
    files: &mut Vec<VolumeFile>,
) -> Result<(), String> {
    let Some(data) = data else {
        return if optional == Some(true) {
            Ok(())
        } else {
            Err(format!("{kind} {name:?} not found"))
        };
    };
    match items {
        Some(items) if !items.is_empty() => {
            for item in items {
                match data.get(&item.key) {
                    Some(value) => files.push(VolumeFile {
                        path: item.path.clone(),
                        contents: value.clone(),
                        mode: item.mode.map_or(mode, |m| m as u32),
                    }),
                    None if optional == Some(true) => {}
                    None => return Err(format!("key {:?} not found in {kind} {name:?}", item.key)),
                }
            }
        }
        _ => files.extend(data.iter().map(|(key, value)| VolumeFile {
            path: key.clone(),
            contents: value.clone(),
            mode,
        })),
    }
    Ok(())
}

/// Creates the volume directories and writes the files of content volumes.
pub fn materialise(pod: &Pod, paths: &BTreeMap<String, PathBuf>, inputs: &VolumeInputs) -> Result<(), VolumeError> {
    use std::os::unix::fs::PermissionsExt;
    for volume in pod.spec.as_ref().and_then(|s| s.volumes.as_ref()).into_iter().flatten() {
        let Some(dir) = paths.get(&volume.name) else {
            continue;
        };
        let io = |path: &Path, source| VolumeError::Io {
            volume: volume.name.clone(),
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        for file in volume_files(volume, inputs)? {
            let path = dir.join(&file.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
            }
            std::fs::write(&path, &file.contents).map_err(|e| io(&path, e))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file.mode)).map_err(|e| io(&path, e))?;
        }
    }
    Ok(())
}

/// Collects the Secret and ConfigMap names volumes refer to into the given sets.
pub fn referenced_objects(
    pod: &Pod,
    secrets: &mut std::collections::BTreeSet<String>,
    config_maps: &mut std::collections::BTreeSet<String>,
) {
    for volume in pod.spec.as_ref().and_then(|s| s.volumes.as_ref()).into_iter().flatten() {
        if let Some(name) = volume.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secrets.insert(name);
        }
        if let Some(c) = &volume.config_map {
            config_maps.insert(c.name.clone());
        }
        for source in volume.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(s) = &source.secret {
                secrets.insert(s.name.clone());
            }
            if let Some(c) = &source.config_map {
                config_maps.insert(c.name.clone());
            }
        }
    }
}

/// Audiences of projected service-account tokens ("" for the default audience).
pub fn token_audiences(pod: &Pod) -> std::collections::BTreeSet<String> {
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    volumes
        .into_iter()
        .flatten()
        .flat_map(|v| v.projected.iter().flat_map(|p| p.sources.iter().flatten()))
        .filter_map(|s| s.service_account_token.as_ref())
        .map(|t| t.audience.clone().unwrap_or_default())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::ObjectData;
    use k8s_openapi::api::core::v1::{
        ConfigMapProjection, EmptyDirVolumeSource, PodSpec, ProjectedVolumeSource, SecretVolumeSource,
        ServiceAccountTokenProjection, VolumeMount, VolumeProjection,
    };

    fn mount(name: &str, path: &str, sub: Option<&str>) -> VolumeMount {
        VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            sub_path: sub.map(Into::into),
            ..Default::default()
        }
    }

    fn mounts() -> MountMap {
        let container = Container {
            name: "main".into(),
            volume_mounts: Some(vec![
                mount("data", "/data", None),
                mount("models", "/data/models/", None),
                mount("cfg", "/etc/app", Some("conf")),
            ]),
            ..Default::default()
        };
        let paths = [
            ("data".to_string(), PathBuf::from("/s/p/volumes/data")),
            ("models".to_string(), PathBuf::from("/s/pvcs/ns/models")),
            ("cfg".to_string(), PathBuf::from("/s/p/volumes/cfg")),
        ]
        .into();
        MountMap::for_container(&container, &paths).expect("known volumes")
    }

    #[test]
    fn rewrites_paths_under_mounts_longest_first() {
        let m = mounts();
        assert_eq!(m.rewrite("/data"), "/s/p/volumes/data");
        assert_eq!(m.rewrite("/data/out/x.bin"), "/s/p/volumes/data/out/x.bin");
        assert_eq!(
            m.rewrite("/data/models/m.safetensors"),
            "/s/pvcs/ns/models/m.safetensors"
        );
        assert_eq!(m.rewrite("/etc/app/app.yaml"), "/s/p/volumes/cfg/conf/app.yaml");
        assert_eq!(m.rewrite("--output=/data/run1"), "--output=/s/p/volumes/data/run1");
        // Not under a mount: a shared prefix is not enough.
        assert_eq!(m.rewrite("/database"), "/database");
        assert_eq!(m.rewrite("relative/data"), "relative/data");
        assert_eq!(m.rewrite("x=/tmp"), "x=/tmp");
        assert_eq!(m.rewrite_path("/tmp/x"), None);
    }

    #[test]
    fn unknown_volume_is_an_error() {
        let container = Container {
            name: "c".into(),
            volume_mounts: Some(vec![mount("nope", "/x", None)]),
            ..Default::default()
        };
        assert!(MountMap::for_container(&container, &BTreeMap::new()).is_err());
    }

    #[test]
    fn content_volumes_become_files() {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some("ns".into());
        pod.spec = Some(PodSpec::default());
        let secrets: ObjectData = [("creds".to_string(), [("key".to_string(), "v".to_string())].into())].into();
        let config_maps: ObjectData = [(
            "kube-root-ca.crt".to_string(),
            [("ca.crt".to_string(), "PEM".to_string())].into(),
        )]
        .into();
        let tokens: BTreeMap<String, String> = [(String::new(), "jwt".to_string())].into();
        let inputs = VolumeInputs {
            env: EnvInputs {
                pod: &pod,
                pod_ip: String::new(),
                host_ip: String::new(),
                secrets: &secrets,
                config_maps: &config_maps,
                node_cpu: "1",
                node_memory: "1Gi",
            },
            tokens: &tokens,
        };
        let secret = Volume {
            name: "s".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some("creds".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let files = volume_files(&secret, &inputs).expect("secret exists");
        assert_eq!(
            files,
            vec![VolumeFile {
                path: "key".into(),
                contents: "v".into(),
                mode: 0o644
            }]
        );

        let projected = Volume {
            name: "kube-api-access".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![
                    VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            path: "token".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    VolumeProjection {
                        config_map: Some(ConfigMapProjection {
                            name: "kube-root-ca.crt".into(),
                            items: Some(vec![KeyToPath {
                                key: "ca.crt".into(),
                                path: "ca.crt".into(),
                                mode: None,
                            }]),
                            optional: None,
                        }),
                        ..Default::default()
                    },
                ]),
                default_mode: None,
            }),
            ..Default::default()
        };
        let files = volume_files(&projected, &inputs).expect("projection sources exist");
        let names: Vec<_> = files.iter().map(|f| (f.path.as_str(), f.contents.as_str())).collect();
        assert_eq!(names, vec![("token", "jwt"), ("ca.crt", "PEM")]);

        let empty = Volume {
            name: "e".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        };
        assert!(volume_files(&empty, &inputs).expect("dir volume").is_empty());

        let missing = Volume {
            name: "m".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some("absent".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(volume_files(&missing, &inputs).is_err());
    }
}
