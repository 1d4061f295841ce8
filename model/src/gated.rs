//! The gated MLP's activation in a training graph: `act(gate) * up`, SwiGLU or GeGLU.
//!
//! Built from candle's ops, the graph keeps `act(gate)` for the product's backward besides gate
//! and up: one more intermediate-sized tensor per layer (2.75 MiB of the 26.6 the bench shape's
//! layer held, e2e/bench/step-memory.sh). This op keeps gate and up only and computes the
//! activation's derivative from gate in the backward, in f32.

use crate::config::Activation;
use crate::error::Result;
use crate::row_chunks::{by_rows, rows_per_chunk};
use candle_core::{DType, Tensor};

/// `act(gate) * up` for the gated MLP, differentiable in gate and up.
pub(crate) fn gated(gate: &Tensor, up: &Tensor, activation: Activation) -> Result<Tensor> {
    let out = (activate(&gate.detach(), activation)? * up.detach())?;
    Ok(crate::custom_grad::with_backward2(
        [gate, up],
        out,
        GatedBackward { activation },
    )?)
}

fn activate(x: &Tensor, activation: Activation) -> candle_core::Result<Tensor> {
    match activation {
        Activation::Silu => x.silu(),
        Activation::GeluTanh => x.gelu(),
    }
}

/// act(g) and d act(g) / dg in f32, sharing their sigmoid or tanh: SiLU's `g s` and
/// `s (1 + g (1 - s))` with s = sigmoid(g); GELU's tanh form, with u = c (g + 0.044715 g³) and
/// c = sqrt(2/π), `g (1 + tanh u) / 2` and `(1 + tanh u) / 2 + g (1 - tanh² u) c (1 +
/// 3 · 0.044715 g²) / 2`.
fn value_and_derivative(g: &Tensor, activation: Activation) -> candle_core::Result<(Tensor, Tensor)> {
    match activation {
        Activation::Silu => {
            let s = candle_nn::ops::sigmoid(g)?;
            let derivative = ((g * s.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)? * &s)?;
            Ok(((g * s)?, derivative))
        }
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let g2 = g.sqr()?;
            let th = (g * g2.affine(0.044715, 1.0)?)?.affine(c, 0.0)?.tanh()?;
            let half_one_plus = th.affine(0.5, 0.5)?;
            let slope = g2.affine(3.0 * 0.044715 * 0.5 * c, 0.5 * c)?;
            let derivative = (&half_one_plus + ((g * th.sqr()?.affine(-1.0, 1.0)?)? * slope)?)?;
            Ok(((g * half_one_plus)?, derivative))
        }
    }
}

struct GatedBackward {
    activation: Activation,
}

impl crate::custom_grad::Backward2 for GatedBackward {
    const NAME: &'static str = "gated-activation";

    /// d gate = grad · up · act'(gate), d up = grad · act(gate), in f32, a chunk of rows at a
    /// time (`row_chunks`): whole, this made six f32 copies of the activations at once.
    fn backward(&self, [gate, up]: [&Tensor; 2], grad: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let dims = gate.dims().to_vec();
        let width = dims.last().copied().unwrap_or(1).max(1);
        let rows = gate.elem_count() / width;
        let flat = |t: &Tensor| t.reshape((rows, width));
        let (gate, up, grad) = (flat(gate)?, flat(up)?, flat(grad)?);
        let [d_gate, d_up] = by_rows(rows, rows_per_chunk(width), |start, len| {
            let part = |t: &Tensor| t.narrow(0, start, len);
            self.rows(&part(&gate)?, &part(&up)?, &part(&grad)?)
        })?;
        Ok((d_gate.reshape(dims.as_slice())?, d_up.reshape(dims.as_slice())?))
    }
}

impl GatedBackward {
    /// [d gate, d up] of some rows.
    fn rows(&self, gate: &Tensor, up: &Tensor, grad: &Tensor) -> candle_core::Result<[Tensor; 2]> {
        let dtype = gate.dtype();
        let grad32 = grad.to_dtype(DType::F32)?;
        let (value, derivative) = value_and_derivative(&gate.to_dtype(DType::F32)?, self.activation)?;
        let d_up = (&grad32 * value)?.to_dtype(dtype)?;
        let d_gate = ((grad32 * up.to_dtype(DType::F32)?)? * derivative)?.to_dtype(dtype)?;
        Ok([d_gate, d_up])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row_chunks::with_chunk_values;
    use candle_core::{Device, Var};

    /// The op against candle's own ops and their backward, for both activations, in f32, with
    /// its backward in one pass and in chunks of 3 of its 14 rows.
    #[test]
    fn the_gated_activation_and_its_gradients_equal_candles_ops() -> Result<()> {
        let dev = Device::Cpu;
        for activation in [Activation::Silu, Activation::GeluTanh] {
            let gate = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 7, 33), &dev)?)?;
            let up = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 7, 33), &dev)?)?;
            let separate = (activate(&gate, activation)? * up.as_tensor())?;
            for chunk_rows in [14, 3] {
                let fused = gated(&gate, &up, activation)?;
                let max_diff =
                    |p: &Tensor, q: &Tensor| -> Result<f32> { Ok((p - q)?.abs()?.max_all()?.to_scalar::<f32>()?) };
                assert!(max_diff(&fused, &separate)? < 1e-5, "{activation:?} output");
                let probe = Tensor::randn(0f32, 1.0, (2, 7, 33), &dev)?;
                let want = (&separate * &probe)?.sum_all()?.backward()?;
                let got = with_chunk_values(33 * chunk_rows, || (fused * &probe)?.sum_all()?.backward())?;
                for (name, v) in [("gate", &gate), ("up", &up)] {
                    let d = max_diff(got.get(v).expect("op gradient"), want.get(v).expect("gradient"))?;
                    assert!(
                        d < 1e-4,
                        "{activation:?}, {chunk_rows} rows a chunk: d{name} off by {d}"
                    );
                }
            }
        }
        Ok(())
    }
}
