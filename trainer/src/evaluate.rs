//! The adapter judged against its base model on the same held-out examples, once training is
//! done and before anything is published: the loss per answer token always, and, for
//! instruction and chat data, a score of greedy answers against the reference answers.
//!
//! The reference answer of an example is its last trained span (an instruction's response, a
//! chat's final assistant message), and the prompt everything before it, so the model is
//! prompted exactly as it was trained, chat template and all.

use crate::config::EvaluationSettings;
use crate::data::tokenize::{Example, TextTokenizer};
use crate::error::{Result, TrainError};
use crate::metrics::Metrics;
use crate::train::evaluate as held_out_loss;
use candle_core::Device;
use kubetune_crds::{EvaluationMetric, EvaluationResult, ModelEvaluation};
use kubetune_model::generate::{greedy, GreedyOptions};
use kubetune_model::{CausalLm, LoraAdapter};
use std::collections::BTreeMap;

/// What judging needs from the finished training run.
pub struct Judge<'a> {
    pub model: &'a CausalLm,
    pub adapter: &'a LoraAdapter,
    pub held_out: &'a [Example],
    pub tokenizer: &'a TextTokenizer,
    /// Tokens that end an answer (EOS and the model's other end-of-turn ids).
    pub stop_tokens: &'a [u32],
    pub batch_size: usize,
    pub device: &'a Device,
    pub metrics: Option<&'a Metrics>,
}

/// Evaluates the base model and the adapter as `settings` says, and exports the results.
pub fn judge(j: &Judge, settings: &EvaluationSettings) -> Result<EvaluationResult> {
    let examples = &j.held_out[..j.held_out.len().min(settings.max_examples)];
    if examples.is_empty() {
        return Err(TrainError::Config {
            path: "evaluation".into(),
            message: "there are no held-out examples to evaluate on".into(),
        });
    }
    // An adapter without pairs adapts nothing: the forward is the base model's.
    let base_adapter = LoraAdapter::from_pairs(j.adapter.config.clone(), BTreeMap::new());
    // Detached, decoding records no autograd graph.
    let trained = j.adapter.detached();
    let result = EvaluationResult {
        metric: settings.metric,
        base: judge_one(j, settings, examples, &base_adapter, None)?,
        adapter: judge_one(j, settings, examples, &trained, Some(&trained))?,
        examples: examples.len() as u32,
        display: None,
    };
    tracing::info!(
        examples = result.examples,
        metric = result.metric.as_ref().map(crate::card::enum_name).unwrap_or_default(),
        base_loss = result.base.loss,
        adapter_loss = result.adapter.loss,
        base_score = result.base.score,
        adapter_score = result.adapter.score,
        "evaluation"
    );
    if let Some(m) = j.metrics {
        m.set_evaluation(&result);
    }
    Ok(result)
}

/// One model: `for_loss` is the adapter the loss runs through (an empty one for the base),
/// `for_answers` the one greedy decoding uses (None for the base).
fn judge_one(
    j: &Judge,
    settings: &EvaluationSettings,
    examples: &[Example],
    for_loss: &LoraAdapter,
    for_answers: Option<&LoraAdapter>,
) -> Result<ModelEvaluation> {
    let loss = held_out_loss(j.model, for_loss, examples, j.batch_size, j.tokenizer.eos, j.device)?;
    let score = match settings.metric {
        Some(metric) => Some(score(j, metric, settings.max_new_tokens, examples, for_answers)?),
        None => None,
    };
    Ok(ModelEvaluation {
        loss: Some(loss),
        score,
    })
}

/// Fraction of the examples whose greedy answer is right under `metric`; examples without a
/// reference answer count as wrong, so a score never rises by skipping.
fn score(
    j: &Judge,
    metric: EvaluationMetric,
    max_new_tokens: usize,
    examples: &[Example],
    adapter: Option<&LoraAdapter>,
) -> Result<f64> {
    let options = GreedyOptions {
        max_new_tokens,
        stop_tokens: j.stop_tokens,
        adapter,
    };
    let mut right = 0;
    for example in examples {
        let Some((prompt, reference)) = prompt_and_reference(example) else {
            continue;
        };
        let answer = j.tokenizer.decode(&greedy(j.model, prompt, &options)?)?;
        right += usize::from(is_right(metric, &answer, &j.tokenizer.decode(reference)?));
    }
    Ok(right as f64 / examples.len() as f64)
}

