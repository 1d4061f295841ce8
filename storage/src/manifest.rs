//! `manifest.json`: the record that makes an adapter version exist. It is written last, so its
//! presence means every file it lists was uploaded first; its sha256 is the version's digest.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;
use crate::error::{Result, StorageError};
use crate::names::{validate_adapter_name, validate_relative_path};

/// File name of the manifest inside `adapters/<name>/v<N>/`.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The version's model card (Hugging Face's name for it), listed and hashed like any other file.
pub const CARD_FILE: &str = "README.md";
/// Current manifest schema; bumped on incompatible changes.
pub const MANIFEST_SCHEMA: u32 = 1;

/// One file of the adapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: Sha256Digest,
    pub size: u64,
}

/// A model or dataset the adapter was trained from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceRef {
    pub uri: String,
    /// `sha256:<hex>` of the source when it was known at training time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Sha256Digest>,
}

/// Final training metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// The base model and the adapter judged on held-out data, when the job asked for it; here
    /// so readers of the registry need not parse the trainer's training_metrics.json. Absent
    /// in manifests written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<Evaluation>,
    /// Under DPO (`method: dpo`): the rewards of the last step's pairs and of the held-out
    /// pairs, as TRL logs them (`train_loss` and `eval_loss` are then DPO losses). The same
    /// numbers as the trainer's training_metrics.json (`dpo`), here for readers of the registry.
    /// Absent for other methods and in manifests written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoMetrics>,
}

/// A DPO run's rewards, on the training and on the held-out pairs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DpoMetrics {
    /// The last optimizer step's pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<DpoScores>,
    /// The held-out pairs after the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<DpoScores>,
}

/// Means over a set of preference pairs, TRL's `rewards/*` (a reward is `beta * (log pi -
/// log ref)` of an answer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpoScores {
    /// The DPO (or IPO) loss.
    pub loss: f64,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    /// Chosen minus rejected reward.
    pub rewards_margins: f64,
    /// The share of pairs whose chosen answer's reward is higher, 0 to 1.
    pub rewards_accuracies: f64,
    /// How many pairs the means are over.
    pub pairs: u64,
}

/// Base model against adapter on the same held-out examples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// How answers were scored (`exactMatch`, `contains`, `labelAccuracy`); absent when only
    /// the loss was evaluated. A string, so a newer trainer's metric still parses here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    pub examples: u32,
    pub base: ModelScores,
    pub adapter: ModelScores,
}

/// One model's results on the held-out examples.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelScores {
    /// Mean loss per answer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Fraction answered right under the metric, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
}

/// The FineTuneJob that produced the adapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Contents of `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub name: String,
    pub version: u32,
    /// Relative path → digest and size, for every file of the version except the manifest.
    pub files: BTreeMap<String, FileEntry>,
    pub base_model: SourceRef,
    pub dataset: SourceRef,
    /// Free-form: the trainer's hyperparameters as it reports them.
    pub hyperparameters: serde_json::Value,
    pub metrics: Metrics,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRef>,
    pub created_at: DateTime<Utc>,
}

impl Manifest {
    /// The canonical bytes stored in the registry (pretty JSON, so humans can read it).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(|e| StorageError::InvalidManifest {
            uri: format!("{}@{}", self.name, self.version),
            reason: format!("cannot serialise: {e}"),
        })
    }

    /// Parses manifest bytes read from `uri` and checks they belong at `name`/`version` and
    /// that every file name is safe to create locally (a registry is outside input too).
    pub fn parse(uri: &str, bytes: &[u8], name: &str, version: u32) -> Result<Self> {
        let m = Self::parse_unplaced(uri, bytes)?;
        if m.name != name || m.version != version {
            return Err(StorageError::InvalidManifest {
                uri: uri.to_string(),
                reason: format!("describes {}@{} but is stored at {name}@{version}", m.name, m.version),
            });
        }
        Ok(m)
    }

    /// Parses manifest bytes found outside a registry layout (a version directory named by
    /// URI, or one `kubetune-adapters pull` wrote): the same checks as [`parse`](Self::parse)
    /// except where it is stored, which such a location does not say.
    pub fn parse_unplaced(uri: &str, bytes: &[u8]) -> Result<Self> {
        let invalid = |reason: String| StorageError::InvalidManifest {
            uri: uri.to_string(),
            reason,
        };
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if m.schema != MANIFEST_SCHEMA {
            return Err(invalid(format!(
                "schema {} is not supported by this version of kubetune (supports {MANIFEST_SCHEMA})",
                m.schema
            )));
        }
        validate_adapter_name(&m.name).map_err(|e| invalid(e.to_string()))?;
        for file in m.files.keys() {
            validate_file_path(file).map_err(|e| invalid(e.to_string()))?;
        }
        Ok(m)
    }

    /// The digest of the manifest bytes: what FineTuneJob status reports and `name@sha256:…`
    /// resolves.
    pub fn digest_of(bytes: &[u8]) -> Sha256Digest {
        Sha256Digest::of(bytes)
    }
}

