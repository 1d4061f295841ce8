//! Attention in blocks of queries, whose memory grows with the sequence and not its square.
//!
//! Off the CPU f32 path (a GPU, or bf16) attention used to build the whole (batch, heads, T, T)
//! score tensor, and candle's graph kept it and four more of its size per layer for the backward
//! pass: at 4 x 512 tokens and 16 heads, 330 MiB a layer. Here the queries go a block at a time:
//! scores, softmax (in f32) and the product with the values exist for one block only. In
//! training the output enters the graph through [`BlockedAttention`], a custom op whose backward
//! computes each block's probabilities again from the saved log-sum-exp of its rows, as
//! FlashAttention does; the graph keeps only q, k, v, the output and that log-sum-exp.

use crate::error::Result;
use crate::row_chunks::accumulate;
use candle_core::{DType, Tensor, D};

/// About this many bytes of f32 scores per block (batch x heads x rows x keys).
const BLOCK_BYTES: usize = 32 << 20;

/// softmax(scale q kᵀ + mask) v for q (b, h, t, d) and k, v (b, g, T, d), each of the g KV heads
/// serving h / g query heads in turn (grouped-query attention); `mask` (t, T), additive f32, or
/// None when every query sees every key. The KV heads are repeated for the query heads inside
/// the op, forward and backward, so a training graph keeps k and v as they are and not their
/// repeated copies (2 of the bench layer's 19 MiB). The result is in
/// the output projection's layout, (b, t, h d): in a training graph the op's own output is then
/// the projection's input, instead of both it and a transposed copy being kept.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    in_blocks(q, k, v, mask, scale, block_rows(q, k.dim(2)?)?)
}

/// Gemma 2's attention: softmax(cap * tanh(scale q kᵀ / cap) + mask) v, in candle's graph.
/// It holds the whole (b, h, t, T) scores, unlike [`attention`]; the blocked kernels have no
/// cap, and no other family needs one.
pub(crate) fn softcapped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    cap: f64,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let scores = (q.to_dtype(DType::F32)?.matmul(&k.to_dtype(DType::F32)?.t()?)? * scale)?;
    let mut scores = ((scores / cap)?.tanh()? * cap)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(DType::F32)?)?;
    }
    // candle's fused softmax has no backward; this one is made of differentiable ops.
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
    Ok(probs.matmul(v)?)
}

/// [`attention`] with `per` query rows per block.
fn in_blocks(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64, per: usize) -> Result<Tensor> {
    let (out, lse) = forward(q, &repeat_kv(k, q)?, &repeat_kv(v, q)?, mask, scale, per)?;
    let (b, h, t, d) = out.dims4()?;
    let out = out.transpose(1, 2)?.reshape((b, t, h * d))?;
    let backward = BlockedAttention {
        lse,
        mask: mask.cloned(),
        scale,
        per,
    };
    Ok(crate::custom_grad::with_backward3([q, k, v], out, backward)?)
}

/// `kv` (b, g, T, d) with each KV head repeated for its query heads of `q` (b, h, t, d):
/// (b, h, T, d), outside the graph.
fn repeat_kv(kv: &Tensor, q: &Tensor) -> Result<Tensor> {
    let (b, g, keys, d) = kv.dims4()?;
    let h = q.dim(1)?;
    if h == g {
        return Ok(kv.detach());
    }
    if g == 0 || h % g != 0 {
        return Err(crate::error::ModelError::ShapeMismatch(format!(
            "attention: {h} query heads cannot share {g} KV heads"
        )));
    }
    Ok(kv
        .detach()
        .unsqueeze(2)?
        .expand((b, g, h / g, keys, d))?
        .reshape((b, h, keys, d))?)
}

/// The gradient of [`repeat_kv`]'s input from its output's: each KV head's query heads summed.
fn fold_kv(grad: &Tensor, g: usize) -> Result<Tensor> {
    let (b, h, keys, d) = grad.dims4()?;
    if h == g {
        return Ok(grad.clone());
    }
    Ok(grad.reshape((b, g, h / g, keys, d))?.sum(2)?)
}

