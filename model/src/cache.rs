//! Per-layer key/value cache for incremental decoding.
//!
//! Each layer keeps one buffer of keys and one of values, (batch, kv_heads, capacity, head_dim),
//! and new positions are written into it in place. Concatenating the whole history onto each new
//! token would copy the cache once per step, which at decode time costs as much memory traffic
//! as the attention itself. A buffer that fills up is reallocated at twice the size, so a cache
//! made without a capacity still appends in amortised constant time.

use crate::error::{ModelError, Result};
use candle_core::Tensor;

#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Not Clone: the buffers are written in place, so two caches must never share one.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// Positions to allocate on the first write; grows past it when needed.
    capacity: usize,
}

/// Positions allocated on first use when the caller gave no capacity.
const DEFAULT_CAPACITY: usize = 64;

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, DEFAULT_CAPACITY)
    }

    /// A cache that holds `capacity` positions without reallocating: the server knows each
    /// sequence's prompt + max_tokens up front.
    pub fn with_capacity(num_layers: usize, capacity: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            capacity: capacity.max(1),
        }
    }

    /// Number of positions cached so far.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |l| l.len)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions the buffers hold without reallocating (or will allocate on the first write).
    pub fn capacity(&self) -> usize {
        match self.layers.first().and_then(|l| l.as_ref()) {
            Some(l) => l.k.dims().get(2).copied().unwrap_or(0),
            None => self.capacity,
        }
    }

    /// Makes room for `positions` in every layer now, so the caller decides when memory is
    /// allocated and how much: the server grows a sequence's cache block by block as it
    /// generates, and accounts exactly what is held. Never shrinks.
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        self.capacity = self.capacity.max(positions);
        for e in self.layers.iter_mut().flatten() {
            if e.k.dim(2)? < positions {
                let (k, v) = grown(e, positions)?;
                e.k = k;
                e.v = v;
            }
        }
        Ok(())
    }

    /// Appends `k` and `v`, (batch, kv_heads, seq, head_dim), to layer `layer` and returns views
    /// of everything cached there, (batch, kv_heads, len, head_dim). The views share the
    /// buffer; later appends only write past their end, so they stay valid.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let capacity = self.capacity;
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::CacheMismatch(format!("KV cache has no layer {layer}")))?;
        let seq = k.dim(2)?;
        let entry = match slot.take() {
            None => LayerKv {
                k: buffer(k, capacity.max(seq))?,
                v: buffer(v, capacity.max(seq))?,
                len: 0,
            },
            Some(e) => {
                let room = e.k.dim(2)?;
                let need = e.len + seq;
                if need > room {
                    grow(e, need.max(2 * room))?
                } else {
                    e
                }
            }
        };
        entry.k.slice_set(&k.contiguous()?, 2, entry.len)?;
        entry.v.slice_set(&v.contiguous()?, 2, entry.len)?;
        let len = entry.len + seq;
        let views = (entry.k.narrow(2, 0, len)?, entry.v.narrow(2, 0, len)?);
        *slot = Some(LayerKv { len, ..entry });
        Ok(views)
    }
}

impl KvCache {
    /// Views of everything cached in layer `layer`, (batch, kv_heads, len, head_dim).
    pub(crate) fn views(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let entry = self
            .layers
            .get(layer)
            .and_then(|l| l.as_ref())
            .ok_or_else(|| ModelError::CacheMismatch(format!("KV cache has nothing in layer {layer}")))?;
        Ok((entry.k.narrow(2, 0, entry.len)?, entry.v.narrow(2, 0, entry.len)?))
    }
}

impl KvCache {
    /// An independent copy of positions `start..start + len`, in a cache of its own whose
    /// buffers hold exactly those positions: the server keeps blocks of a prompt's keys and
    /// values after its sequence ends, for later prompts that start the same way. A view would
    /// keep the whole sequence's buffer alive, so the memory counted would not be the memory held.
    pub fn copy_range(&self, start: usize, len: usize) -> Result<KvCache> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let e = layer.as_ref().filter(|e| start + len <= e.len).ok_or_else(|| {
                ModelError::CacheMismatch(format!("KV cache layer {i} does not hold {start}..{}", start + len))
            })?;
            let copy = |x: &Tensor| -> Result<Tensor> {
                let out = buffer(x, len)?;
                out.slice_set(&x.narrow(2, start, len)?.contiguous()?, 2, 0)?;
                Ok(out)
            };
            layers.push(Some(LayerKv {
                k: copy(&e.k)?,
                v: copy(&e.v)?,
                len,
            }));
        }
        Ok(KvCache { layers, capacity: len })
    }

    /// Appends, layer by layer, every position each of `others` holds, in order, after what
    /// this cache holds: a sequence starts from cached blocks of its prompt.
    pub fn extend_from(&mut self, others: &[&KvCache]) -> Result<()> {
        if others.is_empty() {
            return Ok(());
        }
        for layer in 0..self.layers.len() {
            let mut ks = Vec::with_capacity(others.len());
            let mut vs = Vec::with_capacity(others.len());
            for other in others {
                if other.num_layers() != self.num_layers() {
                    return Err(ModelError::CacheMismatch(format!(
                        "a {}-layer KV cache extended from a {}-layer one",
                        self.num_layers(),
                        other.num_layers()
                    )));
                }
                let (k, v) = other.views(layer)?;
                ks.push(k);
                vs.push(v);
            }
            let k = Tensor::cat(&ks, 2)?;
            let v = Tensor::cat(&vs, 2)?;
            self.append(layer, &k, &v)?;
        }
        Ok(())
    }
}

