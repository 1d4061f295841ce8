//! LoRA adapters as HF PEFT defines them: `y = W x + (alpha / r) * B A dropout(x)`.
//!
//! Adapters live outside the model so one frozen base can serve many adapters (the server) and
//! the trainer can hand in tensors that are candle `Var`s. Only A and B are ever variables.

use crate::config::Config;
use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A projection of a decoder layer that can carry an adapter; serialised with PEFT's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetModule {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl TargetModule {
    pub const ALL: [TargetModule; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// The module's name in HF weight keys and PEFT's `target_modules`.
    pub fn name(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
        }
    }

    /// The submodule of the decoder layer holding this projection.
    pub fn parent(self) -> &'static str {
        match self {
            Self::QProj | Self::KProj | Self::VProj | Self::OProj => "self_attn",
            Self::GateProj | Self::UpProj | Self::DownProj => "mlp",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// (in_features, out_features) of the projection in `config`.
    pub fn shape(self, config: &Config) -> (usize, usize) {
        let h = config.hidden_size;
        let q = config.num_attention_heads * config.head_dim();
        let kv = config.num_kv_heads() * config.head_dim();
        let i = config.intermediate_size;
        match self {
            Self::QProj => (h, q),
            Self::KProj | Self::VProj => (h, kv),
            Self::OProj => (q, h),
            Self::GateProj | Self::UpProj => (h, i),
            Self::DownProj => (i, h),
        }
    }

    fn index(self) -> u64 {
        self as u64
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<TargetModule>,
}

impl LoraConfig {
    /// PEFT's scaling: applied to the low-rank delta only, never to the base output.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(ModelError::Adapter("lora r must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::Adapter(format!(
                "lora dropout {} is not in [0, 1)",
                self.dropout
            )));
        }
        if self.target_modules.is_empty() {
            return Err(ModelError::Adapter("lora target_modules is empty".into()));
        }
        Ok(())
    }
}

/// The low-rank pair of one projection: A is (r, in), B is (out, r), as PEFT stores them.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pairs: BTreeMap<(usize, TargetModule), LoraPair>,
}

/// A trainable variable and its PEFT name; the optimizer and checkpoints key on the name.
pub struct NamedVar {
    pub name: String,
    pub var: Var,
}

/// PEFT's tensor name for A (`which == "A"`) or B of a projection.
pub fn peft_name(layer: usize, module: TargetModule, which: &str) -> String {
    peft_key(layer, module.parent(), module.name(), which)
}

/// PEFT's tensor name for A or B of the module `parent.module` of a layer, a projection or a
/// fused module ([`crate::fused`]).
pub(crate) fn peft_key(layer: usize, parent: &str, module: &str, which: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{parent}.{module}.lora_{which}.weight")
}

impl LoraAdapter {
    pub fn from_pairs(config: LoraConfig, pairs: BTreeMap<(usize, TargetModule), LoraPair>) -> Self {
        Self { config, pairs }
    }

