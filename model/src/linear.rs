//! A frozen base projection plus, at forward time, an optional LoRA delta.
//!
//! The base weight's format (dense, NF4, int8) is one enum matched here; the quantized
//! formats own their products, built on [`crate::kernels`], and know nothing of projections.

use crate::error::Result;
use crate::int8::Int8Tensor;
use crate::kernels::matmul::{matmul_t, SMALL_ROWS};
use crate::lora::{ActiveAdapter, TargetModule};
use crate::lora_linear::LowRank;
use crate::nf4::Nf4Tensor;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Module, Shape, Storage, Tensor};
use candle_nn::VarBuilder;

/// The frozen weight of a projection, (out, in) as HF stores it. An enum so a quantized form
/// can sit beside the dense one without the layers knowing.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    Dense(Tensor),
    Nf4(Nf4Tensor),
    /// int8 with one scale per output row, for serving (see [`crate::int8`]).
    Int8(Int8Tensor),
}

impl BaseWeight {
    /// The weight as an f32-compatible dense tensor; quantized weights are expanded for this
    /// one use and dropped afterwards, so the base stays small in memory between uses.
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(w) => Ok(w.clone()),
            BaseWeight::Nf4(q) => q.dequantize(),
            BaseWeight::Int8(q) => q.dequantize(),
        }
    }

    /// `grad @ w` for `grad` (rows, out): the input's gradient of `x @ w^T`. A large NF4
    /// weight is expanded a slice at a time.
    pub(crate) fn grad_matmul(&self, grad: &Tensor) -> Result<Tensor> {
        match self {
            BaseWeight::Nf4(q) => q.grad_matmul(grad),
            _ => Ok(grad.matmul(&self.dense()?)?),
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

/// How the frozen base is held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseFormat {
    /// f32 weights (plain LoRA).
    #[default]
    Dense,
    /// NF4 with double quantization (QLoRA).
    Nf4,
    /// int8 with per-row scales, projections and head, for serving (see [`crate::int8`]).
    Int8,
}

impl BaseFormat {
    /// A projection's weight in this format, quantized as it loads so the f32 model is never
    /// whole in memory.
    pub(crate) fn store(self, dense: Tensor) -> Result<BaseWeight> {
        Ok(match self {
            BaseFormat::Dense => BaseWeight::Dense(dense),
            BaseFormat::Nf4 => BaseWeight::Nf4(Nf4Tensor::quantize(&dense)?),
            BaseFormat::Int8 => BaseWeight::Int8(Int8Tensor::quantize(&dense)?),
        })
    }

    /// The embedding table and an untied head in this format. NF4 quantizes them too (QLoRA
    /// as bitsandbytes does it keeps those two in 16 bits; at a small model's shapes they are
    /// most of what is left, 32 of 44 MiB in the benchmark's). int8 keeps the embedding
    /// lookup in f32 and quantizes the head after loading
    /// ([`crate::CausalLm::quantize_head_int8`]).
    pub(crate) fn store_table(self, dense: Tensor) -> Result<BaseWeight> {
        match self {
            BaseFormat::Nf4 => self.store(dense),
            BaseFormat::Dense | BaseFormat::Int8 => Ok(BaseWeight::Dense(dense)),
        }
    }
}

impl Projection {
    pub(crate) fn load(
        vb: &VarBuilder,
        format: BaseFormat,
        (fan_in, out): (usize, usize),
        bias: bool,
        layer: usize,
        module: TargetModule,
    ) -> Result<Self> {
        let vb = vb.pp(module.name());
        let weight = format.store(vb.get((out, fan_in), "weight")?)?;
        let bias = if bias { Some(vb.get(out, "bias")?) } else { None };
        Ok(Self {
            weight,
            bias,
            layer,
            module,
        })
    }

    /// `x` is (batch, seq, in); the result is (batch, seq, out).
    pub fn forward(&self, x: &Tensor, adapter: Option<&ActiveAdapter>) -> Result<Tensor> {
        let (b, t, fan_in) = x.dims3()?;
        let x2 = x.reshape((b * t, fan_in))?;
        // In a training graph, the projection and its pair are one op.
        let fused = self.trainable_pair(&x2, adapter);
        let mut y = match fused {
            Some(pair) => crate::lora_linear::lora_linear(&x2, &self.weight, pair)?,
            None => frozen_matmul(&x2, &self.weight)?,
        };
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let (Some(adapter), None) = (adapter, fused) {
            if let Some(delta) = adapter.delta(self.layer, self.module, &x2)? {
                y = (y + delta)?;
            }
        }
        let out = y.dim(1)?;
        Ok(y.reshape((b, t, out))?)
    }
}

impl Projection {
    /// This projection's pair in `adapter` as the training op uses it, when there is one and a
    /// graph to train it in (`x`, A or B tracked).
    fn trainable_pair<'a>(&self, x: &Tensor, adapter: Option<&'a ActiveAdapter>) -> Option<LowRank<'a>> {
        let (pair, scale, dropout) = adapter?.trainable_pair(self.layer, self.module)?;
        let tracked = x.track_op() || pair.a.track_op() || pair.b.track_op();
        tracked.then_some(LowRank {
            a: &pair.a,
            b: &pair.b,
            scale,
            dropout,
        })
    }

    /// `x` (batch, seq, in) projected into attention heads (batch, heads, seq, head_dim),
    /// rotated by `heads.rope` when given. In a training graph with a pair, one op
    /// ([`crate::lora_linear::lora_linear_heads`]); otherwise the projection, then the split
    /// and the rotation.
    pub(crate) fn forward_heads(
        &self,
        x: &Tensor,
        adapter: Option<&ActiveAdapter>,
        heads: &crate::lora_linear::Heads,
    ) -> Result<Tensor> {
        let (b, t, fan_in) = x.dims3()?;
        let x2 = x.reshape((b * t, fan_in))?;
        if let Some(pair) = self.trainable_pair(&x2, adapter) {
            return crate::lora_linear::lora_linear_heads(&x2, &self.weight, self.bias.as_ref(), pair, heads);
        }
        let split = self
            .forward(x, adapter)?
            .reshape((b, t, heads.heads, heads.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        match &heads.rope {
            Some((cos, sin)) => crate::rope::apply(&split, cos, sin),
            None => Ok(split),
        }
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
        let mut y = matmul_weight(x, &self.weight)?;
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

/// [`matmul_t`] for any base weight: an NF4 weight is expanded (a large one a slice of rows
/// at a time, [`crate::nf4::Nf4Tensor::matmul_t`]); an int8 weight multiplies in its own form
/// where [`crate::int8::Int8Tensor::matmul_t`] can, else it is expanded; a dense one as is.
pub(crate) fn matmul_weight(x: &Tensor, w: &BaseWeight) -> Result<Tensor> {
    if let BaseWeight::Nf4(q) = w {
        return q.matmul_t(x);
    }
    if let BaseWeight::Int8(q) = w {
        if let Some(y) = q.matmul_t(x, SMALL_ROWS)? {
            return Ok(y);
        }
    }
    matmul_t(x, &w.dense()?)
}

/// `x @ w^T` for `x` (rows, in) and a frozen weight (out, in), in a graph that trains adapters.
///
/// candle's matmul backward also computes the weight's gradient: a second product as large as
/// the forward one, into a weight-sized buffer, for every projection and the head, though the
/// base is frozen and nothing reads it. [`FrozenMatmul`] returns only the input's gradient.
/// Outside a graph (inference, or an input no variable feeds) it is a plain matmul.
pub(crate) fn frozen_matmul(x: &Tensor, weight: &BaseWeight) -> Result<Tensor> {
    if !x.track_op() {
        return matmul_weight(x, weight);
    }
    if let BaseWeight::Nf4(q) = weight {
        // Both products expand the weight as matmul_weight does, a slice of rows at a time when
        // it is large (the head): FrozenMatmul's forward sees only storage and would expand it
        // whole.
        let y = q.matmul_t(&x.detach())?;
        return Ok(crate::custom_grad::with_backward(
            x,
            y,
            FrozenBackward { weight: weight.clone() },
        )?);
    }
    Ok(x.apply_op1(FrozenMatmul { weight: weight.clone() })?)
}

/// The backward of [`frozen_matmul`] of an NF4 weight, which stays packed between the forward
/// and the backward pass and is expanded again for the backward product, so QLoRA never holds
/// the whole base expanded at once.
struct FrozenBackward {
    weight: BaseWeight,
}

impl crate::custom_grad::Backward for FrozenBackward {
    const NAME: &'static str = "frozen-nf4-matmul";

    /// d(x w^T)/dx = grad w; the weight gets no gradient.
    fn backward(&self, _x: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        self.weight
            .grad_matmul(&grad.contiguous()?)
            .map_err(candle_core::Error::wrap)
    }
}

/// The op behind [`frozen_matmul`] of a dense or int8 weight.
struct FrozenMatmul {
    weight: BaseWeight,
}

impl FrozenMatmul {
    fn forward<S: BackendStorage>(
        &self,
        x: &S,
        x_layout: &Layout,
        pick: impl Fn(&Storage) -> Option<&S>,
    ) -> candle_core::Result<(S, Shape)> {
        let w = self.weight.dense().map_err(candle_core::Error::wrap)?;
        let (storage, w_layout) = w.storage_and_layout();
        let w_storage = pick(&storage).ok_or_else(|| {
            candle_core::Error::Msg("frozen matmul: the weight is on another device than its input".into())
        })?;
        let (m, k) = x_layout.shape().dims2()?;
        let (n, k_w) = w_layout.shape().dims2()?;
        if k != k_w {
            return Err(candle_core::Error::Msg(format!(
                "frozen matmul: input has {k} features, the weight {k_w}"
            )));
        }
        let y = x.matmul(w_storage, (1, m, n, k), x_layout, &w_layout.transpose(0, 1)?)?;
        Ok((y, Shape::from((m, n))))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(x, layout, crate::custom_grad::cpu)
    }

    fn cuda_fwd(&self, x: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.forward(x, layout, crate::custom_grad::cuda)
    }

    fn metal_fwd(&self, x: &MetalStorage, layout: &Layout) -> candle_core::Result<(MetalStorage, Shape)> {
        self.forward(x, layout, crate::custom_grad::metal)
    }

    /// d(x w^T)/dx = grad w; the weight gets no gradient.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            self.weight
                .grad_matmul(&grad.contiguous()?)
                .map_err(candle_core::Error::wrap)?,
        ))
    }
}

