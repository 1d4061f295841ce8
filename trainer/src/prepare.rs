//! Builds the training and validation sequences from the dataset files and the tokenizer.

use crate::config::TrainConfig;
use crate::data::batch::{pack, split_validation, truncate, PrepareStats};
use crate::data::records::Record;
use crate::data::render::render;
use crate::data::template::render_with_template;
use crate::data::tokenize::{Example, TextTokenizer};
use crate::data::{load_jsonl, Loaded};
use crate::error::{Result, TrainError};
use crate::io::local_path;
use std::path::Path;

pub struct Prepared {
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    pub stats: PrepareStats,
    /// Malformed lines skipped under `skipInvalid` (training and validation files).
    pub skipped_invalid: usize,
}

pub fn prepare(config: &TrainConfig, tokenizer: &TextTokenizer) -> Result<Prepared> {
    let ds = &config.dataset;
    let t = &config.training;
    let train_path = local_path(&ds.path, "dataset.path")?;
    let loaded = load_jsonl(&train_path, ds.format, ds.skip_invalid)?;
    let mut skipped_invalid = loaded.skipped;
    let mut stats = PrepareStats::default();
    let examples = truncate(
        tokenize_all(&loaded, &train_path, tokenizer)?,
        t.max_seq_length,
        &mut stats,
    );
    let (train, validation) = match (&ds.validation_path, ds.validation_split) {
        (Some(path), _) => {
            let path = local_path(path, "dataset.validationPath")?;
            let loaded = load_jsonl(&path, ds.format, ds.skip_invalid)?;
            skipped_invalid += loaded.skipped;
            let val = truncate(tokenize_all(&loaded, &path, tokenizer)?, t.max_seq_length, &mut stats);
            (examples, val)
        }
        (None, Some(fraction)) if examples.len() >= 2 => split_validation(examples, fraction, t.seed),
        (None, Some(_)) => {
            return Err(TrainError::Dataset {
                file: train_path,
                message: "validationSplit needs at least 2 usable examples".into(),
            })
        }
        (None, None) => (examples, Vec::new()),
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
    let train = if t.packing {
        pack(train, t.max_seq_length)
    } else {
        train
    };
    Ok(Prepared {
        train,
        validation,
        stats,
        skipped_invalid,
    })
}

/// Chat records go through the model's chat template when it has one (as the server renders
/// prompts), everything else through the documented default formats.
fn tokenize_all(loaded: &Loaded, file: &Path, tokenizer: &TextTokenizer) -> Result<Vec<Example>> {
    let eos = tokenizer.eos_text();
    let tokenize = |record: &Record, line: usize| match (record, &tokenizer.chat_template) {
        (Record::Chat { messages }, Some(template)) => {
            let rendered =
                render_with_template(messages, template, eos.as_deref()).map_err(|message| TrainError::Data {
                    file: file.into(),
                    line,
                    message,
                })?;
            tokenizer.tokenize_framed(&rendered.segments, rendered.framing)
        }
        _ => tokenizer.tokenize(&render(record)),
    };
    loaded
        .records
        .iter()
        .zip(&loaded.lines)
        .map(|(r, &line)| tokenize(r, line))
        .collect()
}
