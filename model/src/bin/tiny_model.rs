//! `kubetune-tiny-model --out DIR`: writes a tiny random Llama in HF layout (see kubetune_model::tiny).

use clap::Parser;
use kubetune_model::tiny::{write_tiny_model, TinySpec};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    version,
    about = "Write a tiny randomly initialised Llama model (HF layout) for tests"
)]
struct Args {
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 512)]
    vocab_size: usize,
    #[arg(long, default_value_t = 64)]
    hidden_size: usize,
    #[arg(long, default_value_t = 192)]
    intermediate_size: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    let spec = TinySpec {
        seed: a.seed,
        vocab_size: a.vocab_size,
        hidden_size: a.hidden_size,
        intermediate_size: a.intermediate_size,
        num_layers: a.layers,
        num_heads: a.heads,
        num_kv_heads: a.kv_heads,
        ..TinySpec::default()
    };
    match write_tiny_model(&a.out, &spec) {
        Ok(()) => {
            println!("wrote tiny model to {}", a.out.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
