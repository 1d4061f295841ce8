//! Where a training step's time goes on a device: the pieces of one decoder layer's forward and
//! backward, each timed alone, for comparison with the same pieces in PyTorch
//! (`e2e/gpu/layer_profile.py`, run beside it by `e2e/gpu/check.sh`).
//!
//! The H200 measured our whole step at 0.64x PEFT's speed without saying which piece is slow;
//! a GPU session is short, so the next one should come back with the answer. Each piece runs
//! through candle's graph exactly as the trainer's step runs it (bf16 base, f32 adapter, the
//! custom ops and their backwards), on a one-layer model generated with the given width. A
//! measurement, not a test: it only reports milliseconds.

use crate::attention::attention;
use crate::config::Activation;
use crate::error::Result;
use crate::gated::gated;
use crate::lora::{ActiveAdapter, LoraAdapter, LoraConfig, TargetModule};
use crate::lora_linear::Heads;
use crate::tiny::{write_tiny_model, TinySpec};
use crate::{load_model, BaseFormat, LoadOptions};
use candle_core::{DType, Device, Module, Tensor, Var};

/// The width of the layer profiled and the tokens it takes.
#[derive(Debug, Clone)]
pub struct ProfileShape {
    pub batch: usize,
    pub seq: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    /// LoRA rank on all seven projections.
    pub rank: usize,
    /// Rows of the head computed at once, as the trainer's `HEAD_ROWS`.
    pub head_rows: usize,
}

/// Milliseconds per forward and backward of each piece, on `device` in bf16, averaged over
/// `reps` runs after two unmeasured ones; the device is synchronised around each measurement.
pub fn layer_pieces(device: &Device, shape: &ProfileShape, reps: usize) -> Result<Vec<(&'static str, f64)>> {
    let dir = std::env::temp_dir().join(format!("kubetune-profile-{}", std::process::id()));
    let spec = TinySpec {
        vocab_size: shape.vocab,
        hidden_size: shape.hidden,
        intermediate_size: shape.intermediate,
        num_layers: 1,
        num_heads: shape.heads,
        num_kv_heads: shape.kv_heads,
        max_position_embeddings: shape.seq.max(16),
        ..TinySpec::default()
    };
    write_tiny_model(&dir, &spec)?;
    let options = LoadOptions {
        dtype: DType::BF16,
        ..LoadOptions::on(device.clone(), BaseFormat::Dense)
    };
    let loaded = load_model(&dir, &options);
    std::fs::remove_dir_all(&dir).ok();
    let (config, model) = loaded?;
    let lora = LoraConfig {
        r: shape.rank,
        alpha: 2.0 * shape.rank as f64,
        dropout: 0.0,
        target_modules: TargetModule::ALL.to_vec(),
    };
    let (adapter, _vars) = LoraAdapter::init_trainable(&config, lora, 7, device)?;
    let active = ActiveAdapter {
        adapter: &adapter,
        dropout_seed: None,
        first_row: 0,
    };
    let pieces = Pieces::new(&model, shape, device)?;
    let layer = &model.layers[0];
    let inputs = model.layer_inputs(0, shape.seq)?;
    let adapter = Some(&active);
    let heads = |n: usize, rotate: bool| Heads {
        batch: shape.batch,
        heads: n,
        head_dim: shape.hidden / shape.heads,
        rope: rotate.then(|| (inputs[0].cos.clone(), inputs[0].sin.clone())),
    };
    let p = &pieces;
    let scale = 1.0 / ((shape.hidden / shape.heads) as f64).sqrt();
    let mut out = Vec::new();
    let mut time = |name: &'static str, f: &dyn Fn() -> Result<()>| -> Result<()> {
        out.push((name, timed(device, reps, f)?));
        Ok(())
    };
    time("layer", &|| {
        p.back(layer.forward(&p.x, &inputs, None, adapter)?, &p.g_hidden)
    })?;
    time("rms_norm", &|| p.back(layer.input_norm.forward(&p.x)?, &p.g_hidden))?;
    time("q_proj_rope", &|| {
        p.back(
            layer.attn.q.forward_heads(&p.x, adapter, &heads(shape.heads, true))?,
            &p.g_q,
        )
    })?;
    time("o_proj", &|| p.back(layer.attn.o.forward(&p.x, adapter)?, &p.g_hidden))?;
    time("attention", &|| {
        p.back(
            attention(&p.q, &p.k, &p.v, inputs[0].mask.as_ref(), scale)?,
            &p.g_hidden,
        )
    })?;
    time("gate_proj", &|| {
        p.back(layer.mlp.gate.forward(&p.x, adapter)?, &p.g_inter)
    })?;
    time("down_proj", &|| {
        p.back(layer.mlp.down.forward(&p.h, adapter)?, &p.g_hidden)
    })?;
    time("gated_silu", &|| {
        p.back(gated(&p.gate, &p.up, Activation::Silu)?, &p.g_inter)
    })?;
    time("head_chunk", &|| {
        let rows =
            p.x.flatten_to(1)?
                .narrow(0, 0, shape.head_rows.min(shape.batch * shape.seq))?;
        let n = rows.dim(0)?;
        let targets = (p.targets.narrow(0, 0, n)?, p.weights.narrow(0, 0, n)?);
        model.head_chunk(&rows, &targets.0, &targets.1, 1.0, &model.head())?;
        Ok(())
    })?;
    Ok(out)
}

