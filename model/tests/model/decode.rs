//! Batched decoding against the one-sequence forward: a batch mixing adapters, the base and
//! different cache lengths gives each row the logits and greedy tokens it gets alone.

use crate::common::*;
use candle_core::{Tensor, D};
use kubetune_model::{ActiveAdapter, CausalLm, DecodeRow, KvCache, LoraAdapter};

const PROMPTS: [&[u32]; 4] = [
    &[0, 57, 80, 120, 301],
    &[0, 9, 200],
    &[0, 44, 9, 200, 17, 301, 12],
    &[0, 3],
];

fn active(adapter: Option<&LoraAdapter>) -> Option<ActiveAdapter<'_>> {
    adapter.map(|adapter| ActiveAdapter {
        adapter,
        dropout_seed: None,
        first_row: 0,
    })
}

fn argmax_last(logits: &Tensor) -> u32 {
    let seq = logits.dim(1).expect("seq");
    logits
        .narrow(1, seq - 1, 1)
        .expect("narrow")
        .flatten_all()
        .expect("flat")
        .argmax(D::Minus1)
        .expect("argmax")
        .to_scalar()
        .expect("id")
}

/// Prefills `prompt` into a new cache; returns the cache and the first generated token.
fn prefill(model: &CausalLm, prompt: &[u32], adapter: Option<&LoraAdapter>, capacity: usize) -> (KvCache, u32) {
    let mut cache = KvCache::with_capacity(model.config().num_hidden_layers, capacity);
    let logits = model
        .forward(&ids(prompt), 0, Some(&mut cache), active(adapter).as_ref())
        .expect("prefill");
    (cache, argmax_last(&logits))
}

/// Greedy tokens for one sequence with the one-sequence forward only (the reference).
fn greedy_alone(model: &CausalLm, prompt: &[u32], adapter: Option<&LoraAdapter>, steps: usize) -> Vec<u32> {
    let (mut cache, mut next) = prefill(model, prompt, adapter, 1);
    let mut out = vec![next];
    for _ in 1..steps {
        let offset = cache.len();
        let logits = model
            .forward(&ids(&[next]), offset, Some(&mut cache), active(adapter).as_ref())
            .expect("step");
        next = argmax_last(&logits);
        out.push(next);
    }
    out
}

#[test]
fn a_mixed_batch_decodes_each_row_as_it_would_alone() {
    let t = tiny();
    let (a, _va) = random_adapter(&t.config, 4, 8.0, 0.0);
    let (b, _vb) = random_adapter(&t.config, 8, 4.0, 0.0);
    // Rows 0 and 2 share adapter a (a group that is not the whole batch), row 1 has b, row 3
    // none; prompts differ in length so the caches do too.
    let adapters = [Some(&a), Some(&b), Some(&a), None];
    let steps = 12;
    let alone: Vec<Vec<u32>> = PROMPTS
        .iter()
        .zip(adapters)
        .map(|(p, ad)| greedy_alone(&t.model, p, ad, steps))
        .collect();

    let mut caches = Vec::new();
    let mut next = Vec::new();
    for (p, ad) in PROMPTS.iter().zip(adapters) {
        let (cache, token) = prefill(&t.model, p, ad, p.len() + steps);
        caches.push(cache);
        next.push(token);
    }
    let mut together: Vec<Vec<u32>> = next.iter().map(|&n| vec![n]).collect();
    for _ in 1..steps {
        let mut rows: Vec<DecodeRow> = caches
            .iter_mut()
            .zip(&next)
            .zip(adapters)
            .map(|((cache, &token), adapter)| DecodeRow { token, cache, adapter })
            .collect();
        let logits = t.model.decode(&mut rows).expect("decode");
        next = logits.argmax(D::Minus1).expect("argmax").to_vec1().expect("ids");
        for (out, &n) in together.iter_mut().zip(&next) {
            out.push(n);
        }
    }
    assert_eq!(together, alone);
    assert!(
        alone[0] != alone[1] && alone[0] != alone[3],
        "the adapters must change the tokens for this test to mean anything"
    );
}

