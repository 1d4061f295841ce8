//! A projection with its LoRA pair as one op of the training graph: `x Wᵀ + s (x Aᵀ) Bᵀ`.
//!
//! Built from separate ops, candle's graph keeps every op's inputs until the backward pass:
//! per projection the base product, the f32 delta (an output-sized f32 tensor), its bf16 copy
//! and the f32 copy of the input. PyTorch's autograd, with PEFT, keeps only what the backward
//! reads. This op keeps its three inputs (the input x, shared with its other consumers, and the
//! small A and B) and computes the rest again in the backward. The base weight stays as stored
//! (NF4 is expanded per product); the adapter runs in its own dtype (f32), as PEFT's mixed
//! precision does. Dropout keeps the separate ops, since its mask would have to be kept or drawn
//! again.

use crate::error::Result;
use crate::linear::{matmul_weight, BaseWeight};
use candle_core::Tensor;

/// `x Wᵀ + scale (x Aᵀ) Bᵀ` for `x` (rows, in), `a` (r, in) and `b` (out, r), in x's dtype;
/// differentiable in x, a and b.
pub(crate) fn lora_linear(x: &Tensor, weight: &BaseWeight, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let base = matmul_weight(&x.detach(), weight)?;
    let low = (x.detach().to_dtype(a.dtype())?.matmul(&a.detach().t()?)? * scale)?;
    let out = (base + low.matmul(&b.detach().t()?)?.to_dtype(x.dtype())?)?;
    Ok(crate::custom_grad::with_backward3(
        [x, a, b],
        out,
        LoraLinearBackward {
            weight: weight.clone(),
            scale,
        },
    )?)
}

struct LoraLinearBackward {
    weight: BaseWeight,
    scale: f64,
}

impl crate::custom_grad::Backward3 for LoraLinearBackward {
    const NAME: &'static str = "lora-linear";

    /// With low = s x Aᵀ (in the adapter's dtype) and g the output's gradient:
    /// dB = gᵀ low, dA = s (g B)ᵀ x, dx = g W + s (g B) A.
    fn backward(
        &self,
        [x, a, b]: [&Tensor; 3],
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let x32 = x.to_dtype(a.dtype())?;
        let g32 = grad.to_dtype(b.dtype())?;
        let low = (x32.matmul(&a.t()?)? * self.scale)?;
        let gb = (g32.matmul(b)? * self.scale)?;
        let db = g32.t()?.matmul(&low)?;
        let da = gb.t()?.matmul(&x32)?;
        let base = self
            .weight
            .grad_matmul(&grad.contiguous()?)
            .map_err(candle_core::Error::wrap)?;
        let dx = (base + gb.matmul(a)?.to_dtype(x.dtype())?)?;
        Ok((dx, da, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// The op against the same function from separate ops, for a dense and an NF4 weight, in
    /// f32: output and the gradients of x, A and B.
    #[test]
    fn the_fused_projection_and_its_gradients_equal_the_separate_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, fan_in, out, r, scale) = (5, 64, 48, 4, 1.7);
        let dense = Tensor::randn(0f32, 0.1, (out, fan_in), &dev)?;
        for weight in [
            BaseWeight::Dense(dense.clone()),
            BaseWeight::Nf4(crate::nf4::Nf4Tensor::quantize(&dense)?),
        ] {
            let w = weight.dense()?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, fan_in), &dev)?)?;
            let a = Var::from_tensor(&Tensor::randn(0f32, 0.2, (r, fan_in), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, (out, r), &dev)?)?;
            let separate = (x.matmul(&w.t()?)? + ((x.matmul(&a.t()?)? * scale)?.matmul(&b.t()?))?)?;
            let fused = lora_linear(&x, &weight, &a, &b, scale)?;
            let max_diff = |p: &Tensor, q: &Tensor| -> Result<f32> {
                Ok((p - q)?.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?)
            };
            assert!(max_diff(&fused, &separate)? < 1e-4);
            let probe = Tensor::randn(0f32, 1.0, (rows, out), &dev)?;
            let want = (separate * &probe)?.sum_all()?.backward()?;
            let got = (fused * &probe)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
                let d = max_diff(got.get(v).expect("fused gradient"), want.get(v).expect("gradient"))?;
                assert!(d < 1e-4, "d{name} off by {d}");
            }
        }
        Ok(())
    }
}
