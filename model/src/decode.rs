//! Batched decoding: one new token for each of several sequences in a single forward.
//!
//! At decode time a forward is dominated by reading the weights, so stacking the sequences'
//! new tokens into one (rows, hidden) batch makes every projection read its weight once per
//! step instead of once per sequence. Only attention is per sequence: each row attends to its
//! own KV cache, whose length differs from row to row. LoRA stays unmerged and is added per
//! group of rows sharing an adapter, so one batch can mix adapters and the base.
//!
//! This path is inference only: it uses candle's fused norm, rope and softmax kernels, which
//! have no backward. Training goes through [`CausalLm::forward`].

use crate::cache::KvCache;
use crate::error::{ModelError, Result};
use crate::fused::cpu_f32;
use crate::linear::{RowGroup, RowGroups};
use crate::lora::{ActiveAdapter, LoraAdapter};
use crate::model::{Attention, CausalLm, Layer, Mlp};
use candle_core::{Layout, Tensor};
use rayon::prelude::*;

/// One sequence's part of a decode step: its newest token, its cache (which the step extends
/// by one position) and its adapter, if any.
pub struct DecodeRow<'a> {
    pub token: u32,
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a LoraAdapter>,
}

impl CausalLm {
    /// Runs one token per row at the position after its cache and returns the logits, (rows,
    /// vocab), in row order. Each row's logits equal those of [`CausalLm::forward`] with that
    /// row's cache and adapter alone (up to float rounding of the fused kernels).
    pub fn decode(&self, rows: &mut [DecodeRow<'_>]) -> Result<Tensor> {
        crate::threads::in_pool(|| self.decode_in_pool(rows))
    }

    fn decode_in_pool(&self, rows: &mut [DecodeRow<'_>]) -> Result<Tensor> {
        if rows.is_empty() {
            return Err(ModelError::Decode("decode called with no rows".into()));
        }
        let positions = self.check_caches(rows)?;
        let groups = group_rows(rows, &self.device)?;
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let ids = Tensor::new(tokens.as_slice(), &self.device)?;
        let mut x = self.embed_rows(&ids)?;
        let (cos, sin) = self.rope.tables_at(&positions, &self.device)?;
        let (cos, sin) = (cos.to_dtype(self.dtype())?, sin.to_dtype(self.dtype())?);
        let mut caches: Vec<&mut KvCache> = rows.iter_mut().map(|r| &mut *r.cache).collect();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.decode(&x, &cos, &sin, &mut caches, i, &groups)?;
        }
        let x = self.norm.forward_inference(&x)?;
        crate::linear::matmul_weight(&x, &self.head())
    }

    /// Every cache must belong to this model and fit one more position; returns the position
    /// each row's token takes.
    fn check_caches(&self, rows: &[DecodeRow<'_>]) -> Result<Vec<usize>> {
        let max = self.config.max_position_embeddings;
        rows.iter()
            .enumerate()
            .map(|(i, r)| {
                if r.cache.num_layers() != self.layers.len() {
                    return Err(ModelError::Decode(format!(
                        "row {i}: KV cache has {} layers, the model {}",
                        r.cache.num_layers(),
                        self.layers.len()
                    )));
                }
                if r.cache.is_empty() {
                    return Err(ModelError::Decode(format!(
                        "row {i}: empty KV cache; prefill the prompt first"
                    )));
                }
                if r.cache.len() >= max {
                    return Err(ModelError::Decode(format!(
                        "row {i}: position {} is past max_position_embeddings {max}",
                        r.cache.len()
                    )));
                }
                Ok(r.cache.len())
            })
            .collect()
    }
}

/// Groups rows by adapter (by identity: the server hands the same loaded adapter to every
/// request for it).
fn group_rows<'a>(rows: &[DecodeRow<'a>], device: &candle_core::Device) -> Result<RowGroups<'a>> {
    let mut found: Vec<(&'a LoraAdapter, Vec<u32>)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let Some(adapter) = r.adapter else { continue };
        match found.iter_mut().find(|(a, _)| std::ptr::eq(*a, adapter)) {
            Some((_, idx)) => idx.push(i as u32),
            None => found.push((adapter, vec![i as u32])),
        }
    }
    let groups = found
        .into_iter()
        .map(|(adapter, idx)| {
            // A group spanning the batch needs no gather or scatter.
            let rows_tensor = if idx.len() == rows.len() {
                None
            } else {
                Some(Tensor::new(idx.as_slice(), device)?)
            };
            Ok(RowGroup {
                adapter: ActiveAdapter {
                    adapter,
                    dropout_seed: None,
                    first_row: 0,
                },
                rows: rows_tensor,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RowGroups { groups })
}

impl Layer {
    fn decode(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut [&mut KvCache],
        index: usize,
        groups: &RowGroups,
    ) -> Result<Tensor> {
        let h = self.input_norm.forward_inference(x)?;
        let h = self.attn.decode(&h, cos, sin, caches, index, groups)?;
        let x = (x + h)?;
        let h = self.mlp.decode(&self.post_attn_norm.forward_inference(&x)?, groups)?;
        Ok((x + h)?)
    }
}

impl Attention {
    /// `x` is (rows, hidden). Projections run on the whole batch, attention per row.
    fn decode(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut [&mut KvCache],
        layer: usize,
        groups: &RowGroups,
    ) -> Result<Tensor> {
        let rows = x.dim(0)?;
        // (rows, heads * d) is already (rows, heads, 1, d) in memory: a free reshape.
        let heads = |y: Tensor, n: usize| y.reshape((rows, n, 1, self.head_dim));
        let q = heads(self.q.forward_rows(x, groups)?, self.heads)?;
        let k = heads(self.k.forward_rows(x, groups)?, self.kv_heads)?;
        let v = heads(self.v.forward_rows(x, groups)?, self.kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let mut views = Vec::with_capacity(rows);
        for (i, cache) in caches.iter_mut().enumerate() {
            views.push(cache.append(layer, &k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?)?);
        }
        let out = match self.attend_rows_cpu(&q, &views)? {
            Some(out) => out,
            None => {
                let mut outs = Vec::with_capacity(rows);
                for (i, (kc, vc)) in views.iter().enumerate() {
                    outs.push(self.attend_one(&q.narrow(0, i, 1)?, kc, vc)?);
                }
                Tensor::cat(&outs, 0)?
            }
        };
        self.o.forward_rows(&out, groups)
    }

    /// Every row's attention in one pass over rows split across threads, for f32 on the CPU
    /// (None otherwise). Per row and layer the general path is about a dozen small candle ops,
    /// each allocating and some dispatching to gemm's threads: at 16 sequences that is over a
    /// thousand tiny ops per decode step. Here each row reads its cache views in place.
    fn attend_rows_cpu(&self, q: &Tensor, views: &[(Tensor, Tensor)]) -> Result<Option<Tensor>> {
        if !crate::fused::fusable(q)
            || views
                .iter()
                .any(|(k, v)| !crate::fused::fusable(k) || !crate::fused::fusable(v))
        {
            return Ok(None);
        }
        let q = q.contiguous()?;
        let (q_guard, q_layout) = q.storage_and_layout();
        let Some(q_data) = cpu_f32(&q_guard, q_layout) else {
            return Ok(None);
        };
        let mut guards = Vec::with_capacity(views.len());
        for (k, v) in views {
            let (kg, kl) = k.storage_and_layout();
            let (vg, vl) = v.storage_and_layout();
            guards.push(((kg, kl), (vg, vl)));
        }
        let mut caches = Vec::with_capacity(views.len());
        for ((kg, kl), (vg, vl)) in &guards {
            let (Some(k), Some(v)) = (cpu_f32(kg, kl), cpu_f32(vg, vl)) else {
                return Ok(None);
            };
            let (Some(k), Some(v)) = (
                CacheView::new(k, kl, self.kv_heads, self.head_dim),
                CacheView::new(v, vl, self.kv_heads, self.head_dim),
            ) else {
                return Ok(None);
            };
            caches.push((k, v));
        }
        let (heads, d, group) = (self.heads, self.head_dim, self.heads / self.kv_heads);
        let attend = group_attention_kernel();
        let mut out = vec![0f32; views.len() * heads * d];
        // One task per (row, KV head): the query heads sharing a KV head are contiguous in
        // both q and the output, and one sequence still spreads over the threads.
        out.par_chunks_mut(group * d).enumerate().for_each(|(task, o)| {
            let (row, kv) = (task / self.kv_heads, task % self.kv_heads);
            let (k, v) = &caches[row];
            let group_attention = GroupAttention {
                q: &q_data[task * group * d..(task + 1) * group * d],
                k,
                v,
                kv,
                start: self.window.map_or(0, |w| k.len.saturating_sub(w)),
                scale: 1.0 / (d as f32).sqrt(),
            };
            attend(&group_attention, o);
        });
        Ok(Some(Tensor::from_vec(out, (views.len(), heads * d), q.device())?))
    }

    /// One row's query, (1, heads, 1, d), against its cache views, (1, kv_heads, len, d).
    /// The query heads that share a KV head become the rows of one matmul, so grouped-query
    /// attention needs no copy of the cache per query head.
    fn attend_one(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let group = self.heads / self.kv_heads;
        let len = k.dim(2)?;
        // The newest position sees the `window` latest ones, itself included.
        let start = self.window.map_or(0, |w| len.saturating_sub(w));
        let k = k.squeeze(0)?.narrow(1, start, len - start)?;
        let v = v.squeeze(0)?.narrow(1, start, len - start)?;
        let q = q.reshape((self.kv_heads, group, self.head_dim))?;
        let scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probs.matmul(&v)?.reshape((1, self.heads * self.head_dim))?)
    }
}

/// The query heads of one row that share KV head `kv`, (group, d), against that head's
/// cached positions `start..len`.
struct GroupAttention<'a> {
    q: &'a [f32],
    k: &'a CacheView<'a>,
    v: &'a CacheView<'a>,
    kv: usize,
    start: usize,
    scale: f32,
}

/// [`attend_group`] compiled for AVX-512 when the CPU has it. The crate is built for baseline
/// x86-64, so the plain function's loops vectorise only to SSE2's four lanes.
fn group_attention_kernel() -> fn(&GroupAttention, &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: returned only after checking that the CPU has the features.
            return |a, o| unsafe { attend_group_avx512(a, o) };
        }
    }
    attend_group
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_group_avx512(a: &GroupAttention, o: &mut [f32]) {
    // SAFETY: this function runs only where the CPU has AVX-512F.
    let mut p = if a.k.d.is_multiple_of(16) {
        unsafe { avx512_scores::scores(a) }
    } else {
        scores(a)
    };
    crate::softmax::softmax_rows(&mut p, a.k.len - a.start);
    mix_values(a, &p, o)
}