/// Query rows per block: as many as keep a block's f32 scores near [`BLOCK_BYTES`].
fn block_rows(q: &Tensor, keys: usize) -> Result<usize> {
    let (b, h, t, _) = q.dims4()?;
    Ok((BLOCK_BYTES / (4 * b * h * keys).max(1)).clamp(16, t.max(16)))
}

/// The scores of queries `rows` of one block in f32, masked: (b, h, rows, T). The scale goes
/// on the block's queries, a fraction of the scores' size, so no pass over the block scales it.
fn scores(q: &Tensor, k: &Tensor, mask: Option<&Tensor>, scale: f64, start: usize) -> Result<Tensor> {
    let rows = q.dim(2)?;
    let s = (q * scale)?.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    Ok(match mask {
        Some(m) => s.broadcast_add(&m.narrow(0, start, rows)?)?,
        None => s,
    })
}

/// The output (b, h, t, d) and the log-sum-exp of every row of scores (b, h, t, 1), in f32.
fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    per: usize,
) -> Result<(Tensor, Tensor)> {
    let (q, k, v) = (q.detach(), k.detach(), v.detach());
    let t = q.dim(2)?;
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for start in (0..t).step_by(per) {
        let rows = per.min(t - start);
        // Two blocks of f32 at most: the scores, then the probabilities (one fused softmax).
        let s = scores(&q.narrow(2, start, rows)?, &k, mask, scale, start)?;
        let max = s.max_keepdim(D::Minus1)?;
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        drop(s);
        // A row's largest probability is exp(0) / sum, so log(sum) = -log(max p): the
        // log-sum-exp comes without another pass over the scores.
        lses.push((max - p.max_keepdim(D::Minus1)?.log()?)?);
        outs.push(p.to_dtype(v.dtype())?.matmul(&v)?);
    }
    Ok((Tensor::cat(&outs, 2)?, Tensor::cat(&lses, 2)?))
}

/// The backward of [`attention`] in a training graph: it recomputes each block's probabilities.
struct BlockedAttention {
    lse: Tensor,
    mask: Option<Tensor>,
    scale: f64,
    per: usize,
}

impl BlockedAttention {
    fn backward_blocks(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, h, t, head_dim) = q.dims4()?;
        let groups = k.dim(1)?;
        let (k, v) = (&repeat_kv(k, q)?, &repeat_kv(v, q)?);
        let per = self.per;
        // The output and its gradient come in rows, (b, t, h d); the blocks work in heads.
        let grad = grad.to_dtype(v.dtype())?;
        // D = rowsum(dO ∘ O), the softmax backward's correction term: summed in rows, then the
        // small (b, t, h, 1) result is moved to heads.
        let d = (grad.to_dtype(DType::F32)? * out.to_dtype(DType::F32)?)?
            .reshape((b, t, h, head_dim))?
            .sum_keepdim(D::Minus1)?
            .transpose(1, 2)?
            .contiguous()?;
        let grad = grad.reshape((b, t, h, head_dim))?.transpose(1, 2)?.contiguous()?;
        let (mut dq, mut dk, mut dv) = (Vec::new(), None::<Tensor>, None::<Tensor>);
        // dK and dV sum over blocks in f32, then go back to the inputs' dtype.
        // Each block holds three f32 blocks at most (the probabilities, dP and dP - D), each
        // one let go as soon as the next is made. The softmax's scale is left out of dS and
        // applied to dQ and dK, which are a fraction of a block's size.
        for start in (0..t).step_by(per) {
            let rows = per.min(t - start);
            let q_blk = q.narrow(2, start, rows)?;
            let g_blk = grad.narrow(2, start, rows)?;
            let shifted = scores(&q_blk, k, self.mask.as_ref(), self.scale, start)?
                .broadcast_sub(&self.lse.narrow(2, start, rows)?)?;
            let p = shifted.exp()?;
            drop(shifted);
            accumulate(
                &mut dv,
                p.to_dtype(v.dtype())?.t()?.matmul(&g_blk)?.to_dtype(DType::F32)?,
            )?;
            let dp = g_blk.matmul(&v.t()?)?.to_dtype(DType::F32)?;
            let centred = dp.broadcast_sub(&d.narrow(2, start, rows)?)?;
            drop(dp);
            let ds = (p * centred)?.to_dtype(q.dtype())?;
            dq.push((ds.matmul(k)? * self.scale)?);
            accumulate(&mut dk, ds.t()?.matmul(&q_blk)?.to_dtype(DType::F32)?)?;
        }
        let missing = || crate::error::ModelError::EmptyInput("attention backward of an empty sequence".into());
        let (dk, dv) = (
            fold_kv(&(dk.ok_or_else(missing)? * self.scale)?, groups)?,
            fold_kv(&dv.ok_or_else(missing)?, groups)?,
        );
        Ok((Tensor::cat(&dq, 2)?, dk.to_dtype(k.dtype())?, dv.to_dtype(v.dtype())?))
    }
}

