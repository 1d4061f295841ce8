//! A projection with its LoRA pair as one op of the training graph: `x Wᵀ + s (x Aᵀ) Bᵀ`.
//!
//! Built from separate ops, candle's graph keeps every op's inputs until the backward pass:
//! per projection the base product, the f32 delta (an output-sized f32 tensor), its bf16 copy
//! and the f32 copy of the input. PyTorch's autograd, with PEFT, keeps only what the backward
//! reads. This op keeps its three inputs (the input x, shared with its other consumers, and the
//! small A and B) and computes the rest again in the backward. The base weight stays as stored
//! (NF4 is expanded per product); the adapter runs in its own dtype (f32), as PEFT's mixed
//! precision does. Dropout's mask is drawn again in the backward from its seed ([`MaskDraw`])
//! rather than kept: through separate ops a dropped-out projection kept the mask, the f32 input
//! and its masked copy, the f32 delta and its bf16 copy (the bench step's peak was 7.4 times
//! the undropped one's at p = 0.05, the trainer's default).

use crate::error::Result;
use crate::linear::{matmul_weight, BaseWeight};
use crate::lora::MaskDraw;
use crate::row_chunks::{accumulate, add_by_rows, rows_per_chunk};
use candle_core::Tensor;

/// A LoRA pair as one projection's op uses it: A (r, in), B (out, r), the scale, and how its
/// input's dropout mask is drawn (None without dropout).
#[derive(Clone, Copy)]
pub(crate) struct LowRank<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
    pub dropout: Option<MaskDraw>,
}

/// The dropout mask of an input `x` (rows, in), drawn by `draw`; None without dropout.
fn mask_of(draw: Option<MaskDraw>, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let Some(draw) = draw else { return Ok(None) };
    let (rows, cols) = x.dims2()?;
    Ok(Some(
        draw.draw(rows, cols, x.device()).map_err(candle_core::Error::wrap)?,
    ))
}

/// `t` times `mask` when there is one.
fn masked(t: Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match mask {
        Some(m) => {
            let m = m.to_dtype(t.dtype())?;
            t * m
        }
        None => Ok(t),
    }
}

/// `x Wᵀ + scale (dropout(x) Aᵀ) Bᵀ` for `x` (rows, in), in x's dtype; differentiable in x, A
/// and B.
pub(crate) fn lora_linear(x: &Tensor, weight: &BaseWeight, pair: LowRank) -> Result<Tensor> {
    let out = forward_rows(x, weight, &pair, None)?;
    in_graph(x, out, weight, pair, None)
}

/// `out`, computed outside the graph, as the op's node in the graph of x, A and B.
fn in_graph(x: &Tensor, out: Tensor, weight: &BaseWeight, pair: LowRank, heads: Option<Heads>) -> Result<Tensor> {
    let backward = LoraLinearBackward {
        weight: weight.clone(),
        scale: pair.scale,
        dropout: pair.dropout,
        heads,
    };
    Ok(crate::custom_grad::with_backward3([x, pair.a, pair.b], out, backward)?)
}

/// Attention heads as a projection's output: (batch, heads, seq, head_dim), rotated by RoPE's
/// `cos` and `sin` tables when given.
#[derive(Clone)]
pub(crate) struct Heads {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub rope: Option<(Tensor, Tensor)>,
}

