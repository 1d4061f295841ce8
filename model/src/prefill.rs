//! Prefill of several prompts in one forward.
//!
//! A prompt's prefill is a handful of large matmuls whose row count is the prompt's length;
//! at a hundred-odd rows gemm runs far below what it reaches with a few thousand. The server
//! therefore prefills the prompts that arrive together as one batch. Prompts are padded on the
//! right to the longest: under the causal mask a real position attends only to earlier
//! positions, which are all real, so padding changes no real position's keys, values or
//! logits. Each row's own cache then takes its real positions from the batch's cache.

use crate::cache::KvCache;
use crate::error::{ModelError, Result};
use crate::lora::ActiveAdapter;
use crate::model::CausalLm;
use candle_core::Tensor;

/// One prompt of a batched prefill and the empty cache it fills.
pub struct PrefillRow<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// The token that pads short prompts; any valid id will do, as no real position sees it.
const PAD: u32 = 0;

impl CausalLm {
    /// Runs each row's prompt into its (empty) cache and returns each prompt's last-position
    /// logits, (rows, vocab), in row order. One adapter, or none, for every row. Equal, up to
    /// float rounding, to [`CausalLm::forward_last`] for each row alone.
    pub fn prefill(&self, rows: &mut [PrefillRow<'_>], adapter: Option<&ActiveAdapter>) -> Result<Tensor> {
        crate::threads::in_pool(|| self.prefill_in_pool(rows, adapter))
    }

    fn prefill_in_pool(&self, rows: &mut [PrefillRow<'_>], adapter: Option<&ActiveAdapter>) -> Result<Tensor> {
        let longest = self.check_prefill_rows(rows)?;
        let mut ids = Vec::with_capacity(rows.len() * longest);
        for r in rows.iter() {
            ids.extend_from_slice(r.tokens);
            ids.resize(ids.len() + longest - r.tokens.len(), PAD);
        }
        let ids = Tensor::from_vec(ids, (rows.len(), longest), &self.device)?;
        let mut batch = KvCache::with_capacity(self.layers.len(), longest);
        let hidden = self.hidden(&ids, 0, Some(&mut batch), adapter)?;
        let (n, t, h) = hidden.dims3()?;
        let last: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (i * t + r.tokens.len() - 1) as u32)
            .collect();
        let last = hidden
            .reshape((n * t, h))?
            .index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        let logits = self.cap_logits(crate::linear::matmul_weight(&last, &self.head())?)?;
        for layer in 0..self.layers.len() {
            let (k, v) = batch.views(layer)?;
            for (i, r) in rows.iter_mut().enumerate() {
                let len = r.tokens.len();
                r.cache.append(
                    layer,
                    &k.narrow(0, i, 1)?.narrow(2, 0, len)?,
                    &v.narrow(0, i, 1)?.narrow(2, 0, len)?,
                )?;
            }
        }
        Ok(logits)
    }

    /// Every row needs tokens, an empty cache of this model's layers, and to fit the context;
    /// returns the longest prompt's length.
    fn check_prefill_rows(&self, rows: &[PrefillRow<'_>]) -> Result<usize> {
        if rows.is_empty() {
            return Err(ModelError::EmptyInput("prefill called with no rows".into()));
        }
        let max = self.config.max_position_embeddings;
        for (i, r) in rows.iter().enumerate() {
            if r.tokens.is_empty() {
                return Err(ModelError::EmptyInput(format!("row {i}: empty prompt")));
            }
            if r.tokens.len() > max {
                return Err(ModelError::ContextTooLong(format!(
                    "row {i}: {} tokens exceed max_position_embeddings {max}",
                    r.tokens.len()
                )));
            }
            if !r.cache.is_empty() || r.cache.num_layers() != self.layers.len() {
                return Err(ModelError::CacheMismatch(format!(
                    "row {i}: prefill needs an empty KV cache of {} layers (it has {} positions in {} layers)",
                    self.layers.len(),
                    r.cache.len(),
                    r.cache.num_layers()
                )));
            }
        }
        Ok(rows.iter().map(|r| r.tokens.len()).max().unwrap_or(1))
    }
}
