//! Loading a model directory in HF layout: config.json plus model.safetensors, or shards listed
//! in model.safetensors.index.json.

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::model::CausalLm;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub use crate::linear::BaseFormat;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub base: BaseFormat,
    /// The dtype of the dense weights (and so of the activations); an NF4 or int8 base expands
    /// to it. [`LoadOptions::on`] picks the device's own ([`crate::device::base_dtype`]).
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self::on(Device::Cpu, BaseFormat::Dense)
    }
}

impl LoadOptions {
    /// `base` on `device`, in that device's dtype: bf16 on a GPU, f32 on the CPU.
    pub fn on(device: Device, base: BaseFormat) -> Self {
        let dtype = crate::device::base_dtype(&device);
        Self { device, base, dtype }
    }
}

/// The safetensors files of a model directory, in a stable order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(ModelError::NoWeights { dir: dir.into() });
    }
    let text = std::fs::read_to_string(&index).map_err(ModelError::io(&index))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: index.clone(),
        source,
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::InvalidConfig {
            path: index.clone(),
            field: "weight_map".into(),
            reason: "missing or not an object".into(),
        })?;
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| ModelError::InvalidConfig {
            path: index.clone(),
            field: format!("weight_map.{tensor}"),
            reason: "not a file name".into(),
        })?;
        files.insert(dir.join(file));
    }
    Ok(files.into_iter().collect())
}

/// Reads config.json (with generation_config.json's stop tokens) and the weights of `dir`.
pub fn load_model(dir: &Path, options: &LoadOptions) -> Result<(Config, CausalLm)> {
    let config = Config::from_model_dir(dir)?;
    let files = weight_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; like every safetensors loader we rely on
    // nobody rewriting a model file while it is loaded.
    let mapped = unsafe { crate::mapped::MappedSafetensors::open(&files) }.map_err(|source| ModelError::Weights {
        path: dir.into(),
        source,
    })?;
    // Phi-3's fused projections are served to the model as the parts it holds.
    let backend = crate::fused::split_fused(Box::new(mapped), &config);
    // NF4 quantizes the checkpoint's own values (read in f32), then expands to the wanted dtype.
    let read_as = match options.base {
        BaseFormat::Dense => options.dtype,
        BaseFormat::Nf4 | BaseFormat::Int8 => DType::F32,
    };
    let vb = VarBuilder::from_backend(backend, read_as, options.device.clone());
    let model = match options.base {
        BaseFormat::Dense => CausalLm::load(vb, &config, BaseFormat::Dense),
        BaseFormat::Nf4 => CausalLm::load(vb, &config, BaseFormat::Nf4).and_then(|m| m.with_dtype(options.dtype)),
        BaseFormat::Int8 if options.dtype != DType::F32 => Err(ModelError::Quantize(format!(
            "an int8 base is held in f32 (CPU serving), not {:?}",
            options.dtype
        ))),
        BaseFormat::Int8 => CausalLm::load(vb, &config, BaseFormat::Int8).and_then(|mut m| {
            m.quantize_head_int8()?;
            Ok(m)
        }),
    }
    .map_err(|e| match e {
        ModelError::Candle(source) => ModelError::Weights {
            path: dir.into(),
            source,
        },
        other => other,
    })?;
    Ok((config, model))
}
