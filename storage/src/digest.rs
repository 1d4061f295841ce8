//! `sha256:<hex>` digests: how files, manifests and models are identified and verified.

use std::fmt;
use std::path::Path;

use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

use crate::error::{Result, StorageError};

/// A sha256 digest, written `sha256:<64 lowercase hex digits>` (the OCI convention).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Digest(String);

impl Sha256Digest {
    /// Parses `sha256:<hex>`; the error names the field and the expected form.
    pub fn parse(field: &'static str, value: &str) -> Result<Self> {
        let hex = value.strip_prefix("sha256:").ok_or_else(|| {
            StorageError::invalid_name(field, value, "digest must be written sha256:<64 lowercase hex digits>")
        })?;
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
            return Err(StorageError::invalid_name(
                field,
                value,
                "digest must be written sha256:<64 lowercase hex digits>",
            ));
        }
        Ok(Self(value.to_string()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    pub(crate) fn from_hasher(hasher: Sha256) -> Self {
        Self(format!("sha256:{}", hex::encode(hasher.finalize())))
    }

    /// The bare hex part.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The digest of a local file, read in chunks so large files need no memory.
    pub async fn of_file(path: &Path) -> Result<Self> {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| StorageError::io("opening", path, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| StorageError::io("reading", path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(Self::from_hasher(hasher))
    }

    /// Errors with [`StorageError::DigestMismatch`] naming `uri` unless `actual == self`.
    pub fn verify(&self, uri: &str, actual: &Sha256Digest) -> Result<()> {
        if self == actual {
            Ok(())
        } else {
            Err(StorageError::DigestMismatch {
                uri: uri.to_string(),
                expected: self.to_string(),
                actual: actual.to_string(),
            })
        }
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Sha256Digest {
    type Error = StorageError;
    fn try_from(value: String) -> Result<Self> {
        Self::parse("digest", &value)
    }
}

impl From<Sha256Digest> for String {
    fn from(d: Sha256Digest) -> String {
        d.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let d = Sha256Digest::of(b"");
        assert_eq!(
            d.hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Sha256Digest::parse("digest", &d.to_string()).unwrap(), d);
        for bad in [
            "e3b0",
            "sha256:XYZ",
            "sha512:e3b0",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(Sha256Digest::parse("digest", bad).is_err(), "{bad}");
        }
    }
}