/// Softmax(q k^T * scale) v for each query head of the group, into `o` (group, d).
#[inline(always)]
fn attend_group(a: &GroupAttention, o: &mut [f32]) {
    let mut p = scores(a);
    crate::softmax::softmax_rows(&mut p, a.k.len - a.start);
    mix_values(a, &p, o)
}

/// q k^T * scale, (group, positions). Each cached key is read once for all heads of the group.
#[inline(always)]
fn scores(a: &GroupAttention) -> Vec<f32> {
    let d = a.k.d;
    let n = a.k.len - a.start;
    let mut p = vec![0f32; (a.q.len() / d) * n];
    for (j, pos) in (a.start..a.k.len).enumerate() {
        let key = a.k.position(a.kv, pos);
        for (g, qh) in a.q.chunks_exact(d).enumerate() {
            p[g * n + j] = crate::small_rows::dot_with::<false>(qh, key) * a.scale;
        }
    }
    p
}

/// The weighted sum of the cached values by each head's probabilities `p`, into `o`.
#[inline(always)]
fn mix_values(a: &GroupAttention, p: &[f32], o: &mut [f32]) {
    let d = a.k.d;
    let n = a.k.len - a.start;
    for (j, pos) in (a.start..a.k.len).enumerate() {
        let value = a.v.position(a.kv, pos);
        for (g, oh) in o.chunks_exact_mut(d).enumerate() {
            let w = p[g * n + j];
            oh.iter_mut().zip(value).for_each(|(o, x)| *o += w * x);
        }
    }
}

