//! The decoder layers' forward and backward written out by hand, with the final norm, head
//! and loss, for LoRA training in f32 on the CPU: [`CausalLm::loss_backward`] and
//! [`CausalLm::loss_backward_checkpointed`] take this path there, and candle's graph
//! everywhere else (CUDA, other dtypes).
//!
//! Through candle's graph about half of a training step went outside the matrix products:
//! gradient accumulators zero-filled and then summed op by op, element-wise ops that each
//! allocate their output, threads handing work to each other between small ops. Here:
//! - the forward keeps exactly what the backward needs (a [`LayerTape`]);
//! - products go to gemm with strides instead of transposed copies, and sums of products and
//!   residuals accumulate in their destination ([`crate::kernels::matrix`]);
//! - element-wise steps are single passes over rows, on buffers reused from step to step
//!   ([`crate::kernels::scratch`]);
//! - causal attention multiplies, per block of query rows, only the keys up to the block's
//!   last row, and keeps only those probabilities;
//! - each thread takes its own whole sequences of the batch through a layer, so no work is
//!   handed between threads inside a layer;
//! - the head computes no logits for rows of loss weight 0.
//!
//! The frozen base gets no gradient; each adapter's A and B get theirs. The tests hold this
//! path equal to the graph's (the model's forward, differentiated by candle) in loss and in
//! every adapter gradient.

use crate::checkpointing::{CheckpointedStep, LossBatch};
use crate::error::{ModelError, Result};
use crate::kernels::matrix::{matmul, Dst, Threads, View, ViewMut};
use crate::kernels::scratch::Buf;
use crate::linear::{BaseWeight, Projection, RmsNorm};
use crate::lora::{ActiveAdapter, TargetModule};
use crate::model::{CausalLm, Layer};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// Query rows per block of causal attention. Each block multiplies only the keys up to its
/// last row: 5/8 of the whole product at 256 positions, instead of all of it.
const ATTENTION_BLOCK: usize = 64;

/// Where the probabilities of the block of query rows from `first` start among a head's.
/// A block of n rows keeps only its n x (first + n) keys that can be visible, so a head holds
/// 5/8 of a full seq x seq matrix at 256 positions. Blocks before `first` are all full.
fn block_offset(first: usize) -> usize {
    let j = first / ATTENTION_BLOCK;
    ATTENTION_BLOCK * ATTENTION_BLOCK * j * (j + 1) / 2
}

/// The probabilities one head keeps for `seq` positions: [`block_offset`] past the last
/// full block, plus the partial block's rows, each `seq` keys long.
fn head_probs(seq: usize) -> usize {
    let full = seq / ATTENTION_BLOCK * ATTENTION_BLOCK;
    block_offset(full) + (seq - full) * seq
}

/// Rows per task of the element-wise passes: enough work per task to outweigh handing it out.
const ROWS_PER_TASK: usize = 16;

/// What one adapted projection's backward needs from its forward.
struct LoraTape {
    /// `scale * dropout(x) A^T`, (rows, r).
    low: Buf,
    /// The dropout mask applied to the input, when dropout is on.
    mask: Option<Vec<f32>>,
}

/// What a layer's backward needs from its forward, all (rows, width) row-major.
struct LayerTape {
    /// The layer's input; the residual stream.
    input: Buf,
    /// Each row's 1 / rms: the backward normalises the input again rather than keeping it.
    inv_rms: Buf,
    /// Queries and keys after rotation, and values.
    q: Buf,
    k: Buf,
    v: Buf,
    /// Attention probabilities, per sequence and head in blocks of query rows (see
    /// [`block_offset`]); masked entries are 0.
    probs: Buf,
    /// The heads' outputs before the output projection.
    attn: Buf,
    /// The residual stream after attention, and its rows' 1 / rms.
    mid: Buf,
    mid_inv_rms: Buf,
    gate: Buf,
    up: Buf,
    /// sigmoid(gate).
    gate_sigmoid: Buf,
    /// Per projection, indexed by `TargetModule as usize`.
    lora: [Option<LoraTape>; 7],
}

/// The shapes and inputs shared by every layer of one step.
struct Step<'a> {
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    window: Option<usize>,
    /// Rotary tables, (seq, head_dim / 2).
    cos: Vec<f32>,
    sin: Vec<f32>,
    adapter: ActiveAdapter<'a>,
    /// [`Threads::Pool`] when this step has the whole pool; [`Threads::Caller`] when it is
    /// one of several parts of a batch running side by side, one per thread.
    threads: Threads,
}

/// The adapter gradients of one projection.
struct ModuleGrad {
    module: TargetModule,
    a: Vec<f32>,
    b: Vec<f32>,
}

/// Runs `f` on the values of an f32 CPU tensor, read in place.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    crate::kernels::fused::with_f32(t, "hand-written training step", f)
}

/// Calls `f(first_row, rows, values)` on a frozen (out, in) weight: once on all of it when
/// dense, and when NF4 on each slice of rows expanded at a time, so a large weight (a 7B
/// model's MLP, the head) is never expanded whole (see [`crate::nf4`]).
fn for_weight_slices(w: &BaseWeight, mut f: impl FnMut(usize, usize, &[f32]) -> Result<()>) -> Result<()> {
    match w {
        BaseWeight::Dense(t) => {
            let rows = t.dim(0)?;
            with_values(t, |values| f(0, rows, values))
        }
        BaseWeight::Nf4(q) => {
            for (first, rows) in q.row_slices()? {
                with_values(&q.dequantize_rows(first, rows)?, |values| f(first, rows, values))?;
            }
            Ok(())
        }
        BaseWeight::Int8(_) => Err(ModelError::Quantize(
            "an int8 base is for serving; training needs a dense or NF4 base".into(),
        )),
    }
}

/// `x * mask`, element by element.
fn masked(x: &[f32], mask: &[f32]) -> Buf {
    let mut out = Buf::for_overwrite(x.len());
    out.iter_mut().zip(x).zip(mask).for_each(|((o, a), b)| *o = a * b);
    out
}

/// Normalised rows of `x` times `w`, and each row's 1 / rms.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, min_len: usize) -> (Buf, Buf) {
    let h = w.len();
    let mut out = Buf::for_overwrite(x.len());
    let mut inv = Buf::for_overwrite(x.len() / h);
    out.par_chunks_mut(h)
        .zip(inv.par_iter_mut())
        .zip(x.par_chunks(h))
        .with_min_len(min_len)
        .for_each(|((o, r), xr)| {
            *r = crate::kernels::fused::inv_rms(xr, eps);
            crate::kernels::fused::normalize_row(xr, w, *r, o);
        });
    (out, inv)
}

