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
use crate::kernels::decode_attention::{group_attention_kernel, CacheView, GroupAttention};
use crate::kernels::fused::cpu_f32;
use crate::linear::{norm_if_any_inference, RowGroup, RowGroups};
use crate::lora::{ActiveAdapter, LoraAdapter};
use crate::model::{Attention, CausalLm, Layer, Mlp};
use candle_core::Tensor;
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
            return Err(ModelError::EmptyInput("decode called with no rows".into()));
        }
        let positions = self.check_caches(rows)?;
        let groups = group_rows(rows, &self.device)?;
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let ids = Tensor::new(tokens.as_slice(), &self.device)?;
        let mut x = self.embed_rows(&ids)?;
        // Each layer kind's RoPE tables at the rows' positions.
        let mut tables = Vec::with_capacity(self.kinds.len());
        for kind in &self.kinds {
            let (cos, sin) = kind.rope.tables_at(&positions, &self.device)?;
            tables.push((cos.to_dtype(self.dtype())?, sin.to_dtype(self.dtype())?));
        }
        let mut caches: Vec<&mut KvCache> = rows.iter_mut().map(|r| &mut *r.cache).collect();
        for (i, layer) in self.layers.iter().enumerate() {
            let (cos, sin) = &tables[layer.kind];
            x = layer.decode(&x, cos, sin, &mut caches, i, &groups)?;
        }
        let x = self.norm.forward_inference(&x)?;
        self.cap_logits(crate::linear::matmul_weight(&x, &self.head())?)
    }

    /// Every cache must belong to this model and fit one more position; returns the position
    /// each row's token takes.
    fn check_caches(&self, rows: &[DecodeRow<'_>]) -> Result<Vec<usize>> {
        let max = self.config.max_position_embeddings;
        rows.iter()
            .enumerate()
            .map(|(i, r)| {
                if r.cache.num_layers() != self.layers.len() {
                    return Err(ModelError::CacheMismatch(format!(
                        "row {i}: KV cache has {} layers, the model {}",
                        r.cache.num_layers(),
                        self.layers.len()
                    )));
                }
                if r.cache.is_empty() {
                    return Err(ModelError::CacheMismatch(format!(
                        "row {i}: empty KV cache; prefill the prompt first"
                    )));
                }
                if r.cache.len() >= max {
                    return Err(ModelError::ContextTooLong(format!(
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
        let x = (x + norm_if_any_inference(&self.attn_out_norm, h)?)?;
        let h = self.mlp.decode(&self.pre_mlp_norm.forward_inference(&x)?, groups)?;
        Ok((&x + norm_if_any_inference(&self.mlp_out_norm, h)?)?)
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
        let q = norm_if_any_inference(&self.q_norm, heads(self.q.forward_rows(x, groups)?, self.heads)?)?;
        let k = norm_if_any_inference(&self.k_norm, heads(self.k.forward_rows(x, groups)?, self.kv_heads)?)?;
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
        if self.softcap.is_some()
            || !crate::kernels::fused::fusable(q)
            || views
                .iter()
                .any(|(k, v)| !crate::kernels::fused::fusable(k) || !crate::kernels::fused::fusable(v))
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
                scale: self.scale as f32,
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
        let mut scores = (q.matmul(&k.t()?)? * self.scale)?;
        if let Some(cap) = self.softcap {
            scores = ((scores / cap)?.tanh()? * cap)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probs.matmul(&v)?.reshape((1, self.heads * self.head_dim))?)
    }
}

impl Mlp {
    fn decode(&self, x: &Tensor, groups: &RowGroups) -> Result<Tensor> {
        let gate = self.gate.forward_rows(x, groups)?;
        let gate = match self.activation {
            crate::config::Activation::Silu => gate.silu()?,
            crate::config::Activation::GeluTanh => gate.gelu()?,
        };
        let up = self.up.forward_rows(x, groups)?;
        self.down.forward_rows(&(gate * up)?, groups)
    }
}
