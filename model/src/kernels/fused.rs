//! Fused CPU kernels, each with its own backward, for the recorded forward of training and
//! prefill: RMSNorm, SwiGLU, RoPE and the causal softmax of attention.
//!
//! Written with candle's basic ops these are 4 to 8 element-wise passes each, and candle runs
//! element-wise ops on one thread and keeps every intermediate for the backward pass. One
//! kernel per op makes a single pass over rows split across rayon's threads, and keeps only
//! what its backward needs (the input, or for softmax the output).
//!
//! The kernels take contiguous f32 on the CPU. Other devices and dtypes (CUDA bf16) take the
//! basic-op path, which the tests also use as the reference.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Whether `t` can go through the fused kernels.
pub(crate) fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The f32 data of a contiguous CPU tensor.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(candle_core::Error::Msg(format!("{op}: input is not contiguous"))),
    }
}

/// The f32 data of a tensor's storage from its layout's start, or None unless it is f32 on
/// the CPU. For kernels that read tensors in place outside a custom op.
pub(crate) fn cpu_f32<'a>(storage: &'a candle_core::Storage, layout: &Layout) -> Option<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(cpu) => cpu.as_slice::<f32>().ok()?.get(layout.start_offset()..),
        _ => None,
    }
}

/// Runs `f` on the values of `t` (made contiguous, which is free when it already is), read in
/// place; an error naming `what` unless `t` is f32 on the CPU.
pub(crate) fn with_f32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> crate::error::Result<R>,
) -> crate::error::Result<R> {
    let t = t.contiguous()?;
    let (guard, layout) = t.storage_and_layout();
    let data = cpu_f32(&guard, layout)
        .and_then(|d| d.get(..t.elem_count()))
        .ok_or_else(|| {
            crate::error::ModelError::Kernel(format!("{what}: a {:?} tensor is not f32 on the CPU", t.dims()))
        })?;
    f(data)
}

fn last_dim(l: &Layout) -> Result<usize> {
    l.dims()
        .last()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("fused op on a scalar".into()))
}

/// Runs `row(index, out_row)` over rows of `width` in parallel; returns the filled buffer.
fn map_rows(len: usize, width: usize, row: impl Fn(usize, &mut [f32]) + Sync + Send) -> Vec<f32> {
    let mut out = vec![0f32; len];
    out.par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(i, o)| row(i, o));
    out
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x * w / sqrt(mean(x^2) + eps). The weight is frozen: no gradient for it.

pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

pub(crate) fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// `out = x * r * w` for one row `x` with its 1 / rms `r`.
pub(crate) fn normalize_row(x: &[f32], w: &[f32], r: f32, out: &mut [f32]) {
    for ((o, xv), wv) in out.iter_mut().zip(x).zip(w) {
        *o = xv * r * wv;
    }
}

