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

/// An adapter on all seven projections whose B is random, so the delta is not zero. The
/// values are the same in every run (candle's own random tensors cannot be seeded), so a
/// test's tolerances hold for the values it was measured with.
pub fn random_adapter(config: &Config, r: usize, alpha: f64, dropout: f64) -> (LoraAdapter, Vec<NamedVar>) {
    let lora = LoraConfig {
        r,
        alpha,
        dropout,
        target_modules: TargetModule::ALL.to_vec(),
    };
    let (adapter, vars) = LoraAdapter::init_trainable(config, lora, 7, &Device::Cpu).expect("adapter");
    for (i, v) in vars.iter().enumerate() {
        if v.name.contains("lora_B") {
            set_random(&v.var, 0.1, i as u64);
        }
    }
    (adapter, vars)
}

/// Sets `var` to uniform values of standard deviation `std` drawn from a stream seeded by `seed`.
pub fn set_random(var: &Var, std: f64, seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let half_width = (std * 3f64.sqrt()) as f32;
    let values: Vec<f32> = (0..var.elem_count())
        .map(|_| rng.random_range(-half_width..half_width))
        .collect();
    let t = Tensor::from_vec(values, var.shape(), &Device::Cpu).expect("values");
    var.set(&t).expect("set var");
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flatten")
        .max(0)
        .expect("max")
        .to_scalar()
        .expect("scalar")
}

pub fn ids(values: &[u32]) -> Tensor {
    Tensor::new(values, &Device::Cpu)
        .expect("ids")
        .unsqueeze(0)
        .expect("batch")
}