#[test]
fn decode_logits_match_the_full_forward_while_the_cache_grows() {
    let t = tiny();
    let (a, _va) = random_adapter(&t.config, 4, 8.0, 0.0);
    let prompt = [0u32, 57, 80, 120, 301, 44, 9, 200, 17, 5, 77];
    let full = t
        .model
        .forward(&ids(&prompt), 0, None, active(Some(&a)).as_ref())
        .expect("full");
    // Capacity 2 forces the cache to reallocate several times while decoding.
    let mut cache = KvCache::with_capacity(t.config.num_hidden_layers, 2);
    t.model
        .forward(&ids(&prompt[..3]), 0, Some(&mut cache), active(Some(&a)).as_ref())
        .expect("prefix");
    for (i, &token) in prompt.iter().enumerate().skip(3) {
        let mut rows = [DecodeRow {
            token,
            cache: &mut cache,
            adapter: Some(&a),
        }];
        let step = t.model.decode(&mut rows).expect("decode");
        let expected = full.narrow(1, i, 1).expect("narrow").squeeze(1).expect("squeeze");
        let diff = max_abs_diff(&step, &expected);
        assert!(diff < 1e-4, "position {i}: {diff}");
    }
    assert_eq!(cache.len(), prompt.len());
}

#[test]
fn decode_refuses_caches_it_cannot_extend_naming_the_row() {
    let t = tiny();
    let (mut filled, token) = prefill(&t.model, &[0, 5], None, 4);
    let mut empty = KvCache::new(t.config.num_hidden_layers);
    let mut rows = [
        DecodeRow {
            token,
            cache: &mut filled,
            adapter: None,
        },
        DecodeRow {
            token,
            cache: &mut empty,
            adapter: None,
        },
    ];
    let err = t.model.decode(&mut rows).expect_err("empty cache").to_string();
    assert!(err.contains("row 1") && err.contains("prefill"), "{err}");
    let mut wrong = KvCache::new(t.config.num_hidden_layers + 1);
    let mut rows = [DecodeRow {
        token,
        cache: &mut wrong,
        adapter: None,
    }];
    let err = t.model.decode(&mut rows).expect_err("wrong layer count").to_string();
    assert!(err.contains("row 0") && err.contains("layers"), "{err}");
    assert!(t.model.decode(&mut []).is_err());
}

/// int8 (the server's `--quantize int8`): loading with it quantizes every projection and the
/// head; its decode path and its full forward agree; and its logits stay close to the f32
/// model's, with and without an adapter. Where the CPU has AVX-512 VNNI the inputs of each
/// product are rounded to int8 too, so the two paths agree to within that rounding: an input
/// that differs in its last bit between them can land on the other side of a step. Over 200
/// random adapters the largest difference was 2.7% of the largest logit (the 2% bound this
/// test had failed once in CI rehearsal with an unseeded adapter); the bound is 4%, and the
/// adapter is now the same in every run.
#[test]
fn an_int8_model_decodes_as_its_own_forward_and_close_to_f32() {
    let t = tiny();
    let options = kubetune_model::LoadOptions {
        base: kubetune_model::BaseFormat::Int8,
        ..Default::default()
    };
    let (_, int8) = kubetune_model::load_model(t.dir.path(), &options).expect("load int8");
    let (dense_bytes, dense_quantized) = t.model.projection_storage();
    let (int8_bytes, quantized) = int8.projection_storage();
    assert_eq!((dense_quantized, quantized), (0, 7 * t.config.num_hidden_layers));
    assert!(
        int8_bytes * 3 < dense_bytes,
        "int8 holds {int8_bytes} bytes against f32's {dense_bytes}"
    );
    let converted = t.model.quantize_int8().expect("quantize after load");
    assert_eq!(converted.projection_storage(), (int8_bytes, quantized));

    let (a, _va) = random_adapter(&t.config, 4, 8.0, 0.0);
    let prompt = [0u32, 57, 80, 120, 301, 44, 9, 200];
    for adapter in [None, Some(&a)] {
        let full = int8
            .forward(&ids(&prompt), 0, None, active(adapter).as_ref())
            .expect("full");
        let largest = full
            .abs()
            .expect("abs")
            .flatten_all()
            .expect("flat")
            .max(0)
            .expect("max")
            .to_scalar::<f32>()
            .expect("max");
        let mut cache = KvCache::with_capacity(t.config.num_hidden_layers, prompt.len());
        int8.forward(&ids(&prompt[..3]), 0, Some(&mut cache), active(adapter).as_ref())
            .expect("prefix");
        for (i, &token) in prompt.iter().enumerate().skip(3) {
            let mut rows = [DecodeRow {
                token,
                cache: &mut cache,
                adapter,
            }];
            let step = int8.decode(&mut rows).expect("decode");
            let expected = full.narrow(1, i, 1).expect("narrow").squeeze(1).expect("squeeze");
            let diff = max_abs_diff(&step, &expected);
            assert!(
                diff < 0.04 * largest,
                "position {i}: decode and forward of the int8 model differ by {diff} (largest logit {largest})"
            );
        }
        let reference = t
            .model
            .forward(&ids(&prompt), 0, None, active(adapter).as_ref())
            .expect("f32");
        let scale = reference
            .abs()
            .expect("abs")
            .flatten_all()
            .expect("flat")
            .max(0)
            .expect("max")
            .to_scalar::<f32>()
            .expect("max");
        let diff = max_abs_diff(&full, &reference);
        assert!(
            diff < 0.05 * scale,
            "int8 logits are {diff} from f32's (largest logit {scale})"
        );
        assert!(diff > 0.0, "the int8 model must really be rounded");
    }
}