/// RMSNorm written with basic ops: candle's fused kernel has no backward, and gradients must
/// flow through every norm to reach the adapters of earlier layers.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub(crate) weight: Tensor,
    pub(crate) eps: f64,
}

impl RmsNorm {
    pub(crate) fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }
}

/// `x` normed by `norm` when the family has that norm (q/k norms, Gemma's output norms), in
/// a training graph too; `x` itself otherwise.
pub(crate) fn norm_if_any(norm: &Option<RmsNorm>, x: Tensor) -> Result<Tensor> {
    match norm {
        Some(norm) => Ok(norm.forward(&x)?),
        None => Ok(x),
    }
}

/// As [`norm_if_any`], with the inference kernel (no backward).
pub(crate) fn norm_if_any_inference(norm: &Option<RmsNorm>, x: Tensor) -> Result<Tensor> {
    match norm {
        Some(norm) => norm.forward_inference(&x),
        None => Ok(x),
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
        if crate::kernels::fused::fusable(x) {
            return crate::kernels::fused::rms_norm(x, &self.weight, self.eps);
        }
        let y = candle_nn::ops::rms_norm(&x.detach().contiguous()?, &self.weight, self.eps as f32)?;
        crate::custom_grad::with_backward(
            x,
            y,
            RmsNormBackward {
                weight: self.weight.clone(),
                eps: self.eps,
            },
        )
    }
}

