//! Gradient checkpointing for LoRA training: the loss and its gradients without keeping every
//! layer's activations alive at once.
//!
//! candle's autograd keeps each intermediate tensor of the graph until `backward` ends, so a
//! plain forward over a 4 × 256 batch holds every layer's attention scores, MLP activations and
//! full-vocabulary logits together. Here the forward runs without a graph and keeps only each
//! layer's input. The backward then walks the layers from the top: it rebuilds one layer's
//! graph from its stored input, pushes the gradient of the layer's output through it with the
//! surrogate `sum(output * grad_output)`, and keeps the gradient of the input for the layer
//! below. The head and loss run in row chunks the same way, so the logits of the whole batch
//! never exist at once either. The price is a second forward of each layer.
//!
//! Dropout masks are derived from the seed, layer and module (see [`crate::lora`]), so the
//! recomputed forward draws exactly the masks of the first.
//!
//! This is the path through candle's graph (CUDA, other dtypes). In f32 on the CPU both
//! [`CausalLm::loss_backward`] and [`CausalLm::loss_backward_checkpointed`] run the layers by
//! hand instead (`layer_grad`), with the same recomputation under checkpointing.

use crate::error::{ModelError, Result};
use crate::linear::{frozen_matmul, BaseWeight};
use crate::lora::ActiveAdapter;
use crate::model::CausalLm;
use crate::row_chunks::accumulate;
use candle_core::backprop::GradStore;
use candle_core::{DType, Module, Tensor, Var, D};

/// One micro-batch: token ids (batch, seq), and per position of the flattened (batch * seq)
/// rows the next token (`targets`, u32) and its loss weight (`weights`, f32; 0 for positions
/// that are not trained, such as prompts, padding and each sequence's last position).
pub struct LossBatch<'a> {
    pub input_ids: &'a Tensor,
    pub targets: &'a Tensor,
    pub weights: &'a Tensor,
}

impl LossBatch<'_> {
    /// (batch, seq), after checking that targets and weights have one entry per position.
    fn shape(&self) -> Result<(usize, usize)> {
        let (b, t) = self.input_ids.dims2()?;
        let rows = b * t;
        if self.targets.dims() != [rows] || self.weights.dims() != [rows] {
            return Err(ModelError::ShapeMismatch(format!(
                "loss targets {:?} and weights {:?} must both have {rows} entries",
                self.targets.dims(),
                self.weights.dims()
            )));
        }
        Ok((b, t))
    }
}

/// Settings of one checkpointed step.
pub struct CheckpointedStep<'a> {
    pub adapter: ActiveAdapter<'a>,
    /// Multiplies the loss before differentiation (e.g. 1 / trained tokens of the step).
    pub loss_scale: f64,
    /// Rows of the flattened batch whose logits are computed at once.
    pub head_rows: usize,
    /// Sequences whose layer is recomputed at once (the whole batch when 0 or larger). Fewer
    /// hold fewer activations; more make larger, faster matmuls. The hand-written step of
    /// f32 on the CPU (`layer_grad`) always recomputes the whole batch: its tape of a layer
    /// is a fraction of what candle's graph of the same layer holds.
    pub recompute_sequences: usize,
}

/// The result: the unscaled summed loss and one gradient store per layer, holding the
/// gradients of that layer's adapter tensors only.
pub struct CheckpointedGrads {
    pub loss_sum: f64,
    pub stores: Vec<GradStore>,
}

