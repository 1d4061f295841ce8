//! PEFT's layout of an adapter for a family whose checkpoints fuse projections (Phi-3's
//! `qkv_proj` and `gate_up_proj`, see [`crate::fused`]).
//!
//! PEFT puts its pairs on the model's modules as transformers builds them, so on Phi-3 it
//! targets `qkv_proj` and `gate_up_proj`: there is no `q_proj` to put a pair on. An adapter
//! naming one fails to load in PEFT when no other name matches, and otherwise loads with those
//! pairs silently left out (peft 0.21.2). kubetune's adapter keeps a pair per projection, so:
//!
//! - Writing, a fused module's A is its targeted parts' A's stacked and its B block-diagonal:
//!   a part's rows hold its B in its own block of columns, an untargeted part's rows are 0. B A
//!   restricted to a part's rows is then that part's B A. Parts that share one A (as read below)
//!   write it once, with their B's stacked. Every module is padded with zero rows of A and
//!   columns of B to one rank R, because vLLM reads no `rank_pattern`; `lora_alpha` becomes
//!   alpha R / r, which keeps alpha / r, the scale of every delta.
//! - Reading, each part of a fused module gets the whole A and its own rows of B: exact, since
//!   the part's delta is those rows of B A.

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::fused::{fused_module_of, fused_modules, FusedModule};
use crate::lora::{peft_key, LoraAdapter, LoraConfig, LoraPair, TargetModule};
use crate::peft::PeftConfig;
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

/// A module as PEFT sees it: a projection of its own, or a fused module.
#[derive(Clone, Copy)]
enum Written {
    Plain(TargetModule),
    Fused(&'static FusedModule),
}

impl Written {
    fn of(part: TargetModule, model: &Config) -> Self {
        fused_module_of(model, part).map_or(Self::Plain(part), Self::Fused)
    }

    fn name(self) -> &'static str {
        match self {
            Self::Plain(m) => m.name(),
            Self::Fused(f) => f.name,
        }
    }

    fn parent(self) -> &'static str {
        match self {
            Self::Plain(m) => m.parent(),
            Self::Fused(f) => f.parent(),
        }
    }

    /// This module's pair in `layer`, unpadded; None when none of its parts has one.
    fn pair(self, adapter: &LoraAdapter, layer: usize, model: &Config) -> Result<Option<LoraPair>> {
        match self {
            Self::Plain(m) => Ok(adapter.get(layer, m).cloned()),
            Self::Fused(f) => fuse_parts(adapter, layer, f, model),
        }
    }
}

/// The modules PEFT targets for `targets`, in the order of the layer's projections.
fn written_modules(targets: &[TargetModule], model: &Config) -> Vec<Written> {
    let mut out: Vec<Written> = Vec::new();
    for part in TargetModule::ALL.into_iter().filter(|m| targets.contains(m)) {
        let module = Written::of(part, model);
        if !out.iter().any(|w| w.name() == module.name()) {
            out.push(module);
        }
    }
    out
}

/// The PEFT config and tensors of `adapter` for a model with fused modules (see the module doc).
pub(crate) fn fuse(
    adapter: &LoraAdapter,
    model: &Config,
    base_model: &str,
) -> Result<(PeftConfig, BTreeMap<String, Tensor>)> {
    let modules = written_modules(&adapter.config.target_modules, model);
    let mut pairs = Vec::new();
    for layer in 0..model.num_hidden_layers {
        for &module in &modules {
            if let Some(pair) = module.pair(adapter, layer, model)? {
                pairs.push((layer, module, pair));
            }
        }
    }
    let r = adapter.config.r;
    let mut rank = r;
    for (_, _, pair) in &pairs {
        rank = rank.max(pair.a.dim(0)?);
    }
    let mut tensors = BTreeMap::new();
    for (layer, module, pair) in pairs {
        let key = |which: &str| peft_key(layer, module.parent(), module.name(), which);
        tensors.insert(key("A"), place(&pair.a, 0, 0, rank)?);
        tensors.insert(key("B"), place(&pair.b, 1, 0, rank)?);
    }
    let mut config = PeftConfig::from_lora(&adapter.config, base_model);
    config.r = rank;
    config.lora_alpha = adapter.config.alpha * rank as f64 / r as f64;
    config.target_modules = modules.iter().map(|m| m.name()).collect::<Vec<_>>().into();
    Ok((config, tensors))
}

