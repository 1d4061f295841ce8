//! PEFT layout round trips, loading PEFT-written adapters, the tiny generator, and the NF4 base.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use kubetune_model::lora::peft_name;
use kubetune_model::tiny::{write_tiny_model, TinySpec};
use kubetune_model::{load_model, peft, ActiveAdapter, BaseFormat, LoadOptions, TargetModule};

#[test]
fn peft_layout_round_trips_with_peft_names() {
    let t = tiny();
    let (adapter, _vars) = random_adapter(&t.config, 4, 8.0, 0.05);
    let out = tempfile::tempdir().expect("dir");
    peft::save(out.path(), &adapter, &t.config, "tiny-llama").expect("save");

    let names: Vec<String> = kubetune_model::tensors::load(&out.path().join(peft::ADAPTER_WEIGHTS), &Device::Cpu)
        .expect("weights")
        .into_keys()
        .collect();
    assert_eq!(names.len(), 2 * 7 * t.config.num_hidden_layers);
    assert!(names.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()));
    assert!(names.contains(&"base_model.model.model.layers.1.mlp.down_proj.lora_B.weight".to_string()));

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join(peft::ADAPTER_CONFIG)).expect("config"))
            .expect("json");
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 8.0);
    assert_eq!(json["base_model_name_or_path"], "tiny-llama");
    assert_eq!(json["target_modules"].as_array().map(|a| a.len()), Some(7));

    let (_, loaded) = peft::load(out.path(), &t.config, &Device::Cpu).expect("load");
    assert_eq!(loaded.config, adapter.config);
    for (key, pair) in adapter.pairs() {
        let other = loaded.get(key.0, key.1).expect("pair present");
        assert_eq!(max_abs_diff(&pair.a, &other.a), 0.0);
        assert_eq!(max_abs_diff(&pair.b, &other.b), 0.0);
    }
}

/// What PEFT 0.13 writes for a LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj","v_proj"])
/// with bf16 weights: extra fields we ignore and fields we must honour.
#[test]
fn loads_an_adapter_written_by_peft() {
    let t = tiny();
    let dir = tempfile::tempdir().expect("dir");
    let config = r#"{"alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "some/llama",
        "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
        "layer_replication": null, "layers_pattern": null, "layers_to_transform": null, "loftq_config": {},
        "lora_alpha": 4, "lora_dropout": 0.1, "megatron_config": null, "megatron_core": "megatron.core",
        "modules_to_save": null, "peft_type": "LORA", "r": 2, "rank_pattern": {}, "revision": null,
        "target_modules": ["v_proj", "q_proj"], "task_type": "CAUSAL_LM", "use_dora": false, "use_rslora": false}"#;
    std::fs::write(dir.path().join(peft::ADAPTER_CONFIG), config).expect("write config");
    let mut tensors = std::collections::BTreeMap::new();
    for layer in 0..t.config.num_hidden_layers {
        for m in [TargetModule::QProj, TargetModule::VProj] {
            let (fan_in, out) = m.shape(&t.config);
            let a = Tensor::randn(0f32, 0.1, (2, fan_in), &Device::Cpu)
                .expect("a")
                .to_dtype(DType::BF16)
                .expect("bf16");
            let b = Tensor::randn(0f32, 0.1, (out, 2), &Device::Cpu)
                .expect("b")
                .to_dtype(DType::BF16)
                .expect("bf16");
            tensors.insert(peft_name(layer, m, "A"), a);
            tensors.insert(peft_name(layer, m, "B"), b);
        }
    }
    kubetune_model::tensors::save(&dir.path().join(peft::ADAPTER_WEIGHTS), &tensors).expect("write weights");
    let (peft_config, adapter) = peft::load(dir.path(), &t.config, &Device::Cpu).expect("load");
    assert_eq!(peft_config.base_model_name_or_path.as_deref(), Some("some/llama"));
    assert_eq!(adapter.config.scale(), 2.0);
    assert!(adapter.get(0, TargetModule::QProj).is_some() && adapter.get(0, TargetModule::KProj).is_none());

    // A field that changes the maths is refused by name, not ignored.
    std::fs::write(
        dir.path().join(peft::ADAPTER_CONFIG),
        config.replace(r#""use_dora": false"#, r#""use_dora": true"#),
    )
    .expect("write");
    let err = peft::load(dir.path(), &t.config, &Device::Cpu)
        .expect_err("dora")
        .to_string();
    assert!(err.contains("adapter_config.json") && err.contains("use_dora"), "{err}");
}