/// Splits an example at its last trained span: (the prompt before it, the span). None when
/// nothing is trained or nothing precedes the span (text data has no prompt).
pub fn prompt_and_reference(e: &Example) -> Option<(&[u32], &[u32])> {
    let end = e.trained.iter().rposition(|t| *t)? + 1;
    let start = e.trained[..end].iter().rposition(|t| !*t).map_or(0, |i| i + 1);
    (start > 0).then(|| (&e.ids[..start], &e.ids[start..end]))
}

/// Whether `answer` is right. Whitespace around either is never significant (tokenizers and
/// templates differ in the newlines they put there).
pub fn is_right(metric: EvaluationMetric, answer: &str, reference: &str) -> bool {
    let (answer, reference) = (answer.trim(), reference.trim());
    match metric {
        // Labels are scored as exact matches: the answer is the class name or it is wrong.
        EvaluationMetric::ExactMatch | EvaluationMetric::LabelAccuracy => answer == reference,
        EvaluationMetric::Contains => answer.contains(reference),
    }
}

/// How much the adapter beat the base by: score points with a metric, else the loss decrease.
pub fn improvement(e: &EvaluationResult) -> Option<f64> {
    match e.metric {
        Some(_) => Some(e.adapter.score? - e.base.score?),
        None => Some(e.base.loss? - e.adapter.loss?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(ids: &[u32], trained: &[bool]) -> Example {
        Example {
            ids: ids.to_vec(),
            trained: trained.to_vec(),
        }
    }

    #[test]
    fn the_reference_is_the_last_trained_span_and_the_prompt_all_before_it() {
        // A chat: prompt, first answer (trained), second prompt, final answer + EOS (trained).
        let e = example(
            &[1, 2, 3, 4, 5, 6, 7, 8],
            &[false, false, true, true, false, true, true, true],
        );
        let (prompt, reference) = prompt_and_reference(&e).expect("split");
        assert_eq!(prompt, &[1, 2, 3, 4, 5]);
        assert_eq!(reference, &[6, 7, 8]);
    }

    #[test]
    fn text_examples_have_no_prompt_to_answer() {
        assert_eq!(prompt_and_reference(&example(&[1, 2, 3], &[true, true, true])), None);
        assert_eq!(prompt_and_reference(&example(&[1, 2], &[false, false])), None);
    }

    #[test]
    fn exact_match_ignores_surrounding_whitespace_only() {
        assert!(is_right(EvaluationMetric::ExactMatch, " apples\n", "apples"));
        assert!(!is_right(EvaluationMetric::ExactMatch, "apples please", "apples"));
        assert!(!is_right(EvaluationMetric::ExactMatch, "Apples", "apples"));
        assert!(is_right(EvaluationMetric::LabelAccuracy, "billing\n", "billing"));
    }

    #[test]
    fn contains_finds_the_reference_inside_a_longer_answer() {
        assert!(is_right(EvaluationMetric::Contains, "I think apples.", " apples "));
        assert!(!is_right(EvaluationMetric::Contains, "pears", "apples"));
    }

    #[test]
    fn improvement_is_in_score_points_with_a_metric_and_in_loss_without() {
        let result = |metric, base: (f64, f64), adapter: (f64, f64)| EvaluationResult {
            metric,
            base: ModelEvaluation {
                loss: Some(base.0),
                score: Some(base.1),
            },
            adapter: ModelEvaluation {
                loss: Some(adapter.0),
                score: Some(adapter.1),
            },
            examples: 10,
            display: None,
        };
        let with_metric = result(Some(EvaluationMetric::ExactMatch), (2.0, 0.25), (1.0, 0.75));
        assert_eq!(improvement(&with_metric), Some(0.5));
        let loss_only = result(None, (2.0, 0.0), (1.5, 0.0));
        assert_eq!(improvement(&loss_only), Some(0.5));
    }
}