impl crate::custom_grad::Backward3 for BlockedAttention {
    const NAME: &'static str = "blocked-attention";

    fn backward(
        &self,
        [q, k, v]: [&Tensor; 3],
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        self.backward_blocks(q, k, v, out, grad)
            .map_err(candle_core::Error::wrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The plain graph: whole scores, softmax, product.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        let s = ((q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap())
            .broadcast_add(mask)
            .unwrap();
        candle_nn::ops::softmax(&s, D::Minus1).unwrap().matmul(v).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// Blocks of 16 query rows, the last one partial, with a mask that has an offset (keys of
    /// a cache) and a sliding window, in f32 against the whole graph; and one block of all rows.
    /// With as many KV heads as query heads, and with each KV head serving two or three query
    /// heads (the reference repeats them in the graph). The output comes in rows, (b, t, h d).
    #[test]
    fn blocked_attention_and_its_gradients_equal_the_whole_graph() {
        let dev = Device::Cpu;
        let (b, h, t, offset, d) = (2, 6, 40, 9, 8);
        let total = offset + t;
        let window = 20;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    let pos = offset + i;
                    if j <= pos && pos - j < window {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, total), &dev).unwrap();
        let scale = 0.35;
        for groups in [6, 3, 2] {
            let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap()).unwrap();
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, groups, total, d), &dev).unwrap()).unwrap();
            let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, groups, total, d), &dev).unwrap()).unwrap();
            let repeated = |x: &Tensor| {
                x.unsqueeze(2)
                    .unwrap()
                    .expand((b, groups, h / groups, total, d))
                    .unwrap()
                    .reshape((b, h, total, d))
                    .unwrap()
            };
            let want = reference(&q, &repeated(&k), &repeated(&v), &mask, scale)
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, h * d))
                .unwrap();
            let w = Tensor::randn(0f32, 1.0, (b, t, h * d), &dev).unwrap();
            let want_grads = (&want * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for per in [16, t] {
                let got = in_blocks(&q, &k, &v, Some(&mask), scale, per).unwrap();
                let off = max_rel(&got, &want);
                assert!(off < 1e-5, "{groups} KV heads, {per} rows: output off by {off}");
                let got_grads = (got * &w).unwrap().sum_all().unwrap().backward().unwrap();
                for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                    let (g, r) = (got_grads.get(var).unwrap(), want_grads.get(var).unwrap());
                    assert_eq!(g.dims(), var.dims(), "d{name}");
                    let off = max_rel(g, r);
                    assert!(off < 1e-4, "{groups} KV heads, {per} rows: d{name} off by {off}");
                }
            }
        }
    }

    #[test]
    fn block_rows_keep_a_block_near_the_budget() {
        let q = Tensor::zeros((4, 16, 4096, 8), DType::F32, &Device::Cpu).unwrap();
        let rows = block_rows(&q, 4096).unwrap();
        assert_eq!(rows, 32, "4 x 16 heads x 4096 keys x 4 bytes is 1 MiB a row");
        let small = Tensor::zeros((1, 1, 10, 8), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(block_rows(&small, 10).unwrap(), 16);
    }
}
