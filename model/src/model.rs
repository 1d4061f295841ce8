//! The decoder: embeddings, N pre-norm layers (GQA attention + SwiGLU MLP), final norm, head.
//!
//! Weight names follow the HF safetensors keys (`model.layers.0.self_attn.q_proj.weight`, ...)
//! because every tensor is fetched with `vb.pp(...)` paths that spell them out.

use crate::cache::KvCache;
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::linear::{BaseFormat, BaseWeight, Projection, RmsNorm};
use crate::lora::{ActiveAdapter, LoraAdapter, TargetModule};
use crate::rope::{self, Rope};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub(crate) struct Attention {
    pub(crate) q: Projection,
    pub(crate) k: Projection,
    pub(crate) v: Projection,
    pub(crate) o: Projection,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    /// Sliding attention window, when the config has one.
    pub(crate) window: Option<usize>,
    /// Qwen3's RMS norms of each query and key head, over head_dim, before RoPE.
    pub(crate) q_norm: Option<RmsNorm>,
    pub(crate) k_norm: Option<RmsNorm>,
}

#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    pub(crate) gate: Projection,
    pub(crate) up: Projection,
    pub(crate) down: Projection,
}

#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) attn: Attention,
    pub(crate) mlp: Mlp,
    pub(crate) input_norm: RmsNorm,
    pub(crate) post_attn_norm: RmsNorm,
}

/// A Llama-family causal LM with a frozen base. Adapters are passed to `forward`, not stored.
#[derive(Debug, Clone)]
pub struct CausalLm {
    pub(crate) config: Config,
    /// The embedding table; NF4 in a QLoRA base (see [`BaseFormat::store_table`]).
    pub(crate) embed: BaseWeight,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: RmsNorm,
    /// None when tied to the embeddings (and not quantized apart from them).
    pub(crate) lm_head: Option<BaseWeight>,
    pub(crate) rope: Rope,
    pub(crate) device: Device,
}