/// Adds to `dx` the input gradient of [`rms_norm`] for the output gradient `g`, row by row
/// with each row's stored 1 / rms.
fn rms_norm_back_add(dx: &mut [f32], x: &[f32], inv: &[f32], w: &[f32], g: &[f32], min_len: usize) {
    let h = w.len();
    let rows = dx
        .par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .zip(g.par_chunks(h))
        .zip(inv.par_iter());
    rows.with_min_len(min_len)
        .for_each(|(((d, xr), gr), &r)| crate::kernels::fused::rms_norm_grad_row_add(xr, gr, w, r, d));
}

/// Elements per task of [`swiglu`] and its backward; also their sigmoid buffer's length.
const SWIGLU_CHUNK: usize = 1024;

/// `silu(gate) * up`, and sigmoid(gate), which the backward needs again.
fn swiglu(gate: &[f32], up: &[f32], min_len: usize) -> (Buf, Buf) {
    let mut sig = Buf::for_overwrite(gate.len());
    sig.par_chunks_mut(SWIGLU_CHUNK)
        .zip(gate.par_chunks(SWIGLU_CHUNK))
        .with_min_len(min_len)
        .for_each(|(s, g)| crate::kernels::softmax::sigmoid(g, s));
    (swiglu_from(gate, up, &sig, min_len), sig)
}

/// `gate * sig * up` with `sig` = sigmoid(gate): [`swiglu`] again without the exponentials.
fn swiglu_from(gate: &[f32], up: &[f32], sig: &[f32], min_len: usize) -> Buf {
    let mut out = Buf::for_overwrite(gate.len());
    let tasks = out
        .par_chunks_mut(SWIGLU_CHUNK)
        .zip(gate.par_chunks(SWIGLU_CHUNK))
        .zip(up.par_chunks(SWIGLU_CHUNK))
        .zip(sig.par_chunks(SWIGLU_CHUNK));
    tasks.with_min_len(min_len).for_each(|(((o, g), u), s)| {
        for (((o, gv), uv), sv) in o.iter_mut().zip(g).zip(u).zip(s) {
            *o = gv * sv * uv;
        }
    });
    out
}

/// Turns `gate` and `up` into their gradients for the gradient `d` of `silu(gate) * up`
/// ([`crate::kernels::fused::swiglu_grads`]), with `sig` holding sigmoid(gate).
fn swiglu_back_in_place(gate: &mut [f32], up: &mut [f32], sig: &[f32], d: &[f32], min_len: usize) {
    let tasks = gate
        .par_chunks_mut(SWIGLU_CHUNK)
        .zip(up.par_chunks_mut(SWIGLU_CHUNK))
        .zip(d.par_chunks(SWIGLU_CHUNK))
        .zip(sig.par_chunks(SWIGLU_CHUNK));
    tasks.with_min_len(min_len).for_each(|(((g, u), d), sig)| {
        for (((gv, uv), dv), &s) in g.iter_mut().zip(u.iter_mut()).zip(d).zip(sig) {
            (*gv, *uv) = crate::kernels::fused::swiglu_grads(*gv, *uv, s, *dv);
        }
    });
}

impl<'a> Step<'a> {
    fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// The fewest items a task of a parallel pass takes: `per_task` with the whole pool, or
    /// all of them, on the calling thread, when this step is one part of several.
    fn min_len(&self, per_task: usize) -> usize {
        match self.threads {
            Threads::Pool => per_task,
            Threads::Caller => usize::MAX,
        }
    }

    fn lora_scale(&self) -> f32 {
        self.adapter.adapter.config.scale() as f32
    }

    /// `out = x W^T + bias + scale * dropout(x) A^T B^T` (or `out +=` with [`Dst::Add`]) for
    /// `x` (rows, in) and `out` (rows, out); the tape of the adapter's part, if it has one.
    fn project(&self, p: &Projection, x: &[f32], out: &mut [f32], mut mode: Dst) -> Result<Option<LoraTape>> {
        let rows = self.rows();
        let (fan_in, fan_out) = (x.len() / rows, out.len() / rows);
        if let Some(bias) = &p.bias {
            with_values(bias, |b| {
                if b.len() != fan_out {
                    return Err(ModelError::ShapeMismatch(format!(
                        "{} bias has {} values for {fan_out} outputs",
                        p.module.name(),
                        b.len()
                    )));
                }
                for row in out.chunks_mut(fan_out) {
                    match mode {
                        Dst::Overwrite => row.copy_from_slice(b),
                        Dst::Add => row.iter_mut().zip(b).for_each(|(o, b)| *o += b),
                    }
                }
                Ok(())
            })?;
            mode = Dst::Add;
        }
        // Each slice of the weight's rows gives those columns of the output.
        for_weight_slices(&p.weight, |first, count, w| {
            let dst = ViewMut::columns(out, rows, fan_out, first, count);
            matmul(
                dst,
                View::new(x, rows, fan_in),
                View::new(w, count, fan_in).t(),
                1.0,
                mode,
                self.threads,
            )
        })?;
        let Some(pair) = self.adapter.adapter.get(p.layer, p.module) else {
            return Ok(None);
        };
        let r = pair.a.dim(0)?;
        let mask = self.adapter.dropout_mask(p.layer, p.module, rows, fan_in);
        let masked = mask.as_deref().map(|m| masked(x, m));
        let input = masked.as_deref().unwrap_or(x);
        let mut low = Buf::for_overwrite(rows * r);
        with_values(&pair.a, |a| {
            let a = View::new(a, r, fan_in).t();
            matmul(
                ViewMut::new(&mut low, rows, r),
                View::new(input, rows, fan_in),
                a,
                self.lora_scale(),
                Dst::Overwrite,
                self.threads,
            )
        })?;
        with_values(&pair.b, |b| {
            matmul(
                ViewMut::new(out, rows, fan_out),
                View::new(&low, rows, r),
                View::new(b, fan_out, r).t(),
                1.0,
                Dst::Add,
                self.threads,
            )
        })?;
        Ok(Some(LoraTape { low, mask }))
    }

