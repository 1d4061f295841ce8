//! Trains the adapter of `tests/reference/gguf_peft/` on that directory's `tiny.gguf` (written
//! by `tests/reference/gguf_peft.py base`) with the trainer's library API, and writes it to
//! `adapter/` there; `gguf_peft.py peft` then loads it in PEFT on transformers' load of the
//! same file. Run once, by hand (the commands are in gguf_peft.py's doc); not a test.

#[path = "../tests/trainer/gguf_peft_train.rs"]
mod gguf_peft_train;

use kubetune_model::peft;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(dir) = std::env::args().nth(1) else {
        return Err("usage: gguf_adapter DIR (with tiny.gguf and data.jsonl)".into());
    };
    let dir = Path::new(&dir);
    // The trainer imports a GGUF file beside it: train on a copy, so the import stays out of
    // the fixture.
    let scratch = tempfile::tempdir()?;
    let gguf = scratch.path().join("tiny.gguf");
    std::fs::copy(dir.join("tiny.gguf"), &gguf)?;
    let output = scratch.path().join("out");
    let metrics = gguf_peft_train::train_on_gguf(&gguf, &dir.join("data.jsonl"), &output);
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter)?;
    for file in [peft::ADAPTER_CONFIG, peft::ADAPTER_WEIGHTS] {
        std::fs::copy(output.join(file), adapter.join(file))?;
    }
    println!(
        "{}: adapter written after {} steps (train loss {:?})",
        adapter.display(),
        metrics.steps,
        metrics.final_train_loss
    );
    Ok(())
}
