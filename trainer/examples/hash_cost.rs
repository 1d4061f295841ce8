//! What hashing the base model costs (see `kubetune_trainer::base_digest`): prints the time of
//! a digest of a model with a 100 MiB weight file, and of the model at the path given, if any
//! (e.g. the SmolLM2 GGUF file of `e2e/models/smollm2.sh`). Each is read once first, so that the
//! page cache is warm, as right after a download. A measurement, run by hand:
//!
//!   cargo run --release -p kubetune-trainer --example hash_cost [MODEL]

use kubetune_trainer::base_digest::of_model;
use std::path::{Path, PathBuf};

fn write_model(dir: &Path, weights: &[u8]) -> std::io::Result<()> {
    std::fs::write(dir.join("config.json"), b"{\"model_type\": \"llama\"}")?;
    std::fs::write(dir.join("tokenizer.json"), b"{}")?;
    std::fs::write(dir.join("model.safetensors"), weights)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    write_model(dir.path(), &vec![7u8; 100 << 20])?;
    let mut models = vec![dir.path().to_path_buf()];
    models.extend(std::env::args_os().nth(1).map(PathBuf::from));
    for path in models {
        let warm = of_model(&path).await?;
        let start = std::time::Instant::now();
        let digest = of_model(&path).await?;
        let seconds = start.elapsed().as_secs_f64();
        if digest != warm {
            return Err(format!("{}: two digests differ", path.display()).into());
        }
        println!("{}: {seconds:.3} s, {digest}", path.display());
    }
    Ok(())
}
