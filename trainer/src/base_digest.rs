//! The base model's digest: which model an adapter was trained on, recorded in its manifest
//! (`base_model.digest`) and its model card, so a team can check later that the base they
//! serve it on is the one it learned against, whatever the URI now points at.
//!
//! Definition (what [`of_model`] computes, so anyone can recompute it):
//!
//! - A **GGUF file**: the sha256 of the file itself (`sha256sum MODEL.gguf`), which is what the
//!   trainer imports its weights, tokenizer and template from.
//! - A **model directory** in HF layout: the sha256 of the text `sha256sum` prints for the files
//!   the trainer reads, listed in byte order of their paths relative to the directory (C
//!   locale `sort`): one line `<64 hex digits><two spaces><relative path>\n` per file. The files
//!   are those of [`MODEL_FILES`] that exist, and the weights as the loader picks them
//!   ([`kubetune_model::load::weight_files`]): `model.safetensors`, or else
//!   `model.safetensors.index.json` with every shard its `weight_map` names. Other files of the
//!   directory (README.md, LICENSE, `original/`, other weight formats) are not read, and are
//!   not part of the digest. In a shell:
//!
//! ```sh
//! cd MODEL_DIR && { ls config.json generation_config.json tokenizer.json tokenizer_config.json \
//!   chat_template.jinja 2>/dev/null; if [ -f model.safetensors ]; then echo model.safetensors; \
//!   else echo model.safetensors.index.json; jq -r '.weight_map[]' model.safetensors.index.json; fi; } \
//!   | LC_ALL=C sort -u | xargs sha256sum | sha256sum
//! ```
//!
//! It is computed once per pod, right after the download (the download itself is not hashed
//! on the way), and so reads every byte of those files once more: 0.07-0.1 s per 100 MiB on
//! this project's 2-core machine with the file in the page cache (sha2 with the CPU's SHA
//! instructions, about 1.4 GB/s on one core; the SmolLM2 Q4_1 GGUF file, 98 MB, in 0.09-0.1 s;
//! measured by `cargo run --release -p kubetune-trainer --example hash_cost`), so about 11 s
//! for a 7B model's 15 GB in bf16, or the disk's read time when that is slower.

use crate::error::{Result, TrainError};
use kubetune_storage::{Sha256Digest, StorageError};
use std::path::{Path, PathBuf};

/// The non-weight files of a model directory the trainer reads, when present: the config,
/// the stop tokens, the tokenizer, and the chat template.
pub const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

