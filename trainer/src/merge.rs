//! `output.merge`: the base model with the adapter folded into its weights, in HF layout, as
//! PEFT's `merge_and_unload` makes it: each adapted projection becomes `W + alpha/r · B·A`, every
//! other tensor and file is the base model's own.
//!
//! The sum is taken in f32 and stored in the base tensor's dtype (bf16 stays bf16, as PEFT
//! keeps it). The base files are read from disk, never from the training run's in-memory
//! model, so a 4-bit training base is not what gets merged: the operator and the schema refuse
//! merge for qlora and 4-bit dpo for that reason. A GGUF base is merged into its f32 import,
//! which is the model the adapter was trained on.

use crate::error::{Result, TrainError};
use candle_core::{DType, Device};
use kubetune_model::{peft, Config, LoraAdapter};
use std::path::Path;

/// Writes the merge of the adapter in `adapter_dir` into the HF model in `model_dir` to `out`
/// (created): every safetensors file rewritten with the adapted projections, every other file
/// of the model copied. Returns how many projections were merged.
pub fn merge_into_base(model_dir: &Path, adapter_dir: &Path, out: &Path) -> Result<usize> {
    let config = Config::from_model_dir(model_dir)?;
    if config.model_type == "phi3" {
        // Phi-3 fuses q/k/v and gate/up into one tensor each; folding per-projection pairs
        // into row blocks of those is not implemented yet.
        return Err(TrainError::Config {
            path: "output.merge".into(),
            message: "merging into a Phi-3 model (fused qkv_proj and gate_up_proj) is not supported yet".into(),
        });
    }
    let (_, adapter) = peft::load(adapter_dir, &config, &Device::Cpu)?;
    std::fs::create_dir_all(out).map_err(TrainError::io(out))?;
    let weights = kubetune_model::load::weight_files(model_dir)?;
    let mut merged = 0;
    for file in &weights {
        merged += merge_file(file, &adapter, &out.join(file_name(file)?))?;
    }
    let expected = adapter.pairs().count();
    if merged != expected {
        return Err(TrainError::Config {
            path: "output.merge".into(),
            message: format!("merged {merged} projections of the base model, but the adapter has {expected}"),
        });
    }
    copy_other_files(model_dir, out)?;
    Ok(merged)
}

/// Rewrites one safetensors file with every adapted projection in it merged; how many were.
fn merge_file(file: &Path, adapter: &LoraAdapter, out: &Path) -> Result<usize> {
    let mut tensors = kubetune_model::tensors::load(file, &Device::Cpu)?;
    let scale = adapter.config.scale();
    let mut merged = 0;
    for (&(layer, module), pair) in adapter.pairs() {
        let suffix = format!("layers.{layer}.{}.{}.weight", module.parent(), module.name());
        let Some(name) = tensors.keys().find(|k| k.ends_with(&suffix)).cloned() else {
            continue;
        };
        let base = &tensors[&name];
        let delta = (pair.b.matmul(&pair.a)? * scale)?;
        let sum = (base.to_dtype(DType::F32)? + delta)?.to_dtype(base.dtype())?;
        tensors.insert(name, sum);
        merged += 1;
    }
    kubetune_model::tensors::save(out, &tensors)?;
    Ok(merged)
}

/// Copies config.json, the tokenizer files, the shard index and whatever else the model
/// directory holds besides its weights, so the merged model loads as the base did.
fn copy_other_files(model_dir: &Path, out: &Path) -> Result<()> {
    let entries = std::fs::read_dir(model_dir).map_err(TrainError::io(model_dir))?;
    for entry in entries {
        let entry = entry.map_err(TrainError::io(model_dir))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().map_err(TrainError::io(&path))?.is_file();
        // Hidden files are caches and markers of the download, not part of the model.
        if !is_file || name.starts_with('.') || name.ends_with(".safetensors") {
            continue;
        }
        std::fs::copy(&path, out.join(&name)).map_err(TrainError::io(&path))?;
    }
    Ok(())
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| TrainError::Config {
            path: path.display().to_string(),
            message: "a weight file without a name".into(),
        })
}