    /// A fresh adapter for training, initialised as PEFT does: A Kaiming-uniform with a = sqrt(5)
    /// (bound 1/sqrt(in)), B zeros, so the adapted model starts equal to the base. The values
    /// come from a seeded ChaCha stream (candle's CPU RNG cannot be seeded) so runs repeat.
    pub fn init_trainable(
        model: &Config,
        config: LoraConfig,
        seed: u64,
        device: &Device,
    ) -> Result<(Self, Vec<NamedVar>)> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        let mut vars = Vec::new();
        for layer in 0..model.num_hidden_layers {
            for &module in &config.target_modules {
                let (fan_in, out) = module.shape(model);
                let bound = 1.0 / (fan_in as f32).sqrt();
                let values: Vec<f32> = (0..config.r * fan_in)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(values, (config.r, fan_in), device)?)?;
                let b = Var::zeros((out, config.r), DType::F32, device)?;
                pairs.insert(
                    (layer, module),
                    LoraPair {
                        a: a.as_tensor().clone(),
                        b: b.as_tensor().clone(),
                    },
                );
                vars.push(NamedVar {
                    name: peft_name(layer, module, "A"),
                    var: a,
                });
                vars.push(NamedVar {
                    name: peft_name(layer, module, "B"),
                    var: b,
                });
            }
        }
        vars.sort_by(|x, y| x.name.cmp(&y.name));
        Ok((Self { config, pairs }, vars))
    }

    /// The same adapter with tensors cut from the autograd graph (sharing their storage): a
    /// forward through it records nothing, so its intermediates are freed as it goes.
    pub fn detached(&self) -> Self {
        let pairs = self
            .pairs
            .iter()
            .map(|(&k, p)| {
                (
                    k,
                    LoraPair {
                        a: p.a.detach(),
                        b: p.b.detach(),
                    },
                )
            })
            .collect();
        Self {
            config: self.config.clone(),
            pairs,
        }
    }

    pub fn get(&self, layer: usize, module: TargetModule) -> Option<&LoraPair> {
        self.pairs.get(&(layer, module))
    }

    pub fn pairs(&self) -> impl Iterator<Item = (&(usize, TargetModule), &LoraPair)> {
        self.pairs.iter()
    }

    /// The tensors under their projections' PEFT names: PEFT's own layout for every family but
    /// Phi-3, whose fused modules [`crate::peft::save`] writes instead. The trainer's variables
    /// and checkpoints go by these names.
    pub fn to_peft_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (&(layer, module), pair) in &self.pairs {
            out.insert(peft_name(layer, module, "A"), pair.a.clone());
            out.insert(peft_name(layer, module, "B"), pair.b.clone());
        }
        out
    }

    /// Rebuilds an adapter from tensors named as [`LoraAdapter::to_peft_tensors`] names them,
    /// checking every shape against the model and rejecting names it does not understand
    /// rather than ignoring them.
    pub fn from_peft_tensors(
        model: &Config,
        config: LoraConfig,
        mut tensors: BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        config.validate()?;
        let mut pairs = BTreeMap::new();
        for layer in 0..model.num_hidden_layers {
            for &module in &config.target_modules {
                let (fan_in, out) = module.shape(model);
                let mut take = |which: &str, shape: (usize, usize)| -> Result<Tensor> {
                    let name = peft_name(layer, module, which);
                    let t = tensors
                        .remove(&name)
                        .or_else(|| tensors.remove(&name.replace(".weight", ".default.weight")))
                        .ok_or_else(|| ModelError::Adapter(format!("missing tensor {name}")))?;
                    if t.dims() != [shape.0, shape.1] {
                        return Err(ModelError::Adapter(format!(
                            "tensor {name} has shape {:?}, expected {shape:?}",
                            t.dims()
                        )));
                    }
                    Ok(t.to_dtype(DType::F32)?)
                };
                let a = take("A", (config.r, fan_in))?;
                let b = take("B", (out, config.r))?;
                pairs.insert((layer, module), LoraPair { a, b });
            }
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(ModelError::Adapter(format!(
                "unexpected tensor {extra} (not a lora_A/lora_B of a target module of this model)"
            )));
        }
        Ok(Self { config, pairs })
    }
}

/// An adapter as one forward pass uses it. `dropout_seed` is set only in training: dropout is
/// then drawn from a stream derived from the seed, the layer and the module, so a resumed run
/// draws the same masks as an uninterrupted one.
#[derive(Clone, Copy)]
pub struct ActiveAdapter<'a> {
    pub adapter: &'a LoraAdapter,
    pub dropout_seed: Option<u64>,
    /// Where the rows of this forward start in the batch the dropout stream covers: 0, except
    /// when a batch is recomputed in parts (gradient checkpointing), so each part draws the
    /// masks the whole batch drew for its rows.
    pub first_row: usize,
}