impl CausalLm {
    /// Builds the model from a VarBuilder rooted at the checkpoint (keys `model.*`, `lm_head.*`).
    /// Weights are held in `format`, quantized as they load.
    pub fn load(vb: VarBuilder, config: &Config, format: BaseFormat) -> Result<Self> {
        let m = vb.pp("model");
        let embed = format.store_table(
            m.pp("embed_tokens")
                .get((config.vocab_size, config.hidden_size), "weight")?,
        )?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            layers.push(Layer::load(m.pp("layers").pp(i), config, format, i)?);
        }
        let norm = RmsNorm::load(m.pp("norm"), config.hidden_size, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(
                format.store_table(
                    vb.pp("lm_head")
                        .get((config.vocab_size, config.hidden_size), "weight")?,
                )?,
            )
        };
        Ok(Self {
            config: config.clone(),
            embed,
            layers,
            norm,
            lm_head,
            rope: Rope::new(config),
            device: vb.device().clone(),
        })
    }

    /// This model with its dense tensors (norms, biases, dense weights) in `dtype` and its NF4
    /// weights expanding to it; see [`crate::nf4::Nf4Tensor::expanding_to`].
    pub(crate) fn with_dtype(mut self, dtype: DType) -> Result<Self> {
        let cast = |w: BaseWeight| -> Result<BaseWeight> {
            Ok(match w {
                BaseWeight::Dense(t) => BaseWeight::Dense(t.to_dtype(dtype)?),
                BaseWeight::Nf4(q) => BaseWeight::Nf4(q.expanding_to(dtype)?),
                BaseWeight::Int8(_) => {
                    return Err(ModelError::Quantize("an int8 base is held in f32 only".into()));
                }
            })
        };
        self.embed = cast(self.embed)?;
        self.lm_head = self.lm_head.map(cast).transpose()?;
        self.norm.weight = self.norm.weight.to_dtype(dtype)?;
        for l in &mut self.layers {
            let head_norms = l.attn.q_norm.iter_mut().chain(l.attn.k_norm.iter_mut());
            for norm in [&mut l.input_norm, &mut l.post_attn_norm].into_iter().chain(head_norms) {
                norm.weight = norm.weight.to_dtype(dtype)?;
            }
            for m in TargetModule::ALL {
                let p = l.projection_mut(m);
                p.weight = cast(p.weight.clone())?;
                p.bias = p.bias.take().map(|b| b.to_dtype(dtype)).transpose()?;
            }
        }
        Ok(self)
    }

    /// Loads dense (full-precision) weights.
    pub fn load_dense(vb: VarBuilder, config: &Config) -> Result<Self> {
        Self::load(vb, config, BaseFormat::Dense)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the activations: the dense weights' (bf16 on a GPU, f32 on the CPU).
    pub fn dtype(&self) -> DType {
        self.norm.weight.dtype()
    }

    /// RoPE's (cos, sin) for positions offset..offset+len, in the activations' dtype.
    pub(crate) fn rope_tables(&self, offset: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = self.rope.tables(offset, len, &self.device)?;
        Ok((cos.to_dtype(self.dtype())?, sin.to_dtype(self.dtype())?))
    }

    /// Logits of shape (batch, seq, vocab) for `input_ids` (batch, seq) at positions
    /// `offset..offset+seq`. With a cache, keys and values of earlier calls are reused and
    /// this call's are appended; `offset` must then equal the cached length.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        offset: usize,
        cache: Option<&mut KvCache>,
        adapter: Option<&ActiveAdapter>,
    ) -> Result<Tensor> {
        let x = self.hidden(input_ids, offset, cache, adapter)?;
        let (b, t, h) = x.dims3()?;
        let logits = crate::linear::frozen_matmul(&x.reshape((b * t, h))?, &self.head())?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// As [`CausalLm::forward`], but only the last position's logits, (batch, vocab): a prompt's
    /// prefill needs no others, and the head is a large share of its cost.
    pub fn forward_last(
        &self,
        input_ids: &Tensor,
        offset: usize,
        cache: Option<&mut KvCache>,
        adapter: Option<&ActiveAdapter>,
    ) -> Result<Tensor> {
        crate::threads::in_pool(|| {
            let x = self.hidden(input_ids, offset, cache, adapter)?;
            let last = x.narrow(1, x.dim(1)? - 1, 1)?.squeeze(1)?;
            crate::linear::matmul_weight(&last, &self.head())
        })
    }

    pub(crate) fn head(&self) -> std::borrow::Cow<'_, BaseWeight> {
        match &self.lm_head {
            Some(head) => std::borrow::Cow::Borrowed(head),
            None => std::borrow::Cow::Borrowed(&self.embed),
        }
    }

    /// Quantizes the head to int8 for serving; a head tied to the embeddings gets
    /// its own int8 copy, since the embedding lookup stays f32. The projections are quantized
    /// as they load ([`BaseFormat::store`]) or by [`CausalLm::quantize_int8`].
    pub(crate) fn quantize_head_int8(&mut self) -> Result<()> {
        let dense = self.head().dense()?;
        self.lm_head = Some(BaseWeight::Int8(crate::int8::Int8Tensor::quantize(&dense)?));
        Ok(())
    }

    /// This model with every dense projection and the head in int8, for serving.
    /// The server quantizes after merging an adapter, so the merged weight is rounded once.
    pub fn quantize_int8(&self) -> Result<Self> {
        let mut out = self.clone();
        for l in &mut out.layers {
            for m in TargetModule::ALL {
                let p = l.projection_mut(m);
                if let BaseWeight::Dense(w) = &p.weight {
                    p.weight = BaseWeight::Int8(crate::int8::Int8Tensor::quantize(w)?);
                }
            }
        }
        out.quantize_head_int8()?;
        Ok(out)
    }

    /// The final-normed hidden states, (batch, seq, hidden).
    pub(crate) fn hidden(
        &self,
        input_ids: &Tensor,
        offset: usize,
        cache: Option<&mut KvCache>,
        adapter: Option<&ActiveAdapter>,
    ) -> Result<Tensor> {
        Ok(self
            .norm
            .forward(&self.last_layer_output(input_ids, offset, cache, adapter)?)?)
    }

    /// The last layer's output before the final norm, (batch, seq, hidden).
    pub(crate) fn last_layer_output(
        &self,
        input_ids: &Tensor,
        offset: usize,
        mut cache: Option<&mut KvCache>,
        adapter: Option<&ActiveAdapter>,
    ) -> Result<Tensor> {
        let seq = input_ids.dim(1)?;
        if let Some(c) = cache.as_deref() {
            if c.num_layers() != self.layers.len() {
                return Err(ModelError::CacheMismatch(format!(
                    "KV cache has {} layers, the model {}",
                    c.num_layers(),
                    self.layers.len()
                )));
            }
            if c.len() != offset {
                return Err(ModelError::CacheMismatch(format!(
                    "forward at offset {offset} but the KV cache holds {} positions",
                    c.len()
                )));
            }
        }
        let (cos, sin) = self.rope_tables(offset, seq)?;
        let mask = self.mask(seq, offset)?;
        let mut x = self.embed_tokens(input_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| (c, i));
            x = layer.forward(&x, &cos, &sin, mask.as_ref(), kv, adapter)?;
        }
        Ok(x)
    }

    /// The embeddings of `input_ids` (batch, seq): (batch, seq, hidden).
    pub(crate) fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        Ok(self
            .embed_rows(&input_ids.flatten_all()?)?
            .reshape((batch, seq, self.config.hidden_size))?)
    }

    /// The embeddings of a flat list of token ids: (ids, hidden).
    pub(crate) fn embed_rows(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.embed {
            BaseWeight::Dense(table) => Ok(table.index_select(ids, 0)?),
            BaseWeight::Nf4(table) => table.gather_rows(&ids.to_vec1::<u32>()?),
            BaseWeight::Int8(table) => Ok(table.dequantize()?.index_select(ids, 0)?),
        }
    }

    /// Additive causal mask (seq, offset + seq), None for a single new token. Also applies the
    /// sliding window when the config has one. None as well where attention runs through the
    /// fused causal softmax (f32 on the CPU), which derives the same mask from the shapes.
    pub(crate) fn mask(&self, seq: usize, offset: usize) -> Result<Option<Tensor>> {
        if crate::kernels::fused::fusable(&self.norm.weight) {
            return Ok(None);
        }
        if seq == 1 && self.config.attention_window().is_none_or(|w| offset < w) {
            return Ok(None);
        }
        let total = offset + seq;
        let window = self.config.attention_window();
        let mut m = Vec::with_capacity(seq * total);
        for i in 0..seq {
            let pos = offset + i;
            for j in 0..total {
                let visible = j <= pos && window.is_none_or(|w| pos - j < w);
                m.push(if visible { 0.0f32 } else { f32::NEG_INFINITY });
            }
        }
        Ok(Some(Tensor::from_vec(m, (seq, total), &self.device)?))
    }

    /// A copy of this model with the adapter folded into the base weights:
    /// W' = W + scale * B A. Used to check the unmerged path and to serve merged models.
    pub fn merged(&self, adapter: &LoraAdapter) -> Result<Self> {
        let mut out = self.clone();
        let scale = adapter.config.scale();
        for (&(layer, module), pair) in adapter.pairs() {
            let l = out.layers.get_mut(layer).ok_or_else(|| {
                ModelError::Adapter(format!("adapter has layer {layer}, model has {}", self.layers.len()))
            })?;
            let p = l.projection_mut(module);
            let base = p.weight.dense()?;
            let delta = (pair.b.matmul(&pair.a)? * scale)?.to_dtype(base.dtype())?;
            p.weight = BaseWeight::Dense((base + delta)?);
        }
        Ok(out)
    }

    /// Bytes held by the projection weights, and how many of them are quantized. Lets tests
    /// and metrics check that a QLoRA base really stays 4-bit.
    pub fn projection_storage(&self) -> (usize, usize) {
        let weights = self
            .layers
            .iter()
            .flat_map(|l| TargetModule::ALL.into_iter().map(move |m| &l.projection(m).weight));
        storage_of(weights)
    }

    /// As [`CausalLm::projection_storage`], for the embedding table and an untied head.
    pub fn table_storage(&self) -> (usize, usize) {
        storage_of(std::iter::once(&self.embed).chain(self.lm_head.as_ref()))
    }
}