impl CausalLm {
    /// `-sum(weights * log p(targets))` over the batch and its gradients with respect to the
    /// adapter variables, with gradient checkpointing (see the module docs).
    pub fn loss_backward_checkpointed(&self, batch: &LossBatch, step: &CheckpointedStep) -> Result<CheckpointedGrads> {
        let (b, t) = batch.shape()?;
        if self.trains_by_hand(&step.adapter) {
            let (loss_sum, stores) = self.loss_backward_by_hand(batch, step, true)?;
            return Ok(CheckpointedGrads { loss_sum, stores });
        }
        let detached = step.adapter.adapter.detached();
        let no_graph = ActiveAdapter {
            adapter: &detached,
            ..step.adapter
        };
        let kind_inputs = self.layer_inputs(0, t)?;

        // Each layer's input is kept for its recomputation, except the first layer's: the
        // embeddings are looked up again when that layer comes (2 MiB less at 4 x 256 tokens).
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut x = self.embed_tokens(batch.input_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let next = layer.forward(&x, &kind_inputs, None, Some(&no_graph))?;
            if i > 0 {
                inputs.push(x);
            }
            x = next;
        }

        let mut stores = Vec::with_capacity(self.layers.len() + 1);
        let (loss_sum, mut grad) = self.head_backward(&x, batch, step)?;
        let part = if step.recompute_sequences == 0 {
            b
        } else {
            step.recompute_sequences.min(b)
        };
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let input = match i {
                0 => self.embed_tokens(batch.input_ids)?,
                _ => inputs
                    .pop()
                    .ok_or_else(|| ModelError::Backward("layer inputs ran out".into()))?,
            };
            let mut layer_store = GradStore::default();
            let mut input_grads = Vec::with_capacity(b.div_ceil(part));
            // Sequences are independent within a layer, so the layer is rebuilt for a few at a
            // time; each part draws the dropout masks the whole batch drew for its rows.
            for first in (0..b).step_by(part) {
                let n = part.min(b - first);
                let x = input.narrow(0, first, n)?;
                // The embeddings are frozen: the first layer's input needs no gradient.
                let x = if i == 0 {
                    x
                } else {
                    Var::from_tensor(&x.contiguous()?)?.as_tensor().clone()
                };
                let adapter = ActiveAdapter {
                    first_row: step.adapter.first_row + first * t,
                    ..step.adapter
                };
                let out = layer.forward(&x, &kind_inputs, None, Some(&adapter))?;
                let store = (out * grad.narrow(0, first, n)?)?.sum_all()?.backward()?;
                if i > 0 {
                    let g = store
                        .get(&x)
                        .ok_or_else(|| ModelError::Backward(format!("no gradient reached the input of layer {i}")))?;
                    input_grads.push(g.detach());
                }
                add_adapter_grads(&mut layer_store, &store, step.adapter.adapter, i)?;
            }
            if i > 0 {
                grad = Tensor::cat(&input_grads, 0)?;
            }
            stores.push(layer_store);
        }
        Ok(CheckpointedGrads { loss_sum, stores })
    }

    /// The final norm, head and loss in chunks of rows: returns the unscaled loss sum and the
    /// gradient of the scaled loss with respect to `x`, the last layer's output (batch, seq, hidden).
    fn head_backward(&self, x: &Tensor, batch: &LossBatch, step: &CheckpointedStep) -> Result<(f64, Tensor)> {
        let (b, t, h) = x.dims3()?;
        let flat = x.reshape((b * t, h))?;
        let head = self.head();
        let chunk = step.head_rows.max(1);
        // Summed on the device and read once: reading each chunk's loss would wait for the
        // device (a GPU) once per chunk, leaving it idle while the next chunk is queued.
        let mut loss_sum: Option<Tensor> = None;
        let mut grads = Vec::with_capacity((b * t).div_ceil(chunk));
        for start in (0..b * t).step_by(chunk) {
            let len = chunk.min(b * t - start);
            let rows = flat.narrow(0, start, len)?;
            let targets = batch.targets.narrow(0, start, len)?;
            let (loss, grad) = self.head_chunk(
                &rows,
                &targets,
                &batch.weights.narrow(0, start, len)?,
                step.loss_scale,
                &head,
            )?;
            accumulate(&mut loss_sum, loss)?;
            grads.push(grad);
        }
        let loss_sum = match loss_sum {
            Some(sum) => sum.to_scalar::<f64>()?,
            None => 0.0,
        };
        Ok((loss_sum, Tensor::cat(&grads, 0)?.reshape((b, t, h))?))
    }

    /// One chunk of [`CausalLm::head_backward`] through candle's graph: its unscaled loss (an
    /// f64 scalar on the device) and the gradient of the scaled loss with respect to `rows`.
    pub(crate) fn head_chunk(
        &self,
        rows: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        scale: f64,
        head: &BaseWeight,
    ) -> Result<(Tensor, Tensor)> {
        let rows = Var::from_tensor(rows)?;
        let logits = self.cap_logits(frozen_matmul(&self.norm.forward(rows.as_tensor())?, head)?)?;
        let sum = weighted_nll(&logits, targets, weights)?;
        // Detached: kept until the last chunk, it would otherwise keep this chunk's graph.
        let loss = sum.detach().to_dtype(DType::F64)?;
        let store = (sum * scale)?.backward()?;
        let grad = store
            .get(rows.as_tensor())
            .ok_or_else(|| ModelError::Backward("no gradient reached the head input".into()))?;
        Ok((loss, grad.detach()))
    }
}