/// An empty buffer shaped like `x` but with room for `capacity` positions.
fn buffer(x: &Tensor, capacity: usize) -> Result<Tensor> {
    let (b, h, _, d) = x.dims4()?;
    Ok(Tensor::zeros((b, h, capacity, d), x.dtype(), x.device())?)
}

fn grow(e: LayerKv, capacity: usize) -> Result<LayerKv> {
    let (k, v) = grown(&e, capacity)?;
    Ok(LayerKv { k, v, len: e.len })
}

/// Copies of `e`'s buffers with room for `capacity` positions; `e` is untouched, so a failed
/// allocation loses nothing.
fn grown(e: &LayerKv, capacity: usize) -> Result<(Tensor, Tensor)> {
    let k = buffer(&e.k, capacity)?;
    let v = buffer(&e.v, capacity)?;
    k.slice_set(&e.k.narrow(2, 0, e.len)?.contiguous()?, 2, 0)?;
    v.slice_set(&e.v.narrow(2, 0, e.len)?.contiguous()?, 2, 0)?;
    Ok((k, v))
}

#[cfg(test)]
mod tests {
    use super::KvCache;
    use candle_core::{Device, Tensor};

    fn positions(start: u32, n: usize) -> Tensor {
        let data: Vec<f32> = (0..n).map(|i| (start as usize + i) as f32).collect();
        Tensor::from_vec(data, (1, 1, n, 1), &Device::Cpu).expect("tensor")
    }

    #[test]
    fn reserve_grows_the_buffers_to_exactly_the_positions_asked_and_keeps_what_was_cached() {
        let mut cache = KvCache::with_capacity(2, 3);
        assert_eq!(cache.capacity(), 3, "nothing allocated yet: the first write's size");
        for layer in 0..2 {
            cache
                .append(layer, &positions(0, 3), &positions(10, 3))
                .expect("append");
        }
        assert_eq!(cache.capacity(), 3);
        cache.reserve(7).expect("reserve");
        assert_eq!(cache.capacity(), 7, "exactly what was asked, not a doubling");
        cache.reserve(5).expect("reserve");
        assert_eq!(cache.capacity(), 7, "never shrinks");
        for layer in 0..2 {
            let (k, v) = cache
                .append(layer, &positions(3, 4), &positions(13, 4))
                .expect("append");
            let k: Vec<f32> = k.flatten_all().and_then(|t| t.to_vec1()).expect("k");
            let v: Vec<f32> = v.flatten_all().and_then(|t| t.to_vec1()).expect("v");
            assert_eq!(k, (0..7).map(|i| i as f32).collect::<Vec<_>>());
            assert_eq!(v, (10..17).map(|i| i as f32).collect::<Vec<_>>());
        }
        assert_eq!(cache.capacity(), 7, "four more positions fitted without reallocating");
    }

    #[test]
    fn a_copied_range_extends_another_cache_with_the_same_keys_and_values_and_shares_no_buffer() {
        let mut source = KvCache::with_capacity(2, 8);
        for layer in 0..2 {
            source
                .append(layer, &positions(0, 6), &positions(100, 6))
                .expect("append");
        }
        let first = source.copy_range(0, 2).expect("copy");
        let second = source.copy_range(2, 2).expect("copy");
        assert_eq!((first.len(), first.capacity()), (2, 2), "exactly the positions copied");
        assert!(source.copy_range(4, 4).is_err(), "past what the source holds");
        drop(source);
        let mut target = KvCache::with_capacity(2, 6);
        target.extend_from(&[&first, &second]).expect("extend");
        for layer in 0..2 {
            let (k, v) = target
                .append(layer, &positions(40, 1), &positions(140, 1))
                .expect("append after the copied positions");
            let k: Vec<f32> = k.flatten_all().and_then(|t| t.to_vec1()).expect("k");
            let v: Vec<f32> = v.flatten_all().and_then(|t| t.to_vec1()).expect("v");
            assert_eq!(k, vec![0.0, 1.0, 2.0, 3.0, 40.0]);
            assert_eq!(v, vec![100.0, 101.0, 102.0, 103.0, 140.0]);
        }
        assert_eq!(target.capacity(), 6, "the target's own capacity, not the blocks'");
    }
}
