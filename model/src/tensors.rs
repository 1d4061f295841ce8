//! Reading and writing named tensors as safetensors files, with errors naming the file.

use crate::error::{ModelError, Result};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Writes `tensors` with `{"format": "pt"}` metadata, which transformers/PEFT expect.
pub fn save(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let mut contiguous = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        contiguous.push((name.clone(), t.contiguous()?));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(contiguous.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata), path).map_err(|e| {
        ModelError::Weights {
            path: path.into(),
            source: candle_core::Error::wrap(e),
        }
    })
}

pub fn load(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let map = candle_core::safetensors::load(path, device).map_err(|source| ModelError::Weights {
        path: path.into(),
        source,
    })?;
    Ok(map.into_iter().collect())
}
