//! One DPO batch on the tiny model against TRL's formulas in PyTorch: the loss, the rewards
//! and the gradient of every adapter tensor, for the sigmoid loss (with label smoothing) and
//! IPO, with and without gradient checkpointing. The reference values are committed
//! (`tests/reference/dpo/`, made by `tests/reference/dpo.py`), so this needs no PyTorch.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use kubetune_model::tiny::EOS_ID;
use kubetune_model::{load_model, peft, BaseFormat, LoadOptions, LoraAdapter};
use kubetune_trainer::config::DpoSettings;
use kubetune_trainer::data::batch::Pair;
use kubetune_trainer::data::tokenize::Example;
use kubetune_trainer::dpo::DpoStats;
use kubetune_trainer::train::DpoModel;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/dpo")
}

fn example(v: &Value) -> Example {
    let list = |key: &str| v[key].as_array().expect(key).clone();
    Example {
        ids: list("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect(),
        trained: list("trained").iter().map(|x| x.as_bool().expect("flag")).collect(),
    }
}

fn close(ours: f64, theirs: f64, what: &str) {
    let tolerance = 2e-5 * theirs.abs().max(1.0);
    assert!(
        (ours - theirs).abs() <= tolerance,
        "{what}: ours {ours}, reference {theirs}"
    );
}

#[test]
fn one_dpo_batch_matches_the_pytorch_reference_in_loss_rewards_and_gradients() {
    let dir = tempfile::tempdir().expect("dir");
    tiny_model(dir.path());
    let (config, model) = load_model(dir.path(), &LoadOptions::on(Device::Cpu, BaseFormat::Dense)).expect("model");
    let (_, loaded) = peft::load(&fixture(), &config, &Device::Cpu).expect("reference adapter");
    // Trainable variables holding the reference adapter, as the trainer's are.
    let (adapter, vars) =
        LoraAdapter::init_trainable(&config, loaded.config.clone(), 0, &Device::Cpu).expect("adapter");
    let values = loaded.to_peft_tensors();
    for v in &vars {
        v.var
            .set(&values[&v.name].to_dtype(DType::F32).expect("f32"))
            .expect("set");
    }
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).expect("reference.json"))
            .expect("json");
    let pairs: Vec<Pair> = reference["pairs"]
        .as_array()
        .expect("pairs")
        .iter()
        .map(|p| Pair {
            chosen: example(&p["chosen"]),
            rejected: example(&p["rejected"]),
        })
        .collect();
    let pairs: Vec<&Pair> = pairs.iter().collect();
    for (name, expected) in reference["losses"].as_object().expect("losses") {
        let settings: DpoSettings = serde_json::from_value(expected["settings"].clone()).expect("settings");
        for gradient_checkpointing in [false, true] {
            let what = format!("{name}, gradient checkpointing {gradient_checkpointing}");
            let dpo = DpoModel {
                model: &model,
                adapter: &adapter,
                vars: &vars,
                settings,
                pad: EOS_ID,
                device: &Device::Cpu,
                gradient_checkpointing,
            };
            let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
            let reference = dpo.reference_logps(&pairs).expect("reference");
            let terms = dpo
                .accumulate(&pairs, &reference, None, 1.0 / pairs.len() as f64, &mut grads)
                .expect("batch");
            let stats = DpoStats::of(&terms);
            let number = |key: &str| expected[key].as_f64().expect(key);
            close(stats.loss, number("loss"), &format!("{what}: loss"));
            close(
                stats.rewards_chosen,
                number("rewards_chosen"),
                &format!("{what}: rewards/chosen"),
            );
            close(
                stats.rewards_rejected,
                number("rewards_rejected"),
                &format!("{what}: rewards/rejected"),
            );
            assert_eq!(stats.rewards_accuracies, number("rewards_accuracies"), "{what}");
            compare_gradients(&grads, &expected["gradients"], &what);
        }
    }
}

/// Every adapter tensor's gradient, element by element, within 1e-4 of the largest element.
fn compare_gradients(grads: &BTreeMap<String, Tensor>, expected: &Value, what: &str) {
    let expected = expected.as_object().expect("gradients");
    assert_eq!(grads.len(), expected.len(), "{what}: gradient tensors");
    let scale = expected
        .values()
        .flat_map(|g| {
            g.as_array()
                .expect("list")
                .iter()
                .map(|x| x.as_f64().expect("number").abs())
        })
        .fold(0.0, f64::max);
    assert!(scale > 0.0, "{what}: the reference gradient is zero");
    for (name, theirs) in expected {
        let ours = grads[name]
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("values");
        let theirs: Vec<f64> = theirs
            .as_array()
            .expect("list")
            .iter()
            .map(|x| x.as_f64().expect("n"))
            .collect();
        assert_eq!(ours.len(), theirs.len(), "{what}: {name}");
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(&o, &t)| (f64::from(o) - t).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= 1e-4 * scale,
            "{what}: {name} differs by {worst} (largest gradient {scale})"
        );
    }
}
