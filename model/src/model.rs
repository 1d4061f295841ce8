//! The decoder: embeddings, N pre-norm layers (GQA attention + gated MLP), final norm, head.
//! The families differ in small, named ways, each read from the config: q/k norms (Qwen3,
//! Gemma 3); Gemma's scaled embeddings, (1 + w) norms, norms after attention and MLP, GeGLU
//! and sliding layers beside full ones (in Gemma 3 with their own RoPE); Gemma 2's soft-capped
//! attention scores and logits.
//!
//! Weight names follow the HF safetensors keys (`model.layers.0.self_attn.q_proj.weight`, ...)
//! because every tensor is fetched with `vb.pp(...)` paths that spell them out.

use crate::cache::KvCache;
use crate::config::{Activation, Config};
use crate::error::{ModelError, Result};
use crate::linear::{norm_if_any, BaseFormat, BaseWeight, Projection, RmsNorm};
use crate::lora::{ActiveAdapter, LoraAdapter, TargetModule};
use crate::lora_linear::Heads;
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
    /// Sliding attention window, when the config gives this layer one.
    pub(crate) window: Option<usize>,
    /// The factor on the scores (see [`Config::attention_scale`]).
    pub(crate) scale: f64,
    /// Gemma 2's cap on the scaled scores (cap * tanh(s / cap)).
    pub(crate) softcap: Option<f64>,
    /// Qwen3's RMS norms of each query and key head, over head_dim, before RoPE.
    pub(crate) q_norm: Option<RmsNorm>,
    pub(crate) k_norm: Option<RmsNorm>,
}

#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    pub(crate) gate: Projection,
    pub(crate) up: Projection,
    pub(crate) down: Projection,
    pub(crate) activation: Activation,
}

#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) attn: Attention,
    pub(crate) mlp: Mlp,
    pub(crate) input_norm: RmsNorm,
    pub(crate) pre_mlp_norm: RmsNorm,
    /// Gemma's norms of the attention's and the MLP's outputs, before the residual sums.
    pub(crate) attn_out_norm: Option<RmsNorm>,
    pub(crate) mlp_out_norm: Option<RmsNorm>,
    /// Index of this layer's [`LayerKind`] in [`CausalLm::kinds`].
    pub(crate) kind: usize,
}

/// What the layers of one kind share: their RoPE and their attention window. Most models
/// have one kind; Gemma 3 has sliding layers with a local RoPE base beside full ones.
#[derive(Debug, Clone)]
pub(crate) struct LayerKind {
    pub(crate) rope: Rope,
    pub(crate) window: Option<usize>,
}

