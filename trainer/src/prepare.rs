//! Builds the training and validation sequences from the dataset files and the tokenizer:
//! single sequences for the supervised formats, chosen/rejected pairs for preference data.

use crate::config::{DataFormat, TrainConfig};
use crate::data::batch::{pack, split_validation, truncate, truncate_pairs, Pair, PrepareStats};
use crate::data::records::{Message, Record};
use crate::data::render::{render, render_conversation};
use crate::data::template::render_answers_with_template;
use crate::data::tokenize::{Example, TextTokenizer};
use crate::data::{load_jsonl, Loaded};
use crate::error::{Result, TrainError};
use crate::io::local_path;
use std::path::{Path, PathBuf};

pub struct Prepared {
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    /// Preference data's pairs; `train` and `validation` are then empty, and these are empty
    /// for the other formats.
    pub train_pairs: Vec<Pair>,
    pub validation_pairs: Vec<Pair>,
    pub stats: PrepareStats,
    /// Malformed lines skipped under `skipInvalid` (training and validation files).
    pub skipped_invalid: usize,
}

impl Prepared {
    /// What the step plan counts: training pairs for preference data, else sequences.
    pub fn train_units(&self) -> usize {
        self.train.len().max(self.train_pairs.len())
    }
}

pub fn prepare(config: &TrainConfig, tokenizer: &TextTokenizer) -> Result<Prepared> {
    let mut stats = PrepareStats::default();
    if config.dataset.format == DataFormat::Preference {
        let sets = load_sets(config, tokenizer, &mut stats, tokenize_pairs, truncate_pairs)?;
        return Ok(Prepared {
            train: Vec::new(),
            validation: Vec::new(),
            train_pairs: sets.train,
            validation_pairs: sets.validation,
            stats,
            skipped_invalid: sets.skipped_invalid,
        });
    }
    let sets = load_sets(config, tokenizer, &mut stats, tokenize_all, truncate)?;
    let t = &config.training;
    let train = if t.packing {
        pack(sets.train, t.max_seq_length)
    } else {
        sets.train
    };
    Ok(Prepared {
        train,
        validation: sets.validation,
        train_pairs: Vec::new(),
        validation_pairs: Vec::new(),
        stats,
        skipped_invalid: sets.skipped_invalid,
    })
}

/// Training and held-out units of one kind (sequences or pairs).
struct Sets<T> {
    train: Vec<T>,
    validation: Vec<T>,
    skipped_invalid: usize,
}

type Tokenize<T> = fn(&Loaded, &Path, &TextTokenizer) -> Result<Vec<T>>;
type Truncate<T> = fn(Vec<T>, usize, &mut PrepareStats) -> Vec<T>;

/// Reads, tokenizes and truncates the training file and the validation file (or split).
fn load_sets<T>(
    config: &TrainConfig,
    tokenizer: &TextTokenizer,
    stats: &mut PrepareStats,
    tokenize: Tokenize<T>,
    cut: Truncate<T>,
) -> Result<Sets<T>> {
    let ds = &config.dataset;
    let t = &config.training;
    let read = |path: &PathBuf, stats: &mut PrepareStats| -> Result<(Vec<T>, usize)> {
        let loaded = load_jsonl(path, ds.format, ds.skip_invalid)?;
        let units = cut(tokenize(&loaded, path, tokenizer)?, t.max_seq_length, stats);
        Ok((units, loaded.skipped))
    };
    let train_path = local_path(&ds.path, "dataset.path")?;
    let (units, mut skipped_invalid) = read(&train_path, stats)?;
    let (train, validation) = match (&ds.validation_path, ds.validation_split) {
        (Some(path), _) => {
            let (val, skipped) = read(&local_path(path, "dataset.validationPath")?, stats)?;
            skipped_invalid += skipped;
            (units, val)
        }
        (None, Some(fraction)) if units.len() >= 2 => split_validation(units, fraction, t.seed),
        (None, Some(_)) => {
            return Err(TrainError::Dataset {
                file: train_path,
                message: "validationSplit needs at least 2 usable examples".into(),
            })
        }
        (None, None) => (units, Vec::new()),
    };
    if train.is_empty() {
        return Err(TrainError::Dataset {
            file: train_path,
            message: format!(
                "no usable training examples ({} had no response tokens left within maxSeqLength {})",
                stats.dropped_no_target, t.max_seq_length
            ),
        });
    }
    Ok(Sets {
        train,
        validation,
        skipped_invalid,
    })
}

/// Chat records go through the model's chat template when it has one (as the server renders
/// prompts), everything else through the documented default formats.
fn tokenize_all(loaded: &Loaded, file: &Path, tokenizer: &TextTokenizer) -> Result<Vec<Example>> {
    let tokenize = |record: &Record, line: usize| match record {
        Record::Chat { messages } => tokenize_conversation(messages, 0, tokenizer, file, line),
        _ => tokenizer.tokenize(&render(record)),
    };
    loaded
        .records
        .iter()
        .zip(&loaded.lines)
        .map(|(r, &line)| tokenize(r, line))
        .collect()
}

/// Each preference record as its prompt followed by the chosen, and by the rejected answer,
/// rendered as chat is and trained on the answer only.
fn tokenize_pairs(loaded: &Loaded, file: &Path, tokenizer: &TextTokenizer) -> Result<Vec<Pair>> {
    let pair = |record: &Record, line: usize| -> Result<Pair> {
        let Record::Preference {
            prompt,
            chosen,
            rejected,
        } = record
        else {
            return Err(TrainError::Data {
                file: file.into(),
                line,
                message: "expected a preference record with prompt, chosen and rejected".into(),
            });
        };
        let with = |answer: &[Message]| {
            tokenize_conversation(&[&prompt[..], answer].concat(), prompt.len(), tokenizer, file, line)
        };
        Ok(Pair {
            chosen: with(chosen)?,
            rejected: with(rejected)?,
        })
    };
    loaded
        .records
        .iter()
        .zip(&loaded.lines)
        .map(|(r, &line)| pair(r, line))
        .collect()
}

/// A conversation trained on its assistant messages from `first_trained` on, through the
/// model's chat template when it has one.
fn tokenize_conversation(
    messages: &[Message],
    first_trained: usize,
    tokenizer: &TextTokenizer,
    file: &Path,
    line: usize,
) -> Result<Example> {
    let Some(template) = &tokenizer.chat_template else {
        return tokenizer.tokenize(&render_conversation(messages, first_trained));
    };
    let eos = tokenizer.eos_text();
    let rendered =
        render_answers_with_template(messages, template, eos.as_deref(), first_trained).map_err(|message| {
            TrainError::Data {
                file: file.into(),
                line,
                message,
            }
        })?;
    tokenizer.tokenize_framed(&rendered.segments, rendered.framing)
}
