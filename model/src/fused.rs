//! Phi-3 checkpoints store each layer's q, k and v projections as one `self_attn.qkv_proj`
//! (q's rows, then k's, then v's, as Phi3Attention slices them) and gate and up as one
//! `mlp.gate_up_proj` (gate's rows first: Phi3MLP's `gate, up = chunk(2)`).
//!
//! The model keeps one projection per [`TargetModule`]: adapters, quantization, merging and the
//! hand-written training step all work per projection, and splitting once at load keeps every
//! one of them unaware of the family. [`split_fused`] wraps the weights' backend so that
//! `q_proj.weight` and the other parts are served as rows of their fused tensor (each part reads
//! the fused tensor once more, a cost paid at load only). PEFT's layout of Phi-3 adapters
//! (fused modules too) is in [`crate::fused_adapter`].

use crate::config::Config;
use crate::lora::TargetModule;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use std::collections::HashMap;
use std::ops::Range;

/// A module a checkpoint stores whole, whose parts the model holds as projections of their own.
#[derive(Debug)]
pub(crate) struct FusedModule {
    /// Its name in weight keys and PEFT's `target_modules`.
    pub(crate) name: &'static str,
    /// The parts, in the order of their rows.
    pub(crate) parts: &'static [TargetModule],
}

const PHI3: &[FusedModule] = &[
    FusedModule {
        name: "qkv_proj",
        parts: &[TargetModule::QProj, TargetModule::KProj, TargetModule::VProj],
    },
    FusedModule {
        name: "gate_up_proj",
        parts: &[TargetModule::GateProj, TargetModule::UpProj],
    },
];

/// The fused modules of `config`'s family: Phi-3's two, none for the others.
pub(crate) fn fused_modules(config: &Config) -> &'static [FusedModule] {
    if config.model_type == "phi3" {
        PHI3
    } else {
        &[]
    }
}

/// The fused module `part` belongs to in `config`'s family, if any.
pub(crate) fn fused_module_of(config: &Config, part: TargetModule) -> Option<&'static FusedModule> {
    fused_modules(config).iter().find(|f| f.parts.contains(&part))
}

impl FusedModule {
    /// The parent of the parts (`self_attn` or `mlp`), which is the fused module's too.
    pub(crate) fn parent(&self) -> &'static str {
        self.parts[0].parent()
    }

    /// (in_features, out_features) of the fused module: the parts' outputs stacked.
    pub(crate) fn shape(&self, config: &Config) -> (usize, usize) {
        let fan_in = self.parts[0].shape(config).0;
        (fan_in, self.parts.iter().map(|p| p.shape(config).1).sum())
    }

    /// The rows of the fused output (and weight) that are `part`'s.
    pub(crate) fn rows(&self, part: TargetModule, config: &Config) -> Range<usize> {
        let mut start = 0;
        for &p in self.parts {
            let out = p.shape(config).1;
            if p == part {
                return start..start + out;
            }
            start += out;
        }
        panic!("{part:?} is not a part of {}", self.name)
    }
}

/// Where a part's weight lies: the fused tensor's name and shape, and the part's rows.
struct PartOf {
    fused: String,
    fused_shape: (usize, usize),
    rows: Range<usize>,
}

/// The checkpoint's backend, serving each part of a fused module as rows of the fused tensor.
struct SplitFused {
    inner: Box<dyn SimpleBackend>,
    parts: HashMap<String, PartOf>,
}

/// `inner` as the model reads it: unchanged for a family without fused modules.
pub(crate) fn split_fused(inner: Box<dyn SimpleBackend>, config: &Config) -> Box<dyn SimpleBackend> {
    let modules = fused_modules(config);
    if modules.is_empty() {
        return inner;
    }
    let mut parts = HashMap::new();
    for layer in 0..config.num_hidden_layers {
        for module in modules {
            let (fan_in, out) = module.shape(config);
            let key = |name: &str| format!("model.layers.{layer}.{}.{name}.weight", module.parent());
            for &part in module.parts {
                let of = PartOf {
                    fused: key(module.name),
                    fused_shape: (out, fan_in),
                    rows: module.rows(part, config),
                };
                parts.insert(key(part.name()), of);
            }
        }
    }
    Box::new(SplitFused { inner, parts })
}

impl SplitFused {
    /// The part's rows as a tensor of their own: the fused tensor is checked whole, and freed.
    fn part(&self, of: &PartOf, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let fused = self
            .inner
            .get(of.fused_shape.into(), &of.fused, candle_nn::Init::Const(0.), dtype, dev)?;
        // A narrowed view would keep the whole fused storage alive with each part.
        fused.narrow(0, of.rows.start, of.rows.len())?.force_contiguous()
    }
}