/// RMSNorm's backward in a training graph. The forward is candle's fused kernel (in f32 inside,
/// whatever the activations' dtype, as transformers' LlamaRMSNorm); the graph of the plain ops
/// kept four f32 copies of the input per norm, this keeps the input alone. The weight is frozen
/// and gets no gradient.
struct RmsNormBackward {
    weight: Tensor,
    eps: f64,
}

impl crate::custom_grad::Backward for RmsNormBackward {
    const NAME: &'static str = "rms-norm";

    /// With r = 1/sqrt(mean(x²) + eps) per row and u = g ∘ w: dx = r u − x r³ mean(u ∘ x), in f32.
    fn backward(&self, x: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        use candle_core::{DType, D};
        let x32 = x.to_dtype(DType::F32)?;
        let u = grad
            .to_dtype(DType::F32)?
            .broadcast_mul(&self.weight.to_dtype(DType::F32)?)?;
        let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let mean_ux = (&u * &x32)?.mean_keepdim(D::Minus1)?;
        let dx = (u.broadcast_mul(&r)? - x32.broadcast_mul(&(r.powf(3.0)? * mean_ux)?)?)?;
        dx.to_dtype(x.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::close;
    use candle_core::{DType, Device, Var};

    /// The op's forward and input gradient equal a plain matmul's, for a dense and an NF4 weight.
    #[test]
    fn frozen_matmul_matches_a_plain_matmul_in_value_and_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 64), &dev)?)?;
        let w = Tensor::randn(0f32, 1., (3, 64), &dev)?;
        let nf4 = crate::nf4::Nf4Tensor::quantize(&w)?;
        for (weight, dense) in [
            (BaseWeight::Dense(w.clone()), w.clone()),
            (BaseWeight::Nf4(nf4.clone()), nf4.dequantize()?),
        ] {
            let ours = frozen_matmul(x.as_tensor(), &weight)?;
            let plain = x.as_tensor().matmul(&dense.t()?)?;
            assert!(close(&ours, &plain));
            let g_ours = ours.sqr()?.sum_all()?.backward()?;
            let g_plain = plain.sqr()?.sum_all()?.backward()?;
            let (a, b) = (
                g_ours.get(x.as_tensor()).expect("grad"),
                g_plain.get(x.as_tensor()).expect("grad"),
            );
            assert!(close(a, b));
        }
        Ok(())
    }

    /// A weight large enough to be expanded in row slices (the head) gives the same value and
    /// input gradient as its whole expansion, in a graph and outside one; the last slice is
    /// partial.
    #[test]
    fn frozen_matmul_of_a_sliced_nf4_weight_matches_its_whole_expansion() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.02, (2100, 512), &dev)?;
        let nf4 = crate::nf4::Nf4Tensor::quantize(&w)?;
        assert!(nf4.is_sliced());
        let dense = nf4.dequantize()?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (7, 512), &dev)?)?;
        let ours = frozen_matmul(x.as_tensor(), &BaseWeight::Nf4(nf4.clone()))?;
        let plain = x.as_tensor().matmul(&dense.t()?)?;
        assert!(close(&ours, &plain));
        let g_ours = ours.sqr()?.sum_all()?.backward()?;
        let g_plain = plain.sqr()?.sum_all()?.backward()?;
        assert!(close(
            g_ours.get(x.as_tensor()).expect("grad"),
            g_plain.get(x.as_tensor()).expect("grad")
        ));
        let no_graph = frozen_matmul(&x.as_tensor().detach(), &BaseWeight::Nf4(nf4))?;
        assert!(!no_graph.track_op());
        assert!(close(&no_graph, &plain));
        Ok(())
    }

    /// On the GPU's path (bf16, codes expanded by tensor ops) an NF4 weight's product and input
    /// gradient in a graph equal those of its expansion, within bf16 rounding.
    #[test]
    fn frozen_matmul_of_an_nf4_weight_expanded_by_tensor_ops_matches_its_expansion() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.02, (300, 256), &dev)?.to_dtype(DType::BF16)?;
        let nf4 = crate::nf4::Nf4Tensor::quantize(&w)?;
        let dense = nf4.dequantize()?;
        assert_eq!(dense.dtype(), DType::BF16);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (7, 256), &dev)?.to_dtype(DType::BF16)?)?;
        let ours = frozen_matmul(x.as_tensor(), &BaseWeight::Nf4(nf4))?;
        let plain = x.as_tensor().matmul(&dense.t()?)?;
        let relative = |a: &Tensor, b: &Tensor| -> Result<f32> {
            let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
            Ok((&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()? / b.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        assert!(relative(&ours, &plain)? < 1e-2);
        let probe = Tensor::randn(0f32, 1., (7, 300), &dev)?.to_dtype(DType::BF16)?;
        let g_ours = (ours * &probe)?.sum_all()?.backward()?;
        let g_plain = (plain * &probe)?.sum_all()?.backward()?;
        let (a, b) = (g_ours.get(&x).expect("grad"), g_plain.get(&x).expect("grad"));
        assert!(relative(a, b)? < 1e-2, "input gradient off by {}", relative(a, b)?);
        Ok(())
    }

    /// Without a variable upstream there is no graph, and the plain matmul runs.
    #[test]
    fn frozen_matmul_of_a_constant_input_tracks_nothing() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 64), &dev)?;
        let y = frozen_matmul(&x, &BaseWeight::Dense(Tensor::randn(0f32, 1., (4, 64), &dev)?))?;
        assert!(!y.track_op());
        assert_eq!(y.dims(), &[2, 4]);
        Ok(())
    }
    /// The training op (fused forward, hand-written backward) against the norm built from plain
    /// ops, in f32: output and input gradient.
    #[test]
    fn the_rms_norm_backward_and_its_input_gradient_equal_the_plain_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 32), &dev)?)?;
        let weight = (Tensor::randn(0f32, 0.3, 32, &dev)? + 1.0)?;
        let eps = 1e-5;
        let plain = {
            let mean_sq = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
            x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?.broadcast_mul(&weight)?
        };
        let y = candle_nn::ops::rms_norm(&x.as_tensor().detach(), &weight, eps as f32)?;
        let op = crate::custom_grad::with_backward(x.as_tensor(), y, RmsNormBackward { weight, eps })?;
        assert!(close(&op, &plain));
        let w = Tensor::randn(0f32, 1.0, (6, 32), &dev)?;
        let g_plain = (plain * &w)?.sum_all()?.backward()?;
        let g_op = (op * &w)?.sum_all()?.backward()?;
        assert!(close(
            g_op.get(&x).expect("op gradient"),
            g_plain.get(&x).expect("plain gradient")
        ));
        Ok(())
    }
}
