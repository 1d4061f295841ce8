//! Continuing from an existing adapter (spec.initFrom), and folding an adapter into the base
//! model's weights (spec.output.merge).

use crate::common::*;
use candle_core::{Device, Tensor};
use kubetune_model::{load_model, ActiveAdapter, BaseFormat, LoadOptions};
use kubetune_trainer::config::{DataFormat, DpoSettings, InitFrom, Method, TrainConfig};
use kubetune_trainer::{run, RunOptions, TrainingMetrics};
use std::path::Path;

/// A short SFT run on the facts, its adapter in `<dir>/sft`.
fn sft(dir: &Path) -> TrainingMetrics {
    let (model, data) = (dir.join("model"), dir.join("facts.jsonl"));
    tiny_model(&model);
    write_facts(&data);
    let mut config = facts_config(&model, &data, &dir.join("sft"));
    config.training.epochs = None;
    config.training.max_steps = Some(15);
    run(&config, &RunOptions::default()).expect("sft run")
}

/// A run of `config` that starts from the SFT adapter in `<dir>/sft`.
fn continued(dir: &Path, mut config: TrainConfig) -> TrainConfig {
    config.init_from = Some(InitFrom {
        path: dir.join("sft").display().to_string(),
        reference: Some("facts@1".into()),
        digest: None,
    });
    config.training.epochs = None;
    config.training.max_steps = Some(2);
    config
}

#[test]
fn an_sft_run_continued_from_an_adapter_starts_where_that_adapter_ended() {
    let dir = tempfile::tempdir().expect("dir");
    let first = sft(dir.path());
    let (model, data) = (dir.path().join("model"), dir.path().join("facts.jsonl"));
    let config = continued(dir.path(), facts_config(&model, &data, &dir.path().join("more")));
    let more = run(&config, &RunOptions::default()).expect("continued run");
    let (ended, started) = (
        first.final_eval_loss.expect("eval"),
        more.initial_eval_loss.expect("eval"),
    );
    assert!(
        (ended - started).abs() < 1e-5,
        "SFT ended at {ended}, the continuation started at {started}"
    );
    let fresh = first.initial_eval_loss.expect("eval");
    assert!(started < fresh - 0.1, "a fresh adapter starts at {fresh}");
}

#[test]
fn a_dpo_run_from_an_sft_adapter_has_that_adapter_as_its_reference_so_its_held_out_loss_starts_at_ln_2() {
    let dir = tempfile::tempdir().expect("dir");
    sft(dir.path());
    let model = dir.path().join("model");
    let pairs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/support-tone-pairs.jsonl");
    let mut config = facts_config(&model, &pairs, &dir.path().join("dpo"));
    config.method = Method::Dpo;
    config.dataset.format = DataFormat::Preference;
    config.dataset.validation_path = None;
    config.dataset.validation_split = Some(0.25);
    config.dpo = Some(DpoSettings::default());
    config.training.batch_size = 4;
    config.training.max_seq_length = 96;
    let m = run(&continued(dir.path(), config), &RunOptions::default()).expect("dpo from sft");
    // Policy and reference are both the SFT adapter before the first step: every margin is 0,
    // so the sigmoid loss is -log sigmoid(0) = ln 2. With the base as reference it would not be.
    let start = m.initial_eval_loss.expect("held-out pairs");
    assert!((start - std::f64::consts::LN_2).abs() < 1e-6, "{start}");
    assert!(m.final_eval_loss.expect("eval") < start, "{m:?}");
}

#[test]
fn a_lora_setting_that_contradicts_the_starting_adapter_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().expect("dir");
    sft(dir.path());
    let (model, data) = (dir.path().join("model"), dir.path().join("facts.jsonl"));
    let mut config = continued(dir.path(), facts_config(&model, &data, &dir.path().join("more")));
    config.lora.r = 8;
    let err = run(&config, &RunOptions::default()).expect_err("rank 8 against an r=16 adapter");
    assert!(
        err.to_string()
            .contains("lora.r: 8 differs from the starting adapter's rank 16"),
        "{err}"
    );
    config.lora.r = 16;
    config.lora.alpha = 8.0;
    let err = run(&config, &RunOptions::default()).expect_err("another alpha");
    assert!(err.to_string().contains("lora.alpha: "), "{err}");
}

#[test]
fn the_merged_model_gives_the_logits_of_the_base_with_the_adapter_within_1e_4() {
    let dir = tempfile::tempdir().expect("dir");
    sft(dir.path());
    let (model_dir, merged_dir) = (dir.path().join("model"), dir.path().join("merged"));
    let merged =
        kubetune_trainer::merge::merge_into_base(&model_dir, &dir.path().join("sft"), &merged_dir).expect("merge");
    assert_eq!(merged, 2 * 7, "every projection of both layers");
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(merged_dir.join(file).is_file(), "{file} in the merged model");
    }
    let options = LoadOptions::on(Device::Cpu, BaseFormat::Dense);
    let (config, base) = load_model(&model_dir, &options).expect("base");
    let (_, folded) = load_model(&merged_dir, &options).expect("merged model loads as a model");
    let (_, adapter) = kubetune_model::peft::load(&dir.path().join("sft"), &config, &Device::Cpu).expect("adapter");
    let ids = Tensor::new(&[[0u32, 17, 42, 99, 250, 311, 5, 8]], &Device::Cpu).expect("ids");
    let active = ActiveAdapter {
        adapter: &adapter,
        dropout_seed: None,
        first_row: 0,
    };
    let with_adapter = base.forward(&ids, 0, None, Some(&active)).expect("base + adapter");
    let plain = base.forward(&ids, 0, None, None).expect("base");
    let folded = folded.forward(&ids, 0, None, None).expect("merged");
    let max_diff = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b)
            .expect("diff")
            .abs()
            .expect("abs")
            .flatten_all()
            .expect("flat")
            .max(0)
            .expect("max")
            .to_scalar()
            .expect("scalar")
    };
    let (merged_err, adapter_effect) = (max_diff(&folded, &with_adapter), max_diff(&plain, &with_adapter));
    eprintln!("merged vs base+adapter: {merged_err:e}; base vs base+adapter: {adapter_effect:e}");
    assert!(merged_err < 1e-4, "{merged_err}");
    assert!(
        adapter_effect > 1e-2,
        "the adapter changes the logits ({adapter_effect}), so the check means something"
    );
}
