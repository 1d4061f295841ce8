//! `kubetune-upload SOURCE URI`: puts a local file, or a directory tree, into object storage.
//!
//! This is how base models and datasets get into the store a FineTuneJob reads from (the demo
//! uses it for the tiny model and the sample dataset). A file lands at URI itself; a directory's
//! files land below URI with their relative paths. Credentials come from the environment
//! (AWS_*, GOOGLE_*, AZURE_*) or from `--env-file`, never from arguments, and are never printed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Parser;
use kubetune_storage::{Credentials, Storage};

#[derive(Parser)]
#[command(about = "Upload a file or a directory to object storage (s3://, gs://, az://, file://)")]
struct Cli {
    /// Local file or directory.
    source: PathBuf,
    /// Destination: the object URI for a file, the prefix URI for a directory.
    uri: String,
    /// A KEY=VALUE file with credentials (e.g. the local cluster's .kubetune/s3.env); its
    /// values take precedence over the environment.
    #[arg(long)]
    env_file: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(upload(&cli)) {
        Ok(count) => {
            println!("uploaded {count} file(s) to {}", cli.uri);
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn upload(cli: &Cli) -> anyhow::Result<usize> {
    let credentials = match &cli.env_file {
        Some(path) => Credentials::from_env().merged(Credentials::from_vars(read_env_file(path)?)),
        None => Credentials::from_env(),
    };
    let meta = std::fs::metadata(&cli.source).with_context(|| format!("reading {}", cli.source.display()))?;
    if meta.is_file() {
        let storage = Storage::from_uri(&cli.uri, &credentials)?;
        storage.put_file("", &cli.source, None).await?;
        return Ok(1);
    }
    let storage = Storage::from_uri(&cli.uri, &credentials)?;
    let files = files_below(&cli.source)?;
    if files.is_empty() {
        bail!("{} holds no files", cli.source.display());
    }
    for rel in &files {
        storage.put_file(rel, &cli.source.join(rel), None).await?;
    }
    Ok(files.len())
}

/// Relative paths (with `/`) of every regular file below `root`, sorted.
fn files_below(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let dir = root.join(&rel);
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let path = rel.join(entry.file_name());
            let kind = entry
                .file_type()
                .with_context(|| format!("reading {}", root.join(&path).display()))?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                let text = path
                    .to_str()
                    .with_context(|| format!("{} is not valid UTF-8", path.display()))?;
                out.push(text.replace(std::path::MAIN_SEPARATOR, "/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `KEY=VALUE` lines; blank lines and `#` comments are skipped, anything else is an error that
/// names the line (without its value, which may be a secret).
fn read_env_file(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut vars = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("{}:{}: expected KEY=VALUE", path.display(), i + 1);
        };
        vars.push((key.trim().to_string(), value.trim().to_string()));
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_nested_files_relative_and_sorted() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        std::fs::write(dir.path().join("z.json"), "{}").expect("write");
        std::fs::write(dir.path().join("a/b/c.bin"), "x").expect("write");
        assert_eq!(
            files_below(dir.path()).expect("list"),
            vec!["a/b/c.bin".to_string(), "z.json".to_string()]
        );
    }

    #[test]
    fn env_file_errors_name_the_line_not_the_value() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("s3.env");
        std::fs::write(&path, "# creds\nAWS_ACCESS_KEY_ID=abc\nsupersecret\n").expect("write");
        let err = read_env_file(&path).expect_err("bad line").to_string();
        assert!(err.ends_with("s3.env:3: expected KEY=VALUE"), "{err}");
        assert!(!err.contains("supersecret"));
    }

    #[tokio::test]
    async fn uploads_a_directory_below_the_prefix() {
        let (src, dst) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
        std::fs::create_dir_all(src.path().join("sub")).expect("mkdir");
        std::fs::write(src.path().join("config.json"), "{}").expect("write");
        std::fs::write(src.path().join("sub/x.txt"), "x").expect("write");
        let uri = format!("file://{}/models/tiny", dst.path().display());
        let cli = Cli {
            source: src.path().to_path_buf(),
            uri,
            env_file: None,
        };
        assert_eq!(upload(&cli).await.expect("upload"), 2);
        assert_eq!(
            std::fs::read_to_string(dst.path().join("models/tiny/sub/x.txt")).expect("read"),
            "x"
        );
    }
}