/// Bytes held by `weights`, and how many of them are quantized.
fn storage_of<'a>(weights: impl Iterator<Item = &'a BaseWeight>) -> (usize, usize) {
    let mut bytes = 0;
    let mut quantized = 0;
    for w in weights {
        match w {
            BaseWeight::Dense(t) => bytes += t.elem_count() * t.dtype().size_in_bytes(),
            BaseWeight::Nf4(q) => {
                bytes += q.storage_bytes();
                quantized += 1;
            }
            BaseWeight::Int8(q) => {
                bytes += q.storage_bytes();
                quantized += 1;
            }
        }
    }
    (bytes, quantized)
}

impl Layer {
    fn load(vb: VarBuilder, c: &Config, format: BaseFormat, i: usize) -> Result<Self> {
        let a = vb.pp("self_attn");
        let proj = |vb: &VarBuilder, m: TargetModule, bias: bool| Projection::load(vb, format, m.shape(c), bias, i, m);
        let attn = Attention {
            q: proj(&a, TargetModule::QProj, c.qkv_bias())?,
            k: proj(&a, TargetModule::KProj, c.qkv_bias())?,
            v: proj(&a, TargetModule::VProj, c.qkv_bias())?,
            o: proj(&a, TargetModule::OProj, c.o_bias())?,
            heads: c.num_attention_heads,
            kv_heads: c.num_kv_heads(),
            head_dim: c.head_dim(),
            window: c.attention_window(),
            q_norm: head_norm(&a, "q_norm", c)?,
            k_norm: head_norm(&a, "k_norm", c)?,
        };
        let m = vb.pp("mlp");
        let mlp = Mlp {
            gate: proj(&m, TargetModule::GateProj, c.mlp_bias)?,
            up: proj(&m, TargetModule::UpProj, c.mlp_bias)?,
            down: proj(&m, TargetModule::DownProj, c.mlp_bias)?,
        };
        Ok(Self {
            attn,
            mlp,
            input_norm: RmsNorm::load(vb.pp("input_layernorm"), c.hidden_size, c.rms_norm_eps)?,
            post_attn_norm: RmsNorm::load(vb.pp("post_attention_layernorm"), c.hidden_size, c.rms_norm_eps)?,
        })
    }

