//! The engine's view of a model: run tokens after a sequence's KV cache, get the last
//! position's logits. The engine never sees tensors, so tests can drive it with a scripted
//! model and the real one lives in one small impl.

use kubetune_model::{ActiveAdapter, CausalLm, DecodeRow, KvCache, LoraAdapter};

/// One sequence's part of a decode step.
pub struct DecodeItem<'a, C> {
    pub token: u32,
    pub cache: &'a mut C,
    pub adapter: Option<&'a LoraAdapter>,
}

pub trait Backend: Send + 'static {
    /// Per-sequence state (the KV cache).
    type Cache: Send;

    /// A cache for a sequence that will hold at most `positions` tokens (prompt + max_tokens).
    fn new_cache(&self, positions: usize) -> Self::Cache;

    /// Bytes of KV cache one position of one sequence takes; the engine budgets with it.
    fn kv_bytes_per_token(&self) -> usize;

    /// Runs `tokens` after whatever `cache` holds and returns the logits of the last position.
    fn forward(&self, tokens: &[u32], cache: &mut Self::Cache, adapter: Option<&LoraAdapter>) -> Result<Vec<f32>, String>;

    /// One new token for each sequence of the batch. The default runs them one by one; the
    /// candle backend overrides it with a single batched forward.
    fn decode(&self, batch: &mut [DecodeItem<'_, Self::Cache>]) -> Vec<Result<Vec<f32>, String>> {
        batch.iter_mut().map(|item| self.forward(&[item.token], item.cache, item.adapter)).collect()
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
            .map(|item| DecodeRow { token: item.token, cache: &mut item.cache.kv, adapter: item.adapter })
            .collect();
        let logits = self.model.decode(&mut rows)?;
        Ok(logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
    }
}

impl Backend for CandleBackend {
    type Cache = CandleCache;

    fn new_cache(&self, positions: usize) -> CandleCache {
        CandleCache { kv: KvCache::with_capacity(self.model.config().num_hidden_layers, positions) }
    }

    fn kv_bytes_per_token(&self) -> usize {
        let c = self.model.config();
        // Keys and values, f32, per layer and KV head.
        2 * c.num_hidden_layers * c.num_kv_heads() * c.head_dim() * 4
    }

    fn forward(&self, tokens: &[u32], cache: &mut CandleCache, adapter: Option<&LoraAdapter>) -> Result<Vec<f32>, String> {
        if tokens.is_empty() {
            return Err("forward called with no tokens".into());
        }
        let mut run = || -> kubetune_model::Result<Vec<f32>> {
            let ids = candle_core::Tensor::new(tokens, self.model.device())?.unsqueeze(0)?;
            let active = adapter.map(|adapter| ActiveAdapter { adapter, dropout_seed: None });
            let offset = cache.kv.len();
            let logits = self.model.forward_last(&ids, offset, Some(&mut cache.kv), active.as_ref())?;
            Ok(logits.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?)
        };
        run().map_err(|e| e.to_string())
    }

    fn decode(&self, batch: &mut [DecodeItem<'_, Self::Cache>]) -> Vec<Result<Vec<f32>, String>> {
        match self.decode_batch(batch) {
            Ok(rows) => rows.into_iter().map(Ok).collect(),
            // One forward for the batch: if it fails, every row of it has failed.
            Err(e) => batch.iter().map(|_| Err(e.to_string())).collect(),
        }
    }
}
