//! Greedy decoding with the KV cache.

use crate::cache::KvCache;
use crate::error::Result;
use crate::lora::{ActiveAdapter, LoraAdapter};
use crate::model::CausalLm;
use candle_core::{Tensor, D};

pub struct GreedyOptions<'a> {
    pub max_new_tokens: usize,
    /// Generation stops after any of these (not included in the result).
    pub stop_tokens: &'a [u32],
    pub adapter: Option<&'a LoraAdapter>,
}

/// Continues `prompt` with the most likely token at each step; returns the new tokens only.
pub fn greedy(model: &CausalLm, prompt: &[u32], options: &GreedyOptions) -> Result<Vec<u32>> {
    let active = options.adapter.map(|adapter| ActiveAdapter {
        adapter,
        dropout_seed: None,
        first_row: 0,
    });
    let mut cache = KvCache::new(model.config().num_hidden_layers);
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    let mut offset = 0;
    while out.len() < options.max_new_tokens && !input.is_empty() {
        let ids = Tensor::new(input.as_slice(), model.device())?.unsqueeze(0)?;
        let logits = model.forward(&ids, offset, Some(&mut cache), active.as_ref())?;
        offset += input.len();
        let last = logits.narrow(1, input.len() - 1, 1)?.squeeze(1)?.squeeze(0)?;
        let next = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
        if options.stop_tokens.contains(&next) {
            break;
        }
        out.push(next);
        input = vec![next];
    }
    Ok(out)
}