/// Scores sixteen positions at a time. A dot product per position ends in a horizontal sum of
/// sixteen lanes, which cost more than the multiply-adds at head_dim 64 (a third of a
/// 16-sequence decode step was attention); here the sixteen positions' partial sums are
/// reduced together by a shuffle tree into one vector of sixteen scores.
#[cfg(target_arch = "x86_64")]
mod avx512_scores {
    use super::GroupAttention;
    use std::arch::x86_64::*;

    /// As [`super::scores`], for head_dim a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores(a: &GroupAttention) -> Vec<f32> {
        let d = a.k.d;
        let n = a.k.len - a.start;
        let group = a.q.len() / d;
        let mut p = vec![0f32; group * n];
        let scale = _mm512_set1_ps(a.scale);
        // Up to four query heads per pass, so each key is loaded once for all of them.
        for g0 in (0..group).step_by(4) {
            let heads = (group - g0).min(4);
            for j0 in (0..n).step_by(16) {
                let m = (n - j0).min(16);
                let mut acc = [[_mm512_setzero_ps(); 16]; 4];
                for jj in 0..m {
                    let key = a.k.position(a.kv, a.start + j0 + jj);
                    for (c, kc) in key.chunks_exact(16).enumerate() {
                        // SAFETY: the chunk holds exactly 16 values.
                        let kv = unsafe { _mm512_loadu_ps(kc.as_ptr()) };
                        for (h, acc) in acc.iter_mut().take(heads).enumerate() {
                            let qc = &a.q[(g0 + h) * d + c * 16..(g0 + h) * d + c * 16 + 16];
                            // SAFETY: as above.
                            acc[jj] = _mm512_fmadd_ps(unsafe { _mm512_loadu_ps(qc.as_ptr()) }, kv, acc[jj]);
                        }
                    }
                }
                for (h, acc) in acc.iter().take(heads).enumerate() {
                    let mut out = [0f32; 16];
                    // SAFETY: `out` holds 16 values.
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), _mm512_mul_ps(reduce16(acc), scale)) };
                    let row = (g0 + h) * n + j0;
                    p[row..row + m].copy_from_slice(&out[..m]);
                }
            }
        }
        p
    }

    /// Lane i of the result is the sum of the sixteen lanes of `v[i]`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn reduce16(v: &[__m512; 16]) -> __m512 {
        // Pairs: per 128-bit lane, (a0+a2, b0+b2, a1+a3, b1+b3).
        let pair = |a: __m512, b: __m512| _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        // Quads: per 128-bit lane L, the lane-L sums of four vectors, in order (64-bit
        // unpacks move the pairs' f32 sums two at a time).
        let quad = |x: __m512, y: __m512| {
            let (xd, yd) = (_mm512_castps_pd(x), _mm512_castps_pd(y));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(xd, yd)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(xd, yd)),
            )
        };
        let y: [__m512; 4] =
            std::array::from_fn(|m| quad(pair(v[4 * m], v[4 * m + 1]), pair(v[4 * m + 2], v[4 * m + 3])));
        // y[m] holds, in 128-bit lane L, the lane-L sums of vectors 4m..4m+4. Adding lanes
        // (0, 2) to (1, 3) twice leaves lane m of the result with y[m]'s four-lane totals.
        let halves = |a: __m512, b: __m512| {
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b))
        };
        let (u01, u23) = (halves(y[0], y[1]), halves(y[2], y[3]));
        halves(u01, u23)
    }
}

