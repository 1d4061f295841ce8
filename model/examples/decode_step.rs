//! Times the model crate's decode and prefill steps alone, without the server around them:
//! `cargo run --release -p kubetune-model --example decode_step -- MODEL_DIR [--int8] [ROWS...]`.
//! Prints milliseconds per decode step and tokens/s for each row count, after a 128-token
//! prefill per row. For finding where the server's time goes; not a test.

use candle_core::Tensor;
use kubetune_model::cache::KvCache;
use kubetune_model::decode::DecodeRow;
use kubetune_model::{load_model, BaseFormat, LoadOptions};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    kubetune_model::threads::settle_thread_count();
    kubetune_model::malloc::tune();
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: decode_step MODEL_DIR [--int8] [ROWS...]")?;
    let rest: Vec<String> = args.collect();
    let int8 = rest.iter().any(|a| a == "--int8");
    let counts: Vec<usize> = rest
        .iter()
        .filter(|a| *a != "--int8")
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let counts = if counts.is_empty() { vec![1, 4, 16] } else { counts };
    let base = if int8 { BaseFormat::Int8 } else { BaseFormat::Dense };
    let (config, model) = load_model(
        std::path::Path::new(&dir),
        &LoadOptions {
            base,
            ..Default::default()
        },
    )?;
    let prompt: Vec<u32> = (0..128u32).map(|i| (i * 31 + 7) % config.vocab_size as u32).collect();
    for rows in counts {
        let mut caches: Vec<KvCache> = (0..rows)
            .map(|_| KvCache::with_capacity(config.num_hidden_layers, 384))
            .collect();
        let start = Instant::now();
        for cache in &mut caches {
            let ids = Tensor::new(prompt.as_slice(), model.device())?.unsqueeze(0)?;
            model.forward_last(&ids, 0, Some(cache), None)?;
        }
        let prefill = start.elapsed().as_secs_f64() / rows as f64;
        // The same prompts as one batch, for comparison.
        let start = Instant::now();
        let mut fresh: Vec<KvCache> = (0..rows)
            .map(|_| KvCache::with_capacity(config.num_hidden_layers, 384))
            .collect();
        let mut batch: Vec<kubetune_model::PrefillRow> = fresh
            .iter_mut()
            .map(|cache| kubetune_model::PrefillRow { tokens: &prompt, cache })
            .collect();
        model.prefill(&mut batch, None)?;
        let batched = start.elapsed().as_secs_f64() / rows as f64;
        println!("rows {rows:>2}: batched prefill {:.1} ms/sequence", batched * 1e3);
        let steps: usize = std::env::var("STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(64);
        let start = Instant::now();
        for step in 0..steps {
            let mut batch: Vec<DecodeRow> = caches
                .iter_mut()
                .map(|cache| DecodeRow {
                    token: (step * 13 % 1000) as u32,
                    cache,
                    adapter: None,
                })
                .collect();
            model.decode(&mut batch)?;
        }
        let per_step = start.elapsed().as_secs_f64() / steps as f64;
        println!(
            "rows {rows:>2}: prefill {:.1} ms/sequence, decode {:.2} ms/step, {:.0} tok/s",
            prefill * 1e3,
            per_step * 1e3,
            rows as f64 / per_step
        );
    }
    Ok(())
}