impl SimpleBackend for SplitFused {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(of) = self.parts.get(name) else {
            return self.inner.get(s, name, h, dtype, dev);
        };
        let tensor = self.part(of, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name} (rows {:?} of {})", of.rows, of.fused),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.parts.get(name) {
            Some(of) => self.part(of, dtype, dev),
            None => self.inner.get_unchecked(name, dtype, dev),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match self.parts.get(name) {
            Some(of) => self.inner.contains_tensor(&of.fused),
            None => self.inner.contains_tensor(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phi3() -> Config {
        let mut config = crate::tiny::TinySpec::default().config();
        config.model_type = "phi3".into();
        config
    }

    /// A backend holding named tensors, as a checkpoint would; a wrong shape is an error.
    struct Named(HashMap<String, Tensor>);

    impl SimpleBackend for Named {
        fn get(&self, s: Shape, name: &str, _: candle_nn::Init, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            let t = self.get_unchecked(name, d, dev)?;
            if t.shape() != &s {
                return Err(candle_core::Error::Msg(format!("shape mismatch for {name}")));
            }
            Ok(t)
        }
        fn get_unchecked(&self, name: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            let t = self
                .0
                .get(name)
                .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
            t.to_dtype(d)?.to_device(dev)
        }
        fn contains_tensor(&self, name: &str) -> bool {
            self.0.contains_key(name)
        }
    }

    /// Row i of a fused (rows, cols) tensor holds i in every column, so a part's values say
    /// which rows it was cut from.
    fn numbered(rows: usize, cols: usize) -> Tensor {
        Tensor::arange(0f32, rows as f32, &Device::Cpu)
            .unwrap()
            .reshape((rows, 1))
            .unwrap()
            .broadcast_as((rows, cols))
            .unwrap()
            .contiguous()
            .unwrap()
    }

    #[test]
    fn each_part_is_served_as_its_rows_of_the_fused_tensor_in_phi3_order() {
        let config = phi3();
        let h = config.hidden_size;
        let (q, kv, i) = (
            config.num_attention_heads * config.head_dim(),
            config.num_kv_heads() * config.head_dim(),
            config.intermediate_size,
        );
        let attn = "model.layers.1.self_attn";
        let mlp = "model.layers.1.mlp";
        let stored = HashMap::from([
            (format!("{attn}.qkv_proj.weight"), numbered(q + 2 * kv, h)),
            (format!("{mlp}.gate_up_proj.weight"), numbered(2 * i, h)),
            (format!("{attn}.o_proj.weight"), numbered(h, q)),
        ]);
        let backend = split_fused(Box::new(Named(stored)), &config);
        let first_row = |name: String, out: usize| -> f32 {
            let t = backend
                .get(
                    (out, h).into(),
                    &name,
                    candle_nn::Init::Const(0.),
                    DType::F32,
                    &Device::Cpu,
                )
                .expect(&name);
            t.get(0).unwrap().get(0).unwrap().to_scalar().unwrap()
        };
        assert_eq!(first_row(format!("{attn}.q_proj.weight"), q), 0.0);
        assert_eq!(first_row(format!("{attn}.k_proj.weight"), kv), q as f32);
        assert_eq!(first_row(format!("{attn}.v_proj.weight"), kv), (q + kv) as f32);
        assert_eq!(first_row(format!("{mlp}.gate_proj.weight"), i), 0.0);
        assert_eq!(first_row(format!("{mlp}.up_proj.weight"), i), i as f32);
        assert!(backend.contains_tensor(&format!("{attn}.k_proj.weight")));
        assert!(backend.contains_tensor(&format!("{attn}.o_proj.weight")));
        assert!(!backend.contains_tensor("model.layers.0.self_attn.q_proj.weight"));
    }

    #[test]
    fn a_fused_tensor_of_the_wrong_size_is_an_error_naming_it() {
        let config = phi3();
        let h = config.hidden_size;
        let name = "model.layers.0.self_attn.qkv_proj.weight";
        let backend = split_fused(
            Box::new(Named(HashMap::from([(name.to_string(), numbered(3, h))]))),
            &config,
        );
        let q = config.num_attention_heads * config.head_dim();
        let err = backend
            .get(
                (q, h).into(),
                "model.layers.0.self_attn.q_proj.weight",
                candle_nn::Init::Const(0.),
                DType::F32,
                &Device::Cpu,
            )
            .expect_err("3 rows cannot hold q, k and v")
            .to_string();
        assert!(err.contains(name), "{err}");
    }
}
