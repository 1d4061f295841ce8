//! Gradient checkpointing, and the plain path's chunked head (in the graph and outside it, as
//! the trainer runs it), compute the same loss and adapter
//! gradients as one recorded forward with the whole batch's logits, on a dense and on an NF4
//! base, with dropout on, the head split into uneven row chunks, and the layers recomputed for
//! the whole batch or one sequence at a time.

use crate::common::*;
use candle_core::{Device, Tensor, D};
use kubetune_model::checkpointing::{CheckpointedStep, LossBatch};
use kubetune_model::{load_model, ActiveAdapter, BaseFormat, CausalLm, LoadOptions};
use std::collections::BTreeMap;

const SEQ: usize = 9;
const INPUT: [u32; 2 * SEQ] = [0, 57, 80, 120, 301, 44, 9, 200, 17, 3, 99, 14, 250, 7, 61, 18, 140, 5];

/// Next-token targets of the flattened batch, weighting only some positions.
fn targets() -> (Tensor, Tensor) {
    let mut t = Vec::new();
    let mut w = Vec::new();
    for s in 0..2 {
        for i in 0..SEQ {
            t.push(INPUT.get(s * SEQ + i + 1).copied().filter(|_| i + 1 < SEQ).unwrap_or(0));
            w.push(if i + 1 < SEQ && i >= 3 { 1f32 } else { 0f32 });
        }
    }
    (
        Tensor::new(t.as_slice(), &Device::Cpu).expect("t"),
        Tensor::new(w.as_slice(), &Device::Cpu).expect("w"),
    )
}

fn check(model: &CausalLm, config: &kubetune_model::Config) {
    let (adapter, vars) = random_adapter(config, 4, 8.0, 0.3);
    let active = ActiveAdapter {
        adapter: &adapter,
        dropout_seed: Some(11),
        first_row: 0,
    };
    let input = Tensor::new(&INPUT, &Device::Cpu)
        .expect("ids")
        .reshape((2, SEQ))
        .expect("batch");
    let (targets, weights) = targets();
    let scale = 0.25;

    let logits = model
        .forward(&input, 0, None, Some(&active))
        .expect("forward")
        .reshape((2 * SEQ, ()))
        .expect("flat");
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).expect("log_softmax");
    let picked = logp
        .gather(&targets.unsqueeze(1).expect("u"), 1)
        .expect("gather")
        .squeeze(1)
        .expect("s");
    let sum = (picked * &weights)
        .expect("mul")
        .sum_all()
        .expect("sum")
        .neg()
        .expect("neg");
    let plain = (sum.clone() * scale).expect("scale").backward().expect("backward");
    let plain_loss: f32 = sum.to_scalar().expect("loss");

    // The plain path's chunked head and loss (odd chunks of 5 rows) give the same loss and
    // gradients as the whole batch's logits at once.
    let batch = LossBatch {
        input_ids: &input,
        targets: &targets,
        weights: &weights,
    };
    let chunked = model.loss_sum(&batch, &active, 5).expect("chunked loss");
    let chunked_loss: f32 = chunked.to_scalar().expect("loss");
    assert!(
        (chunked_loss - plain_loss).abs() < 1e-4 * plain_loss.abs(),
        "{chunked_loss} vs {plain_loss}"
    );
    let store = (chunked * scale).expect("scale").backward().expect("backward");
    let mut chunked_grads = candle_core::backprop::GradStore::default();
    for v in &vars {
        chunked_grads.insert(
            v.var.as_tensor(),
            store.get(v.var.as_tensor()).expect("gradient").clone(),
        );
    }
    let as_checkpointed = kubetune_model::checkpointing::CheckpointedGrads {
        loss_sum: chunked_loss as f64,
        stores: vec![chunked_grads],
    };
    compare(&as_checkpointed, &vars, &plain, plain_loss);

    // The plain path as the trainer runs it: layers recorded, head and loss outside the graph.
    let (loss, store) = model
        .loss_backward(&batch, &active, scale, 5)
        .expect("plain loss and backward");
    let mut grads = candle_core::backprop::GradStore::default();
    for v in &vars {
        grads.insert(
            v.var.as_tensor(),
            store.get(v.var.as_tensor()).expect("gradient").clone(),
        );
    }
    compare(
        &kubetune_model::checkpointing::CheckpointedGrads {
            loss_sum: loss,
            stores: vec![grads],
        },
        &vars,
        &plain,
        plain_loss,
    );

    for recompute_sequences in [0, 1] {
        let batch = LossBatch {
            input_ids: &input,
            targets: &targets,
            weights: &weights,
        };
        let step = CheckpointedStep {
            adapter: active,
            loss_scale: scale,
            head_rows: 5,
            recompute_sequences,
        };
        let out = model.loss_backward_checkpointed(&batch, &step).expect("checkpointed");
        compare(&out, &vars, &plain, plain_loss);
    }
}