/// One layer's cached keys or values of one sequence, (1, kv_heads, len, d), read in place:
/// each position's head_dim values must be contiguous; heads and positions may be strided.
struct CacheView<'a> {
    data: &'a [f32],
    head_stride: usize,
    pos_stride: usize,
    len: usize,
    d: usize,
}

impl<'a> CacheView<'a> {
    fn new(data: &'a [f32], layout: &Layout, kv_heads: usize, d: usize) -> Option<Self> {
        let (&[1, h, len, dd], &[_, hs, ps, 1]) = (layout.dims(), layout.stride()) else {
            return None;
        };
        if h != kv_heads || dd != d || len == 0 || data.len() < (h - 1) * hs + (len - 1) * ps + d {
            return None;
        }
        Some(Self {
            data,
            head_stride: hs,
            pos_stride: ps,
            len,
            d,
        })
    }

    fn position(&self, head: usize, pos: usize) -> &[f32] {
        let at = head * self.head_stride + pos * self.pos_stride;
        &self.data[at..at + self.d]
    }
}

impl Mlp {
    fn decode(&self, x: &Tensor, groups: &RowGroups) -> Result<Tensor> {
        let gate = self.gate.forward_rows(x, groups)?.silu()?;
        let up = self.up.forward_rows(x, groups)?;
        self.down.forward_rows(&(gate * up)?, groups)
    }
}

