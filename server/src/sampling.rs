//! Picking the next token from logits: penalties, temperature, top-k, top-p, seeded sampling,
//! and the log-probabilities OpenAI's `logprobs` reports.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// Validated sampling settings (ranges are checked in `validate`).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// How many alternatives to report per token; None reports nothing.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// Log-probability of the chosen token and of the most likely alternatives, from the model's
/// own distribution (before penalties and temperature, as vLLM reports them).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampling state: the RNG and the counts the penalties need.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            counts: HashMap::new(),
        }
    }

    /// Chooses the next token. Penalties count generated tokens only (OpenAI's "text so far"
    /// read as vLLM does), so a long prompt does not skew them.
    pub fn sample(&mut self, logits: &[f32]) -> (u32, Option<TokenLogprob>) {
        let p = self.params.clone();
        let mut scores = logits.to_vec();
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &n) in &self.counts {
                if let Some(s) = scores.get_mut(id as usize) {
                    *s -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        let id = if p.temperature == 0.0 {
            argmax(&scores)
        } else {
            self.draw(&mut scores)
        };
        *self.counts.entry(id).or_insert(0) += 1;
        let logprob = p.logprobs.map(|n| logprobs_of(logits, id, n));
        (id, logprob)
    }

    fn draw(&mut self, scores: &mut [f32]) -> u32 {
        let p = &self.params;
        let candidates = if p.top_k > 0 {
            p.top_k.min(scores.len())
        } else {
            scores.len()
        };
        if candidates > RANK_UP_TO {
            return self.draw_by_mass(scores);
        }
        let mut ranked = Ranked::new(scores, p.top_k);
        let Some(first) = ranked.get(0) else {
            return 0;
        };
        let max = scores[first as usize];
        // Masses add up in f64: over a flat 150k vocabulary, f32 running sums drift by more
        // than one token's weight, and the token drawn would depend on the order of addition.
        let weight = |i: u32| ((scores[i as usize] - max) / p.temperature).exp() as f64;
        // The candidates' total mass, summed in an order that does not need them ranked: all
        // of the vocabulary in id order, or the top-k in rank order (ranked anyway, and few).
        let total: f64 = if p.top_k > 0 {
            (0..ranked.len()).filter_map(|r| ranked.get(r)).map(weight).sum()
        } else {
            (0..scores.len() as u32).map(weight).sum()
        };
        // top-p: the smallest prefix whose mass reaches top_p (at least one token). Ranking
        // stops at the cut, which for a peaked distribution is a few dozen tokens.
        let (keep, kept_mass) = if p.top_p < 1.0 {
            let target = p.top_p as f64 * total;
            let (mut mass, mut keep) = (0.0f64, 0);
            while let Some(i) = ranked.get(keep) {
                mass += weight(i);
                keep += 1;
                if mass >= target {
                    break;
                }
            }
            (keep, mass)
        } else {
            (ranked.len(), total)
        };
        let mut r = self.rng.random::<f32>() as f64 * kept_mass;
        let mut last = first;
        for rank in 0..keep {
            let Some(i) = ranked.get(rank) else { break };
            let x = weight(i);
            if r < x {
                return i;
            }
            r -= x;
            last = i;
        }
        // Rounding left r just above the last bucket.
        last
    }

    /// `draw` for many candidates, in linear time: the top-p cut and the drawn token are each
    /// found by a selection on cumulative mass (quickselect that sums what ranks above the
    /// pivot) instead of by ranking the tokens one by one. On a flat distribution, the ranked
    /// walk sorts most of a 150k vocabulary for every token (a random model's case, and a real
    /// one's long tail at temperature 1); this reads it a few times. It draws the token the
    /// ranked walk draws, up to the rounding of the sums.
    fn draw_by_mass(&mut self, scores: &[f32]) -> u32 {
        let p = &self.params;
        let mut ids: Vec<u32> = (0..scores.len() as u32).collect();
        if p.top_k > 0 && p.top_k < ids.len() {
            ids.select_nth_unstable_by(p.top_k - 1, |&a, &b| by_score(scores, a, b));
            ids.truncate(p.top_k);
        }
        let max = ids
            .iter()
            .map(|&i| scores[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = scores.iter().map(|&x| ((x - max) / p.temperature).exp()).collect();
        let total: f64 = ids.iter().map(|&i| weights[i as usize] as f64).sum();
        let kept_mass = if p.top_p < 1.0 {
            let target = p.top_p as f64 * total;
            let (cut, mass) = select_by_mass(&mut ids, scores, &weights, |m| m >= target);
            ids.retain(|&i| by_score(scores, i, cut) != std::cmp::Ordering::Greater);
            mass
        } else {
            total
        };
        let r = self.rng.random::<f32>() as f64 * kept_mass;
        select_by_mass(&mut ids, scores, &weights, |m| m > r).0
    }
}

/// Candidate sets up to this size are ranked (few to rank, and exactly a full sort's order);
/// larger ones are drawn from by cumulative mass ([`Sampler::draw_by_mass`]).
const RANK_UP_TO: usize = 1024;

/// The first token, in descending score order (ties: lower id first), at which the running
/// mass (its own weight included) satisfies `reached`, and that mass; the lowest-ranked token
/// when rounding keeps the total from reaching it. `reached` must be monotone in the mass.
/// Reorders `ids`. Expected linear time: each pass partitions the range around a pivot and
/// keeps only the side that holds the crossing.
fn select_by_mass(ids: &mut [u32], scores: &[f32], weights: &[f32], reached: impl Fn(f64) -> bool) -> (u32, f64) {
    let weight = |i: u32| weights[i as usize] as f64;
    let (mut lo, mut hi) = (0, ids.len());
    let mut above = 0.0f64;
    let mut last = (ids[0], 0.0);
    while lo < hi {
        ids.swap(lo + (hi - lo) / 2, hi - 1);
        let pivot = ids[hi - 1];
        let (mut store, mut mass) = (lo, 0.0f64);
        for j in lo..hi - 1 {
            if by_score(scores, ids[j], pivot) == std::cmp::Ordering::Less {
                ids.swap(store, j);
                mass += weight(ids[store]);
                store += 1;
            }
        }
        ids.swap(store, hi - 1);
        if reached(above + mass) {
            hi = store;
            continue;
        }
        let with_pivot = above + mass + weight(pivot);
        if reached(with_pivot) {
            return (pivot, with_pivot);
        }
        above = with_pivot;
        last = (pivot, with_pivot);
        lo = store + 1;
    }
    last
}

/// Token ids by descending score (ties: lower id first), ranked lazily: only as far as a
/// caller reads, by partial selection of the unranked rest in growing blocks. Sampling reads
/// the top few dozen of a vocabulary of 32k-150k, so sorting all of it for every token was
/// most of the cost. The order is a total order, so the ranks are exactly a full sort's.
pub struct Ranked<'a> {
    scores: &'a [f32],
    order: Vec<u32>,
    /// `order[..ranked]` is in final order.
    ranked: usize,
}

impl<'a> Ranked<'a> {
    /// The top `limit` ids (all when `limit` is 0).
    pub fn new(scores: &'a [f32], limit: usize) -> Self {
        let mut r = Self {
            scores,
            order: (0..scores.len() as u32).collect(),
            ranked: 0,
        };
        if limit > 0 && limit < r.order.len() {
            let scores = r.scores;
            r.order
                .select_nth_unstable_by(limit - 1, |&a, &b| by_score(scores, a, b));
            r.order.truncate(limit);
        }
        r
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The id at `rank` (0 is the highest score).
    pub fn get(&mut self, rank: usize) -> Option<u32> {
        if rank >= self.order.len() {
            return None;
        }
        if rank >= self.ranked {
            // Blocks grow 4x, so reading all of it costs O(n log n) like one sort.
            let end = (rank + 1).max(self.ranked * 4).max(64).min(self.order.len());
            let scores = self.scores;
            let rest = &mut self.order[self.ranked..];
            let take = end - self.ranked;
            if take < rest.len() {
                rest.select_nth_unstable_by(take - 1, |&a, &b| by_score(scores, a, b));
            }
            rest[..take].sort_unstable_by(|&a, &b| by_score(scores, a, b));
            self.ranked = end;
        }
        Some(self.order[rank])
    }
}

fn by_score(scores: &[f32], a: u32, b: u32) -> std::cmp::Ordering {
    scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b))
}