/// Prompts of different lengths prefilled as one right-padded batch give each row the
/// last-position logits and the cache it gets alone: the next decode step agrees too.
#[test]
fn a_batched_prefill_equals_each_prompt_alone() {
    let t = tiny();
    let (a, _va) = random_adapter(&t.config, 4, 8.0, 0.0);
    for adapter in [None, Some(&a)] {
        let mut caches: Vec<KvCache> = PROMPTS
            .iter()
            .map(|p| KvCache::with_capacity(t.config.num_hidden_layers, p.len() + 1))
            .collect();
        let mut rows: Vec<kubetune_model::PrefillRow> = PROMPTS
            .iter()
            .zip(caches.iter_mut())
            .map(|(p, cache)| kubetune_model::PrefillRow { tokens: p, cache })
            .collect();
        let batched = t
            .model
            .prefill(&mut rows, active(adapter).as_ref())
            .expect("batched prefill");
        for (i, (prompt, cache)) in PROMPTS.iter().zip(caches.iter_mut()).enumerate() {
            let mut alone = KvCache::new(t.config.num_hidden_layers);
            let want = t
                .model
                .forward_last(&ids(prompt), 0, Some(&mut alone), active(adapter).as_ref())
                .expect("alone");
            let got = batched.narrow(0, i, 1).expect("row");
            assert!(max_abs_diff(&got, &want) < 1e-4, "row {i}: prefill logits differ");
            assert_eq!(cache.len(), prompt.len(), "row {i} caches only its real positions");
            let step = |cache: &mut KvCache| {
                t.model
                    .decode(&mut [DecodeRow {
                        token: 5,
                        cache,
                        adapter,
                    }])
                    .expect("decode")
            };
            assert!(
                max_abs_diff(&step(cache), &step(&mut alone)) < 1e-4,
                "row {i}: the next step differs"
            );
        }
    }
    let mut used = KvCache::new(t.config.num_hidden_layers);
    t.model
        .forward_last(&ids(&[0, 5]), 0, Some(&mut used), None)
        .expect("fill");
    let err = t
        .model
        .prefill(
            &mut [kubetune_model::PrefillRow {
                tokens: &[0, 5],
                cache: &mut used,
            }],
            None,
        )
        .expect_err("a used cache");
    assert!(
        err.to_string().contains("row 0") && err.to_string().contains("empty KV cache"),
        "{err}"
    );
}
