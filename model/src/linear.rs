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

/// Which rows of a decode batch use which adapter. Rows of the same adapter are one group, so
/// the low-rank product runs once per adapter, not once per row; rows without an adapter are
/// in no group and get no delta.
pub(crate) struct RowGroups<'a> {
    pub groups: Vec<RowGroup<'a>>,
}

pub(crate) struct RowGroup<'a> {
    pub adapter: ActiveAdapter<'a>,
    /// The rows (u32 indices into the batch), or None when the group is the whole batch.
    pub rows: Option<Tensor>,
}

impl Projection {
    /// `x` is (rows, in), one row per sequence of a decode batch; the result is (rows, out).
    /// The base weight is read once for all rows; each adapter group adds its own delta.
    pub(crate) fn forward_rows(&self, x: &Tensor, groups: &RowGroups) -> Result<Tensor> {
        let w = self.weight.dense()?;
        let mut y = x.matmul(&w.t()?)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        for g in &groups.groups {
            match &g.rows {
                None => {
                    if let Some(delta) = g.adapter.delta(self.layer, self.module, x)? {
                        y = (y + delta)?;
                    }
                }
                Some(rows) => {
                    let xs = x.index_select(rows, 0)?;
                    if let Some(delta) = g.adapter.delta(self.layer, self.module, &xs)? {
                        y = y.index_add(rows, &delta, 0)?;
                    }
                }
            }
        }
        Ok(y)
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

impl RmsNorm {
    /// candle's fused kernel: one pass instead of five ops, for inference where no gradient
    /// is taken.
    pub(crate) fn forward_inference(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)?)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean_sq = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = x.broadcast_div(&(mean_sq + self.eps)?.sqrt()?)?;
        normed.broadcast_mul(&self.weight)
    }
}