#[test]
fn adapter_with_wrong_shapes_or_extra_tensors_is_rejected() {
    let t = tiny();
    let (adapter, _vars) = random_adapter(&t.config, 4, 8.0, 0.0);
    let dir = tempfile::tempdir().expect("dir");
    peft::save(dir.path(), &adapter, &t.config, "tiny").expect("save");
    let path = dir.path().join(peft::ADAPTER_WEIGHTS);
    let mut tensors = kubetune_model::tensors::load(&path, &Device::Cpu).expect("load");
    tensors.insert(
        "base_model.model.lm_head.lora_A.weight".into(),
        Tensor::zeros((4, 64), DType::F32, &Device::Cpu).expect("t"),
    );
    kubetune_model::tensors::save(&path, &tensors).expect("save");
    let err = peft::load(dir.path(), &t.config, &Device::Cpu)
        .expect_err("extra")
        .to_string();
    assert!(
        err.contains("unexpected tensor base_model.model.lm_head.lora_A.weight"),
        "{err}"
    );
}

#[test]
fn tiny_model_is_deterministic_from_its_seed() {
    let (a, b, c) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
        tempfile::tempdir().expect("c"),
    );
    write_tiny_model(a.path(), &TinySpec::default()).expect("a");
    write_tiny_model(b.path(), &TinySpec::default()).expect("b");
    write_tiny_model(
        c.path(),
        &TinySpec {
            seed: 1,
            ..TinySpec::default()
        },
    )
    .expect("c");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let read = |d: &tempfile::TempDir| std::fs::read(d.path().join(file)).expect(file);
        assert_eq!(read(&a), read(&b), "{file} differs between runs");
    }
    assert_ne!(
        std::fs::read(a.path().join("model.safetensors")).ok(),
        std::fs::read(c.path().join("model.safetensors")).ok()
    );
    let tok = tokenizers::Tokenizer::from_file(a.path().join("tokenizer.json")).expect("tokenizer");
    let enc = tok
        .encode("Q: Where does the brother live? A: By the sea.", false)
        .expect("encode");
    assert!(
        enc.get_ids().len() < 20,
        "BPE merges common words: {:?}",
        enc.get_tokens()
    );
    assert_eq!(
        tok.decode(enc.get_ids(), false).expect("decode"),
        "Q: Where does the brother live? A: By the sea."
    );
}

#[test]
fn nf4_base_stays_four_bit_and_passes_gradients() {
    let t = tiny();
    let (_, q) = load_model(
        t.dir.path(),
        &LoadOptions {
            base: BaseFormat::Nf4,
            ..LoadOptions::default()
        },
    )
    .expect("nf4");
    let (dense_bytes, dense_quantized) = t.model.projection_storage();
    let (nf4_bytes, quantized) = q.projection_storage();
    assert_eq!(dense_quantized, 0);
    assert_eq!(quantized, 7 * t.config.num_hidden_layers, "every projection is NF4");
    assert!(
        (nf4_bytes as f64) < dense_bytes as f64 * 4.2 / 32.0,
        "{nf4_bytes} vs {dense_bytes} bytes"
    );
    let tables = 1 + usize::from(!t.config.tie_word_embeddings);
    assert_eq!(t.model.table_storage().1, 0);
    assert_eq!(
        q.table_storage().1,
        tables,
        "the embedding table and an untied head are NF4 too"
    );

    let (adapter, vars) = random_adapter(&t.config, 4, 8.0, 0.0);
    let active = ActiveAdapter {
        adapter: &adapter,
        dropout_seed: None,
        first_row: 0,
    };
    let prompt = ids(&[0, 57, 80, 120, 301]);
    let dense = t.model.forward(&prompt, 0, None, Some(&active)).expect("dense");
    let quant = q.forward(&prompt, 0, None, Some(&active)).expect("nf4");
    // 4-bit codes perturb every weight by a few percent; the logits must still point the same way.
    let dot = |a: &Tensor, b: &Tensor| -> f32 { (a * b).expect("mul").sum_all().expect("sum").to_scalar().expect("s") };
    let cosine = dot(&dense, &quant) / (dot(&dense, &dense).sqrt() * dot(&quant, &quant).sqrt());
    assert!(cosine > 0.95, "NF4 logits have cosine {cosine} to the dense ones");
    let grads = quant
        .sqr()
        .expect("sqr")
        .mean_all()
        .expect("mean")
        .backward()
        .expect("backward");
    let first = vars
        .iter()
        .find(|v| v.name == peft_name(0, TargetModule::QProj, "B"))
        .expect("var");
    assert!(
        grads.get(first.var.as_tensor()).is_some(),
        "gradient reaches layer 0 through the NF4 base"
    );
}
