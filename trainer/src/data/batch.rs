//! Sequences for training: truncation, optional packing, seeded per-epoch order, batches.

use super::tokenize::Example;
use kubetune_model::lora::mix;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Counts of what preparation changed, for the log and training_metrics.json.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrepareStats {
    pub truncated: usize,
    /// Examples left with no trained token after truncation (prompt longer than the limit).
    pub dropped_no_target: usize,
}

/// Cuts examples to `max_len` tokens and drops those with nothing left to learn.
pub fn truncate(examples: Vec<Example>, max_len: usize, stats: &mut PrepareStats) -> Vec<Example> {
    let mut out = Vec::with_capacity(examples.len());
    for mut ex in examples {
        cut(&mut ex, max_len, stats);
        if ex.trained_tokens() == 0 {
            stats.dropped_no_target += 1;
            continue;
        }
        out.push(ex);
    }
    out
}

/// A preference pair: the same prompt with the chosen and with the rejected answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub chosen: Example,
    pub rejected: Example,
}

/// Cuts both sequences of each pair to `max_len` tokens (the answers' ends go, as in TRL) and
/// drops pairs where either answer has no token left: the pair then compares nothing.
pub fn truncate_pairs(pairs: Vec<Pair>, max_len: usize, stats: &mut PrepareStats) -> Vec<Pair> {
    let mut out = Vec::with_capacity(pairs.len());
    for mut pair in pairs {
        let before = stats.truncated;
        cut(&mut pair.chosen, max_len, stats);
        cut(&mut pair.rejected, max_len, stats);
        // A pair counts once, however many of its sequences were cut.
        stats.truncated = before + usize::from(stats.truncated > before);
        if pair.chosen.trained_tokens() == 0 || pair.rejected.trained_tokens() == 0 {
            stats.dropped_no_target += 1;
            continue;
        }
        out.push(pair);
    }
    out
}

fn cut(ex: &mut Example, max_len: usize, stats: &mut PrepareStats) {
    if ex.ids.len() > max_len {
        ex.ids.truncate(max_len);
        ex.trained.truncate(max_len);
        stats.truncated += 1;
    }
}

/// Greedy packing in order: whole examples are appended while they fit. Packed examples can
/// attend to earlier ones in the same sequence (as with HF's simple packing); the loss still
/// counts only their trained tokens.
pub fn pack(examples: Vec<Example>, max_len: usize) -> Vec<Example> {
    let mut out: Vec<Example> = Vec::new();
    let mut current = Example {
        ids: Vec::new(),
        trained: Vec::new(),
    };
    for ex in examples {
        if !current.ids.is_empty() && current.ids.len() + ex.ids.len() > max_len {
            out.push(std::mem::replace(
                &mut current,
                Example {
                    ids: Vec::new(),
                    trained: Vec::new(),
                },
            ));
        }
        current.ids.extend(ex.ids);
        current.trained.extend(ex.trained);
    }
    if !current.ids.is_empty() {
        out.push(current);
    }
    out
}

/// Order of the sequences in `epoch`: a permutation drawn from (seed, epoch) alone, so a
/// resumed run knows it without saving it.
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(seed, epoch)));
    order
}

/// Splits off a validation set of `fraction` of the examples (at least one), chosen by seed.
pub fn split_validation<T>(examples: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let order = epoch_order(examples.len(), mix(seed, 0x5eed), 0);
    let n_val = ((examples.len() as f64 * fraction).round() as usize).clamp(1, examples.len().saturating_sub(1));
    let mut slots: Vec<Option<T>> = examples.into_iter().map(Some).collect();
    let mut val = Vec::new();
    let mut train = Vec::new();
    for (k, i) in order.into_iter().enumerate() {
        if let Some(ex) = slots[i].take() {
            if k < n_val {
                val.push(ex)
            } else {
                train.push(ex)
            }
        }
    }
    (train, val)
}

/// Batches of `batch_size` sequence indices following `order`; the last may be short.
pub fn batches(order: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    order.chunks(batch_size).map(<[usize]>::to_vec).collect()
}
