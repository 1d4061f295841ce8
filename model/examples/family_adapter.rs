//! Writes, for each family checkpoint named on the command line, the adapter the trainer would
//! save for it (`peft::save`, the trainer's own writer) into `<family>/adapter/`: rank 2 on all
//! seven projections (on Phi-3 written as its fused modules, of rank 6), with B drawn at random
//! rather than PEFT's zeros so the adapter changes the logits. `tests/reference/families.py peft` then loads each one in PEFT and records PEFT's
//! logits beside it; `tests/model/families.rs` holds ours to them. Run once, by hand, when a
//! family is added (the command is in families.py's doc); not a test.

use candle_core::Device;
use kubetune_model::{peft, Config, LoraAdapter, LoraConfig, TargetModule};
use rand::{Rng, SeedableRng};
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dirs: Vec<String> = std::env::args().skip(1).collect();
    if dirs.is_empty() {
        return Err("usage: family_adapter FAMILY_DIR...".into());
    }
    for dir in dirs {
        let dir = Path::new(&dir);
        let config = Config::from_model_dir(dir)?;
        let lora = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: TargetModule::ALL.to_vec(),
        };
        let (adapter, vars) = LoraAdapter::init_trainable(&config, lora, 11, &Device::Cpu)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        for v in vars.iter().filter(|v| v.name.contains("lora_B")) {
            let values: Vec<f32> = (0..v.var.elem_count()).map(|_| rng.random_range(-0.2..0.2)).collect();
            v.var
                .set(&candle_core::Tensor::from_vec(values, v.var.shape(), &Device::Cpu)?)?;
        }
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("family");
        peft::save(&dir.join("adapter"), &adapter, &config, name)?;
        println!("{}: adapter written", dir.display());
    }
    Ok(())
}