/// The pair of a fused module in `layer` from its parts' pairs, None when no part has one.
fn fuse_parts(adapter: &LoraAdapter, layer: usize, module: &FusedModule, model: &Config) -> Result<Option<LoraPair>> {
    let targeted: Vec<&LoraPair> = module.parts.iter().filter_map(|&p| adapter.get(layer, p)).collect();
    let Some(first) = targeted.first() else {
        return Ok(None);
    };
    let mut shared = true;
    for pair in &targeted {
        shared = shared && same_values(&pair.a, &first.a)?;
    }
    let a = if shared {
        first.a.clone()
    } else {
        Tensor::cat(&targeted.iter().map(|p| &p.a).collect::<Vec<_>>(), 0)?
    };
    let rank = a.dim(0)?;
    let mut rows = Vec::with_capacity(module.parts.len());
    let mut block = 0;
    for &part in module.parts {
        let b = match adapter.get(layer, part) {
            None => Tensor::zeros((part.shape(model).1, rank), a.dtype(), a.device())?,
            Some(pair) if shared => pair.b.clone(),
            Some(pair) => {
                let r = pair.b.dim(1)?;
                block += 1;
                place(&pair.b, 1, (block - 1) * r, rank)?
            }
        };
        rows.push(b);
    }
    Ok(Some(LoraPair {
        a,
        b: Tensor::cat(&rows, 0)?,
    }))
}

/// Whether `a` and `b` hold the same values (the same A read into several parts).
fn same_values(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dims() != b.dims() {
        return Ok(false);
    }
    Ok(a.eq(b)?.flatten_all()?.min(0)?.to_scalar::<u8>()? == 1)
}

/// `t` at offset `before` along `dim`, within zeros that make that dimension `total` long.
fn place(t: &Tensor, dim: usize, before: usize, total: usize) -> Result<Tensor> {
    let len = t.dim(dim)?;
    if before == 0 && len == total {
        return Ok(t.clone());
    }
    let zeros = |n: usize| -> Result<Tensor> {
        let mut dims = t.dims().to_vec();
        dims[dim] = n;
        Ok(Tensor::zeros(dims, t.dtype(), t.device())?)
    };
    let mut pieces = Vec::with_capacity(3);
    if before > 0 {
        pieces.push(zeros(before)?);
    }
    pieces.push(t.clone());
    if total > before + len {
        pieces.push(zeros(total - before - len)?);
    }
    Ok(Tensor::cat(&pieces, dim)?)
}

/// `peft` with each fused module in `target_modules` replaced by its parts; unchanged for a
/// family without fused modules. A part named on its own (`q_proj` on Phi-3) is refused: PEFT
/// could not have put a pair on it. `path` only labels the error.
pub(crate) fn split_targets(peft: &PeftConfig, model: &Config, path: &Path) -> Result<PeftConfig> {
    let Some(names) = peft.target_modules.as_array() else {
        return Ok(peft.clone());
    };
    let mut split = Vec::new();
    for value in names {
        let name = value.as_str().unwrap_or_default();
        if let Some(fused) = fused_modules(model).iter().find(|f| f.name == name) {
            split.extend(fused.parts.iter().map(|p| serde_json::Value::from(p.name())));
            continue;
        }
        if let Some(fused) = TargetModule::from_name(name).and_then(|m| fused_module_of(model, m)) {
            return Err(ModelError::InvalidConfig {
                path: path.into(),
                field: "target_modules".into(),
                reason: format!(
                    "`{name}` is not a module of {} (its checkpoints fuse it into {}, which PEFT targets)",
                    model.model_type, fused.name
                ),
            });
        }
        split.push(value.clone());
    }
    Ok(PeftConfig {
        target_modules: split.into(),
        ..peft.clone()
    })
}

