//! HF PEFT adapter directories: adapter_config.json + adapter_model.safetensors.
//!
//! The layout is PEFT's for the base model's family: a pair per projection, except on Phi-3,
//! whose checkpoints (and so PEFT) have fused modules (see `fused_adapter.rs`).

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::fused::fused_modules;
use crate::lora::{LoraAdapter, LoraConfig, TargetModule};
use crate::tensors;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The fields of PEFT's LoraConfig that we write and honour. Fields PEFT has that would change
/// the maths (DoRA, rsLoRA, per-layer ranks, trained biases) are read so they can be refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: serde_json::Value,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default = "none")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    #[serde(default = "init_true")]
    pub init_lora_weights: serde_json::Value,
}

fn none() -> String {
    "none".into()
}
fn init_true() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

impl PeftConfig {
    pub fn from_lora(config: &LoraConfig, base_model: &str) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: config.r,
            lora_alpha: config.alpha,
            lora_dropout: config.dropout,
            target_modules: config
                .target_modules
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .into(),
            base_model_name_or_path: Some(base_model.into()),
            bias: none(),
            fan_in_fan_out: false,
            inference_mode: true,
            use_rslora: false,
            use_dora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            modules_to_save: None,
            layers_to_transform: None,
            init_lora_weights: init_true(),
        }
    }

    /// The LoRA settings, or an error naming the first field we cannot honour.
    pub fn to_lora(&self, path: &Path) -> Result<LoraConfig> {
        let bad = |field: &str, reason: String| ModelError::InvalidConfig {
            path: path.into(),
            field: field.into(),
            reason,
        };
        if self.peft_type != "LORA" {
            return Err(bad("peft_type", format!("`{}` is not LORA", self.peft_type)));
        }
        let unsupported = [
            ("use_dora", self.use_dora),
            ("use_rslora", self.use_rslora),
            ("fan_in_fan_out", self.fan_in_fan_out),
            ("rank_pattern", !self.rank_pattern.is_empty()),
            ("alpha_pattern", !self.alpha_pattern.is_empty()),
            (
                "modules_to_save",
                self.modules_to_save.as_ref().is_some_and(|v| !v.is_null()),
            ),
            (
                "layers_to_transform",
                self.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()),
            ),
            ("bias", self.bias != "none"),
        ];
        if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(bad(field, "is set, which this runtime does not support".into()));
        }
        let names = self.target_modules.as_array().ok_or_else(|| {
            bad(
                "target_modules",
                "must be a list of module names (a regex is not supported)".into(),
            )
        })?;
        let mut target_modules = Vec::new();
        for n in names {
            let name = n.as_str().unwrap_or_default();
            let m = TargetModule::from_name(name).ok_or_else(|| {
                bad(
                    "target_modules",
                    format!("unknown module {n} (expected q_proj .. down_proj)"),
                )
            })?;
            target_modules.push(m);
        }
        target_modules.sort();
        let config = LoraConfig {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules,
        };
        config
            .validate()
            .map_err(|e| bad("r/lora_dropout/target_modules", e.to_string()))?;
        Ok(config)
    }
}

/// Writes the adapter in PEFT's layout for `model` into `dir` (created if needed): a pair per
/// projection, except on Phi-3, whose fused modules PEFT targets (see `fused_adapter.rs`).
pub fn save(dir: &Path, adapter: &LoraAdapter, model: &Config, base_model: &str) -> Result<()> {
    if fused_modules(model).is_empty() {
        return save_per_projection(dir, adapter, base_model);
    }
    let (config, tensors) = crate::fused_adapter::fuse(adapter, model, base_model)?;
    write(dir, &config, &tensors)
}

/// Writes the adapter with a pair per projection whatever the family: PEFT's layout for every
/// family but Phi-3, and the one [`LoraAdapter::from_peft_tensors`] reads back as it was
/// written. The trainer's checkpoints use it: their optimizer moments are per projection.
pub fn save_per_projection(dir: &Path, adapter: &LoraAdapter, base_model: &str) -> Result<()> {
    write(
        dir,
        &PeftConfig::from_lora(&adapter.config, base_model),
        &adapter.to_peft_tensors(),
    )
}

fn write(dir: &Path, config: &PeftConfig, weights: &BTreeMap<String, Tensor>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(ModelError::io(dir))?;
    let config_path = dir.join(ADAPTER_CONFIG);
    let json = serde_json::to_string_pretty(config).map_err(|source| ModelError::Json {
        path: config_path.clone(),
        source,
    })?;
    std::fs::write(&config_path, json).map_err(ModelError::io(&config_path))?;
    tensors::save(&dir.join(ADAPTER_WEIGHTS), weights)
}

/// Reads a PEFT adapter directory (ours or one PEFT wrote) for `model`; the adapter holds a
/// pair per projection whatever the layout. The config is returned as the file has it.
pub fn load(dir: &Path, model: &Config, device: &Device) -> Result<(PeftConfig, LoraAdapter)> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&config_path).map_err(ModelError::io(&config_path))?;
    let peft: PeftConfig = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: config_path.clone(),
        source,
    })?;
    let lora = if fused_modules(model).is_empty() {
        peft.to_lora(&config_path)?
    } else {
        crate::fused_adapter::split_targets(&peft, model, &config_path)?.to_lora(&config_path)?
    };
    let weights = dir.join(ADAPTER_WEIGHTS);
    let tensors = tensors::load(&weights, device)?;
    let adapter = crate::fused_adapter::split_tensors(tensors, &lora, model)
        .and_then(|tensors| LoraAdapter::from_peft_tensors(model, lora, tensors))
        .map_err(|e| ModelError::Adapter(format!("{}: {e}", weights.display())))?;
    Ok((peft, adapter))
}
