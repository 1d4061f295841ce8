#![allow(dead_code)]
//! Shared helpers: a tiny model written into a temp dir, and an adapter with non-zero B.

use candle_core::{Device, Tensor, Var};
use kubetune_model::lora::NamedVar;
use kubetune_model::tiny::{write_tiny_model, TinySpec};
use kubetune_model::{load_model, CausalLm, Config, LoadOptions, LoraAdapter, LoraConfig, TargetModule};

pub struct Tiny {
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub model: CausalLm,
}

pub fn tiny() -> Tiny {
    let dir = tempfile::tempdir().expect("temp dir");
    write_tiny_model(dir.path(), &TinySpec::default()).expect("tiny model");
    let (config, model) = load_model(dir.path(), &LoadOptions::default()).expect("load tiny model");
    Tiny { dir, config, model }
}

/// An adapter on all seven projections whose B is random, so the delta is not zero.
pub fn random_adapter(config: &Config, r: usize, alpha: f64, dropout: f64) -> (LoraAdapter, Vec<NamedVar>) {
    let lora = LoraConfig { r, alpha, dropout, target_modules: TargetModule::ALL.to_vec() };
    let (adapter, vars) = LoraAdapter::init_trainable(config, lora, 7, &Device::Cpu).expect("adapter");
    for v in &vars {
        if v.name.contains("lora_B") {
            set_random(&v.var, 0.1);
        }
    }
    (adapter, vars)
}

pub fn set_random(var: &Var, std: f64) {
    let t = Tensor::randn(0f32, std as f32, var.shape(), &Device::Cpu).expect("randn");
    var.set(&t).expect("set var");
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).expect("sub").abs().expect("abs").flatten_all().expect("flatten").max(0).expect("max").to_scalar().expect("scalar")
}

pub fn ids(values: &[u32]) -> Tensor {
    Tensor::new(values, &Device::Cpu).expect("ids").unsqueeze(0).expect("batch")
}
