//! Direct preference optimisation (DPO, and its IPO variant) of a LoRA adapter, as TRL's
//! `DPOTrainer` does it with PEFT.
//!
//! The reference model is the base with the adapter switched off, so no second copy of the
//! weights is held: its log-probabilities come from a forward with an adapter that has no
//! pairs. A pair's margin is `(pi_c - ref_c) - (pi_r - ref_r)`, with `pi`/`ref` the policy's
//! and the reference's log-probability of the chosen (`c`) and rejected (`r`) answer, summed
//! over the answer's tokens; for IPO they are averaged over them instead, as TRL's
//! `concatenated_forward` does for `loss_type="ipo"` (the rewards then use the averages too).
//!
//! The gradient goes through the model's existing weighted-token loss instead of a new
//! backward: the DPO loss depends on the policy only through the margin, so its gradient is
//! `dL/dm * (d pi_c - d pi_r)`, which is the gradient of `-sum(w * log p)` with each answer
//! token weighted `w = -dL/dm` in the chosen and `+dL/dm` in the rejected sequence (divided
//! by the answer's length for IPO). `dL/dm` is computed from a forward of the policy without a
//! graph first, with the same dropout masks as the backward's forward. That keeps gradient
//! checkpointing and the CPU's hand-written backward working for DPO unchanged. The reference's
//! log-probs are computed once when the run starts (the base is frozen), so a step holds as many
//! forwards as TRL's (reference, then policy with its backward): the policy's scoring forward,
//! then the backward's forward and backward.

use crate::config::{DpoLoss, DpoSettings};
use crate::data::batch::Pair;
use crate::data::tokenize::Example;
use serde::Serialize;

/// What one pair's loss contributes: the loss, its derivative by the margin, and the rewards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairTerms {
    pub loss: f64,
    /// dL/d(margin), before the division by the pair count.
    pub dloss_dmargin: f64,
    /// beta * (pi_c - ref_c).
    pub chosen_reward: f64,
    /// beta * (pi_r - ref_r).
    pub rejected_reward: f64,
}

/// The loss of one pair from its four log-probabilities (see the module docs).
pub fn pair_terms(s: &DpoSettings, policy: (f64, f64), reference: (f64, f64)) -> PairTerms {
    let chosen_ratio = policy.0 - reference.0;
    let rejected_ratio = policy.1 - reference.1;
    let margin = chosen_ratio - rejected_ratio;
    let (loss, dloss_dmargin) = match s.loss {
        DpoLoss::Sigmoid => {
            let z = s.beta * margin;
            let ls = s.label_smoothing;
            let loss = -(1.0 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z);
            // d/dz -log sigmoid(z) = -sigmoid(-z); d/dz -log sigmoid(-z) = sigmoid(z).
            let grad = s.beta * (-(1.0 - ls) * sigmoid(-z) + ls * sigmoid(z));
            (loss, grad)
        }
        DpoLoss::Ipo => {
            let d = margin - 1.0 / (2.0 * s.beta);
            (d * d, 2.0 * d)
        }
    };
    PairTerms {
        loss,
        dloss_dmargin,
        chosen_reward: s.beta * chosen_ratio,
        rejected_reward: s.beta * rejected_ratio,
    }
}

/// log(sigmoid(x)) without overflow for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    log_sigmoid(x).exp()
}

/// Means over pairs, as TRL logs them: loss, rewards/chosen, rewards/rejected,
/// rewards/margins and rewards/accuracies (the share of pairs whose chosen reward is higher).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DpoStats {
    pub loss: f64,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub rewards_margins: f64,
    pub rewards_accuracies: f64,
    pub pairs: usize,
}

impl DpoStats {
    pub fn of(terms: &[PairTerms]) -> Self {
        let n = terms.len().max(1) as f64;
        let mean = |f: &dyn Fn(&PairTerms) -> f64| terms.iter().map(f).sum::<f64>() / n;
        Self {
            loss: mean(&|t| t.loss),
            rewards_chosen: mean(&|t| t.chosen_reward),
            rewards_rejected: mean(&|t| t.rejected_reward),
            rewards_margins: mean(&|t| t.chosen_reward - t.rejected_reward),
            // Ties count as misses, as TRL's `chosen_rewards > rejected_rewards`.
            rewards_accuracies: mean(&|t| f64::from(u8::from(t.chosen_reward > t.rejected_reward))),
            pairs: terms.len(),
        }
    }
}

