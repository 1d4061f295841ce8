//! kubetune-trainer: LoRA / QLoRA fine-tuning. The training code arrives with its own issue;
//! until then the binary only reports its version.

fn main() {
    println!("kubetune-trainer {} (training not built yet)", env!("CARGO_PKG_VERSION"));
}
