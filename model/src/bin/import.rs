//! `kubetune-import MODEL.gguf --out DIR`: writes a GGUF file's model in the Hugging Face layout
//! (config.json, safetensors in f32, tokenizer.json, tokenizer_config.json with the chat
//! template, generation_config.json), to inspect it or upload it as a `baseModel`. The trainer
//! and the server do the same import by themselves when given a `.gguf` file.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about = "Write a GGUF model (llama.cpp, Ollama) in Hugging Face layout")]
struct Args {
    /// The GGUF file.
    gguf: PathBuf,
    /// Output directory; must not exist yet.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match kubetune_model::gguf::import(&args.gguf, &args.out) {
        Ok(done) => {
            println!(
                "{}: {} architecture, {} tensors, {} parameters, {} safetensors file(s)",
                done.dir.display(),
                done.architecture,
                done.tensors,
                done.parameters,
                done.shards
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kubetune-import: {e}");
            ExitCode::FAILURE
        }
    }
}