/// `dx += r * (g * w) - x * r^3 * sum(g * w * x) / h` for one row: the input gradient of
/// [`normalize_row`] for the output gradient `g`.
pub(crate) fn rms_norm_grad_row_add(x: &[f32], g: &[f32], w: &[f32], r: f32, dx: &mut [f32]) {
    let dot: f32 = x.iter().zip(g).zip(w).map(|((xv, gv), wv)| xv * gv * wv).sum();
    let k = r * r * r * dot / x.len() as f32;
    for (((d, xv), gv), wv) in dx.iter_mut().zip(x).zip(g).zip(w) {
        *d += r * gv * wv - xv * k;
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w, h) = (slice(xs, xl, "rms norm")?, slice(ws, wl, "rms norm")?, last_dim(xl)?);
        if w.len() != h {
            return Err(candle_core::Error::Msg(format!(
                "rms norm: weight has {} entries, rows {h}",
                w.len()
            )));
        }
        let out = map_rows(x.len(), h, |i, o| {
            let xr = &x[i * h..(i + 1) * h];
            normalize_row(xr, w, inv_rms(xr, self.eps), o);
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &g.contiguous()?, &RmsNormBackward { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

/// dx = r * (g * w) - x * r^3 * sum(g * w * x) / h, with r = 1 / rms(x).
struct RmsNormBackward {
    eps: f32,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "fused-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "rms norm backward";
        let (x, w, g, h) = (
            slice(xs, xl, op)?,
            slice(ws, wl, op)?,
            slice(gs, gl, op)?,
            last_dim(xl)?,
        );
        // map_rows starts each row at zeros, so adding the gradient writes it.
        let out = map_rows(x.len(), h, |i, o| {
            let (xr, gr) = (&x[i * h..(i + 1) * h], &g[i * h..(i + 1) * h]);
            rms_norm_grad_row_add(xr, gr, w, inv_rms(xr, self.eps), o);
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: silu(gate) * up.

pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (slice(gs, gl, "swiglu")?, slice(us, ul, "swiglu")?);
        if gl.shape() != ul.shape() {
            return Err(candle_core::Error::Msg(format!(
                "swiglu: gate {:?} and up {:?} differ",
                gl.dims(),
                ul.dims()
            )));
        }
        let w = last_dim(gl)?;
        let out = map_rows(gate.len(), w, |i, o| {
            for ((o, gv), uv) in o.iter_mut().zip(&gate[i * w..(i + 1) * w]).zip(&up[i * w..(i + 1) * w]) {
                *o = gv * sigmoid(*gv) * uv;
            }
        });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let d_gate = gate.apply_op3_no_bwd(up, &g, &SwiGluBackward { wrt_gate: true })?;
        let d_up = gate.apply_op3_no_bwd(up, &g, &SwiGluBackward { wrt_gate: false })?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// The gradients of `silu(gate) * up` with respect to gate and up for the output gradient `d`,
/// with `s` = sigmoid(gate): `d * up * s * (1 + gate * (1 - s))` and `d * gate * s`.
#[inline]
pub(crate) fn swiglu_grads(gate: f32, up: f32, s: f32, d: f32) -> (f32, f32) {
    (d * up * s * (1.0 + gate * (1.0 - s)), d * gate * s)
}

/// [`swiglu_grads`] with respect to gate or to up.
struct SwiGluBackward {
    wrt_gate: bool,
}

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "fused-swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "swiglu backward";
        let (gate, up, d) = (slice(gs, gl, op)?, slice(us, ul, op)?, slice(ds, dl, op)?);
        let w = last_dim(gl)?;
        let out = map_rows(gate.len(), w, |i, o| {
            let range = i * w..(i + 1) * w;
            for (((o, gv), uv), dv) in o
                .iter_mut()
                .zip(&gate[range.clone()])
                .zip(&up[range.clone()])
                .zip(&d[range.clone()])
            {
                let (d_gate, d_up) = swiglu_grads(*gv, *uv, sigmoid(*gv), *dv);
                *o = if self.wrt_gate { d_gate } else { d_up };
            }
        });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE in HF's rotate-half layout on (batch, heads, seq, head_dim), one position per seq index.

/// `cos` and `sin` are (seq, head_dim / 2).
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let table = RopeTable {
        cos: cos.flatten_all()?.to_vec1::<f32>()?,
        sin: sin.flatten_all()?.to_vec1::<f32>()?,
    };
    x.contiguous()?.apply_op1(Rope {
        table: std::sync::Arc::new(table),
        inverse: false,
    })
}

struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// Rotates one head's (x1, x2) half pairs in place by their angles' `cos` and `sin` (head_dim
/// / 2 each); `inverse` rotates back, which is also the backward pass (a rotation's transpose
/// is its inverse).
pub(crate) fn rotate_half(head: &mut [f32], cos: &[f32], sin: &[f32], inverse: bool) {
    let sign = if inverse { -1.0 } else { 1.0 };
    let (x1, x2) = head.split_at_mut(cos.len());
    for k in 0..cos.len() {
        let (a, b, sk) = (x1[k], x2[k], sign * sin[k]);
        x1[k] = a * cos[k] - b * sk;
        x2[k] = b * cos[k] + a * sk;
    }
}

/// [`rotate_half`] over (batch, heads, seq, head_dim), one position per seq index.
struct Rope {
    table: std::sync::Arc<RopeTable>,
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, "rope")?;
        let &[_, _, seq, d] = xl.dims() else {
            return Err(candle_core::Error::Msg(format!(
                "rope: expected 4 dims, got {:?}",
                xl.dims()
            )));
        };
        let half = d / 2;
        if self.table.cos.len() != seq * half || self.table.sin.len() != seq * half {
            return Err(candle_core::Error::Msg(format!(
                "rope: tables do not cover {seq} positions of {half}"
            )));
        }
        let out = map_rows(x.len(), d, |row, o| {
            let pos = row % seq;
            let (c, s) = (
                &self.table.cos[pos * half..(pos + 1) * half],
                &self.table.sin[pos * half..(pos + 1) * half],
            );
            o.copy_from_slice(&x[row * d..(row + 1) * d]);
            rotate_half(o, c, s, self.inverse);
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let back = Rope {
            table: self.table.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Attention probabilities: softmax(scores * scale) under the causal (and sliding-window) mask.

/// `softmax(scale * q k^T)` under the causal mask (and the sliding window, if any), for `q`
/// (b, kv_heads, n * queries, d) and `k` (b, kv_heads, keys, d): the n query heads that share
/// a KV head have their rows stacked, so grouped-query attention needs no copy of K and V per
/// query head. The queries are the last positions of the keys: row i of a head sits at
/// position keys - queries + i and sees keys j <= that position (with a window w, only the w
/// newest). Masked entries come out as exactly 0.
///
/// One op from q and k to the probabilities: the graph keeps only the probabilities (the
/// backward needs them), not the scores before them, and the backward produces the scores'
/// gradient once instead of through candle's zero-filled accumulators.
pub(crate) fn causal_probs(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    window: Option<usize>,
    queries: usize,
) -> Result<Tensor> {
    q.contiguous()?.apply_op2(
        &k.contiguous()?,
        CausalProbs {
            scale: scale as f32,
            window,
            queries,
        },
    )
}

struct CausalProbs {
    scale: f32,
    window: Option<usize>,
    queries: usize,
}

impl CausalProbs {
    /// The visible key range of row `row` of a head's stacked rows.
    fn visible(&self, row: usize, keys: usize) -> std::ops::Range<usize> {
        let pos = keys - self.queries + row % self.queries;
        let first = self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        first..pos + 1
    }

    /// (batch * kv heads, rows, keys, head dim) after checking the shapes.
    fn dims(&self, ql: &Layout, kl: &Layout) -> Result<(usize, usize, usize, usize)> {
        match (ql.dims(), kl.dims()) {
            (&[b, g, rows, d], &[kb, kg, keys, kd])
                if (b, g, d) == (kb, kg, kd) && self.queries > 0 && rows % self.queries == 0 && self.queries <= keys =>
            {
                Ok((b * g, rows, keys, d))
            }
            (q, k) => Err(candle_core::Error::Msg(format!(
                "causal attention: q {q:?} must be (b, kv heads, n * {} queries, d) and k {k:?} (b, kv heads, keys >= queries, d)",
                self.queries
            ))),
        }
    }

    /// Scaled, masked softmax of one row of scores, in place.
    fn softmax_row(&self, scores: &mut [f32], row: usize) {
        let seen = self.visible(row, scores.len());
        scores[seen.clone()].iter_mut().for_each(|v| *v *= self.scale);
        causal_softmax(scores, seen.end - 1, self.window);
    }
}

/// Softmax of the (already scaled) scores in `row` that query position `pos` may see: keys up
/// to `pos`, and with a window w only the w newest; the rest of the row becomes 0.
pub(crate) fn causal_softmax(row: &mut [f32], pos: usize, window: Option<usize>) {
    let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
    let n = pos + 1 - first;
    crate::kernels::softmax::softmax_rows(&mut row[first..=pos], n);
    row[..first].fill(0.0);
    row[pos + 1..].fill(0.0);
}

impl CustomOp2 for CausalProbs {
    fn name(&self) -> &'static str {
        "fused-causal-probs"
    }

    fn cpu_fwd(&self, qs: &CpuStorage, ql: &Layout, ks: &CpuStorage, kl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (heads, rows, keys, d) = self.dims(ql, kl)?;
        use candle_core::backend::BackendStorage;
        let scores = qs.matmul(ks, (heads, rows, keys, d), ql, &kl.transpose(2, 3)?)?;
        let CpuStorage::F32(mut scores) = scores else {
            return Err(candle_core::Error::Msg("causal attention: expected f32".into()));
        };
        scores
            .par_chunks_mut(keys.max(1))
            .enumerate()
            .for_each(|(i, r)| self.softmax_row(r, i % rows));
        let mut shape = ql.dims().to_vec();
        shape[3] = keys;
        Ok((CpuStorage::F32(scores), Shape::from(shape)))
    }

    /// With dS = scale * p * (g - sum(p * g)) the scores' gradient: dq = dS k, dk = dS^T q.
    fn bwd(&self, q: &Tensor, k: &Tensor, p: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = p.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBackward { scale: self.scale })?;
        // Detached: a gradient that held q and k through a graph would keep them alive.
        let dq = ds.matmul(&k.detach())?;
        let dk = ds.t()?.matmul(&q.detach())?;
        Ok((Some(dq), Some(dk)))
    }
}

/// Turns `g`, the gradient of one row of probabilities `p`, into the gradient of the scaled
/// scores before the softmax, in place: `scale * p * (g - sum(p * g))`. Masked entries have
/// p = 0 and get 0.
pub(crate) fn softmax_grad_row(p: &[f32], g: &mut [f32], scale: f32) {
    let dot: f32 = p.iter().zip(g.iter()).map(|(a, b)| a * b).sum();
    g.iter_mut().zip(p).for_each(|(gv, pv)| *gv = scale * pv * (*gv - dot));
}

/// [`softmax_grad_row`] over rows.
struct SoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(&self, ps: &CpuStorage, pl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (p, g, k) = (
            slice(ps, pl, "softmax backward")?,
            slice(gs, gl, "softmax backward")?,
            last_dim(pl)?,
        );
        let out = map_rows(p.len(), k, |row, o| {
            o.copy_from_slice(&g[row * k..(row + 1) * k]);
            softmax_grad_row(&p[row * k..(row + 1) * k], o, self.scale);
        });
        Ok((CpuStorage::F32(out), pl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .expect("sub")
            .abs()
            .expect("abs")
            .flatten_all()
            .expect("f")
            .max(0)
            .expect("max")
            .to_scalar()
            .expect("s")
    }

    /// Output and input gradients (under a random output gradient) of `fused` and `reference`.
    fn agree(inputs: &[Tensor], fused: impl Fn(&[Tensor]) -> Tensor, reference: impl Fn(&[Tensor]) -> Tensor) {
        let g = randn(fused(inputs).dims(), 99);
        let run = |f: &dyn Fn(&[Tensor]) -> Tensor| {
            let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).expect("var")).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts);
            let grads = (&y * &g)
                .expect("mul")
                .sum_all()
                .expect("sum")
                .backward()
                .expect("backward");
            let gs: Vec<Tensor> = ts.iter().map(|t| grads.get(t).expect("grad").clone()).collect();
            (y, gs)
        };
        let (yf, gf) = run(&fused);
        let (yr, gr) = run(&reference);
        assert!(max_diff(&yf, &yr) < 1e-5, "outputs differ by {}", max_diff(&yf, &yr));
        for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
            assert!(max_diff(a, b) < 1e-4, "gradient {i} differs by {}", max_diff(a, b));
        }
    }

    #[test]
    fn rms_norm_matches_basic_ops() {
        let x = randn(&[3, 5, 16], 1);
        let w = randn(&[16], 2);
        let eps = 1e-5;
        agree(
            &[x],
            |t| rms_norm(&t[0], &w, eps).expect("fused"),
            |t| {
                let ms = t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                t[0].broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(&w)
                    .unwrap()
            },
        );
    }

    #[test]
    fn swiglu_matches_basic_ops() {
        agree(
            &[randn(&[4, 24], 3), randn(&[4, 24], 4)],
            |t| swiglu(&t[0], &t[1]).expect("fused"),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
        );
    }

    #[test]
    fn rope_matches_the_rotate_half_formula_and_inverts() {
        let (seq, half) = (6, 4);
        let cos = randn(&[seq, half], 5).cos().expect("cos");
        let sin = randn(&[seq, half], 5).sin().expect("sin");
        agree(
            &[randn(&[2, 3, seq, 2 * half], 6)],
            |t| rope(&t[0], &cos, &sin).expect("fused"),
            |t| {
                let x1 = t[0].narrow(D::Minus1, 0, half).unwrap();
                let x2 = t[0].narrow(D::Minus1, half, half).unwrap();
                let a = (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
                let b = (x2.broadcast_mul(&cos).unwrap() + x1.broadcast_mul(&sin).unwrap()).unwrap();
                Tensor::cat(&[a, b], D::Minus1).unwrap()
            },
        );
    }

    /// The additive-mask formulation the model used before, with `offset` cached positions.
    fn masked_reference(x: &Tensor, scale: f64, window: Option<usize>) -> Tensor {
        let (q, k) = (x.dim(2).unwrap(), x.dim(3).unwrap());
        let mut m = Vec::new();
        for i in 0..q {
            let pos = k - q + i;
            for j in 0..k {
                let visible = j <= pos && window.is_none_or(|w| pos - j < w);
                m.push(if visible { 0f32 } else { f32::NEG_INFINITY });
            }
        }
        let mask = Tensor::from_vec(m, (q, k), &Device::Cpu).unwrap();
        candle_nn::ops::softmax(&(x * scale).unwrap().broadcast_add(&mask).unwrap(), D::Minus1).unwrap()
    }

    /// The fused probabilities equal the additive-mask softmax of q k^T with K repeated per
    /// query head, in value and in the gradients of q and k: one query head per KV head and
    /// three, more keys than queries (a cache before them) and a window.
    #[test]
    fn causal_probs_match_the_additive_mask() {
        for (n, q, k, window) in [(1, 7, 7, None), (3, 3, 9, None), (2, 8, 8, Some(3)), (3, 1, 6, Some(4))] {
            agree(
                &[randn(&[2, 2, n * q, 8], 7), randn(&[2, 2, k, 8], 8)],
                |t| causal_probs(&t[0], &t[1], 0.35, window, q).expect("fused"),
                |t| {
                    let keys = t[1]
                        .unsqueeze(2)
                        .unwrap()
                        .expand((2, 2, n, k, 8))
                        .unwrap()
                        .reshape((2, 2 * n, k, 8))
                        .unwrap();
                    let queries = t[0].reshape((2, 2 * n, q, 8)).unwrap();
                    let scores = queries.matmul(&keys.t().unwrap()).unwrap();
                    masked_reference(&scores, 0.35, window)
                        .reshape((2, 2, n * q, k))
                        .unwrap()
                },
            );
        }
    }

    #[test]
    fn shape_errors_are_errors() {
        let (q, k) = (randn(&[2, 3, 5, 8], 8), randn(&[2, 3, 4, 8], 9));
        let err = causal_probs(&q, &k, 1.0, None, 5)
            .expect_err("more queries than keys")
            .to_string();
        assert!(err.contains("keys >= queries"), "{err}");
        let err = causal_probs(&q, &k, 1.0, None, 2)
            .expect_err("rows not a multiple of the queries")
            .to_string();
        assert!(err.contains("n * 2 queries"), "{err}");
        let err = rms_norm(&randn(&[2, 8], 1), &randn(&[4], 2), 1e-5)
            .expect_err("weight size")
            .to_string();
        assert!(err.contains("weight has 4 entries"), "{err}");
    }
}
