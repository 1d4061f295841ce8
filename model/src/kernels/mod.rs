//! Hand-written CPU kernels, each tested against what candle's graph computes.
//!
//! Why apart: these files are about memory traffic, SIMD lanes and thread splits; the model
//! files (`model`, `decode`, `prefill`, `layer_grad`, ...) should read as the model, calling a
//! kernel where candle's ops are too slow on the CPU and falling back to candle's graph
//! elsewhere (other devices and dtypes). Each kernel's tests take candle's result, or a
//! portable version of the same kernel, as the reference.
//!
//! - `matmul`: `x @ w^T` for a (out, in) weight, choosing among the products below and gemm.
//! - `small_rows`: `x @ w^T` for the few rows of a decode step (f32 or int8 weights).
//! - `vnni`: `x @ w^T` with both sides int8, on AVX-512 VNNI.
//! - `softmax`: softmax, sigmoid and the loss gradient over f32 rows, vectorised.
//! - `fused`: RMSNorm, SwiGLU, RoPE and causal softmax as single-pass ops with backwards.
//! - `decode_attention`: one decode step's attention of each row against its cache.
//! - `dropout`: LoRA dropout's mask from a counter, on the host or by our CUDA kernel (the one
//!   kernel here that runs on a GPU).
//! - `matrix`: strided f32 views and their gemm products, for the hand-written training step.
//! - `scratch`: the training step's pool of reused f32 buffers.

pub(crate) mod decode_attention;
pub(crate) mod dropout;
pub(crate) mod fused;
pub(crate) mod matmul;
pub(crate) mod matrix;
pub(crate) mod scratch;
pub(crate) mod small_rows;
pub(crate) mod softmax;
pub(crate) mod vnni;
