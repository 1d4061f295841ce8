//! The agent's config file: which local binary stands in for which container image.
//!
//! ```yaml
//! images:
//!   kubetune/trainer: /abs/path/kubetune-trainer
//!   ghcr.io/example/server:v1: ../target/debug/kubetune-server   # relative to this file
//! ```
//! Images are matched by name with any tag or digest stripped on both sides, because the
//! binary we run is the same whatever tag a manifest pins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read agent config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("agent config {path} is not valid YAML for this agent: {source}")]
    Parse { path: PathBuf, source: serde_yaml::Error },
}

/// Parsed config file; an absent file means "no images mapped".
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// Image name (tag/digest ignored) → local executable.
    #[serde(default)]
    pub images: BTreeMap<String, PathBuf>,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        // Relative binary paths are relative to the config file, not to wherever the agent was
        // started from, so the file can live next to the binaries it names.
        let base = path.parent().unwrap_or(Path::new("."));
        for binary in config.images.values_mut() {
            if binary.is_relative() {
                *binary = base.join(&*binary);
            }
        }
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, serde_yaml::Error> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml::from_str(text)
    }

    /// The binary mapped to `image`, if any.
    pub fn binary_for(&self, image: &str) -> Option<&Path> {
        let wanted = image_name(image);
        self.images
            .iter()
            .find(|(key, _)| image_name(key) == wanted)
            .map(|(_, path)| path.as_path())
    }
}

/// `registry:5000/org/img:tag@sha256:…` → `registry:5000/org/img`.
///
/// A colon only starts a tag when it comes after the last slash; before it, it is a registry port.
pub fn image_name(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    match without_digest[last_slash..].find(':') {
        Some(colon) => &without_digest[..last_slash + colon],
        None => without_digest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_tags_and_digests_but_not_registry_ports() {
        assert_eq!(image_name("kubetune/trainer"), "kubetune/trainer");
        assert_eq!(image_name("kubetune/trainer:0.1"), "kubetune/trainer");
        assert_eq!(image_name("kubetune/trainer@sha256:abc"), "kubetune/trainer");
        assert_eq!(image_name("kubetune/trainer:0.1@sha256:abc"), "kubetune/trainer");
        assert_eq!(image_name("localhost:5000/trainer"), "localhost:5000/trainer");
        assert_eq!(image_name("localhost:5000/trainer:v2"), "localhost:5000/trainer");
    }

    #[test]
    fn maps_images_ignoring_tags_on_both_sides() {
        let config =
            AgentConfig::parse("images:\n  kubetune/trainer: /bin/trainer\n  kubetune/server:latest: /bin/server\n")
                .expect("valid config");
        assert_eq!(
            config.binary_for("kubetune/trainer:dev"),
            Some(Path::new("/bin/trainer"))
        );
        assert_eq!(config.binary_for("kubetune/server"), Some(Path::new("/bin/server")));
        assert_eq!(config.binary_for("kubetune/other"), None);
    }

    #[test]
    fn empty_and_unknown_fields() {
        assert!(AgentConfig::parse("").expect("empty is fine").images.is_empty());
        assert!(AgentConfig::parse("imagez: {}").is_err());
    }
}