/// `tensors` with each targeted fused module's A and B replaced by its parts': the whole A and
/// the part's rows of B, under the parts' names. Other tensors pass unchanged (an unknown one
/// is refused when the adapter is built from them).
pub(crate) fn split_tensors(
    mut tensors: BTreeMap<String, Tensor>,
    lora: &LoraConfig,
    model: &Config,
) -> Result<BTreeMap<String, Tensor>> {
    for layer in 0..model.num_hidden_layers {
        for module in fused_modules(model) {
            if !module.parts.iter().any(|p| lora.target_modules.contains(p)) {
                continue;
            }
            let (a, b) = take_fused(&mut tensors, layer, module, lora.r, model)?;
            for &part in module.parts {
                let rows = module.rows(part, model);
                let key = |which: &str| peft_key(layer, module.parent(), part.name(), which);
                tensors.insert(key("A"), a.clone());
                tensors.insert(key("B"), b.narrow(0, rows.start, rows.len())?);
            }
        }
    }
    Ok(tensors)
}

/// A fused module's A (r, in) and B (parts' outputs, r) in `layer`, removed from `tensors`.
fn take_fused(
    tensors: &mut BTreeMap<String, Tensor>,
    layer: usize,
    module: &FusedModule,
    r: usize,
    model: &Config,
) -> Result<(Tensor, Tensor)> {
    let (fan_in, out) = module.shape(model);
    let mut take = |which: &str, shape: [usize; 2]| -> Result<Tensor> {
        let name = peft_key(layer, module.parent(), module.name, which);
        let t = tensors
            .remove(&name)
            .or_else(|| tensors.remove(&name.replace(".weight", ".default.weight")))
            .ok_or_else(|| ModelError::Adapter(format!("missing tensor {name}")))?;
        if t.dims() != shape {
            return Err(ModelError::Adapter(format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                t.dims()
            )));
        }
        Ok(t)
    };
    Ok((take("A", [r, fan_in])?, take("B", [out, r])?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn phi3() -> Config {
        let mut config = crate::tiny::TinySpec::default().config();
        config.model_type = "phi3".into();
        config
    }

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let values: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// An adapter of rank 2 on `targets`, with random B's so every delta is non-zero.
    fn trained(model: &Config, targets: &[TargetModule]) -> LoraAdapter {
        let lora = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: targets.to_vec(),
        };
        let (adapter, vars) = LoraAdapter::init_trainable(model, lora, 3, &Device::Cpu).unwrap();
        for (i, v) in vars.iter().enumerate().filter(|(_, v)| v.name.contains("lora_B")) {
            v.var.set(&random(v.var.dims2().unwrap(), i as u64)).unwrap();
        }
        adapter
    }

    /// The adapter PEFT's layout `(config, tensors)` reads back as.
    fn read(config: &PeftConfig, tensors: BTreeMap<String, Tensor>, model: &Config) -> LoraAdapter {
        let split = split_targets(config, model, Path::new("adapter_config.json")).unwrap();
        let lora = split.to_lora(Path::new("adapter_config.json")).unwrap();
        let tensors = split_tensors(tensors, &lora, model).unwrap();
        LoraAdapter::from_peft_tensors(model, lora, tensors).unwrap()
    }

    fn delta(adapter: &LoraAdapter, layer: usize, m: TargetModule) -> Tensor {
        let pair = adapter.get(layer, m).expect("pair");
        (pair.b.matmul(&pair.a).unwrap() * adapter.config.scale()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn pairs_written_fused_read_back_with_every_projections_delta() {
        let model = phi3();
        let adapter = trained(&model, &TargetModule::ALL);
        let (config, tensors) = fuse(&adapter, &model, "phi3").unwrap();
        // q, k and v stack three rank-2 blocks; every module is padded to that rank.
        assert_eq!((config.r, config.lora_alpha), (6, 12.0));
        assert_eq!(
            config.target_modules,
            serde_json::json!(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
        );
        let o_a = &tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"];
        assert_eq!(o_a.dims(), [6, model.num_attention_heads * model.head_dim()]);
        let read = read(&config, tensors, &model);
        for layer in 0..model.num_hidden_layers {
            for m in TargetModule::ALL {
                let diff = max_diff(&delta(&read, layer, m), &delta(&adapter, layer, m));
                assert!(diff < 1e-6, "layer {layer} {m:?}: deltas differ by {diff}");
            }
        }
    }

    #[test]
    fn untargeted_parts_of_a_fused_module_get_zero_rows() {
        let model = phi3();
        let adapter = trained(&model, &[TargetModule::QProj, TargetModule::VProj]);
        let (config, tensors) = fuse(&adapter, &model, "phi3").unwrap();
        assert_eq!(
            (config.r, config.target_modules.clone()),
            (4, serde_json::json!(["qkv_proj"]))
        );
        let b = &tensors["base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight"];
        let k_rows = crate::fused::fused_modules(&model)[0].rows(TargetModule::KProj, &model);
        let k = b.narrow(0, k_rows.start, k_rows.len()).unwrap();
        assert_eq!(max_diff(&k, &k.zeros_like().unwrap()), 0.0);
        let read = read(&config, tensors, &model);
        let diff = max_diff(
            &delta(&read, 1, TargetModule::VProj),
            &delta(&adapter, 1, TargetModule::VProj),
        );
        assert!(diff < 1e-6, "v's delta differs by {diff}");
    }

    /// A fused adapter as PEFT writes one: one A per fused module, shared by its parts.
    #[test]
    fn an_adapter_read_from_the_fused_layout_and_written_back_gives_the_same_tensors() {
        let model = phi3();
        let mut config = PeftConfig::from_lora(&trained(&model, &[TargetModule::OProj]).config, "phi3");
        config.r = 4;
        config.lora_alpha = 8.0;
        config.target_modules = serde_json::json!(["gate_up_proj", "qkv_proj", "down_proj"]);
        let mut tensors = BTreeMap::new();
        for layer in 0..model.num_hidden_layers {
            let modules = [("self_attn", "qkv_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj")];
            for (i, (parent, name)) in modules.into_iter().enumerate() {
                let (fan_in, out) = match name {
                    "down_proj" => TargetModule::DownProj.shape(&model),
                    _ => fused_modules(&model)[i].shape(&model),
                };
                let seed = (layer * 10 + i) as u64;
                tensors.insert(peft_key(layer, parent, name, "A"), random((4, fan_in), seed));
                tensors.insert(peft_key(layer, parent, name, "B"), random((out, 4), seed + 100));
            }
        }
        let adapter = read(&config, tensors.clone(), &model);
        let (written, rewritten) = fuse(&adapter, &model, "phi3").unwrap();
        assert_eq!((written.r, written.lora_alpha), (4, 8.0));
        assert_eq!(
            written.target_modules,
            serde_json::json!(["qkv_proj", "gate_up_proj", "down_proj"])
        );
        assert_eq!(rewritten.keys().collect::<Vec<_>>(), tensors.keys().collect::<Vec<_>>());
        for (name, t) in &tensors {
            assert_eq!(max_diff(t, &rewritten[name]), 0.0, "{name}");
        }
    }

    #[test]
    fn a_part_named_on_its_own_or_a_fused_tensor_of_the_wrong_shape_is_refused_by_name() {
        let model = phi3();
        let mut config = PeftConfig::from_lora(&trained(&model, &[TargetModule::QProj]).config, "phi3");
        let path = Path::new("adapter_config.json");
        let err = split_targets(&config, &model, path).unwrap_err().to_string();
        assert!(
            err.contains("target_modules") && err.contains("`q_proj`") && err.contains("qkv_proj"),
            "{err}"
        );

        config.target_modules = serde_json::json!(["qkv_proj"]);
        let lora = split_targets(&config, &model, path).unwrap().to_lora(path).unwrap();
        let h = model.hidden_size;
        let tensors = BTreeMap::from([
            (peft_key(0, "self_attn", "qkv_proj", "A"), random((2, h), 1)),
            (peft_key(0, "self_attn", "qkv_proj", "B"), random((h, 2), 2)),
        ]);
        let err = split_tensors(tensors, &lora, &model).unwrap_err().to_string();
        assert!(
            err.contains("layers.0.self_attn.qkv_proj.lora_B.weight has shape"),
            "{err}"
        );
    }
}
