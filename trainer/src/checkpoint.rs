//! Checkpoints: `<output>/checkpoints/step-N/` with the adapter (a pair per projection, which is
//! PEFT's layout for every family but Phi-3: see `peft::save_per_projection`), the optimizer
//! moments and trainer_state.json. Written to a temporary directory and renamed, so a pod
//! killed mid-write never leaves a half checkpoint that a retry would resume from.

use crate::error::{Result, TrainError};
use candle_core::{Device, Tensor};
use kubetune_model::{peft, tensors, LoraAdapter};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "trainer_state.json";

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossPoint {
    pub step: u64,
    pub loss: f64,
}

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainerState {
    pub step: u64,
    /// Micro-batches consumed; with the seed this fixes the data position.
    pub micro_batches: u64,
    pub tokens: u64,
    pub elapsed_secs: f64,
    pub train_history: Vec<LossPoint>,
    pub eval_history: Vec<LossPoint>,
    /// The settings that shape the trajectory; a resume with different ones is refused.
    pub fingerprint: String,
}

fn root(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

pub fn save(
    output: &Path,
    adapter: &LoraAdapter,
    base_model: &str,
    optimizer: &BTreeMap<String, Tensor>,
    state: &TrainerState,
) -> Result<PathBuf> {
    let root = root(output);
    let final_dir = root.join(format!("step-{}", state.step));
    let tmp = root.join(format!(".tmp-step-{}", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(TrainError::io(&tmp))?;
    }
    // A pair per projection, as the optimizer state: what a resumed run reads back.
    peft::save_per_projection(&tmp, adapter, base_model)?;
    tensors::save(&tmp.join(OPTIMIZER), optimizer)?;
    let json = serde_json::to_string_pretty(state).map_err(|e| TrainError::Checkpoint {
        path: tmp.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(tmp.join(STATE), json).map_err(TrainError::io(tmp.join(STATE)))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(TrainError::io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(TrainError::io(&final_dir))?;
    // Older checkpoints are superseded; keeping only the newest bounds disk use.
    for (_, dir) in list(output)? {
        if dir != final_dir {
            std::fs::remove_dir_all(&dir).map_err(TrainError::io(&dir))?;
        }
    }
    Ok(final_dir)
}

/// Complete checkpoints under `output`, oldest first.
pub fn list(output: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = root(output);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root).map_err(TrainError::io(&root))? {
        let entry = entry.map_err(TrainError::io(&root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

pub struct Loaded {
    pub adapter_tensors: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
    pub state: TrainerState,
}

pub fn load(dir: &Path, device: &Device) -> Result<Loaded> {
    let bad = |message: String| TrainError::Checkpoint {
        path: dir.into(),
        message,
    };
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(TrainError::io(&state_path))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| bad(format!("{STATE}: {e}")))?;
    Ok(Loaded {
        adapter_tensors: tensors::load(&dir.join(peft::ADAPTER_WEIGHTS), device)?,
        optimizer: tensors::load(&dir.join(OPTIMIZER), device)?,
        state,
    })
}