    /// The gradients through [`Step::project`] for the output gradient `dy` (rows, out) and the
    /// forward's input `x` (rows, in): A's and B's into `grads`, and the input's into `dx` when
    /// it is wanted, written or added by `mode`.
    #[allow(clippy::too_many_arguments)]
    fn project_back(
        &self,
        p: &Projection,
        dy: &[f32],
        x: &[f32],
        lora: Option<&LoraTape>,
        mut dx: Option<&mut [f32]>,
        mode: Dst,
        grads: &mut Vec<ModuleGrad>,
    ) -> Result<()> {
        let rows = self.rows();
        let (fan_in, fan_out) = (x.len() / rows, dy.len() / rows);
        if let Some(dx) = dx.as_deref_mut() {
            // Each slice of the weight's rows takes those columns of dy; the products add up.
            for_weight_slices(&p.weight, |first, count, w| {
                let slice_mode = if first == 0 { mode } else { Dst::Add };
                let dy_columns = View::columns(dy, rows, fan_out, first, count);
                matmul(
                    ViewMut::new(dx, rows, fan_in),
                    dy_columns,
                    View::new(w, count, fan_in),
                    1.0,
                    slice_mode,
                    self.threads,
                )
            })?;
        }
        let (Some(pair), Some(lora)) = (self.adapter.adapter.get(p.layer, p.module), lora) else {
            return Ok(());
        };
        let r = lora.low.len() / rows;
        let scale = self.lora_scale();
        let dy_view = View::new(dy, rows, fan_out);
        // d low = dy B, d B = dy^T low, d A = scale * d low^T dropout(x).
        let mut d_low = Buf::for_overwrite(rows * r);
        with_values(&pair.b, |b| {
            matmul(
                ViewMut::new(&mut d_low, rows, r),
                dy_view,
                View::new(b, fan_out, r),
                1.0,
                Dst::Overwrite,
                self.threads,
            )
        })?;
        // d B^T (r, out) then its transpose: gemm runs this product 1.4 times as fast into a
        // wide destination as into the tall (out, r) one.
        let mut d_b_t = Buf::for_overwrite(r * fan_out);
        matmul(
            ViewMut::new(&mut d_b_t, r, fan_out),
            View::new(&lora.low, rows, r).t(),
            dy_view,
            1.0,
            Dst::Overwrite,
            self.threads,
        )?;
        let d_b = crate::kernels::small_rows::transpose(&d_b_t, r, fan_out, false);
        let masked = lora.mask.as_deref().map(|m| masked(x, m));
        let input = masked.as_deref().unwrap_or(x);
        let mut d_a = Buf::for_overwrite(r * fan_in);
        let d_low_view = View::new(&d_low, rows, r);
        matmul(
            ViewMut::new(&mut d_a, r, fan_in),
            d_low_view.t(),
            View::new(input, rows, fan_in),
            scale,
            Dst::Overwrite,
            self.threads,
        )?;
        drop(masked);
        if let Some(dx) = dx {
            // d x += scale * (d low A), times the dropout mask where there is one.
            with_values(&pair.a, |a| {
                let a = View::new(a, r, fan_in);
                match &lora.mask {
                    None => matmul(
                        ViewMut::new(dx, rows, fan_in),
                        d_low_view,
                        a,
                        scale,
                        Dst::Add,
                        self.threads,
                    ),
                    Some(mask) => {
                        let mut part = Buf::for_overwrite(rows * fan_in);
                        matmul(
                            ViewMut::new(&mut part, rows, fan_in),
                            d_low_view,
                            a,
                            scale,
                            Dst::Overwrite,
                            self.threads,
                        )?;
                        dx.iter_mut()
                            .zip(part.iter())
                            .zip(mask)
                            .for_each(|((d, v), m)| *d += v * m);
                        Ok(())
                    }
                }
            })?;
        }
        grads.push(ModuleGrad {
            module: p.module,
            a: d_a.into_vec(),
            b: d_b,
        });
        Ok(())
    }

    /// Rotates each head of each row of `x` (rows, heads * head_dim) by its position's angles,
    /// in HF's rotate-half layout; `inverse` rotates back, which is also the backward (a
    /// rotation's transpose is its inverse).
    fn rope(&self, x: &mut [f32], heads: usize, inverse: bool) {
        let (d, half, seq) = (self.head_dim, self.head_dim / 2, self.seq);
        x.par_chunks_mut(heads * d)
            .enumerate()
            .with_min_len(self.min_len(ROWS_PER_TASK))
            .for_each(|(row, xr)| {
                let pos = row % seq;
                let (c, s) = (
                    &self.cos[pos * half..(pos + 1) * half],
                    &self.sin[pos * half..(pos + 1) * half],
                );
                for head in xr.chunks_exact_mut(d) {
                    crate::kernels::fused::rotate_half(head, c, s, inverse);
                }
            });
    }