/// First index of the largest value (the model crate's greedy decoding picks the same).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

fn logprobs_of(logits: &[f32], chosen: u32, n: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let mut ranked = Ranked::new(logits, n);
    let top: Vec<(u32, f32)> = (0..n.min(ranked.len()))
        .filter_map(|r| ranked.get(r))
        .map(|i| (i, logits[i as usize] - log_z))
        .collect();
    TokenLogprob {
        logprob: logits[chosen as usize] - log_z,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, 3.0]).0, 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32 / 3.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| p.seed = Some(seed)));
            (0..20).map(|_| s.sample(&logits).0).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(
            run(7),
            run(8),
            "different seeds should differ over 20 draws from a flat-ish distribution"
        );
        let mut k1 = Sampler::new(params(|p| p.top_k = 1));
        assert_eq!(k1.sample(&logits).0, argmax(&logits));
    }

    #[test]
    fn tiny_top_p_keeps_only_the_most_likely_token() {
        let logits = [1.0, 5.0, 4.9, 0.0];
        let mut s = Sampler::new(params(|p| {
            p.top_p = 0.01;
            p.seed = Some(1)
        }));
        for _ in 0..20 {
            assert_eq!(s.sample(&logits).0, 1);
        }
    }

    #[test]
    fn frequency_penalty_moves_greedy_off_a_repeated_token() {
        let mut s = Sampler::new(params(|p| {
            p.temperature = 0.0;
            p.frequency_penalty = 1.0
        }));
        let logits = [2.0, 1.5, 0.0];
        assert_eq!(s.sample(&logits).0, 0);
        // Token 0 now carries a penalty of 1.0: 1.0 < 1.5.
        assert_eq!(s.sample(&logits).0, 1);
    }

    /// The sampler as it was before ranking became lazy: the whole vocabulary sorted, then the
    /// same arithmetic.
    fn draw_by_full_sort(p: &SamplingParams, rng: &mut ChaCha8Rng, scores: &[f32]) -> u32 {
        let mut order: Vec<u32> = (0..scores.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let max = scores[order[0] as usize];
        let weight = |i: u32| ((scores[i as usize] - max) / p.temperature).exp() as f64;
        let total: f64 = if p.top_k > 0 {
            order.iter().map(|&i| weight(i)).sum()
        } else {
            (0..scores.len() as u32).map(weight).sum()
        };
        let mut keep = order.len();
        let mut kept_mass = total;
        if p.top_p < 1.0 {
            let (mut mass, mut k) = (0.0f64, 0);
            for &i in &order {
                mass += weight(i);
                k += 1;
                if mass >= p.top_p as f64 * total {
                    break;
                }
            }
            keep = k;
            kept_mass = mass;
        }
        let mut r = rng.random::<f32>() as f64 * kept_mass;
        for &i in &order[..keep] {
            if r < weight(i) {
                return i;
            }
            r -= weight(i);
        }
        order[keep - 1]
    }

    #[test]
    fn ranked_and_mass_draws_sample_exactly_what_a_full_sort_samples() {
        let mut gen = ChaCha8Rng::seed_from_u64(11);
        let mut checked = 0;
        for case in 0..60 {
            // Up to RANK_UP_TO candidates are ranked; 5000 (without top-k) are drawn by mass.
            let vocab = [5, 64, 65, 300, 5000][case % 5];
            // Peaked, flat and tied logits: ties exercise the id tie-break.
            let logits: Vec<f32> = (0..vocab)
                .map(|_| match case % 3 {
                    0 => gen.random_range(-10.0f32..10.0),
                    1 => gen.random_range(0.0f32..0.01),
                    _ => gen.random_range(0..4) as f32,
                })
                .collect();
            for (top_k, top_p, temperature) in [
                (0, 1.0, 1.0),
                (0, 0.9, 0.7),
                (0, 0.999, 1.5),
                (40, 1.0, 1.0),
                (40, 0.5, 1.0),
                (1, 1.0, 1.0),
                (vocab, 0.95, 0.3),
            ] {
                let p = params(|p| {
                    p.top_k = top_k;
                    p.top_p = top_p;
                    p.temperature = temperature;
                    p.seed = Some(case as u64);
                });
                let mut lazy = Sampler::new(p.clone());
                let mut rng = ChaCha8Rng::seed_from_u64(case as u64);
                for _ in 0..10 {
                    assert_eq!(
                        lazy.sample(&logits).0,
                        draw_by_full_sort(&p, &mut rng, &logits),
                        "vocab {vocab} top_k {top_k} top_p {top_p} t {temperature}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 60 * 7 * 10);
        // Top-n logprobs rank the same way too.
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1009) as f32 / 100.0).collect();
        let mut full: Vec<u32> = (0..1000).collect();
        full.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        let top = logprobs_of(&logits, 0, 20).top;
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), full[..20].to_vec());
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let mut s = Sampler::new(params(|p| {
            p.temperature = 0.0;
            p.logprobs = Some(2)
        }));
        let (id, lp) = s.sample(&[0.0, 2.0, 1.0]);
        let lp = lp.expect("logprobs requested");
        assert_eq!(id, 1);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        let z: f32 = [0.0f32, 2.0, 1.0].iter().map(|x| x.exp()).sum();
        assert!((lp.logprob - (2.0f32.exp() / z).ln()).abs() < 1e-5);
    }
}
