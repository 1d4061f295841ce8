//! Builds the training and validation sequences from the dataset files and the tokenizer.

use crate::config::{DataFormat, TrainConfig};
use crate::data::batch::{pack, split_validation, truncate, PrepareStats};
use crate::data::records::Record;
use crate::data::render::render;
use crate::data::tokenize::{Example, TextTokenizer};
use crate::data::{load_jsonl, Loaded};
use crate::error::{Result, TrainError};
use crate::io::local_path;

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
    if ds.format == DataFormat::Chat && tokenizer.chat_template.is_some() {
        return Err(TrainError::Config {
            path: "dataset.format".into(),
            message: "the model's tokenizer_config.json has a chat_template, and rendering chat templates is not \
                      implemented yet; convert the data to `instruction` or `text`"
                .into(),
        });
    }
    let train_path = local_path(&ds.path, "dataset.path")?;
    let Loaded { records, skipped } = load_jsonl(&train_path, ds.format, ds.skip_invalid)?;
    let mut skipped_invalid = skipped;
    let mut stats = PrepareStats::default();
    let examples = truncate(tokenize_all(&records, tokenizer)?, t.max_seq_length, &mut stats);
    let (train, validation) = match (&ds.validation_path, ds.validation_split) {
        (Some(path), _) => {
            let path = local_path(path, "dataset.validationPath")?;
            let loaded = load_jsonl(&path, ds.format, ds.skip_invalid)?;
            skipped_invalid += loaded.skipped;
            let val = truncate(tokenize_all(&loaded.records, tokenizer)?, t.max_seq_length, &mut stats);
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
    let train = if t.packing { pack(train, t.max_seq_length) } else { train };
    Ok(Prepared { train, validation, stats, skipped_invalid })
}

fn tokenize_all(records: &[Record], tokenizer: &TextTokenizer) -> Result<Vec<Example>> {
    records.iter().map(|r| tokenizer.tokenize(&render(r))).collect()
}
