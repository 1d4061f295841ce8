//! Per-layer key/value cache for incremental decoding.

use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers] }
    }

    /// Number of positions cached so far.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The slot of layer `i`; `CausalLm::forward` checks the layer count before calling.
    pub(crate) fn layer_mut(&mut self, i: usize) -> Option<&mut Option<(Tensor, Tensor)>> {
        self.layers.get_mut(i)
    }
}
