//! The trainer's boundary to where inputs and outputs live. Today only local paths (plain or
//! `file://`); the kubetune-storage crate will plug object stores in here, so nothing else in
//! the trainer touches URIs.

use crate::error::{Result, TrainError};
use std::path::PathBuf;

/// Resolves a model, dataset or output location to a local path.
pub fn local_path(uri: &str, what: &str) -> Result<PathBuf> {
    if let Some(rest) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(rest));
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        return Err(TrainError::Config {
            path: what.into(),
            message: format!("`{uri}`: scheme {scheme}:// is not supported yet (local paths and file:// only)"),
        });
    }
    Ok(PathBuf::from(uri))
}
