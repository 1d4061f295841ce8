//! Llama-family causal language models (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3) in
//! candle, with LoRA adapters kept outside the frozen base, shared by the trainer and the
//! inference server.
//!
//! - [`Config`] mirrors HF config.json; [`load::load_model`] reads an HF model directory.
//! - [`CausalLm::forward`] takes token ids, the position offset, an optional KV cache and an
//!   optional adapter.
//! - [`CausalLm::decode`] runs one new token for each of a batch of sequences, each with its
//!   own cache and adapter, reading the weights once (the server's decode step).
//! - [`CausalLm::loss_backward`] and [`CausalLm::loss_backward_checkpointed`] (gradient
//!   checkpointing) give a training step's loss and adapter gradients; in f32 on the CPU their
//!   layers run forward and backward by hand (`layer_grad`), elsewhere through candle's
//!   graph.
//! - [`lora`] holds adapters; [`peft`] reads and writes them in HF PEFT layout.
//! - [`nf4`] quantizes the frozen base to 4 bits for QLoRA.
//! - [`chat`] renders a model's chat template (server prompts and trainer data alike).
//! - [`malloc`] keeps glibc from mapping and unmapping every tensor-sized block.
//! - [`threads`] settles the CPU thread count once per process (binaries call it first).
//! - [`gguf`] turns a GGUF file (llama.cpp, Ollama) into the HF layout the loader reads.
//! - [`tiny`] writes a small random model with a real BPE tokenizer for tests.
//!
//! The hand-written CPU kernels (products for few rows and for int8, fused norm, SwiGLU, RoPE
//! and softmax, the strided matrices and buffer pool of the training step, decode attention)
//! live apart in `kernels`, so the files above read as the model and the kernels can be
//! tested on their own against candle.

mod attention;
pub mod cache;
pub mod chat;
pub mod checkpointing;
pub mod config;
mod corpus;
mod custom_grad;
pub mod decode;
pub mod device;
pub mod error;
mod fused;
mod fused_adapter;
mod gated;
pub mod generate;
pub mod gguf;
pub mod int8;
mod kernels;
mod layer_grad;
pub mod linear;
pub mod load;
pub mod lora;
mod lora_linear;
pub mod malloc;
mod mapped;
pub mod model;
pub mod nf4;
pub mod peft;
pub mod prefill;
pub mod profile;
pub mod rope;
mod row_chunks;
pub mod tensors;
pub mod threads;
pub mod tiny;

pub use cache::KvCache;
pub use config::Config;
pub use decode::DecodeRow;
pub use device::DeviceChoice;
pub use error::{ModelError, Result};
pub use load::{load_model, BaseFormat, LoadOptions};
pub use lora::{ActiveAdapter, LoraAdapter, LoraConfig, TargetModule};
pub use model::CausalLm;
pub use prefill::PrefillRow;