    pub(crate) fn projection(&self, m: TargetModule) -> &Projection {
        match m {
            TargetModule::QProj => &self.attn.q,
            TargetModule::KProj => &self.attn.k,
            TargetModule::VProj => &self.attn.v,
            TargetModule::OProj => &self.attn.o,
            TargetModule::GateProj => &self.mlp.gate,
            TargetModule::UpProj => &self.mlp.up,
            TargetModule::DownProj => &self.mlp.down,
        }
    }

    fn projection_mut(&mut self, m: TargetModule) -> &mut Projection {
        match m {
            TargetModule::QProj => &mut self.attn.q,
            TargetModule::KProj => &mut self.attn.k,
            TargetModule::VProj => &mut self.attn.v,
            TargetModule::OProj => &mut self.attn.o,
            TargetModule::GateProj => &mut self.mlp.gate,
            TargetModule::UpProj => &mut self.mlp.up,
            TargetModule::DownProj => &mut self.mlp.down,
        }
    }

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: Option<(&mut KvCache, usize)>,
        adapter: Option<&ActiveAdapter>,
    ) -> Result<Tensor> {
        let h = self
            .attn
            .forward(&self.input_norm.forward(x)?, cos, sin, mask, kv, adapter)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.post_attn_norm.forward(&x)?, adapter)?;
        Ok((x + h)?)
    }
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: Option<(&mut KvCache, usize)>,
        adapter: Option<&ActiveAdapter>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor, heads: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, heads, self.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let q = norm_heads(&self.q_norm, split(self.q.forward(x, adapter)?, self.heads)?)?;
        let k = norm_heads(&self.k_norm, split(self.k.forward(x, adapter)?, self.kv_heads)?)?;
        let v = split(self.v.forward(x, adapter)?, self.kv_heads)?;
        let q = rope::apply(&q, cos, sin)?;
        let k = rope::apply(&k, cos, sin)?;
        let (k, v) = match kv {
            Some((cache, layer)) => cache.append(layer, &k, &v)?,
            None => (k, v),
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let heads = if crate::kernels::fused::fusable(&q) {
            // The query heads of each KV head stacked as rows of one matrix; the fused op
            // derives the causal (and window) mask from the shapes.
            let grouped = q.reshape((b, self.kv_heads, self.heads / self.kv_heads * t, self.head_dim))?;
            let probs = crate::kernels::fused::causal_probs(&grouped, &k, scale, self.window, t)?;
            probs
                .matmul(&v.contiguous()?)?
                .reshape((b, self.heads, t, self.head_dim))?
        } else {
            // In blocks of queries, scores and softmax in f32 (crate::attention).
            let k = repeat_kv(&k, self.heads / self.kv_heads)?.contiguous()?;
            let v = repeat_kv(&v, self.heads / self.kv_heads)?.contiguous()?;
            crate::attention::attention(&q, &k, &v, mask, scale)?
        };
        let out = heads.transpose(1, 2)?.reshape((b, t, self.heads * self.head_dim))?;
        self.o.forward(&out, adapter)
    }
}

/// A per-head norm's weights (head_dim of them) when the family has one.
fn head_norm(attention: &VarBuilder, name: &str, c: &Config) -> Result<Option<RmsNorm>> {
    if !c.qk_norm() {
        return Ok(None);
    }
    Ok(Some(RmsNorm::load(attention.pp(name), c.head_dim(), c.rms_norm_eps)?))
}

/// `heads` (.., head_dim) normed over head_dim, in a training graph too.
fn norm_heads(norm: &Option<RmsNorm>, heads: Tensor) -> Result<Tensor> {
    match norm {
        Some(norm) => Ok(norm.forward(&heads)?),
        None => Ok(heads),
    }
}

/// Expands (b, kv_heads, s, d) to (b, kv_heads * n, s, d) so each query head has its KV head.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, kv, n, s, d))?.reshape((b, kv * n, s, d))?)
}

impl Mlp {
    fn forward(&self, x: &Tensor, adapter: Option<&ActiveAdapter>) -> Result<Tensor> {
        let gate = self.gate.forward(x, adapter)?;
        let up = self.up.forward(x, adapter)?;
        let h = if crate::kernels::fused::fusable(&gate) {
            crate::kernels::fused::swiglu(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        self.down.forward(&h, adapter)
    }
}