    /// Causal (and windowed) attention of rotated `q` (rows, heads * d) over `k` and `v`
    /// (rows, kv_heads * d): the probabilities (batch, heads, then blocks as [`block_offset`]
    /// lays them out) and the heads' outputs (rows, heads * d). Sequences are the parallel
    /// tasks; query heads that share a KV head read it in place.
    fn attention(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<(Buf, Buf)> {
        let (t, d) = (self.seq, self.head_dim);
        let (qd, kvd, group) = (self.heads * d, self.kv_heads * d, self.heads / self.kv_heads);
        let scale = 1.0 / (d as f32).sqrt();
        // Every entry is written before it is read: each block's scores, then every head's
        // columns of every row.
        let per_head = head_probs(t);
        let mut probs = Buf::for_overwrite(self.batch * self.heads * per_head);
        let mut out = Buf::for_overwrite(self.rows() * qd);
        let tasks = probs
            .par_chunks_mut(self.heads * per_head)
            .zip(out.par_chunks_mut(t * qd))
            .enumerate();
        tasks.with_min_len(self.min_len(1)).try_for_each(|(s, (p, o))| {
            let (qs, ks, vs) = (
                &q[s * t * qd..(s + 1) * t * qd],
                &k[s * t * kvd..(s + 1) * t * kvd],
                &v[s * t * kvd..(s + 1) * t * kvd],
            );
            for head in 0..self.heads {
                let g = head / group;
                let ph = &mut p[head * per_head..(head + 1) * per_head];
                for first in (0..t).step_by(ATTENTION_BLOCK) {
                    let n = ATTENTION_BLOCK.min(t - first);
                    let keys = first + n;
                    let block = &mut ph[block_offset(first)..block_offset(first) + n * keys];
                    let queries = View::columns(qs, t, qd, head * d, d).rows(first, n);
                    let keys_t = View::columns(ks, keys, kvd, g * d, d).t();
                    matmul(
                        ViewMut::new(block, n, keys),
                        queries,
                        keys_t,
                        scale,
                        Dst::Overwrite,
                        Threads::Caller,
                    )?;
                    for (i, row) in block.chunks_exact_mut(keys).enumerate() {
                        crate::kernels::fused::causal_softmax(row, first + i, self.window);
                    }
                    let probs = View::new(block, n, keys);
                    let dst = ViewMut::columns(o, t, qd, head * d, d).rows(first, n);
                    matmul(
                        dst,
                        probs,
                        View::columns(vs, keys, kvd, g * d, d),
                        1.0,
                        Dst::Overwrite,
                        Threads::Caller,
                    )?;
                }
            }
            Ok::<(), ModelError>(())
        })?;
        Ok((probs, out))
    }

    /// The gradients of `q`, `k` and `v` for the gradient `d_out` of [`Step::attention`]'s
    /// output: with dP = dO V^T and dS = scale * P * (dP - rowsum(P * dP)), dQ = dS K,
    /// dK = dS^T Q and dV = P^T dO, each summed over the query heads of a KV head.
    fn attention_back(&self, q: &[f32], k: &[f32], v: &[f32], probs: &[f32], d_out: &[f32]) -> Result<(Buf, Buf, Buf)> {
        let (t, d) = (self.seq, self.head_dim);
        let (qd, kvd, group) = (self.heads * d, self.kv_heads * d, self.heads / self.kv_heads);
        let scale = 1.0 / (d as f32).sqrt();
        let per_head = head_probs(t);
        // dQ is written head by head, block by block; dK and dV are sums.
        let (mut dq, mut dk, mut dv) = (Buf::for_overwrite(q.len()), Buf::zeroed(k.len()), Buf::zeroed(v.len()));
        let tasks = dq
            .par_chunks_mut(t * qd)
            .zip(dk.par_chunks_mut(t * kvd))
            .zip(dv.par_chunks_mut(t * kvd))
            .enumerate();
        tasks
            .with_min_len(self.min_len(1))
            .try_for_each(|(s, ((dq, dk), dv))| {
                let (qs, ks, vs) = (
                    &q[s * t * qd..(s + 1) * t * qd],
                    &k[s * t * kvd..(s + 1) * t * kvd],
                    &v[s * t * kvd..(s + 1) * t * kvd],
                );
                let dos = &d_out[s * t * qd..(s + 1) * t * qd];
                let mut ds = Buf::for_overwrite(ATTENTION_BLOCK * t);
                for head in 0..self.heads {
                    let g = head / group;
                    let ph = &probs[(s * self.heads + head) * per_head..(s * self.heads + head + 1) * per_head];
                    for first in (0..t).step_by(ATTENTION_BLOCK) {
                        let n = ATTENTION_BLOCK.min(t - first);
                        let keys = first + n;
                        let block = &ph[block_offset(first)..block_offset(first) + n * keys];
                        let p = View::new(block, n, keys);
                        let d_o = View::columns(dos, t, qd, head * d, d).rows(first, n);
                        let k_head = View::columns(ks, keys, kvd, g * d, d);
                        matmul(
                            ViewMut::new(&mut ds, n, keys),
                            d_o,
                            View::columns(vs, keys, kvd, g * d, d).t(),
                            1.0,
                            Dst::Overwrite,
                            Threads::Caller,
                        )?;
                        matmul(
                            ViewMut::columns(dv, keys, kvd, g * d, d),
                            p.t(),
                            d_o,
                            1.0,
                            Dst::Add,
                            Threads::Caller,
                        )?;
                        for (row, pr) in ds.chunks_exact_mut(keys).zip(block.chunks_exact(keys)) {
                            crate::kernels::fused::softmax_grad_row(pr, row, scale);
                        }
                        let d_s = View::new(&ds, n, keys);
                        matmul(
                            ViewMut::columns(dq, t, qd, head * d, d).rows(first, n),
                            d_s,
                            k_head,
                            1.0,
                            Dst::Overwrite,
                            Threads::Caller,
                        )?;
                        let q_head = View::columns(qs, t, qd, head * d, d).rows(first, n);
                        matmul(
                            ViewMut::columns(dk, keys, kvd, g * d, d),
                            d_s.t(),
                            q_head,
                            1.0,
                            Dst::Add,
                            Threads::Caller,
                        )?;
                    }
                }
                Ok::<(), ModelError>(())
            })?;
        Ok((dq, dk, dv))
    }

    /// [`rms_norm`] with the norm `n`.
    fn norm(&self, n: &RmsNorm, x: &[f32]) -> Result<(Buf, Buf)> {
        with_values(&n.weight, |w| {
            if w.is_empty() || !x.len().is_multiple_of(w.len()) {
                return Err(ModelError::ShapeMismatch(format!(
                    "rms norm of {} values with a weight of {}",
                    x.len(),
                    w.len()
                )));
            }
            Ok(rms_norm(x, w, n.eps as f32, self.min_len(ROWS_PER_TASK)))
        })
    }

    /// [`Step::norm`]'s output again from its input and the rows' 1 / rms: one pass, and a
    /// tape without the normalised copies (4 MiB per layer at the benchmark's shape).
    fn renorm(&self, n: &RmsNorm, x: &[f32], inv: &[f32]) -> Result<Buf> {
        with_values(&n.weight, |w| {
            let h = w.len();
            let mut out = Buf::for_overwrite(x.len());
            let rows = out.par_chunks_mut(h).zip(x.par_chunks(h)).zip(inv.par_iter());
            rows.with_min_len(self.min_len(ROWS_PER_TASK))
                .for_each(|((o, xr), &r)| crate::kernels::fused::normalize_row(xr, w, r, o));
            Ok(out)
        })
    }

    /// The final norm, head and loss of this step's rows `x` (rows, hidden) whose weight is
    /// not 0, `head_rows` at a time: the unscaled weighted loss sum and the gradient of
    /// `scale` times it with respect to `x`. Rows of weight 0 (prompts, padding) get no logits
    /// at all, and a zero gradient. The targets are inside the vocabulary (checked once for the
    /// whole batch by [`CausalLm::loss_backward_by_hand`]).
    fn head_back(
        &self,
        model: &CausalLm,
        x: &[f32],
        targets: &[u32],
        weights: &[f32],
        scale: f32,
        head_rows: usize,
    ) -> Result<(f64, Buf)> {
        let (h, vocab) = (self.hidden, model.config.vocab_size);
        let trained: Vec<usize> = (0..targets.len()).filter(|&r| weights[r] != 0.0).collect();
        let head = model.head();
        let mut d_x = Buf::zeroed(x.len());
        let mut loss = 0.0;
        for rows in trained.chunks(head_rows.max(1)) {
            let n = rows.len();
            let mut picked = Buf::for_overwrite(n * h);
            for (dst, &r) in picked.chunks_exact_mut(h).zip(rows) {
                dst.copy_from_slice(&x[r * h..(r + 1) * h]);
            }
            let (normed, inv) = self.norm(&model.norm, &picked)?;
            let mut logits = Buf::for_overwrite(n * vocab);
            for_weight_slices(&head, |first, count, w| {
                let dst = ViewMut::columns(&mut logits, n, vocab, first, count);
                matmul(
                    dst,
                    View::new(&normed, n, h),
                    View::new(w, count, h).t(),
                    1.0,
                    Dst::Overwrite,
                    self.threads,
                )
            })?;
            let tasks = logits
                .par_chunks_mut(vocab)
                .zip(rows.par_iter())
                .with_min_len(self.min_len(1));
            loss += tasks
                .map(|(row, &r)| crate::kernels::softmax::nll_grad_row(row, targets[r] as usize, weights[r], scale))
                .sum::<f64>();
            let mut d_normed = Buf::for_overwrite(n * h);
            for_weight_slices(&head, |first, count, w| {
                let mode = if first == 0 { Dst::Overwrite } else { Dst::Add };
                let grad = View::columns(&logits, n, vocab, first, count);
                matmul(
                    ViewMut::new(&mut d_normed, n, h),
                    grad,
                    View::new(w, count, h),
                    1.0,
                    mode,
                    self.threads,
                )
            })?;
            drop(logits);
            let mut d_picked = Buf::zeroed(n * h);
            with_values(&model.norm.weight, |w| {
                rms_norm_back_add(&mut d_picked, &picked, &inv, w, &d_normed, self.min_len(ROWS_PER_TASK));
                Ok(())
            })?;
            for (&r, d) in rows.iter().zip(d_picked.chunks_exact(h)) {
                d_x[r * h..(r + 1) * h].copy_from_slice(d);
            }
        }
        Ok((loss, d_x))
    }

    /// One layer's output for its input (rows, hidden), and the tape for its backward.
    fn forward(&self, layer: &Layer, input: Buf) -> Result<(Buf, LayerTape)> {
        let rows = self.rows();
        let (qd, kvd) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let (a, m) = (&layer.attn, &layer.mlp);
        let mut lora: [Option<LoraTape>; 7] = Default::default();
        let (normed, inv_rms) = self.norm(&layer.input_norm, &input)?;
        let (mut q, mut k, mut v) = (
            Buf::for_overwrite(rows * qd),
            Buf::for_overwrite(rows * kvd),
            Buf::for_overwrite(rows * kvd),
        );
        lora[TargetModule::QProj as usize] = self.project(&a.q, &normed, &mut q, Dst::Overwrite)?;
        lora[TargetModule::KProj as usize] = self.project(&a.k, &normed, &mut k, Dst::Overwrite)?;
        lora[TargetModule::VProj as usize] = self.project(&a.v, &normed, &mut v, Dst::Overwrite)?;
        drop(normed);
        self.rope(&mut q, self.heads, false);
        self.rope(&mut k, self.kv_heads, false);
        let (probs, attn) = self.attention(&q, &k, &v)?;
        let mut mid = Buf::copy_of(&input);
        lora[TargetModule::OProj as usize] = self.project(&a.o, &attn, &mut mid, Dst::Add)?;
        let (mid_normed, mid_inv_rms) = self.norm(&layer.pre_mlp_norm, &mid)?;
        let (mut gate, mut up) = (
            Buf::for_overwrite(rows * self.intermediate),
            Buf::for_overwrite(rows * self.intermediate),
        );
        lora[TargetModule::GateProj as usize] = self.project(&m.gate, &mid_normed, &mut gate, Dst::Overwrite)?;
        lora[TargetModule::UpProj as usize] = self.project(&m.up, &mid_normed, &mut up, Dst::Overwrite)?;
        drop(mid_normed);
        let (act, gate_sigmoid) = swiglu(&gate, &up, self.min_len(1));
        let mut out = Buf::copy_of(&mid);
        lora[TargetModule::DownProj as usize] = self.project(&m.down, &act, &mut out, Dst::Add)?;
        let tape = LayerTape {
            input,
            inv_rms,
            q,
            k,
            v,
            probs,
            attn,
            mid,
            mid_inv_rms,
            gate,
            up,
            gate_sigmoid,
            lora,
        };
        Ok((out, tape))
    }

    /// Adds the adapter gradients of `layer` for the gradient `d_out` of its output into
    /// `grads`, and returns the gradient of its input when `input_grad` asks for it.
    fn backward(
        &self,
        layer: &Layer,
        tape: LayerTape,
        d_out: &[f32],
        input_grad: bool,
        grads: &mut Vec<ModuleGrad>,
    ) -> Result<Option<Buf>> {
        let rows = self.rows();
        let (a, m) = (&layer.attn, &layer.mlp);
        let LayerTape {
            input,
            inv_rms,
            q,
            k,
            v,
            probs,
            attn,
            mid,
            mid_inv_rms,
            mut gate,
            mut up,
            gate_sigmoid,
            lora,
        } = tape;
        let tape_of = |module: TargetModule| lora[module as usize].as_ref();

        let act = swiglu_from(&gate, &up, &gate_sigmoid, self.min_len(1));
        let mut d_act = Buf::for_overwrite(rows * self.intermediate);
        self.project_back(
            &m.down,
            d_out,
            &act,
            tape_of(TargetModule::DownProj),
            Some(&mut d_act),
            Dst::Overwrite,
            grads,
        )?;
        drop(act);
        swiglu_back_in_place(&mut gate, &mut up, &gate_sigmoid, &d_act, self.min_len(1));
        drop((d_act, gate_sigmoid));
        let mid_normed = self.renorm(&layer.pre_mlp_norm, &mid, &mid_inv_rms)?;
        let mut d_mid_normed = Buf::for_overwrite(rows * self.hidden);
        self.project_back(
            &m.gate,
            &gate,
            &mid_normed,
            tape_of(TargetModule::GateProj),
            Some(&mut d_mid_normed),
            Dst::Overwrite,
            grads,
        )?;
        self.project_back(
            &m.up,
            &up,
            &mid_normed,
            tape_of(TargetModule::UpProj),
            Some(&mut d_mid_normed),
            Dst::Add,
            grads,
        )?;
        drop((gate, up, mid_normed));
        let mut d_mid = Buf::copy_of(d_out);
        with_values(&layer.pre_mlp_norm.weight, |w| {
            rms_norm_back_add(
                &mut d_mid,
                &mid,
                &mid_inv_rms,
                w,
                &d_mid_normed,
                self.min_len(ROWS_PER_TASK),
            );
            Ok(())
        })?;
        drop((mid, d_mid_normed));

        let mut d_attn = Buf::for_overwrite(attn.len());
        self.project_back(
            &a.o,
            &d_mid,
            &attn,
            tape_of(TargetModule::OProj),
            Some(&mut d_attn),
            Dst::Overwrite,
            grads,
        )?;
        drop(attn);
        let (mut dq, mut dk, dv) = self.attention_back(&q, &k, &v, &probs, &d_attn)?;
        drop((q, k, v, probs, d_attn));
        self.rope(&mut dq, self.heads, true);
        self.rope(&mut dk, self.kv_heads, true);

        let normed = self.renorm(&layer.input_norm, &input, &inv_rms)?;
        if !input_grad {
            // The first layer's input is the frozen embeddings: only the adapters need more.
            for (p, d) in [(&a.q, &dq), (&a.k, &dk), (&a.v, &dv)] {
                self.project_back(p, d, &normed, tape_of(p.module), None, Dst::Overwrite, grads)?;
            }
            return Ok(None);
        }
        let mut d_normed = Buf::for_overwrite(rows * self.hidden);
        let parts = [
            (&a.q, &dq, Dst::Overwrite),
            (&a.k, &dk, Dst::Add),
            (&a.v, &dv, Dst::Add),
        ];
        for (p, d, mode) in parts {
            self.project_back(p, d, &normed, tape_of(p.module), Some(&mut d_normed), mode, grads)?;
        }
        let mut d_input = d_mid;
        with_values(&layer.input_norm.weight, |w| {
            rms_norm_back_add(
                &mut d_input,
                &input,
                &inv_rms,
                w,
                &d_normed,
                self.min_len(ROWS_PER_TASK),
            );
            Ok(())
        })?;
        Ok(Some(d_input))
    }
}

impl CausalLm {
    /// Whether a step for `adapter` can run by hand: the base and the adapter in f32 on the
    /// CPU, with dense or NF4 projections, and a layer this file writes out (the Llama layer,
    /// one window for all: Qwen3's and Gemma 3's train through candle's graph).
    pub(crate) fn trains_by_hand(&self, adapter: &ActiveAdapter) -> bool {
        if !self.config.llama_layers() {
            return false;
        }
        let f32_cpu = |t: &Tensor| crate::kernels::fused::fusable(t);
        let weights_ok = self.layers.iter().all(|l| {
            crate::lora::TargetModule::ALL
                .iter()
                .all(|&m| match &l.projection(m).weight {
                    BaseWeight::Dense(t) => f32_cpu(t),
                    BaseWeight::Nf4(_) => true,
                    BaseWeight::Int8(_) => false,
                })
        });
        weights_ok && f32_cpu(&self.norm.weight) && adapter.adapter.pairs().all(|(_, p)| f32_cpu(&p.a) && f32_cpu(&p.b))
    }