/// One forward's inputs to the layers of one kind: RoPE's tables for its positions and the
/// additive mask, when one is built (see [`CausalLm::mask`]).
pub(crate) struct KindInputs {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) mask: Option<Tensor>,
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
    /// The kinds of layer this model has, in order of first appearance.
    pub(crate) kinds: Vec<LayerKind>,
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
        let (kinds, kind_of_layer) = layer_kinds(config);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for (i, &kind) in kind_of_layer.iter().enumerate().take(config.num_hidden_layers) {
            let mut layer = Layer::load(m.pp("layers").pp(i), config, format, i)?;
            layer.kind = kind;
            layers.push(layer);
        }
        let norm = load_norm(m.pp("norm"), config.hidden_size, config)?;
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
            kinds,
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
            let optional = [
                &mut l.attn.q_norm,
                &mut l.attn.k_norm,
                &mut l.attn_out_norm,
                &mut l.mlp_out_norm,
            ];
            let optional = optional.into_iter().filter_map(|n| n.as_mut());
            for norm in [&mut l.input_norm, &mut l.pre_mlp_norm].into_iter().chain(optional) {
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

    /// Each layer kind's RoPE tables for positions offset..offset+len, in the activations'
    /// dtype, and its mask.
    pub(crate) fn layer_inputs(&self, offset: usize, len: usize) -> Result<Vec<KindInputs>> {
        self.kinds
            .iter()
            .map(|kind| {
                let (cos, sin) = kind.rope.tables(offset, len, &self.device)?;
                Ok(KindInputs {
                    cos: cos.to_dtype(self.dtype())?,
                    sin: sin.to_dtype(self.dtype())?,
                    mask: self.mask(kind.window, len, offset, self.config.attn_logit_softcapping.is_some())?,
                })
            })
            .collect()
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
        Ok(self.cap_logits(logits)?.reshape((b, t, self.config.vocab_size))?)
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
            self.cap_logits(crate::linear::matmul_weight(&last, &self.head())?)
        })
    }

    /// The logits soft-capped when the family caps them (Gemma 2: cap * tanh(logits / cap)),
    /// in a training graph too.
    pub(crate) fn cap_logits(&self, logits: Tensor) -> Result<Tensor> {
        match self.config.final_logit_softcapping {
            Some(cap) => Ok(((logits / cap)?.tanh()? * cap)?),
            None => Ok(logits),
        }
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
        let inputs = self.layer_inputs(offset, seq)?;
        let mut x = self.embed_tokens(input_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| (c, i));
            x = layer.forward(&x, &inputs, kv, adapter)?;
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

    /// The embeddings of a flat list of token ids: (ids, hidden), scaled when the family
    /// scales them (Gemma).
    pub(crate) fn embed_rows(&self, ids: &Tensor) -> Result<Tensor> {
        let rows = match &self.embed {
            BaseWeight::Dense(table) => table.index_select(ids, 0)?,
            BaseWeight::Nf4(table) => table.gather_rows(ids)?,
            BaseWeight::Int8(table) => table.dequantize()?.index_select(ids, 0)?,
        };
        match self.config.embedding_scale() {
            Some(scale) => Ok((rows * scale)?),
            None => Ok(rows),
        }
    }

    /// Additive causal mask (seq, offset + seq), None for a single new token. Also applies a
    /// sliding `window`. None as well where attention runs through the fused causal softmax
    /// (f32 on the CPU), which derives the same mask from the shapes, unless `softcapped`
    /// attention (which that kernel does not compute) needs it.
    pub(crate) fn mask(
        &self,
        window: Option<usize>,
        seq: usize,
        offset: usize,
        softcapped: bool,
    ) -> Result<Option<Tensor>> {
        if crate::kernels::fused::fusable(&self.norm.weight) && !softcapped {
            return Ok(None);
        }
        if seq == 1 && window.is_none_or(|w| offset < w) {
            return Ok(None);
        }
        let total = offset + seq;
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

/// A layer's kind: its window, and whether it rotates with the local RoPE base.
type KindKey = (Option<usize>, bool);

/// The distinct kinds of the config's layers, in order of first appearance (at least one),
/// and each layer's index among them.
fn layer_kinds(config: &Config) -> (Vec<LayerKind>, Vec<usize>) {
    let mut keys: Vec<KindKey> = Vec::new();
    let mut kinds = Vec::new();
    let mut of_layer = Vec::with_capacity(config.num_hidden_layers);
    for layer in 0..config.num_hidden_layers.max(1) {
        let key = (config.layer_window(layer), config.local_rope(layer));
        let index = keys.iter().position(|k| *k == key).unwrap_or_else(|| {
            let rope = if key.1 { Rope::local(config) } else { Rope::new(config) };
            kinds.push(LayerKind { rope, window: key.0 });
            keys.push(key);
            keys.len() - 1
        });
        of_layer.push(index);
    }
    (kinds, of_layer)
}

/// An RMS norm of `size` weights; Gemma's multiply by (1 + w), stored here as 1 + w so every
/// path (graph, fused kernels, decode) computes x * r * w as for the other families. In f32
/// that is transformers' arithmetic; in bf16 the sum is rounded once, as the output is anyway.
fn load_norm(vb: VarBuilder, size: usize, c: &Config) -> Result<RmsNorm> {
    let mut norm = RmsNorm::load(vb, size, c.rms_norm_eps)?;
    if c.gemma_norms() {
        norm.weight = (norm.weight + 1.0)?;
    }
    Ok(norm)
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
            window: c.layer_window(i),
            scale: c.attention_scale(),
            softcap: c.attn_logit_softcapping,
            q_norm: head_norm(&a, "q_norm", c)?,
            k_norm: head_norm(&a, "k_norm", c)?,
        };
        let m = vb.pp("mlp");
        let mlp = Mlp {
            gate: proj(&m, TargetModule::GateProj, c.mlp_bias)?,
            up: proj(&m, TargetModule::UpProj, c.mlp_bias)?,
            down: proj(&m, TargetModule::DownProj, c.mlp_bias)?,
            activation: c.activation(std::path::Path::new("config.json"))?,
        };
        let norm = |name: &str| load_norm(vb.pp(name), c.hidden_size, c);
        // Gemma's post_attention_layernorm norms the attention's output; its MLP input has
        // pre_feedforward_layernorm. Llama's post_attention_layernorm is the MLP's input norm.
        let (pre_mlp_norm, attn_out_norm, mlp_out_norm) = if c.gemma_norms() {
            let after_attention = norm("post_attention_layernorm")?;
            let after_mlp = norm("post_feedforward_layernorm")?;
            (
                norm("pre_feedforward_layernorm")?,
                Some(after_attention),
                Some(after_mlp),
            )
        } else {
            (norm("post_attention_layernorm")?, None, None)
        };
        Ok(Self {
            attn,
            mlp,
            input_norm: norm("input_layernorm")?,
            pre_mlp_norm,
            attn_out_norm,
            mlp_out_norm,
            kind: 0,
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

    /// `inputs` holds every kind's; the layer takes its own.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        inputs: &[KindInputs],
        kv: Option<(&mut KvCache, usize)>,
        adapter: Option<&ActiveAdapter>,
    ) -> Result<Tensor> {
        let KindInputs { cos, sin, mask } = &inputs[self.kind];
        let h = self
            .attn
            .forward(&self.input_norm.forward(x)?, cos, sin, mask.as_ref(), kv, adapter)?;
        let x = (x + norm_if_any(&self.attn_out_norm, h)?)?;
        let h = self.mlp.forward(&self.pre_mlp_norm.forward(&x)?, adapter)?;
        Ok((&x + norm_if_any(&self.mlp_out_norm, h)?)?)
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
        // Each projection goes straight into heads, rotated with them unless a per-head norm
        // (over head_dim) comes between the split and RoPE.
        let into = |heads: usize, rotate: bool| Heads {
            batch: b,
            heads,
            head_dim: self.head_dim,
            rope: rotate.then(|| (cos.clone(), sin.clone())),
        };
        let query_like = |p: &Projection, heads: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let y = p.forward_heads(x, adapter, &into(heads, norm.is_none()))?;
            match norm {
                Some(n) => rope::apply(&n.forward(&y)?, cos, sin),
                None => Ok(y),
            }
        };
        let q = query_like(&self.q, self.heads, &self.q_norm)?;
        let k = query_like(&self.k, self.kv_heads, &self.k_norm)?;
        let v = self.v.forward_heads(x, adapter, &into(self.kv_heads, false))?;
        let (k, v) = match kv {
            Some((cache, layer)) => cache.append(layer, &k, &v)?,
            None => (k, v),
        };
        let scale = self.scale;
        let rows = (b, t, self.heads * self.head_dim);
        let out = if let Some(cap) = self.softcap {
            let k = repeat_kv(&k, self.heads / self.kv_heads)?.contiguous()?;
            let v = repeat_kv(&v, self.heads / self.kv_heads)?.contiguous()?;
            crate::attention::softcapped(&q, &k, &v, mask, scale, cap)?
                .transpose(1, 2)?
                .reshape(rows)?
        } else if crate::kernels::fused::fusable(&q) {
            // The query heads of each KV head stacked as rows of one matrix; the fused op
            // derives the causal (and window) mask from the shapes.
            let grouped = q.reshape((b, self.kv_heads, self.heads / self.kv_heads * t, self.head_dim))?;
            let probs = crate::kernels::fused::causal_probs(&grouped, &k, scale, self.window, t)?;
            probs
                .matmul(&v.contiguous()?)?
                .reshape((b, self.heads, t, self.head_dim))?
                .transpose(1, 2)?
                .reshape(rows)?
        } else {
            // In blocks of queries, scores and softmax in f32 (crate::attention), which
            // repeats the KV heads itself.
            crate::attention::attention(&q, &k, &v, mask, scale)?
        };
        self.o.forward(&out, adapter)
    }
}

/// A per-head norm's weights (head_dim of them) when the family has one.
fn head_norm(attention: &VarBuilder, name: &str, c: &Config) -> Result<Option<RmsNorm>> {
    if !c.qk_norm() {
        return Ok(None);
    }
    Ok(Some(load_norm(attention.pp(name), c.head_dim(), c)?))
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
        let h = match self.activation {
            Activation::Silu if crate::kernels::fused::fusable(&gate) => crate::kernels::fused::swiglu(&gate, &up)?,
            activation => crate::gated::gated(&gate, &up, activation)?,
        };
        self.down.forward(&h, adapter)
    }
}