/// Checks a relative file path inside an adapter version (e.g. `adapter_model.safetensors` or
/// `tokenizer/vocab.json`). Rejects absolute paths, backslashes and any hostile segment.
pub fn validate_file_path(path: &str) -> Result<()> {
    const FIELD: &str = "adapter file path";
    validate_relative_path(FIELD, path)?;
    if path == MANIFEST_FILE {
        return Err(StorageError::invalid_name(
            FIELD,
            path,
            "manifest.json is written by the registry itself and cannot be an adapter file",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest as the registry wrote it before `metrics.dpo` existed.
    const OLD_MANIFEST: &str = r#"{
  "schema": 1,
  "name": "support-bot",
  "version": 3,
  "files": {"adapter_model.safetensors": {"sha256": "sha256:0000000000000000000000000000000000000000000000000000000000000000", "size": 4}},
  "base_model": {"uri": "hf://org/base"},
  "dataset": {"uri": "s3://data/pairs.jsonl"},
  "hyperparameters": {"method": "dpo"},
  "metrics": {"train_loss": 0.6, "eval_loss": 0.65},
  "created_at": "2025-01-01T00:00:00Z"
}"#;

    #[test]
    fn a_manifest_written_before_dpo_metrics_existed_still_parses_without_them() {
        let m = Manifest::parse("mem://v3/manifest.json", OLD_MANIFEST.as_bytes(), "support-bot", 3).expect("parses");
        assert_eq!(m.metrics.train_loss, Some(0.6));
        assert_eq!(m.metrics.dpo, None);
        // Nor does a manifest without them grow a `dpo` key when written again.
        let json: serde_json::Value = serde_json::from_slice(&m.to_bytes().expect("bytes")).expect("json");
        assert_eq!(
            json["metrics"],
            serde_json::json!({"train_loss": 0.6, "eval_loss": 0.65})
        );
    }

    #[test]
    fn dpo_rewards_are_written_under_metrics_and_read_back_unchanged() {
        let mut m =
            Manifest::parse("mem://v3/manifest.json", OLD_MANIFEST.as_bytes(), "support-bot", 3).expect("parses");
        let scores = |loss: f64, accuracies: f64, pairs: u64| DpoScores {
            loss,
            rewards_chosen: 0.25,
            rewards_rejected: -0.5,
            rewards_margins: 0.75,
            rewards_accuracies: accuracies,
            pairs,
        };
        m.metrics.dpo = Some(DpoMetrics {
            train: Some(scores(0.4, 0.9, 8)),
            eval: Some(scores(0.45, 0.8, 10)),
        });
        let bytes = m.to_bytes().expect("bytes");
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(
            json["metrics"]["dpo"]["eval"],
            serde_json::json!({"loss": 0.45, "rewards_chosen": 0.25, "rewards_rejected": -0.5,
                "rewards_margins": 0.75, "rewards_accuracies": 0.8, "pairs": 10}),
            "{json}"
        );
        let back = Manifest::parse("mem://v3/manifest.json", &bytes, "support-bot", 3).expect("reads back");
        assert_eq!(back, m);
    }

    #[test]
    fn file_paths_cannot_escape() {
        for ok in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "tok/vocab.json",
            "README.md",
        ] {
            assert!(validate_file_path(ok).is_ok(), "{ok} should be accepted");
        }
        let hostile = [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "./x",
            "a//b",
            "a/",
            "%2e%2e/x",
            "..%2fx",
            "a\\..\\x",
            ".claim",
            ".hidden/x",
            "manifest.json",
            "a/b/c/d/e/f/g/h/i",
        ];
        for bad in hostile {
            let err = validate_file_path(bad).expect_err(bad);
            assert!(err.to_string().contains("adapter file path"), "{bad}: {err}");
        }
    }
}