impl CausalLm {
    /// The loss sum and the gradients of `loss_scale` times it, without checkpointing. In f32
    /// on the CPU, by hand (`layer_grad`); elsewhere one recorded forward of the layers, then
    /// the final norm, head and loss in chunks outside that graph, as
    /// [`CausalLm::loss_backward_checkpointed`] does them, and one backward pass from the last
    /// layer's output. Through candle's graph the head and loss held about eleven logits-sized
    /// tensors per chunk until the backward pass, for every chunk of the batch.
    pub fn loss_backward(
        &self,
        batch: &LossBatch,
        adapter: &ActiveAdapter,
        loss_scale: f64,
        head_rows: usize,
    ) -> Result<(f64, GradStore)> {
        batch.shape()?; // targets and weights must fit the batch
        let step = CheckpointedStep {
            adapter: *adapter,
            loss_scale,
            head_rows,
            recompute_sequences: 0,
        };
        if self.trains_by_hand(adapter) {
            let (loss_sum, mut stores) = self.loss_backward_by_hand(batch, &step, false)?;
            return Ok((loss_sum, stores.pop().unwrap_or_default()));
        }
        let x = self.last_layer_output(batch.input_ids, 0, None, Some(adapter))?;
        let (loss_sum, grad) = self.head_backward(&x.detach(), batch, &step)?;
        let mut store = (x * &grad)?.sum_all()?.backward()?;
        // candle also stores the gradient of `grad`, a constant here: `x * 1`, whose graph
        // holds every layer's activations for as long as the store lives.
        store.remove(&grad);
        Ok((loss_sum, store))
    }

    /// `-sum(weights * log p(targets))` as one tensor, through candle's graph when the adapter
    /// is trainable: the trainer's evaluation (with a detached adapter, so no graph) and the
    /// tests' reference for [`CausalLm::loss_backward`]. The head and the loss run in chunks of
    /// `head_rows` rows: the whole batch's logits (4 x 256 rows x 8192 f32 is 32 MiB) reached
    /// glibc's mmap threshold, so every such tensor was a fresh mapping, page-faulted in and
    /// zeroed each time. The chunks come from the reused heap instead.
    pub fn loss_sum(&self, batch: &LossBatch, adapter: &ActiveAdapter, head_rows: usize) -> Result<Tensor> {
        let (b, t) = batch.shape()?;
        let rows = b * t;
        let x = self.hidden(batch.input_ids, 0, None, Some(adapter))?;
        let flat = x.reshape((rows, x.dim(2)?))?;
        let head = self.head();
        let chunk = head_rows.max(1);
        let mut total: Option<Tensor> = None;
        for start in (0..rows).step_by(chunk) {
            let len = chunk.min(rows - start);
            let logits = self.cap_logits(frozen_matmul(&flat.narrow(0, start, len)?, &head)?)?;
            let sum = weighted_nll(
                &logits,
                &batch.targets.narrow(0, start, len)?,
                &batch.weights.narrow(0, start, len)?,
            )?;
            accumulate(&mut total, sum)?;
        }
        total.ok_or_else(|| ModelError::EmptyInput("loss of an empty batch".into()))
    }
}