    fn by_hand_step<'a>(
        &self,
        batch: usize,
        seq: usize,
        adapter: &ActiveAdapter<'a>,
        threads: Threads,
    ) -> Result<Step<'a>> {
        let c = &self.config;
        // One kind of layer: `trains_by_hand` takes only the Llama layer with one window.
        let (cos, sin) = self.kinds[0].rope.tables(0, seq, &Device::Cpu)?;
        Ok(Step {
            batch,
            seq,
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_kv_heads(),
            head_dim: c.head_dim(),
            intermediate: c.intermediate_size,
            window: c.attention_window(),
            cos: cos.flatten_all()?.to_vec1()?,
            sin: sin.flatten_all()?.to_vec1()?,
            adapter: *adapter,
            threads,
        })
    }

    /// The loss sum and its adapter gradients by hand: one store per layer when
    /// `checkpointed` (each layer's tape is rebuilt from its input on the way back, for the
    /// whole batch at once), else one store for all.
    ///
    /// With at least as many sequences as threads, the batch is cut into one part of whole
    /// sequences per thread, and each thread runs its part through a layer on its own
    /// (products and element-wise passes on the calling thread), the parts meeting only
    /// between layers. Sequences never look at each other, so this is the same arithmetic as
    /// the whole batch at once, with no hand-over between threads inside a layer;
    /// single-threaded products of half the rows also run faster per thread than
    /// two-threaded ones of all rows. With fewer sequences than threads, there is a part per
    /// sequence and their work shares the pool.
    pub(crate) fn loss_backward_by_hand(
        &self,
        batch: &LossBatch,
        step: &CheckpointedStep,
        checkpointed: bool,
    ) -> Result<(f64, Vec<GradStore>)> {
        let (b, t) = batch.input_ids.dims2()?;
        if b == 0 || t == 0 {
            return Err(ModelError::EmptyInput(format!(
                "a training step of an empty batch ({b} x {t} tokens)"
            )));
        }
        let h = self.config.hidden_size;
        let targets = batch.targets.to_vec1::<u32>()?;
        let weights = batch.weights.to_vec1::<f32>()?;
        let vocab = self.config.vocab_size;
        if let Some(row) = targets.iter().position(|&t| t as usize >= vocab) {
            return Err(ModelError::TokenOutOfVocab(format!(
                "loss row {row} targets token {} of a {vocab}-token vocabulary",
                targets[row]
            )));
        }
        let embedded = self.embed_tokens(batch.input_ids)?.flatten_all()?.to_vec1::<f32>()?;
        crate::kernels::scratch::set_pooling(!checkpointed);
        // One part per thread when the batch has a sequence for each; with fewer sequences
        // than threads (a batch of 4 on 16 cores), each part's products and passes share the
        // pool instead, so no thread idles.
        let pool = rayon::current_num_threads().max(1);
        let count = pool.min(b);
        let threads = if count > 1 && count == pool {
            Threads::Caller
        } else {
            Threads::Pool
        };
        let mut parts = Vec::with_capacity(count);
        for p in 0..count {
            let sequences = p * b / count..(p + 1) * b / count;
            let rows = sequences.start * t..sequences.end * t;
            let adapter = ActiveAdapter {
                first_row: step.adapter.first_row + rows.start,
                ..step.adapter
            };
            parts.push(Part {
                step: self.by_hand_step(sequences.len(), t, &adapter, threads)?,
                x: Buf::copy_of(&embedded[rows.start * h..rows.end * h]),
                rows,
                tapes: Vec::new(),
                inputs: Vec::new(),
                grads: Vec::new(),
                loss: 0.0,
            });
        }
        drop(embedded);
        for layer in &self.layers {
            parts.par_iter_mut().try_for_each(|part| {
                let (out, tape) = part
                    .step
                    .forward(layer, std::mem::replace(&mut part.x, Buf::for_overwrite(0)))?;
                if checkpointed {
                    part.inputs.push(tape.input);
                } else {
                    part.tapes.push(tape);
                }
                part.x = out;
                Ok::<(), ModelError>(())
            })?;
        }
        // The parts' chunks of logits exist side by side: together they hold `head_rows` rows.
        let head_rows = step.head_rows.div_ceil(count);
        parts.par_iter_mut().try_for_each(|part| {
            let rows = part.rows.clone();
            let (loss, grad) = part.step.head_back(
                self,
                &part.x,
                &targets[rows.clone()],
                &weights[rows],
                step.loss_scale as f32,
                head_rows,
            )?;
            part.loss = loss;
            part.x = grad;
            Ok::<(), ModelError>(())
        })?;
        for (i, layer) in self.layers.iter().enumerate().rev() {
            parts.par_iter_mut().try_for_each(|part| {
                let tape = match (part.tapes.pop(), part.inputs.pop()) {
                    (Some(tape), _) => tape,
                    (None, Some(input)) => part.step.forward(layer, input)?.1,
                    (None, None) => return Err(ModelError::Backward(format!("no tape or input left for layer {i}"))),
                };
                let mut grads = Vec::new();
                if let Some(d) = part.step.backward(layer, tape, &part.x, i > 0, &mut grads)? {
                    part.x = d;
                }
                part.grads.push((i, grads));
                Ok(())
            })?;
        }
        let loss = parts.iter().map(|p| p.loss).sum();
        let stores = self.sum_parts(parts, step.adapter.adapter, checkpointed)?;
        crate::kernels::scratch::end_step();
        Ok((loss, stores))
    }

    /// The parts' adapter gradients added up, as one store per layer or one for all.
    fn sum_parts(
        &self,
        parts: Vec<Part>,
        adapter: &crate::lora::LoraAdapter,
        per_layer: bool,
    ) -> Result<Vec<GradStore>> {
        let mut sums: std::collections::BTreeMap<(usize, TargetModule), (Vec<f32>, Vec<f32>)> = Default::default();
        for part in parts {
            for (layer, grads) in part.grads {
                for g in grads {
                    match sums.get_mut(&(layer, g.module)) {
                        Some((a, b)) => {
                            a.iter_mut().zip(&g.a).for_each(|(s, v)| *s += v);
                            b.iter_mut().zip(&g.b).for_each(|(s, v)| *s += v);
                        }
                        None => {
                            sums.insert((layer, g.module), (g.a, g.b));
                        }
                    }
                }
            }
        }
        let mut stores: Vec<GradStore> = (0..if per_layer { self.layers.len() } else { 1 })
            .map(|_| GradStore::default())
            .collect();
        for ((layer, module), (a, b)) in sums {
            let pair = adapter.get(layer, module).ok_or_else(|| {
                ModelError::Backward(format!(
                    "a gradient for layer {layer} {} without an adapter pair",
                    module.name()
                ))
            })?;
            let store = &mut stores[if per_layer { layer } else { 0 }];
            store.insert(&pair.a, Tensor::from_vec(a, pair.a.shape(), &Device::Cpu)?);
            store.insert(&pair.b, Tensor::from_vec(b, pair.b.shape(), &Device::Cpu)?);
        }
        Ok(stores)
    }
}

