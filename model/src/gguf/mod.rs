//! GGUF files (llama.cpp, Ollama) as a model source. A GGUF file is turned into the Hugging Face
//! layout this crate already loads (config.json, safetensors, tokenizer.json,
//! tokenizer_config.json, generation_config.json), once, in a directory beside it: every reader
//! of a model directory (the loader, the server's tokenizer and chat template, the trainer's data
//! pipeline) then works unchanged, and the result can be inspected and uploaded
//! (`kubetune-import`). Adapters trained on it are ordinary PEFT adapters of the HF names.
//!
//! Quantized tensors are dequantized to f32: LoRA training and the dense CPU and GPU paths run on
//! dense weights, and f32 holds every dequantized value exactly (bf16 would round them).
//!
//! - [`metadata`]: `general.architecture` and `<arch>.*` keys to config.json; a key that would
//!   change the maths and is not understood is an error naming it.
//! - [`tokenizer`]: `tokenizer.ggml.*` to tokenizer.json and tokenizer_config.json.
//! - [`tensors`]: GGUF tensor names to HF names, undoing llama.cpp's q/k row permutation.

mod metadata;
mod tensors;
mod tokenizer;

use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// What an import wrote, for `kubetune-import` to print.
#[derive(Debug, Clone)]
pub struct Imported {
    pub dir: PathBuf,
    pub architecture: String,
    pub tensors: usize,
    pub parameters: usize,
    pub shards: usize,
}

/// True for a path that names a GGUF file (by its extension; the magic is checked on import).
pub fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The model directory for `path`: `path` itself when it is a directory, else, for a GGUF
/// file, its HF-layout import in `<file>.hf/` beside it (made on first use; a complete import is
/// reused). Anything else is returned as is, for the loader to report.
pub fn model_dir(path: &Path) -> Result<PathBuf> {
    if !is_gguf(path) {
        return Ok(path.to_path_buf());
    }
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".hf");
    let dir = path.with_file_name(name);
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    match import(path, &dir) {
        Ok(_) => Ok(dir),
        // Another process imported it first (its rename won): use that one.
        Err(_) if dir.join("config.json").is_file() => Ok(dir),
        Err(e) => Err(e),
    }
}

/// Writes the HF layout of the GGUF file `gguf` into `out` (which must not exist yet). The files
/// are written into a temporary sibling and renamed into place last, so an interrupted import
/// never leaves a directory that looks complete.
pub fn import(gguf: &Path, out: &Path) -> Result<Imported> {
    if out.exists() {
        return Err(ModelError::Io {
            path: out.into(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the output directory exists"),
        });
    }
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".partial-{}", std::process::id()));
    let tmp = out.with_file_name(name);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(ModelError::io(&tmp))?;
    let written = write_layout(gguf, &tmp);
    let summary = match written {
        Ok(summary) => summary,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, out).map_err(ModelError::io(out))?;
    Ok(Imported {
        dir: out.into(),
        ..summary
    })
}

fn write_layout(gguf: &Path, dir: &Path) -> Result<Imported> {
    let mut reader = BufReader::new(File::open(gguf).map_err(ModelError::io(gguf))?);
    let content = Content::read(&mut reader).map_err(|source| ModelError::Weights {
        path: gguf.into(),
        source,
    })?;
    let meta = Metadata::new(gguf, &content.metadata);
    let tensor_names: Vec<&str> = content.tensor_infos.keys().map(String::as_str).collect();
    let layout = metadata::layout(&meta, &tensor_names)?;
    let vocab = tokenizer::Vocab::read(&meta)?;
    write_json(&dir.join("config.json"), &layout.config_json(&vocab))?;
    write_json(&dir.join("generation_config.json"), &vocab.generation_config())?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &vocab.tokenizer_config(layout.context_length),
    )?;
    let tokenizer_json = vocab.tokenizer_json(&meta)?;
    let tokenizer_path = dir.join("tokenizer.json");
    write_json(&tokenizer_path, &tokenizer_json)?;
    // Loading it back checks that the tokenizers crate accepts what was built.
    tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| ModelError::Tokenizer {
        path: tokenizer_path.clone(),
        reason: e.to_string(),
    })?;
    let written = tensors::write_safetensors(gguf, &mut reader, &content, &layout, dir)?;
    // Validated the way every model directory is, so an import that the loader would refuse
    // fails here, naming the field.
    crate::Config::from_file(&dir.join("config.json"))?;
    Ok(Imported {
        dir: dir.into(),
        architecture: layout.architecture.clone(),
        tensors: written.tensors,
        parameters: written.parameters,
        shards: written.shards,
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| ModelError::Json {
        path: path.into(),
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(ModelError::io(path))
}

/// Typed access to a GGUF file's key-value metadata; errors name the file and the key.
pub(crate) struct Metadata<'a> {
    path: &'a Path,
    values: &'a HashMap<String, Value>,
}

impl<'a> Metadata<'a> {
    fn new(path: &'a Path, values: &'a HashMap<String, Value>) -> Self {
        Self { path, values }
    }

    pub(crate) fn error(&self, key: &str, reason: impl Into<String>) -> ModelError {
        ModelError::InvalidConfig {
            path: self.path.into(),
            field: key.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &'a str> {
        self.values.keys().map(String::as_str)
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.values.get(key)
    }

    fn required(&self, key: &str) -> Result<&'a Value> {
        self.get(key).ok_or_else(|| self.error(key, "missing"))
    }

    pub(crate) fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| match v {
                Value::I32(i) if *i >= 0 => Ok(*i as u64),
                Value::I64(i) if *i >= 0 => Ok(*i as u64),
                v => v
                    .to_u64()
                    .map_err(|_| self.error(key, format!("{v:?} is not an unsigned integer"))),
            })
            .transpose()
    }

    pub(crate) fn u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?.ok_or_else(|| self.error(key, "missing"))
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| match v {
                Value::F32(f) => Ok(*f as f64),
                Value::F64(f) => Ok(*f),
                v => Err(self.error(key, format!("{v:?} is not a number"))),
            })
            .transpose()
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.to_bool()
                    .map_err(|_| self.error(key, format!("{v:?} is not a boolean")))
            })
            .transpose()
    }

    pub(crate) fn string(&self, key: &str) -> Result<&'a str> {
        self.opt_string(key)?.ok_or_else(|| self.error(key, "missing"))
    }

    pub(crate) fn opt_string(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key)
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.error(key, format!("{v:?} is not a string"))),
            })
            .transpose()
    }

    pub(crate) fn array(&self, key: &str) -> Result<&'a [Value]> {
        match self.required(key)? {
            Value::Array(items) => Ok(items),
            v => Err(self.error(key, format!("{:?} is not an array", v.value_type()))),
        }
    }

    pub(crate) fn strings(&self, key: &str) -> Result<Vec<&'a str>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.error(&format!("{key}[{i}]"), format!("{v:?} is not a string"))),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