/// `-sum(weights * log_softmax(logits)[targets])` for logits (rows, vocab), next-token ids
/// (rows) and loss weights (rows): the training loss, summed rather than averaged so that
/// chunks and micro-batches add up.
///
/// One op of the graph: through candle's ops the graph of a chunk kept about eleven
/// logits-sized f32 tensors until its backward (the f32 copy, the log-softmax's steps and their
/// gradients); this keeps the logits alone and computes `weights (softmax - onehot(targets))`
/// in the backward.
pub fn weighted_nll(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let weights = weights.to_dtype(DType::F32)?;
    // The log-softmax in f32: bf16 logits keep too few bits for the loss and its gradient.
    let x = logits.detach().to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?;
    let log_sum = x.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = (x.gather(&targets.unsqueeze(1)?, 1)? - max - log_sum)?.squeeze(1)?;
    let sum = (picked * &weights)?.sum_all()?.neg()?;
    Ok(crate::custom_grad::with_backward(
        logits,
        sum,
        NllBackward {
            targets: targets.clone(),
            weights,
        },
    )?)
}

struct NllBackward {
    targets: Tensor,
    weights: Tensor,
}

impl crate::custom_grad::Backward for NllBackward {
    const NAME: &'static str = "weighted-nll";

    /// d/dlogits = g w (softmax(logits) - onehot(target)) per row, g the scalar's gradient.
    fn backward(&self, logits: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        let scale = self.weights.broadcast_mul(&grad.to_dtype(DType::F32)?)?.unsqueeze(1)?;
        let d = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?.broadcast_mul(&scale)?;
        d.scatter_add_set(&self.targets.unsqueeze(1)?, &scale.neg()?, 1)?;
        d.to_dtype(logits.dtype())
    }
}

/// Adds the gradients of layer `layer`'s adapter tensors in `store` to `into`, detached.
/// candle leaves each gradient with the op that made it, and that op refers to the forward
/// activations: kept as they are, the gradients would keep every layer's graph alive and undo
/// the checkpointing.
fn add_adapter_grads(
    into: &mut GradStore,
    store: &GradStore,
    adapter: &crate::lora::LoraAdapter,
    layer: usize,
) -> Result<()> {
    for (_, pair) in adapter.pairs().filter(|((l, _), _)| *l == layer) {
        for t in [&pair.a, &pair.b] {
            if let Some(g) = store.get(t) {
                let sum = match into.get(t) {
                    Some(before) => (before + g)?.detach(),
                    None => g.detach(),
                };
                into.insert(t, sum);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The op against candle's log-softmax, gather and sum, for f32 and bf16 logits: the loss
    /// and the logits' gradient, with a weight of 0 on one row.
    #[test]
    fn the_weighted_nll_and_its_gradient_equal_candles_log_softmax() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, vocab) = (6, 50);
        let targets = Tensor::new(&[3u32, 49, 0, 17, 17, 8], &dev)?;
        let weights = Tensor::new(&[1f32, 0.5, 0.0, 2.0, 1.0, 1.0], &dev)?;
        for dtype in [DType::F32, DType::BF16] {
            let logits = Var::from_tensor(&Tensor::randn(0f32, 3.0, (rows, vocab), &dev)?.to_dtype(dtype)?)?;
            let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
            let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
            let want = (picked * &weights)?.sum_all()?.neg()?;
            let got = weighted_nll(&logits, &targets, &weights)?;
            let (w, g) = (want.to_scalar::<f32>()?, got.to_scalar::<f32>()?);
            assert!((w - g).abs() < 1e-4 * w.abs(), "{dtype:?}: loss {g} against {w}");
            let want = (want * 0.7)?.backward()?;
            let got = (got * 0.7)?.backward()?;
            let (want, got) = (
                want.get(&logits).expect("gradient"),
                got.get(&logits).expect("op gradient"),
            );
            assert_eq!(got.dtype(), dtype);
            let diff = (want.to_dtype(DType::F32)? - got.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            let bound = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            assert!(diff < bound, "{dtype:?}: gradient off by {diff}");
        }
        Ok(())
    }
}