/// The inputs every piece reads, made once: the pieces' inputs are variables, so each
/// backward computes their gradients as inside a step.
struct Pieces {
    x: Tensor,
    h: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    up: Tensor,
    g_hidden: Tensor,
    g_inter: Tensor,
    g_q: Tensor,
    targets: Tensor,
    weights: Tensor,
}

impl Pieces {
    fn new(model: &crate::CausalLm, s: &ProfileShape, device: &Device) -> Result<Self> {
        let constant =
            |dims: &[usize]| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, dims, device)?.to_dtype(DType::BF16)?) };
        let var = |dims: &[usize]| -> Result<Tensor> { Ok(Var::from_tensor(&constant(dims)?)?.as_tensor().clone()) };
        let (b, t, d) = (s.batch, s.seq, s.hidden / s.heads);
        let rows = b * t;
        let targets: Vec<u32> = (0..rows).map(|i| (i * 31 % model.config().vocab_size) as u32).collect();
        Ok(Self {
            x: var(&[b, t, s.hidden])?,
            h: var(&[b, t, s.intermediate])?,
            q: var(&[b, s.heads, t, d])?,
            k: var(&[b, s.kv_heads, t, d])?,
            v: var(&[b, s.kv_heads, t, d])?,
            gate: var(&[b, t, s.intermediate])?,
            up: var(&[b, t, s.intermediate])?,
            g_hidden: constant(&[b, t, s.hidden])?,
            g_inter: constant(&[b, t, s.intermediate])?,
            g_q: constant(&[b, s.heads, t, d])?,
            targets: Tensor::from_vec(targets, rows, device)?,
            weights: Tensor::ones(rows, DType::F32, device)?,
        })
    }

    /// The backward of `y` against the output gradient `g`; the gradients are dropped.
    fn back(&self, y: Tensor, g: &Tensor) -> Result<()> {
        (y * g)?.sum_all()?.backward()?;
        Ok(())
    }
}

/// Milliseconds per call of `f`, after two unmeasured calls.
fn timed(device: &Device, reps: usize, f: &dyn Fn() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    device.synchronize()?;
    let start = std::time::Instant::now();
    for _ in 0..reps.max(1) {
        f()?;
    }
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1000.0 / reps.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every piece runs its forward and backward on a small shape and takes some time.
    #[test]
    fn every_piece_of_a_small_layer_runs_forward_and_backward() -> Result<()> {
        let shape = ProfileShape {
            batch: 2,
            seq: 16,
            hidden: 64,
            intermediate: 128,
            heads: 4,
            kv_heads: 2,
            vocab: 256,
            rank: 4,
            head_rows: 8,
        };
        let pieces = layer_pieces(&Device::Cpu, &shape, 1)?;
        let names: Vec<_> = pieces.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "layer",
                "rms_norm",
                "q_proj_rope",
                "o_proj",
                "attention",
                "gate_proj",
                "down_proj",
                "gated_silu",
                "head_chunk"
            ]
        );
        assert!(pieces.iter().all(|(_, ms)| *ms > 0.0), "{pieces:?}");
        Ok(())
    }
}
