//! The engine's view of a model: run tokens after a sequence's KV cache, get the last
//! position's logits. The engine never sees tensors, so tests can drive it with a scripted
//! model and the real one lives in one small impl.

use kubetune_model::{ActiveAdapter, CausalLm, DecodeRow, KvCache, LoraAdapter, PrefillRow};

/// One sequence's part of a decode step.
pub struct DecodeItem<'a, C> {
    pub token: u32,
    pub cache: &'a mut C,
    pub adapter: Option<&'a LoraAdapter>,
}

/// One new sequence's part of a prefill: its prompt and the fresh cache it fills.
pub struct PrefillItem<'a, C> {
    pub tokens: &'a [u32],
    pub cache: &'a mut C,
    pub adapter: Option<&'a LoraAdapter>,
}

pub trait Backend: Send + 'static {
    /// Per-sequence state (the KV cache).
    type Cache: Send;

    /// A cache with room for `positions` tokens; the engine grows it with [`Backend::reserve`].
    fn new_cache(&self, positions: usize) -> Self::Cache;

    /// Makes room for `positions` tokens in `cache` now, so that memory is held exactly as the
    /// engine counts it. The default does nothing, for caches that grow on their own.
    fn reserve(&self, cache: &mut Self::Cache, positions: usize) -> Result<(), String> {
        let _ = (cache, positions);
        Ok(())
    }

    /// Bytes of KV cache one position of one sequence takes; the engine budgets with it.
    fn kv_bytes_per_token(&self) -> usize;

    /// An independent copy of positions `start..start + len` of `cache`, as a cache of its own
    /// that the prefix cache keeps after the sequence ends. The default cannot copy: prompts
    /// are then never cached.
    fn copy_positions(&self, cache: &Self::Cache, start: usize, len: usize) -> Result<Self::Cache, String> {
        let _ = (cache, start, len);
        Err("this backend cannot copy KV positions".into())
    }

    /// Appends every position of each of `blocks`, in order, after what `cache` holds: a new
    /// sequence starts from the cached blocks of its prompt.
    fn extend_from(&self, cache: &mut Self::Cache, blocks: &[&Self::Cache]) -> Result<(), String> {
        let _ = (cache, blocks);
        Err("this backend cannot copy KV positions".into())
    }

    /// Runs `tokens` after whatever `cache` holds and returns the logits of the last position.
    fn forward(
        &self,
        tokens: &[u32],
        cache: &mut Self::Cache,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Vec<f32>, String>;

    /// Runs each new sequence's prompt into its fresh cache and returns each one's
    /// last-position logits, in order. The default runs them one by one; the candle backend
    /// batches prompts that share an adapter.
    fn prefill(&self, batch: &mut [PrefillItem<'_, Self::Cache>]) -> Vec<Result<Vec<f32>, String>> {
        batch
            .iter_mut()
            .map(|item| self.forward(item.tokens, item.cache, item.adapter))
            .collect()
    }

    /// One new token for each sequence of the batch. The default runs them one by one; the
    /// candle backend overrides it with a single batched forward.
    fn decode(&self, batch: &mut [DecodeItem<'_, Self::Cache>]) -> Vec<Result<Vec<f32>, String>> {
        batch
            .iter_mut()
            .map(|item| self.forward(&[item.token], item.cache, item.adapter))
            .collect()
    }
}

/// The candle model. A decode step is one batched forward over every running sequence, each
/// with its own cache and adapter (unmerged LoRA), so a batch can mix adapters.
pub struct CandleBackend {
    model: CausalLm,
}

pub struct CandleCache {
    kv: KvCache,
}

impl CandleBackend {
    pub fn new(model: CausalLm) -> Self {
        Self { model }
    }

    pub fn model(&self) -> &CausalLm {
        &self.model
    }

    fn decode_batch(&self, batch: &mut [DecodeItem<'_, CandleCache>]) -> kubetune_model::Result<Vec<Vec<f32>>> {
        let mut rows: Vec<DecodeRow<'_>> = batch
            .iter_mut()
            .map(|item| DecodeRow {
                token: item.token,
                cache: &mut item.cache.kv,
                adapter: item.adapter,
            })
            .collect();
        let logits = self.model.decode(&mut rows)?;
        Ok(logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
    }
}

impl CandleBackend {
    /// One batched prefill of the items at `indices` (one adapter), in index order.
    fn prefill_batch(
        &self,
        batch: &mut [PrefillItem<'_, CandleCache>],
        indices: &[usize],
    ) -> kubetune_model::Result<Vec<Vec<f32>>> {
        let adapter = batch[indices[0]].adapter;
        let mut rows: Vec<PrefillRow<'_>> = batch
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| indices.contains(i))
            .map(|(_, item)| PrefillRow {
                tokens: item.tokens,
                cache: &mut item.cache.kv,
            })
            .collect();
        let active = adapter.map(|adapter| ActiveAdapter {
            adapter,
            dropout_seed: None,
            first_row: 0,
        });
        let logits = self.model.prefill(&mut rows, active.as_ref())?;
        Ok(logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
    }
}

/// Prompts padded to the longest of their batch may add at most this share of padding.
const MAX_PADDING: f64 = 0.25;
/// A batch's padded tokens, beyond which batching gains nothing and activations grow.
const MAX_BATCH_TOKENS: usize = 8192;
/// A batch's attention scores (rows x longest^2) stay within one 4096-token prompt's.
const MAX_BATCH_SCORES: usize = 4096 * 4096;

/// Splits new sequences, given as (adapter identity, prompt length), into prefill batches:
/// one adapter per batch, similar lengths so padding stays small, and bounded in size. Each
/// batch lists its indices in ascending order.
pub fn prefill_batches(items: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut by_adapter: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, &(adapter, _)) in items.iter().enumerate() {
        match by_adapter.iter_mut().find(|(a, _)| *a == adapter) {
            Some((_, group)) => group.push(i),
            None => by_adapter.push((adapter, vec![i])),
        }
    }
    let mut batches = Vec::new();
    for (_, mut group) in by_adapter {
        group.sort_by_key(|&i| items[i].1);
        let mut current: Vec<usize> = Vec::new();
        let mut real = 0usize;
        for i in group {
            let len = items[i].1;
            let rows = current.len() + 1;
            let padded = rows * len;
            let fits = padded as f64 <= (1.0 + MAX_PADDING) * (real + len) as f64
                && padded <= MAX_BATCH_TOKENS
                && rows.saturating_mul(len).saturating_mul(len) <= MAX_BATCH_SCORES;
            if !current.is_empty() && !fits {
                current.sort_unstable();
                batches.push(std::mem::take(&mut current));
                real = 0;
            }
            current.push(i);
            real += len;
        }
        if !current.is_empty() {
            current.sort_unstable();
            batches.push(current);
        }
    }
    batches
}

impl Backend for CandleBackend {
    type Cache = CandleCache;

    fn new_cache(&self, positions: usize) -> CandleCache {
        CandleCache {
            kv: KvCache::with_capacity(self.model.config().num_hidden_layers, positions),
        }
    }

    fn reserve(&self, cache: &mut CandleCache, positions: usize) -> Result<(), String> {
        cache.kv.reserve(positions).map_err(|e| e.to_string())
    }

    fn copy_positions(&self, cache: &CandleCache, start: usize, len: usize) -> Result<CandleCache, String> {
        let kv = cache.kv.copy_range(start, len).map_err(|e| e.to_string())?;
        Ok(CandleCache { kv })
    }

    fn extend_from(&self, cache: &mut CandleCache, blocks: &[&CandleCache]) -> Result<(), String> {
        let blocks: Vec<&KvCache> = blocks.iter().map(|b| &b.kv).collect();
        cache.kv.extend_from(&blocks).map_err(|e| e.to_string())
    }

    fn kv_bytes_per_token(&self) -> usize {
        let c = self.model.config();
        // Keys and values, f32, per layer and KV head.
        2 * c.num_hidden_layers * c.num_kv_heads() * c.head_dim() * 4
    }

    fn forward(
        &self,
        tokens: &[u32],
        cache: &mut CandleCache,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Vec<f32>, String> {
        if tokens.is_empty() {
            return Err("forward called with no tokens".into());
        }
        let mut run = || -> kubetune_model::Result<Vec<f32>> {
            let ids = candle_core::Tensor::new(tokens, self.model.device())?.unsqueeze(0)?;
            let active = adapter.map(|adapter| ActiveAdapter {
                adapter,
                dropout_seed: None,
                first_row: 0,
            });
            let offset = cache.kv.len();
            let logits = self
                .model
                .forward_last(&ids, offset, Some(&mut cache.kv), active.as_ref())?;
            Ok(logits
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?)
        };
        run().map_err(|e| e.to_string())
    }

    fn prefill(&self, batch: &mut [PrefillItem<'_, Self::Cache>]) -> Vec<Result<Vec<f32>, String>> {
        let keys: Vec<(usize, usize)> = batch
            .iter()
            .map(|item| {
                (
                    item.adapter.map_or(0, |a| a as *const LoraAdapter as usize),
                    item.tokens.len(),
                )
            })
            .collect();
        let mut results: Vec<Result<Vec<f32>, String>> = vec![Err("not prefilled".into()); batch.len()];
        for indices in prefill_batches(&keys) {
            match self.prefill_batch(batch, &indices) {
                Ok(rows) => indices.iter().zip(rows).for_each(|(&i, row)| results[i] = Ok(row)),
                // One forward for the batch: if it fails, every row of it has failed.
                Err(e) => indices.iter().for_each(|&i| results[i] = Err(e.to_string())),
            }
        }
        results
    }

    fn decode(&self, batch: &mut [DecodeItem<'_, Self::Cache>]) -> Vec<Result<Vec<f32>, String>> {
        match self.decode_batch(batch) {
            Ok(rows) => rows.into_iter().map(Ok).collect(),
            // One forward for the batch: if it fails, every row of it has failed.
            Err(e) => batch.iter().map(|_| Err(e.to_string())).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefill_batches;

    #[test]
    fn prefill_batches_keep_one_adapter_similar_lengths_and_bounded_size() {
        // Adapter 0: lengths 100, 120, 10, 110, 12; adapter 7: 100.
        let items = [(0, 100), (0, 120), (7, 100), (0, 10), (0, 110), (0, 12)];
        assert_eq!(prefill_batches(&items), vec![vec![3, 5], vec![0, 1, 4], vec![2]]);
        // 64 prompts of 256 tokens: 8192 padded tokens per batch at most.
        let many = vec![(0, 256); 64];
        let batches = prefill_batches(&many);
        assert_eq!(batches.len(), 2);
        assert!(batches.iter().all(|b| b.len() == 32));
        // A prompt longer than any limit still gets a batch of its own.
        assert_eq!(prefill_batches(&[(0, 10_000), (0, 10_000)]), vec![vec![0], vec![1]]);
        assert!(prefill_batches(&[]).is_empty());
    }
}