impl ActiveAdapter<'_> {
    /// `scale * B A dropout(x)` for a 2-D `x` of shape (n, in), or None without a pair here.
    pub(crate) fn delta(&self, layer: usize, module: TargetModule, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(pair) = self.adapter.get(layer, module) else {
            return Ok(None);
        };
        let (rows, cols) = x.dims2()?;
        // Mixed precision as PEFT does it: a bf16 base's activations enter the adapter in the
        // adapter's own dtype (f32), and the delta leaves in the base's.
        let base_dtype = x.dtype();
        let x = x.to_dtype(pair.a.dtype())?;
        let x = match self.dropout_mask_on(layer, module, rows, cols, x.device())? {
            Some(mask) => x.mul(&mask.to_dtype(x.dtype())?)?,
            None => x,
        };
        // Scaling the rank-r intermediate rather than the (rows, out) delta is the same product
        // with an element-wise pass over r columns instead of out, forward and backward.
        let low = (x.matmul(&pair.a.t()?)? * self.adapter.config.scale())?;
        Ok(Some(low.matmul(&pair.b.t()?)?.to_dtype(base_dtype)?))
    }

    /// The pair of `module` in `layer`, its scale, and how its dropout mask is drawn (None
    /// without dropout): what [`crate::lora_linear`] computes as one op, drawing the mask again
    /// in its backward instead of keeping it.
    pub(crate) fn trainable_pair(
        &self,
        layer: usize,
        module: TargetModule,
    ) -> Option<(&LoraPair, f64, Option<MaskDraw>)> {
        let pair = self.adapter.get(layer, module)?;
        Some((pair, self.adapter.config.scale(), self.mask_draw(layer, module)))
    }

    /// How the dropout mask of `module` in `layer` is drawn in this forward; None when not
    /// training or p is 0.
    pub(crate) fn mask_draw(&self, layer: usize, module: TargetModule) -> Option<MaskDraw> {
        let p = self.adapter.config.dropout;
        let seed = self.dropout_seed.filter(|_| p > 0.0)?;
        Some(MaskDraw {
            stream: mix(mix(seed, layer as u64), module.index()),
            p,
            first_row: self.first_row,
        })
    }

    /// [`MaskDraw::draw`] of `module` in `layer`, or None without dropout.
    pub(crate) fn dropout_mask_on(
        &self,
        layer: usize,
        module: TargetModule,
        rows: usize,
        cols: usize,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        self.mask_draw(layer, module)
            .map(|d| d.draw(rows, cols, device))
            .transpose()
    }

    /// [`MaskDraw::host_values`] of `module` in `layer`, or None without dropout.
    pub(crate) fn dropout_mask(
        &self,
        layer: usize,
        module: TargetModule,
        rows: usize,
        cols: usize,
    ) -> Option<Vec<f32>> {
        Some(self.mask_draw(layer, module)?.host_values(rows, cols))
    }
}

/// Everything that decides one projection's dropout mask: its stream (from the seed, the layer
/// and the module), p, and where this forward's rows start in the batch the stream covers. The
/// same draw gives the same mask, so a backward can draw it again rather than keep it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct MaskDraw {
    pub stream: u64,
    pub p: f64,
    pub first_row: usize,
}

impl MaskDraw {
    /// The inverted-dropout mask of (rows, cols) inputs on `device`, drawn there (by our
    /// kernel on a GPU): element (r, c) is element (first_row + r) cols + c of the stream
    /// (`kernels::dropout`), so a part recomputed under checkpointing, or a backward drawing
    /// it again, gets exactly the rows the whole batch got.
    pub(crate) fn draw(&self, rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
        let first = (self.first_row * cols) as u64;
        crate::kernels::dropout::mask(self.stream, first, (rows, cols), self.p, device)
    }

    /// The mask's (rows, cols) values on the host, 0 (probability p) or 1/(1-p): the same
    /// values as [`MaskDraw::draw`].
    pub(crate) fn host_values(&self, rows: usize, cols: usize) -> Vec<f32> {
        let first = (self.first_row * cols) as u64;
        crate::kernels::dropout::host_values(self.stream, first, rows * cols, self.p)
    }
}

/// The fraction of a dropout mask's elements that differ between `device` and the host: 0
/// when they agree, as they must (a GPU draws its masks by our own kernel).
/// `kubetune-device-check` runs it on a GPU.
pub fn dropout_mask_mismatch(device: &Device) -> Result<f64> {
    let draw = MaskDraw {
        stream: mix(17, 3),
        p: 0.1,
        first_row: 5,
    };
    let (rows, cols) = (64, 1000);
    let on = draw
        .draw(rows, cols, device)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let host = draw.host_values(rows, cols);
    Ok(on.iter().zip(&host).filter(|(a, b)| a != b).count() as f64 / host.len() as f64)
}

/// SplitMix64 step combining two values into a well-spread seed.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_mask_is_the_host_stream_and_none_without_a_seed() -> Result<()> {
        let config = crate::tiny::TinySpec::default().config();
        let lora = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.25,
            target_modules: vec![TargetModule::QProj],
        };
        let (adapter, _) = LoraAdapter::init_trainable(&config, lora, 1, &Device::Cpu)?;
        let mut active = ActiveAdapter {
            adapter: &adapter,
            dropout_seed: Some(9),
            first_row: 3,
        };
        let on = active
            .dropout_mask_on(1, TargetModule::QProj, 4, 8, &Device::Cpu)?
            .expect("a mask");
        let host = active.dropout_mask(1, TargetModule::QProj, 4, 8).expect("a host mask");
        assert_eq!(on.flatten_all()?.to_vec1::<f32>()?, host);
        active.dropout_seed = None;
        assert!(active
            .dropout_mask_on(1, TargetModule::QProj, 4, 8, &Device::Cpu)?
            .is_none());
        Ok(())
    }
}