/// The pairs as one batch of sequences: every chosen answer, then every rejected one (TRL's
/// concatenated layout), so one padded batch serves the reference, the policy and the backward.
pub fn sequences<'a>(pairs: &[&'a Pair]) -> Vec<&'a Example> {
    pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect()
}

/// The loss terms of `n` pairs from per-sequence log-probabilities in [`sequences`] order.
pub fn score(s: &DpoSettings, policy: &[f64], reference: &[f64]) -> Vec<PairTerms> {
    let n = policy.len() / 2;
    (0..n)
        .map(|i| pair_terms(s, (policy[i], policy[n + i]), (reference[i], reference[n + i])))
        .collect()
}

/// The per-token loss weight of each sequence (see the module docs), in [`sequences`] order:
/// `-dL/dm` for chosen, `+dL/dm` for rejected answers, over the answer length for IPO.
pub fn sequence_weights(s: &DpoSettings, terms: &[PairTerms], seqs: &[&Example]) -> Vec<f32> {
    let n = terms.len();
    seqs.iter()
        .enumerate()
        .map(|(k, e)| {
            let g = terms[k % n].dloss_dmargin;
            let sign = if k < n { -1.0 } else { 1.0 };
            let norm = match s.loss {
                DpoLoss::Sigmoid => 1.0,
                DpoLoss::Ipo => e.trained_tokens().max(1) as f64,
            };
            (sign * g / norm) as f32
        })
        .collect()
}

/// A sequence's answer log-probability as the loss uses it: the sum, or for IPO the mean.
pub fn as_used(s: &DpoSettings, logp_sum: f64, e: &Example) -> f64 {
    match s.loss {
        DpoLoss::Sigmoid => logp_sum,
        DpoLoss::Ipo => logp_sum / e.trained_tokens().max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(loss: DpoLoss, beta: f64, label_smoothing: f64) -> DpoSettings {
        DpoSettings {
            beta,
            loss,
            label_smoothing,
        }
    }

    #[test]
    fn an_untrained_policy_has_loss_log_2_and_zero_rewards() {
        let t = pair_terms(&settings(DpoLoss::Sigmoid, 0.1, 0.0), (-5.0, -7.0), (-5.0, -7.0));
        assert!((t.loss - std::f64::consts::LN_2).abs() < 1e-12, "{t:?}");
        assert_eq!((t.chosen_reward, t.rejected_reward), (0.0, 0.0));
        assert!((t.dloss_dmargin + 0.05).abs() < 1e-12, "-beta/2: {t:?}");
    }

    #[test]
    fn the_derivative_by_the_margin_matches_a_finite_difference_for_both_losses() {
        for s in [
            settings(DpoLoss::Sigmoid, 0.5, 0.0),
            settings(DpoLoss::Sigmoid, 0.5, 0.2),
            settings(DpoLoss::Ipo, 0.5, 0.0),
        ] {
            let at = |m: f64| pair_terms(&s, (m, 0.0), (0.0, 0.0));
            let h = 1e-6;
            let numeric = (at(0.7 + h).loss - at(0.7 - h).loss) / (2.0 * h);
            assert!((numeric - at(0.7).dloss_dmargin).abs() < 1e-6, "{s:?}");
        }
    }

    #[test]
    fn ipo_is_zero_at_its_target_margin_and_label_smoothing_penalises_certainty() {
        let ipo = pair_terms(&settings(DpoLoss::Ipo, 0.25, 0.0), (-1.0, -3.0), (0.0, 0.0));
        assert!(ipo.loss.abs() < 1e-12, "margin 2 = 1/(2*0.25): {ipo:?}");
        let sure = |ls| pair_terms(&settings(DpoLoss::Sigmoid, 1.0, ls), (0.0, -50.0), (0.0, 0.0));
        assert!(
            sure(0.0).loss < 1e-12 && sure(0.1).loss > 4.9,
            "{:?} {:?}",
            sure(0.0),
            sure(0.1)
        );
    }

    #[test]
    fn accuracy_counts_pairs_whose_chosen_reward_is_strictly_higher() {
        let s = settings(DpoLoss::Sigmoid, 1.0, 0.0);
        let terms = score(&s, &[1.0, 0.0, 0.0, 0.0, 0.0, 1.0], &[0.0; 6]);
        let stats = DpoStats::of(&terms);
        assert_eq!(stats.pairs, 3);
        assert!((stats.rewards_accuracies - 1.0 / 3.0).abs() < 1e-12, "{stats:?}");
        assert!(
            (stats.rewards_margins - 0.0).abs() < 1e-12,
            "(1 + 0 - 1) / 3: {stats:?}"
        );
    }
}