/// The rows of a batch that one thread runs, and what it keeps between layers.
struct Part<'a> {
    step: Step<'a>,
    /// Its rows of the flattened batch.
    rows: std::ops::Range<usize>,
    /// The current layer's input going forward; the gradient of the layer's output going back.
    x: Buf,
    tapes: Vec<LayerTape>,
    /// Layer inputs, under checkpointing.
    inputs: Vec<Buf>,
    /// Adapter gradients per layer.
    grads: Vec<(usize, Vec<ModuleGrad>)>,
    loss: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::BaseFormat;
    use crate::lora::{LoraAdapter, LoraConfig};
    use candle_core::D;
    use candle_nn::VarBuilder;

    const BATCH: usize = 2;
    /// Three attention blocks, the last one partial.
    const SEQ: usize = 150;

    /// A Llama with biases on every projection, a sliding window shorter than the sequence,
    /// grouped-query attention and norms that are not all ones: every branch of the step.
    fn model() -> CausalLm {
        let mut config = crate::tiny::TinySpec::default().config();
        config.attention_bias = true;
        config.mlp_bias = true;
        config.sliding_window = Some(40);
        let mut weights = crate::tiny::random_weights(&config, 3).expect("weights");
        let noise = |n: usize, seed: u64, base: f32| -> Tensor {
            let values = (0..n)
                .map(|i| base + 0.2 * ((i as f32 * 0.77 + seed as f32).sin()))
                .collect::<Vec<f32>>();
            Tensor::from_vec(values, n, &Device::Cpu).expect("noise")
        };
        for layer in 0..config.num_hidden_layers {
            for (i, m) in TargetModule::ALL.into_iter().enumerate() {
                let name = format!("model.layers.{layer}.{}.{}.bias", m.parent(), m.name());
                weights.insert(name, noise(m.shape(&config).1, (layer * 7 + i) as u64, 0.0));
            }
            for (i, norm) in ["input_layernorm", "post_attention_layernorm"].into_iter().enumerate() {
                weights.insert(
                    format!("model.layers.{layer}.{norm}.weight"),
                    noise(config.hidden_size, (layer * 2 + i) as u64, 1.0),
                );
            }
        }
        let vb = VarBuilder::from_tensors(weights.into_iter().collect(), candle_core::DType::F32, &Device::Cpu);
        CausalLm::load(vb, &config, BaseFormat::Dense).expect("model")
    }

    #[test]
    fn by_hand_equals_the_graph_with_biases_a_window_and_several_attention_blocks() -> Result<()> {
        // One part per thread (two sequences on this machine's two threads), and one part
        // sharing the pool (one sequence).
        by_hand_equals_the_graph(&model(), BATCH, SEQ)?;
        by_hand_equals_the_graph(&model(), 1, SEQ)
    }

    /// NF4 projections above the slicing threshold are expanded a slice of rows at a time,
    /// forward (slices of output columns) and backward (slices of the sum).
    #[test]
    fn by_hand_equals_the_graph_with_nf4_projections_expanded_in_slices() -> Result<()> {
        let mut config = crate::tiny::TinySpec::default().config();
        config.hidden_size = 512;
        config.intermediate_size = 2304;
        config.num_hidden_layers = 1;
        config.num_attention_heads = 8;
        config.num_key_value_heads = Some(4);
        let weights = crate::tiny::random_weights(&config, 4)?;
        let vb = VarBuilder::from_tensors(weights.into_iter().collect(), candle_core::DType::F32, &Device::Cpu);
        let model = CausalLm::load(vb, &config, crate::linear::BaseFormat::Nf4)?;
        let sliced = |m: TargetModule| match &model.layers[0].projection(m).weight {
            BaseWeight::Nf4(q) => q.row_slices().map(|s| s.len()).unwrap_or(0),
            _ => 0,
        };
        assert!(
            sliced(TargetModule::GateProj) > 1 && sliced(TargetModule::DownProj) > 1,
            "the MLP weights are sliced"
        );
        by_hand_equals_the_graph(&model, 2, 12)
    }

    fn by_hand_equals_the_graph(model: &CausalLm, batch_size: usize, seq: usize) -> Result<()> {
        let config = model.config().clone();
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.2,
            target_modules: TargetModule::ALL.to_vec(),
        };
        let (adapter, vars) = LoraAdapter::init_trainable(&config, lora, 5, &Device::Cpu)?;
        // B random rather than zero, so every path carries a delta; seeded, so every run
        // checks the same values.
        for (i, v) in vars.iter().enumerate().filter(|(_, v)| v.name.contains("lora_B")) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
            let values: Vec<f32> = (0..v.var.elem_count())
                .map(|_| rng.random_range(-0.17f32..0.17))
                .collect();
            v.var.set(&Tensor::from_vec(values, v.var.shape(), &Device::Cpu)?)?;
        }
        let active = ActiveAdapter {
            adapter: &adapter,
            dropout_seed: Some(9),
            first_row: 0,
        };
        assert!(model.trains_by_hand(&active));

        let rows = batch_size * seq;
        let ids: Vec<u32> = (0..rows).map(|i| ((i * 37 + 11) % config.vocab_size) as u32).collect();
        let input = Tensor::from_vec(ids.clone(), (batch_size, seq), &Device::Cpu)?;
        let targets: Vec<u32> = (0..rows).map(|i| ids[(i + 1) % rows]).collect();
        let weights: Vec<f32> = (0..rows)
            .map(|i| if i % seq > seq / 7 && i % 3 != 0 { 1.0 } else { 0.0 })
            .collect();
        let targets = Tensor::from_vec(targets, rows, &Device::Cpu)?;
        let weights = Tensor::from_vec(weights, rows, &Device::Cpu)?;
        let scale = 0.01;

        // The reference: candle's graph over the whole batch's logits.
        let logits = model.forward(&input, 0, None, Some(&active))?.reshape((rows, ()))?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let sum = (logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)? * &weights)?
            .sum_all()?
            .neg()?;
        let want_loss = sum.to_scalar::<f32>()? as f64;
        let want = (sum * scale)?.backward()?;

        let batch = LossBatch {
            input_ids: &input,
            targets: &targets,
            weights: &weights,
        };
        let step = CheckpointedStep {
            adapter: active,
            loss_scale: scale,
            head_rows: 64,
            recompute_sequences: 0,
        };
        for checkpointed in [false, true] {
            let (loss, stores) = model.loss_backward_by_hand(&batch, &step, checkpointed)?;
            assert!(
                (loss - want_loss).abs() < 1e-4 * want_loss.abs(),
                "loss {loss} vs {want_loss}"
            );
            for v in &vars {
                let expected = want.get(v.var.as_tensor()).expect("graph gradient");
                let got = stores
                    .iter()
                    .find_map(|s| s.get(v.var.as_tensor()))
                    .unwrap_or_else(|| panic!("no gradient for {}", v.name));
                let size = expected.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                let diff = (expected - got)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(
                    size > 0.0 && diff <= 1e-4 * size,
                    "{} (checkpointed {checkpointed}): differs by {diff}, largest {size}",
                    v.name
                );
            }
        }
        Ok(())
    }

    /// A loss target past the vocabulary is an error naming its row of the batch (not of a
    /// thread's part), in either mode.
    #[test]
    fn a_target_past_the_vocabulary_is_an_error_naming_the_row() -> Result<()> {
        let model = model();
        let vocab = model.config().vocab_size as u32;
        let lora = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: vec![TargetModule::QProj],
        };
        let (adapter, _vars) = LoraAdapter::init_trainable(model.config(), lora, 1, &Device::Cpu)?;
        let input = Tensor::from_vec(vec![1u32, 2, 3, 4, 5, 6], (2, 3), &Device::Cpu)?;
        let targets = Tensor::from_vec(vec![2u32, 3, 0, 5, vocab, 0], 6, &Device::Cpu)?;
        let weights = Tensor::from_vec(vec![1f32, 1.0, 0.0, 1.0, 1.0, 0.0], 6, &Device::Cpu)?;
        let batch = LossBatch {
            input_ids: &input,
            targets: &targets,
            weights: &weights,
        };
        let active = ActiveAdapter {
            adapter: &adapter,
            dropout_seed: None,
            first_row: 0,
        };
        let step = CheckpointedStep {
            adapter: active,
            loss_scale: 1.0,
            head_rows: 4,
            recompute_sequences: 0,
        };
        for checkpointed in [false, true] {
            let err = model
                .loss_backward_by_hand(&batch, &step, checkpointed)
                .expect_err("target past the vocabulary")
                .to_string();
            assert!(
                err.contains(&format!("row 4 targets token {vocab} of a {vocab}-token vocabulary")),
                "{err}"
            );
        }
        Ok(())
    }

    #[test]
    fn attention_blocks_keep_only_the_keys_up_to_their_last_row() {
        assert_eq!(head_probs(256), 64 * (64 + 128 + 192 + 256), "5/8 of 256 x 256");
        assert_eq!(head_probs(150), 64 * (64 + 128) + 22 * 150, "a partial last block");
        assert_eq!(head_probs(12), 12 * 12);
        assert_eq!(block_offset(128), 64 * 64 + 64 * 128);
    }

    #[test]
    fn rope_backward_undoes_the_forward_rotation() {
        let spec = crate::tiny::TinySpec::default().config();
        let adapter = LoraAdapter::from_pairs(
            LoraConfig {
                r: 1,
                alpha: 1.0,
                dropout: 0.0,
                target_modules: vec![TargetModule::QProj],
            },
            Default::default(),
        );
        let active = ActiveAdapter {
            adapter: &adapter,
            dropout_seed: None,
            first_row: 0,
        };
        let model = model();
        let step = model.by_hand_step(2, 5, &active, Threads::Pool).expect("step");
        let d = spec.head_dim();
        let x: Vec<f32> = (0..2 * 5 * 3 * d).map(|i| (i as f32 * 0.31).cos()).collect();
        let mut y = x.clone();
        step.rope(&mut y, 3, false);
        assert!(
            y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 1e-3),
            "positions past 0 rotate"
        );
        step.rope(&mut y, 3, true);
        assert!(y.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-5));
    }
}
