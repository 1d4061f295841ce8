//! `pvc://claim/path` URIs: a PersistentVolumeClaim in the object's namespace, mounted read-only
//! into the pod that reads it, and handed to the trainer or server as the `file://` URI of the
//! mount. The binaries never see `pvc://`: the storage crate reads files, and the claim is the
//! pod's business, so the operator translates.
//!
//! Read-only inputs only (base models and datasets). A registry on a claim is refused: the
//! operator itself reads registries to resolve adapter versions, and it mounts no claims.

use serde_json::{json, Value};
use std::collections::BTreeSet;

/// Where claims are mounted in trainer and server pods: `<root>/<claim>`.
pub const MOUNT_ROOT: &str = "/mnt/kubetune/pvc";

const SCHEME: &str = "pvc://";

/// Whether `uri` names a claim.
pub fn is_pvc(uri: &str) -> bool {
    uri.starts_with(SCHEME)
}

/// The claims one pod reads from, collected while its URIs are translated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClaimMounts {
    claims: BTreeSet<String>,
}

impl ClaimMounts {
    /// `uri` as the pod reads it: a `pvc://claim/path` URI becomes `file://<MOUNT_ROOT>/claim/path`
    /// and its claim is recorded for mounting; any other URI is returned as it is. Err names
    /// `field` and says what is wrong.
    pub fn local_uri(&mut self, field: &str, uri: &str) -> Result<String, String> {
        let Some(rest) = uri.strip_prefix(SCHEME) else {
            return Ok(uri.to_string());
        };
        let rest = rest.trim_end_matches('/');
        let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !is_dns1123_subdomain(claim) {
            return Err(format!(
                "{field}: {uri:?} does not start with a PersistentVolumeClaim name (pvc://claim/path; a claim name is lowercase letters, digits, '-' and '.', at most 253 characters)"
            ));
        }
        let bad_segment = |s: &&str| s.is_empty() || *s == "." || *s == "..";
        if let Some(bad) = path.split('/').find(bad_segment).filter(|_| !path.is_empty()) {
            return Err(format!(
                "{field}: {uri:?} has the path segment {bad:?}; write the path inside the claim without empty, '.' or '..' segments"
            ));
        }
        self.claims.insert(claim.to_string());
        let mut local = format!("file://{MOUNT_ROOT}/{claim}");
        if !path.is_empty() {
            local.push('/');
            local.push_str(path);
        }
        Ok(local)
    }

    /// The pod's volumes, one per claim, read-only. Named by position: a claim name may be
    /// longer than the 63 characters a volume name allows.
    pub fn volumes(&self) -> Vec<Value> {
        self.claims
            .iter()
            .enumerate()
            .map(|(i, claim)| {
                json!({"name": volume_name(i), "persistentVolumeClaim": {"claimName": claim, "readOnly": true}})
            })
            .collect()
    }

    /// The container's mounts of [`Self::volumes`], read-only.
    pub fn volume_mounts(&self) -> Vec<Value> {
        self.claims
            .iter()
            .enumerate()
            .map(|(i, claim)| json!({"name": volume_name(i), "mountPath": format!("{MOUNT_ROOT}/{claim}"), "readOnly": true}))
            .collect()
    }

    /// The claims recorded, in name order.
    pub fn claims(&self) -> impl Iterator<Item = &str> {
        self.claims.iter().map(String::as_str)
    }
}

fn volume_name(index: usize) -> String {
    format!("pvc-{index}")
}

/// A Kubernetes object name (RFC 1123 subdomain), which claim names are.
fn is_dns1123_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && label.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// The refusal of a registry on a claim, naming `field`.
pub fn registry_refused(field: &str, uri: &str) -> String {
    format!(
        "{field}: {uri} is on a PersistentVolumeClaim, which cannot hold a registry: the operator reads registries itself to resolve adapter versions and mounts no claims; use s3, gs, az or file"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_uri_becomes_the_file_uri_of_its_read_only_mount() {
        let mut mounts = ClaimMounts::default();
        assert_eq!(
            mounts.local_uri("spec.baseModel.uri", "pvc://models/llama/3b"),
            Ok("file:///mnt/kubetune/pvc/models/llama/3b".into())
        );
        assert_eq!(
            mounts.local_uri("spec.dataset.uri", "pvc://data.team-a/train.jsonl"),
            Ok("file:///mnt/kubetune/pvc/data.team-a/train.jsonl".into())
        );
        assert_eq!(
            mounts.local_uri("spec.dataset.validationUri", "pvc://models/heldout.jsonl"),
            Ok("file:///mnt/kubetune/pvc/models/heldout.jsonl".into()),
        );
        assert_eq!(
            mounts.local_uri("spec.baseModel.uri", "pvc://whole-claim/"),
            Ok("file:///mnt/kubetune/pvc/whole-claim".into()),
            "the claim's root"
        );
        assert_eq!(
            mounts.claims().collect::<Vec<_>>(),
            ["data.team-a", "models", "whole-claim"],
            "one mount per claim, however many URIs name it"
        );
        assert_eq!(
            mounts.volumes(),
            [
                json!({"name": "pvc-0", "persistentVolumeClaim": {"claimName": "data.team-a", "readOnly": true}}),
                json!({"name": "pvc-1", "persistentVolumeClaim": {"claimName": "models", "readOnly": true}}),
                json!({"name": "pvc-2", "persistentVolumeClaim": {"claimName": "whole-claim", "readOnly": true}}),
            ]
        );
        assert_eq!(
            mounts.volume_mounts()[1],
            json!({"name": "pvc-1", "mountPath": "/mnt/kubetune/pvc/models", "readOnly": true})
        );
    }

    #[test]
    fn other_schemes_pass_through_and_mount_nothing() {
        let mut mounts = ClaimMounts::default();
        for uri in ["s3://b/m", "file:///data/m", "hf://org/name@main"] {
            assert_eq!(mounts.local_uri("spec.baseModel.uri", uri), Ok(uri.to_string()));
        }
        assert!(mounts.volumes().is_empty() && mounts.volume_mounts().is_empty());
    }

    #[test]
    fn a_bad_claim_name_or_path_is_refused_naming_the_field() {
        let mut mounts = ClaimMounts::default();
        for (uri, says) in [
            ("pvc://Models/m", "PersistentVolumeClaim name"),
            ("pvc:///m", "PersistentVolumeClaim name"),
            ("pvc://models/../etc", "\"..\""),
            ("pvc://models/a//b", "\"\""),
            ("pvc://models/./b", "\".\""),
        ] {
            let err = mounts.local_uri("spec.dataset.uri", uri).expect_err(uri);
            assert!(err.starts_with("spec.dataset.uri: "), "{err}");
            assert!(err.contains(says), "{uri}: {err}");
        }
        assert_eq!(mounts.claims().count(), 0, "nothing is mounted for a refused URI");
    }
}