#[cfg(test)]
mod tests {
    use super::{attend_group, CacheView, GroupAttention};

    /// A cache of two KV heads, each `len` positions of `d` values.
    fn view(data: &[f32], len: usize, d: usize) -> CacheView<'_> {
        CacheView {
            data,
            head_stride: len * d,
            pos_stride: d,
            len,
            d,
        }
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// The AVX-512 attention (sixteen positions per reduction, up to four heads per pass)
    /// equals the portable one, for head dims with and without a multiple of 16, position
    /// counts that leave partial blocks, a window start, and groups of 1, 2 and 6 heads.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_attention_equals_the_portable_one() {
        if !std::arch::is_x86_feature_detected!("avx512f") || !std::arch::is_x86_feature_detected!("fma") {
            return;
        }
        for (d, len, start, group) in [(16, 1, 0, 2), (64, 37, 0, 2), (32, 40, 9, 6), (24, 19, 3, 1)] {
            let kv_heads = 2;
            let (k, v) = (values(kv_heads * len * d, 1), values(kv_heads * len * d, 2));
            let (kc, vc) = (view(&k, len, d), view(&v, len, d));
            let q = values(group * d, 3);
            let a = GroupAttention {
                q: &q,
                k: &kc,
                v: &vc,
                kv: 1,
                start,
                scale: 0.125,
            };
            let mut want = vec![0f32; group * d];
            attend_group(&a, &mut want);
            let mut got = vec![0f32; group * d];
            // SAFETY: the CPU has the features (checked above).
            unsafe { super::attend_group_avx512(&a, &mut got) };
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() < 1e-5,
                    "d {d}, len {len}, start {start}, group {group}, at {i}: {g} vs {w}"
                );
            }
        }
    }

    /// The shuffle tree gives lane i the sum of vector i's lanes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn reduce16_sums_each_vector_into_its_lane() {
        use std::arch::x86_64::*;
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let values: Vec<[f32; 16]> = (0..16)
            .map(|i| std::array::from_fn(|l| (i * 16 + l) as f32 * if l % 3 == 0 { -0.5 } else { 1.0 }))
            .collect();
        // SAFETY: the CPU has AVX-512F (checked above).
        let got = unsafe {
            let v: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(values[i].as_ptr()));
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), super::avx512_scores::reduce16(&v));
            out
        };
        for (i, v) in values.iter().enumerate() {
            assert_eq!(got[i], v.iter().sum::<f32>(), "lane {i}");
        }
    }
}
