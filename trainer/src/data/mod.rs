//! Datasets: JSONL files in instruction, chat or text format, validated in full before
//! training so a bad line fails the run early with its file and line number.

pub mod batch;
pub mod records;
pub mod render;
pub mod template;
pub mod tokenize;

use crate::config::DataFormat;
use crate::error::{Result, TrainError};
use records::Record;
use std::path::Path;

/// The parsed lines of one file and how many bad lines were skipped.
#[derive(Debug)]
pub struct Loaded {
    pub records: Vec<Record>,
    /// The 1-based line of each record, for errors found after parsing (a chat template that
    /// rejects a conversation).
    pub lines: Vec<usize>,
    pub skipped: usize,
}

/// Reads a JSONL file. Blank lines are ignored (they carry no record). A malformed line is an
/// error naming file and line unless `skip_invalid`, which counts it instead. No records at
/// all is an error either way.
pub fn load_jsonl(path: &Path, format: DataFormat, skip_invalid: bool) -> Result<Loaded> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    let mut records = Vec::new();
    let mut lines = Vec::new();
    let mut skipped = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match records::parse_line(line, format) {
            Ok(r) => {
                records.push(r);
                lines.push(i + 1);
            }
            Err(_) if skip_invalid => skipped += 1,
            Err(message) => {
                return Err(TrainError::Data {
                    file: path.into(),
                    line: i + 1,
                    message,
                })
            }
        }
    }
    if records.is_empty() {
        let message = if skipped > 0 {
            format!("dataset is empty: all {skipped} lines were invalid and skipped")
        } else {
            "dataset is empty: no records".to_string()
        };
        return Err(TrainError::Dataset {
            file: path.into(),
            message,
        });
    }
    Ok(Loaded {
        records,
        lines,
        skipped,
    })
}