impl Heads {
    /// Rows (batch * seq, heads * head_dim) split into heads, then rotated.
    pub(crate) fn split(&self, rows: &Tensor) -> Result<Tensor> {
        let t = rows.dim(0)? / self.batch.max(1);
        let heads = rows
            .reshape((self.batch, t, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        Ok(match &self.rope {
            Some((cos, sin)) => candle_nn::rotary_emb::rope(&heads, cos, sin)?,
            None => heads,
        })
    }

    /// The gradient of [`Heads::split`]'s input from its output's: rotated back, in rows.
    fn join_gradient(&self, grad: &Tensor) -> candle_core::Result<Tensor> {
        let grad = match &self.rope {
            Some((cos, sin)) => candle_nn::rotary_emb::rope(&grad.contiguous()?, cos, &sin.neg()?)?,
            None => grad.clone(),
        };
        let (b, h, t, d) = grad.dims4()?;
        grad.transpose(1, 2)?.reshape((b * t, h * d))
    }
}

/// [`lora_linear`] plus a frozen `bias`, whose result goes into attention heads: the op's output
/// is the heads (rotated), so the graph keeps neither the projection's rows nor the split copy
/// before the rotation, only what attention reads (3 of the bench layer's 23 MiB, q and k).
pub(crate) fn lora_linear_heads(
    x: &Tensor,
    weight: &BaseWeight,
    bias: Option<&Tensor>,
    pair: LowRank,
    heads: &Heads,
) -> Result<Tensor> {
    let out = heads.split(&forward_rows(x, weight, &pair, bias)?)?;
    in_graph(x, out, weight, pair, Some(heads.clone()))
}

/// The op's result outside the graph: `x Wᵀ + scale (dropout(x) Aᵀ) Bᵀ (+ bias)`. The
/// low-rank part widens x to f32: it goes a chunk of rows at a time (`row_chunks`).
fn forward_rows(x: &Tensor, weight: &BaseWeight, pair: &LowRank, bias: Option<&Tensor>) -> Result<Tensor> {
    let x = x.detach();
    let base = matmul_weight(&x, weight)?;
    let mask = mask_of(pair.dropout, &x)?;
    let (rows, width) = (x.dim(0)?, x.dim(1)?.max(base.dim(1)?));
    let (a, b) = (pair.a.detach(), pair.b.detach());
    let out = add_by_rows(base, rows, rows_per_chunk(width), |start, len| {
        let mask = mask.as_ref().map(|m| m.narrow(0, start, len)).transpose()?;
        let xm = masked(x.narrow(0, start, len)?.to_dtype(a.dtype())?, mask.as_ref())?;
        let low = (xm.matmul(&a.t()?)? * pair.scale)?;
        low.matmul(&b.t()?)?.to_dtype(x.dtype())
    })?;
    Ok(match bias {
        Some(bias) => out.broadcast_add(bias)?,
        None => out,
    })
}

struct LoraLinearBackward {
    weight: BaseWeight,
    scale: f64,
    dropout: Option<MaskDraw>,
    /// Where the output went, when into attention heads.
    heads: Option<Heads>,
}

impl crate::custom_grad::Backward3 for LoraLinearBackward {
    const NAME: &'static str = "lora-linear";

    /// With m dropout's mask (1 without it), xm = x ∘ m and low = s xm Aᵀ (in the adapter's
    /// dtype), and g the output's gradient: dB = gᵀ low, dA = s (g B)ᵀ xm,
    /// dx = g W + (s (g B) A) ∘ m.
    fn backward(
        &self,
        [x, a, b]: [&Tensor; 3],
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let grad = match &self.heads {
            Some(heads) => heads.join_gradient(grad)?,
            None => grad.clone(),
        };
        // Drawn again from its seed, as the forward drew it.
        let mask = mask_of(self.dropout, x)?;
        let base = self
            .weight
            .grad_matmul(&grad.contiguous()?)
            .map_err(candle_core::Error::wrap)?;
        // The f32 products go a chunk of rows at a time; dA and dB sum over the chunks.
        let (rows, width) = (x.dim(0)?, x.dim(1)?.max(grad.dim(1)?));
        let (mut da, mut db) = (None, None);
        let dx = add_by_rows(base, rows, rows_per_chunk(width), |start, len| {
            let part = |t: &Tensor| t.narrow(0, start, len);
            let mask = mask.as_ref().map(part).transpose()?;
            let xm = masked(part(x)?.to_dtype(a.dtype())?, mask.as_ref())?;
            let g32 = part(&grad)?.to_dtype(b.dtype())?;
            let low = (xm.matmul(&a.t()?)? * self.scale)?;
            let gb = (g32.matmul(b)? * self.scale)?;
            accumulate(&mut db, g32.t()?.matmul(&low)?)?;
            accumulate(&mut da, gb.t()?.matmul(&xm)?)?;
            drop(xm);
            masked(gb.matmul(a)?, mask.as_ref())?.to_dtype(x.dtype())
        })?;
        let none = || candle_core::Error::Msg("lora-linear backward of no rows".into());
        let (da, db) = (da.ok_or_else(none)?, db.ok_or_else(none)?);
        Ok((dx, da, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row_chunks::with_chunk_values;
    use candle_core::{DType, Device, Var};

    /// The op against the same function from separate ops, for a dense and an NF4 weight, in
    /// f32, without dropout and with it (the separate ops apply the mask the draw gives), whole
    /// and a chunk of rows at a time: output and the gradients of x, A and B.
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
            let draw = MaskDraw {
                stream: 11,
                p: 0.3,
                first_row: 2,
            };
            for dropout in [None, Some(draw)] {
                let dropped = match dropout {
                    Some(d) => (x.as_tensor() * d.draw(rows, fan_in, &dev)?)?,
                    None => x.as_tensor().clone(),
                };
                let separate = (x.matmul(&w.t()?)? + ((dropped.matmul(&a.t()?)? * scale)?.matmul(&b.t()?))?)?;
                let pair = LowRank {
                    a: &a,
                    b: &b,
                    scale,
                    dropout,
                };
                // In one pass, and in chunks of 2 of the 5 rows, forward and backward.
                for chunk_values in [usize::MAX, 2 * fan_in] {
                    with_chunk_values(chunk_values, || {
                        let fused = lora_linear(&x, &weight, pair)?;
                        let what = format!("dropout {dropout:?}, chunks of {chunk_values} values");
                        assert_same_value_and_gradients(&fused, &separate, [&x, &a, &b], &what)
                    })?;
                }
            }
        }
        Ok(())
    }

    /// `fused` equals `separate` within 1e-4, and so do the gradients of x, A and B of both
    /// against the same random weighting of their outputs.
    fn assert_same_value_and_gradients(
        fused: &Tensor,
        separate: &Tensor,
        [x, a, b]: [&Var; 3],
        what: &str,
    ) -> Result<()> {
        let max_diff = |p: &Tensor, q: &Tensor| -> Result<f32> {
            Ok((p - q)?.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?)
        };
        assert!(max_diff(fused, separate)? < 1e-4, "{what}: output");
        let probe = Tensor::randn(0f32, 1.0, fused.shape(), fused.device())?;
        let want = (separate * &probe)?.sum_all()?.backward()?;
        let got = (fused * &probe)?.sum_all()?.backward()?;
        for (name, v) in [("x", x), ("A", a), ("B", b)] {
            let d = max_diff(got.get(v).expect("fused gradient"), want.get(v).expect("gradient"))?;
            assert!(d < 1e-4, "{what}: d{name} off by {d}");
        }
        Ok(())
    }

    /// The op whose output is attention heads, rotated by RoPE, with a bias, against the
    /// projection, bias, split and rotation as separate ops: output and the gradients of x, A
    /// and B, in f32; and the same without a rotation.
    #[test]
    fn the_projection_into_rotated_heads_and_its_gradients_equal_the_separate_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (batch, t, heads, head_dim, fan_in, r, scale) = (2, 5, 3, 8, 32, 4, 0.6);
        let out = heads * head_dim;
        let weight = BaseWeight::Dense(Tensor::randn(0f32, 0.1, (out, fan_in), &dev)?);
        let bias = Tensor::randn(0f32, 0.1, out, &dev)?;
        let angles = Tensor::arange(0f32, (t * head_dim / 2) as f32, &dev)?.reshape((t, head_dim / 2))?;
        let rope = (angles.cos()?, angles.sin()?);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch * t, fan_in), &dev)?)?;
        let a = Var::from_tensor(&Tensor::randn(0f32, 0.2, (r, fan_in), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, (out, r), &dev)?)?;
        for rotated in [true, false] {
            let layout = Heads {
                batch,
                heads,
                head_dim,
                rope: rotated.then(|| rope.clone()),
            };
            let rows = (x.matmul(&weight.dense()?.t()?)? + ((x.matmul(&a.t()?)? * scale)?.matmul(&b.t()?))?)?
                .broadcast_add(&bias)?;
            let split = rows
                .reshape((batch, t, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            let separate = match rotated {
                true => crate::rope::apply(&split, &rope.0, &rope.1)?,
                false => split,
            };
            let pair = LowRank {
                a: &a,
                b: &b,
                scale,
                dropout: None,
            };
            let fused = lora_linear_heads(&x, &weight, Some(&bias), pair, &layout)?;
            assert_eq!(fused.dims(), [batch, heads, t, head_dim]);
            assert_same_value_and_gradients(&fused, &separate, [&x, &a, &b], &format!("rotated {rotated}"))?;
        }
        Ok(())
    }
}