fn compare(
    out: &kubetune_model::checkpointing::CheckpointedGrads,
    vars: &[kubetune_model::lora::NamedVar],
    plain: &candle_core::backprop::GradStore,
    plain_loss: f32,
) {
    assert!(
        (out.loss_sum - plain_loss as f64).abs() < 1e-4 * plain_loss.abs() as f64,
        "{} vs {plain_loss}",
        out.loss_sum
    );

    let mut checkpointed: BTreeMap<&str, Tensor> = BTreeMap::new();
    for store in &out.stores {
        for v in vars {
            if let Some(g) = store.get(v.var.as_tensor()) {
                assert!(
                    checkpointed.insert(&v.name, g.clone()).is_none(),
                    "{} has two gradients",
                    v.name
                );
            }
        }
    }
    for v in vars {
        let want = plain
            .get(v.var.as_tensor())
            .unwrap_or_else(|| panic!("no plain gradient for {}", v.name));
        let got = checkpointed
            .get(v.name.as_str())
            .unwrap_or_else(|| panic!("no checkpointed gradient for {}", v.name));
        let size = want
            .abs()
            .expect("abs")
            .flatten_all()
            .expect("f")
            .max(0)
            .expect("max")
            .to_scalar::<f32>()
            .expect("s");
        let diff = max_abs_diff(want, got);
        assert!(
            size > 0.0 && diff <= 1e-4 * size.max(1.0),
            "{}: differs by {diff} (max {size})",
            v.name
        );
    }
}

#[test]
fn checkpointed_gradients_equal_recorded_ones_on_a_dense_base() {
    let t = tiny();
    check(&t.model, &t.config);
}

#[test]
fn checkpointed_gradients_equal_recorded_ones_on_an_nf4_base() {
    let t = tiny();
    let (config, model) = load_model(t.dir.path(), &LoadOptions::on(Device::Cpu, BaseFormat::Nf4)).expect("nf4 load");
    check(&model, &config);
}

#[test]
fn mismatched_targets_are_an_error_not_a_panic() {
    let t = tiny();
    let (adapter, _vars) = random_adapter(&t.config, 4, 8.0, 0.0);
    let input = Tensor::new(&INPUT, &Device::Cpu)
        .expect("ids")
        .reshape((2, SEQ))
        .expect("batch");
    let short = Tensor::zeros(3, candle_core::DType::U32, &Device::Cpu).expect("t");
    let w = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).expect("w");
    let batch = LossBatch {
        input_ids: &input,
        targets: &short,
        weights: &w,
    };
    let step = CheckpointedStep {
        adapter: ActiveAdapter {
            adapter: &adapter,
            dropout_seed: None,
            first_row: 0,
        },
        loss_scale: 1.0,
        head_rows: 4,
        recompute_sequences: 0,
    };
    let err = model_err(&t.model, &batch, &step);
    assert!(err.contains("18 entries"), "{err}");
}

fn model_err(model: &CausalLm, batch: &LossBatch, step: &CheckpointedStep) -> String {
    match model.loss_backward_checkpointed(batch, step) {
        Ok(_) => panic!("accepted mismatched targets"),
        Err(e) => e.to_string(),
    }
}
