//! Forward-pass behaviour: LoRA against merged weights, dropout, KV cache, sharded loading,
//! gradients reaching only the adapters.

use crate::common::*;
use candle_core::Device;
use kubetune_model::{load_model, ActiveAdapter, KvCache, LoadOptions};

const PROMPT: [u32; 9] = [0, 57, 80, 120, 301, 44, 9, 200, 17];

#[test]
fn lora_forward_equals_merged_weights_with_scale_not_one() {
    let t = tiny();
    // alpha / r = 3: a wrongly placed scale (on the base, or missing) would show.
    let (adapter, _vars) = random_adapter(&t.config, 4, 12.0, 0.0);
    let active = ActiveAdapter {
        adapter: &adapter,
        dropout_seed: None,
        first_row: 0,
    };
    let with_lora = t
        .model
        .forward(&ids(&PROMPT), 0, None, Some(&active))
        .expect("lora forward");
    let merged = t.model.merged(&adapter).expect("merge");
    let merged_out = merged.forward(&ids(&PROMPT), 0, None, None).expect("merged forward");
    let base_out = t.model.forward(&ids(&PROMPT), 0, None, None).expect("base forward");
    let diff = max_abs_diff(&with_lora, &merged_out);
    assert!(diff < 1e-4, "lora vs merged differ by {diff}");
    assert!(
        max_abs_diff(&with_lora, &base_out) > 1e-2,
        "the adapter must change the output"
    );
}

#[test]
fn dropout_applies_only_when_training() {
    let t = tiny();
    let (adapter, _vars) = random_adapter(&t.config, 4, 8.0, 0.5);
    let eval = ActiveAdapter {
        adapter: &adapter,
        dropout_seed: None,
        first_row: 0,
    };
    let a = t.model.forward(&ids(&PROMPT), 0, None, Some(&eval)).expect("eval");
    let merged = t
        .model
        .merged(&adapter)
        .expect("merge")
        .forward(&ids(&PROMPT), 0, None, None)
        .expect("merged");
    assert!(max_abs_diff(&a, &merged) < 1e-4, "no dropout at eval");
    let train = |seed| {
        let active = ActiveAdapter {
            adapter: &adapter,
            dropout_seed: Some(seed),
            first_row: 0,
        };
        t.model.forward(&ids(&PROMPT), 0, None, Some(&active)).expect("train")
    };
    assert!(
        max_abs_diff(&train(1), &a) > 1e-3,
        "dropout changes the training output"
    );
    assert_eq!(max_abs_diff(&train(1), &train(1)), 0.0, "same seed, same masks");
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let t = tiny();
    let (adapter, _vars) = random_adapter(&t.config, 4, 8.0, 0.0);
    let active = ActiveAdapter {
        adapter: &adapter,
        dropout_seed: None,
        first_row: 0,
    };
    let full = t.model.forward(&ids(&PROMPT), 0, None, Some(&active)).expect("full");
    let mut cache = KvCache::new(t.config.num_hidden_layers);
    let split = 5;
    let first = t
        .model
        .forward(&ids(&PROMPT[..split]), 0, Some(&mut cache), Some(&active))
        .expect("prefix");
    assert!(max_abs_diff(&first, &full.narrow(1, 0, split).expect("narrow")) < 1e-4);
    for (i, &tok) in PROMPT.iter().enumerate().skip(split) {
        let step = t
            .model
            .forward(&ids(&[tok]), i, Some(&mut cache), Some(&active))
            .expect("step");
        let expected = full.narrow(1, i, 1).expect("narrow");
        assert!(max_abs_diff(&step, &expected) < 1e-4, "position {i}");
    }
    let wrong = t
        .model
        .forward(&ids(&[1]), 3, Some(&mut cache), None)
        .expect_err("offset mismatch");
    assert!(wrong.to_string().contains("KV cache holds 9"), "{wrong}");
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let t = tiny();
    let sharded = tempfile::tempdir().expect("dir");
    let all = kubetune_model::tensors::load(&t.dir.path().join("model.safetensors"), &Device::Cpu).expect("load");
    let (mut one, mut two) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, tensor)) in all.into_iter().enumerate() {
        let file = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        weight_map.insert(name.clone(), file.into());
        if i % 2 == 0 {
            one.insert(name, tensor)
        } else {
            two.insert(name, tensor)
        };
    }
    kubetune_model::tensors::save(&sharded.path().join("model-00001-of-00002.safetensors"), &one).expect("shard 1");
    kubetune_model::tensors::save(&sharded.path().join("model-00002-of-00002.safetensors"), &two).expect("shard 2");
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(sharded.path().join("model.safetensors.index.json"), index.to_string()).expect("index");
    std::fs::copy(t.dir.path().join("config.json"), sharded.path().join("config.json")).expect("config");
    let (_, model) = load_model(sharded.path(), &LoadOptions::default()).expect("sharded load");
    let a = model.forward(&ids(&PROMPT), 0, None, None).expect("sharded forward");
    let b = t.model.forward(&ids(&PROMPT), 0, None, None).expect("forward");
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn missing_weights_name_the_directory_and_tensor() {
    let t = tiny();
    let broken = tempfile::tempdir().expect("dir");
    let mut all = kubetune_model::tensors::load(&t.dir.path().join("model.safetensors"), &Device::Cpu).expect("load");
    all.remove("model.layers.1.mlp.up_proj.weight");
    kubetune_model::tensors::save(&broken.path().join("model.safetensors"), &all).expect("save");
    std::fs::copy(t.dir.path().join("config.json"), broken.path().join("config.json")).expect("config");
    let err = load_model(broken.path(), &LoadOptions::default())
        .expect_err("missing tensor")
        .to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    let empty = tempfile::tempdir().expect("dir");
    std::fs::copy(t.dir.path().join("config.json"), empty.path().join("config.json")).expect("config");
    let err = load_model(empty.path(), &LoadOptions::default())
        .expect_err("no weights")
        .to_string();
    assert!(err.contains("no model.safetensors"), "{err}");
    // A file cut short (an interrupted copy) is an error naming the file, not a crash.
    let bytes = std::fs::read(t.dir.path().join("model.safetensors")).expect("weights");
    std::fs::write(empty.path().join("model.safetensors"), &bytes[..bytes.len() / 2]).expect("write");
    let err = anyhow_like(load_model(empty.path(), &LoadOptions::default()).expect_err("truncated"));
    assert!(
        err.contains("model.safetensors") && err.contains("not a safetensors file"),
        "{err}"
    );
}

