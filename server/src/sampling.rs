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
        let mut order: Vec<u32> = (0..scores.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let max = scores[order[0] as usize];
        let mut probs: Vec<f32> = order
            .iter()
            .map(|&i| ((scores[i as usize] - max) / p.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut mass = 0.0;
            let mut keep = 0;
            for &x in &probs {
                mass += x;
                keep += 1;
                if mass >= p.top_p {
                    break;
                }
            }
            order.truncate(keep);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &x) in probs.iter().enumerate() {
            if r < x {
                return order[i];
            }
            r -= x;
        }
        // Rounding left r just above the last bucket.
        order[probs.len() - 1]
    }
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
    let mut top: Vec<(u32, f32)> = Vec::new();
    if n > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        top = idx
            .into_iter()
            .take(n)
            .map(|i| (i, logits[i as usize] - log_z))
            .collect();
    }
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
