//! A frozen base projection plus, at forward time, an optional LoRA delta.

use crate::error::Result;
use crate::lora::{ActiveAdapter, TargetModule};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

/// The frozen weight of a projection, (out, in) as HF stores it. An enum so a quantized form
/// can sit beside the dense one without the layers knowing.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    Dense(Tensor),
    Nf4(crate::nf4::Nf4Tensor),
}

impl BaseWeight {
    /// The weight as an f32-compatible dense tensor; quantized weights are expanded for this
    /// one use and dropped afterwards, so the base stays small in memory between uses.
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(w) => Ok(w.clone()),
            BaseWeight::Nf4(q) => q.dequantize(),
        }
    }
}

/// One projection of a decoder layer, knowing its place so it can find its adapter pair.
#[derive(Debug, Clone)]
pub struct Projection {
    pub weight: BaseWeight,
    pub bias: Option<Tensor>,
    pub layer: usize,
    pub module: TargetModule,
}

/// How the loader turns a dense weight into the form kept in memory.
pub trait WeightStore {
    fn store(&self, dense: Tensor) -> Result<BaseWeight>;
}

/// Keeps weights dense (plain LoRA).
pub struct DenseStore;

impl WeightStore for DenseStore {
    fn store(&self, dense: Tensor) -> Result<BaseWeight> {
        Ok(BaseWeight::Dense(dense))
    }
}

impl Projection {
    pub(crate) fn load(
        vb: &VarBuilder,
        store: &dyn WeightStore,
        (fan_in, out): (usize, usize),
        bias: bool,
        layer: usize,
        module: TargetModule,
    ) -> Result<Self> {
        let vb = vb.pp(module.name());
        let weight = store.store(vb.get((out, fan_in), "weight")?)?;
        let bias = if bias { Some(vb.get(out, "bias")?) } else { None };
        Ok(Self { weight, bias, layer, module })
    }

    /// `x` is (batch, seq, in); the result is (batch, seq, out).
    pub fn forward(&self, x: &Tensor, adapter: Option<&ActiveAdapter>) -> Result<Tensor> {
        let (b, t, fan_in) = x.dims3()?;
        let x2 = x.reshape((b * t, fan_in))?;
        let w = self.weight.dense()?;
        let mut y = x2.matmul(&w.t()?)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let Some(adapter) = adapter {
            if let Some(delta) = adapter.delta(self.layer, self.module, &x2)? {
                y = (y + delta)?;
            }
        }
        let out = y.dim(1)?;
        Ok(y.reshape((b, t, out))?)
    }
}

/// RMSNorm written with basic ops: candle's fused kernel has no backward, and gradients must
/// flow through every norm to reach the adapters of earlier layers.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub(crate) fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean_sq = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = x.broadcast_div(&(mean_sq + self.eps)?.sqrt()?)?;
        normed.broadcast_mul(&self.weight)
    }
}