/// The error with its sources, as a log line shows it.
fn anyhow_like(e: kubetune_model::ModelError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

#[test]
fn gradients_reach_adapters_of_every_layer() {
    let t = tiny();
    let (adapter, vars) = random_adapter(&t.config, 4, 8.0, 0.0);
    let active = ActiveAdapter {
        adapter: &adapter,
        dropout_seed: None,
        first_row: 0,
    };
    let logits = t.model.forward(&ids(&PROMPT), 0, None, Some(&active)).expect("forward");
    let loss = logits.sqr().expect("sqr").mean_all().expect("mean");
    let grads = loss.backward().expect("backward");
    for v in &vars {
        let g = grads
            .get(v.var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {}", v.name));
        let norm: f32 = g
            .sqr()
            .expect("sqr")
            .sum_all()
            .expect("sum")
            .to_scalar()
            .expect("scalar");
        assert!(norm > 0.0, "zero gradient for {}", v.name);
    }
}

/// The tiny model loaded again with its base in bf16, on the CPU: the same code path a GPU
/// takes (bf16 weights and activations, f32 adapters, norms, softmax and loss).
fn bf16_twin(t: &Tiny, base: kubetune_model::BaseFormat) -> kubetune_model::CausalLm {
    let options = LoadOptions {
        dtype: candle_core::DType::BF16,
        ..LoadOptions::on(Device::Cpu, base)
    };
    load_model(t.dir.path(), &options).expect("bf16 load").1
}

/// ‖a − b‖ / ‖b‖, both taken to f32.
fn relative_error(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let f32 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32).expect("f32");
    let norm =
        |t: &candle_core::Tensor| -> f32 { t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() };
    norm(&(f32(a) - f32(b)).expect("sub")) / norm(&f32(b))
}

/// bf16 keeps 8 bits of mantissa, about 4e-3 relative per value; the tiny model's forward with
/// an adapter measured 0.8% (kubetune-device-check --device cpu), and the bound leaves room
/// for other adapters and prompts.
const BF16_LOGITS_BOUND: f32 = 0.03;

#[test]
fn a_bf16_base_gives_the_f32_logits_within_bf16_rounding_and_half_the_bytes() {
    let t = tiny();
    let bf16 = bf16_twin(&t, kubetune_model::BaseFormat::Dense);
    assert_eq!(bf16.projection_storage().0 * 2, t.model.projection_storage().0);
    let (adapter, _vars) = random_adapter(&t.config, 4, 8.0, 0.0);
    let active = ActiveAdapter {
        adapter: &adapter,
        dropout_seed: None,
        first_row: 0,
    };
    let reference = t.model.forward(&ids(&PROMPT), 0, None, Some(&active)).expect("f32");
    let logits = bf16.forward(&ids(&PROMPT), 0, None, Some(&active)).expect("bf16");
    assert_eq!(logits.dtype(), candle_core::DType::BF16);
    let err = relative_error(&logits, &reference);
    assert!(err < BF16_LOGITS_BOUND, "bf16 logits off by {err}");
}

#[test]
fn a_bf16_training_step_gives_the_f32_loss_and_f32_adapter_gradients_within_bf16_rounding() {
    use kubetune_model::checkpointing::{CheckpointedStep, LossBatch};
    let t = tiny();
    let (adapter, vars) = random_adapter(&t.config, 4, 8.0, 0.0);
    let active = ActiveAdapter {
        adapter: &adapter,
        dropout_seed: None,
        first_row: 0,
    };
    let input = ids(&PROMPT);
    let targets = candle_core::Tensor::new(&[57u32, 80, 120, 301, 44, 9, 200, 17, 3], &Device::Cpu).unwrap();
    let weights = candle_core::Tensor::new(&[0f32, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], &Device::Cpu).unwrap();
    let batch = LossBatch {
        input_ids: &input,
        targets: &targets,
        weights: &weights,
    };
    for base in [kubetune_model::BaseFormat::Dense, kubetune_model::BaseFormat::Nf4] {
        let f32_model = match base {
            kubetune_model::BaseFormat::Dense => t.model.clone(),
            _ => load_model(t.dir.path(), &LoadOptions::on(Device::Cpu, base)).unwrap().1,
        };
        let (loss, grads) = f32_model.loss_backward(&batch, &active, 1.0, 4).expect("f32 step");
        let bf16 = bf16_twin(&t, base);
        let (loss_bf16, grads_bf16) = bf16.loss_backward(&batch, &active, 1.0, 4).expect("bf16 step");
        let step = CheckpointedStep {
            adapter: active,
            loss_scale: 1.0,
            head_rows: 4,
            recompute_sequences: 0,
        };
        let checkpointed = bf16
            .loss_backward_checkpointed(&batch, &step)
            .expect("bf16 checkpointed step");
        for (what, loss_bf16) in [("plain", loss_bf16), ("checkpointed", checkpointed.loss_sum)] {
            assert!(
                (loss_bf16 - loss).abs() < 0.01 * loss.abs(),
                "{base:?} {what}: loss {loss_bf16} against {loss}"
            );
        }
        for v in &vars {
            let g = grads.get(v.var.as_tensor()).expect("f32 gradient");
            let from_checkpoints = checkpointed.stores.iter().find_map(|s| s.get(v.var.as_tensor()));
            let plain = grads_bf16.get(v.var.as_tensor()).expect("bf16 gradient");
            for (what, g_bf16) in [
                ("plain", plain),
                ("checkpointed", from_checkpoints.expect("checkpointed gradient")),
            ] {
                assert_eq!(
                    g_bf16.dtype(),
                    candle_core::DType::F32,
                    "{}: adapters train in f32",
                    v.name
                );
                // A gradient with a graph of its own would keep the activations it was
                // computed from alive as long as the gradient lives (e2e/bench/step-memory.sh).
                assert!(!g_bf16.track_op(), "{base:?} {what}: {} gradient holds a graph", v.name);
                let err = relative_error(g_bf16, g);
                assert!(err < 0.05, "{base:?} {what}: {} gradient off by {err}", v.name);
            }
        }
    }
}
