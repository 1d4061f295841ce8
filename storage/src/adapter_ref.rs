//! `AdapterRef`: how users name an adapter version: `name`, `name@latest`, `name@3`,
//! `name@sha256:<hex>`.

use std::fmt;
use std::str::FromStr;

use crate::digest::Sha256Digest;
use crate::error::{Result, StorageError};
use crate::names::validate_adapter_name;

/// Which version of an adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionSelector {
    /// The highest published version.
    Latest,
    /// Version N (N ≥ 1).
    Number(u32),
    /// The version whose manifest has this digest.
    Digest(Sha256Digest),
}

/// A reference to an adapter version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterRef {
    pub name: String,
    pub version: VersionSelector,
}

const FORMS: &str = "expected name, name@latest, name@<N> (N >= 1) or name@sha256:<64 hex digits>";

impl FromStr for AdapterRef {
    type Err = StorageError;

    fn from_str(s: &str) -> Result<Self> {
        let (name, selector) = match s.split_once('@') {
            Some((n, sel)) => (n, Some(sel)),
            None => (s, None),
        };
        validate_adapter_name(name)?;
        let bad = |reason: String| StorageError::invalid_name("adapter reference", s, reason);
        let version = match selector {
            None | Some("latest") => VersionSelector::Latest,
            Some(sel) if sel.starts_with("sha256:") => {
                VersionSelector::Digest(Sha256Digest::parse("adapter reference digest", sel)?)
            }
            // Digits only: no sign, no leading zeros (so `3` and `03` are not two spellings).
            Some(sel) if !sel.is_empty() && sel.chars().all(|c| c.is_ascii_digit()) && !sel.starts_with('0') => {
                VersionSelector::Number(
                    sel.parse()
                        .map_err(|_| bad(format!("version {sel} is too large; {FORMS}")))?,
                )
            }
            Some(sel) => return Err(bad(format!("version {sel:?} not understood; {FORMS}"))),
        };
        Ok(AdapterRef {
            name: name.to_string(),
            version,
        })
    }
}

impl fmt::Display for AdapterRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            VersionSelector::Latest => write!(f, "{}@latest", self.name),
            VersionSelector::Number(n) => write!(f, "{}@{n}", self.name),
            VersionSelector::Digest(d) => write!(f, "{}@{d}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_forms() {
        let d = Sha256Digest::of(b"x");
        let cases = [
            ("bot", VersionSelector::Latest),
            ("bot@latest", VersionSelector::Latest),
            ("bot@3", VersionSelector::Number(3)),
            (&format!("bot@{d}") as &str, VersionSelector::Digest(d.clone())),
        ];
        for (s, v) in cases {
            let r: AdapterRef = s.parse().unwrap();
            assert_eq!((r.name.as_str(), r.version), ("bot", v), "{s}");
        }
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "bot@",
            "bot@0",
            "bot@03",
            "bot@-1",
            "bot@v3",
            "bot@99999999999",
            "bot@sha256:abc",
            "Bot@1",
            "../x@1",
            "a@1@2",
        ] {
            assert!(bad.parse::<AdapterRef>().is_err(), "{bad} should be rejected");
        }
    }
}