/// The files of the model directory `dir` that the digest covers, as relative paths in the
/// order the digest lists them.
pub fn model_files(dir: &Path) -> Result<Vec<String>> {
    let mut files: Vec<PathBuf> = MODEL_FILES
        .iter()
        .map(|name| dir.join(name))
        .filter(|p| p.is_file())
        .collect();
    let weights = kubetune_model::load::weight_files(dir)?;
    if weights.first().is_some_and(|w| !w.ends_with("model.safetensors")) {
        // Sharded: the loader read the index to find the shards.
        files.push(dir.join("model.safetensors.index.json"));
    }
    files.extend(weights);
    let mut relative = files
        .iter()
        .map(|p| {
            p.strip_prefix(dir)
                .ok()
                .and_then(|r| r.to_str())
                .map(str::to_string)
                .ok_or_else(|| TrainError::Io {
                    path: p.clone(),
                    source: std::io::Error::other("not a UTF-8 path inside the model directory"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    relative.sort();
    relative.dedup();
    Ok(relative)
}

/// The digest of the base model at `path` as the job downloaded it (a GGUF file or a model
/// directory), by the definition in this module's documentation.
pub async fn of_model(path: &Path) -> Result<Sha256Digest> {
    if kubetune_model::gguf::is_gguf(path) {
        return file_digest(path).await;
    }
    let mut listing = String::new();
    for file in model_files(path)? {
        let digest = file_digest(&path.join(&file)).await?;
        listing.push_str(&format!("{}  {file}\n", digest.hex()));
    }
    Ok(Sha256Digest::of(listing.as_bytes()))
}

async fn file_digest(path: &Path) -> Result<Sha256Digest> {
    Sha256Digest::of_file(path).await.map_err(|e| match e {
        StorageError::Io { path, source, .. } => TrainError::Io { path, source },
        other => TrainError::Io {
            path: path.into(),
            source: std::io::Error::other(other.to_string()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, bytes).expect("write");
    }

    fn hex(bytes: &[u8]) -> String {
        Sha256Digest::of(bytes).hex().to_string()
    }

    /// A model directory with the files the trainer reads and some it does not.
    fn model(dir: &Path, weights: &[u8]) {
        write(dir, "config.json", b"{\"model_type\": \"llama\"}");
        write(dir, "tokenizer.json", b"{}");
        write(dir, "tokenizer_config.json", b"{\"chat_template\": \"x\"}");
        write(dir, "model.safetensors", weights);
        write(dir, "README.md", b"# a model card");
        write(dir, "original/consolidated.00.pth", b"another format");
    }

    #[tokio::test]
    async fn a_directory_digest_is_sha256sum_of_the_sorted_files_the_trainer_reads() {
        let dir = tempfile::tempdir().expect("dir");
        model(dir.path(), b"weights");
        assert_eq!(
            model_files(dir.path()).expect("files"),
            [
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json"
            ]
        );
        // What `ls ... | LC_ALL=C sort | xargs sha256sum | sha256sum` prints.
        let listing = format!(
            "{}  config.json\n{}  model.safetensors\n{}  tokenizer.json\n{}  tokenizer_config.json\n",
            hex(b"{\"model_type\": \"llama\"}"),
            hex(b"weights"),
            hex(b"{}"),
            hex(b"{\"chat_template\": \"x\"}"),
        );
        assert_eq!(
            of_model(dir.path()).await.expect("digest"),
            Sha256Digest::of(listing.as_bytes())
        );
    }

    #[tokio::test]
    async fn the_digest_is_stable_for_the_same_files_and_changes_with_any_file_read() {
        let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
        model(a.path(), b"weights");
        model(b.path(), b"weights");
        let digest = of_model(a.path()).await.expect("digest");
        assert_eq!(of_model(a.path()).await.expect("again"), digest, "stable");
        assert_eq!(of_model(b.path()).await.expect("copy"), digest, "same files elsewhere");

        // Files the trainer does not read change nothing.
        write(b.path(), "README.md", b"# edited");
        write(b.path(), "original/consolidated.00.pth", b"edited");
        assert_eq!(of_model(b.path()).await.expect("unread files"), digest);

        write(b.path(), "model.safetensors", b"weightz");
        assert_ne!(
            of_model(b.path()).await.expect("weights"),
            digest,
            "a weight file changed"
        );
        write(b.path(), "model.safetensors", b"weights");
        write(b.path(), "generation_config.json", b"{\"eos_token_id\": [2]}");
        assert_ne!(of_model(b.path()).await.expect("added"), digest, "stop tokens added");
    }

    #[tokio::test]
    async fn a_sharded_model_covers_its_index_and_every_shard_it_names() {
        let dir = tempfile::tempdir().expect("dir");
        write(dir.path(), "config.json", b"{}");
        write(
            dir.path(),
            "model.safetensors.index.json",
            br#"{"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#,
        );
        write(dir.path(), "model-00001-of-00002.safetensors", b"one");
        write(dir.path(), "model-00002-of-00002.safetensors", b"two");
        write(dir.path(), "consolidated.safetensors", b"not read");
        assert_eq!(
            model_files(dir.path()).expect("files"),
            [
                "config.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
            ]
        );
        let before = of_model(dir.path()).await.expect("digest");
        write(dir.path(), "model-00002-of-00002.safetensors", b"TWO");
        assert_ne!(of_model(dir.path()).await.expect("digest"), before);
    }

    #[tokio::test]
    async fn a_gguf_file_digest_is_its_own_sha256() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("SmolLM2.Q4_1.gguf");
        std::fs::write(&file, b"GGUF and the rest").expect("write");
        assert_eq!(
            of_model(&file).await.expect("digest"),
            Sha256Digest::of(b"GGUF and the rest")
        );
    }

    #[tokio::test]
    async fn a_directory_without_weights_is_an_error() {
        let dir = tempfile::tempdir().expect("dir");
        write(dir.path(), "config.json", b"{}");
        assert!(of_model(dir.path()).await.is_err());
    }
}
