//! `x @ w^T` for activations `x` (rows, in) and a weight `w` (out, in) as HF stores it: the
//! product every projection, the head and the quantized formats' expanded slices go through.
//!
//! Why not candle's matmul alone: gemm packs its right operand on every call and runs one row
//! on a single thread, which wastes most of a decode step; this picks, by row count, the
//! decode kernel ([`crate::kernels::small_rows`]), gemm with the weight on the left, or plain
//! gemm.

use super::{fused, small_rows};
use crate::error::{ModelError, Result};
use candle_core::Tensor;

/// `x @ w^T` for `x` (rows, in) and a weight `w` (out, in).
///
/// Up to [`SMALL_ROWS`] rows of f32 on the CPU (decoding: one row per sequence) go to
/// [`crate::kernels::small_rows`], which reads each weight once for all rows; gemm would pack the
/// weight first, or take a single-threaded matrix-vector path for one row. Prefill-sized
/// inputs go to gemm, which threads them itself.
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let rows = x.dim(0)?;
    let cpu_f32 = fused::fusable(x) && crate::kernels::fused::fusable(w);
    if rows <= SMALL_ROWS && cpu_f32 {
        return small_rows_matmul(&x.contiguous()?, &w.contiguous()?);
    }
    if rows <= WEIGHT_LEFT_ROWS && cpu_f32 && w.is_contiguous() {
        // gemm vectorises over its left operand's rows and packs the right one on every call:
        // with the weight on the right that is a copy of the whole weight for a few hundred
        // rows of work. `w @ x^T` packs x instead (128 rows, out 1408: 0.72 against 1.01 ms),
        // and the (out, rows) result is transposed back.
        let yt = w.matmul(&x.t()?)?;
        return transpose(&yt);
    }
    Ok(x.matmul(&w.t()?)?)
}

/// Row count up to which [`matmul_t`] puts the weight on gemm's left. At 1024 rows both
/// orders took the same time.
const WEIGHT_LEFT_ROWS: usize = 512;

/// A contiguous 2-D f32 CPU tensor transposed into a new contiguous one
/// ([`crate::kernels::small_rows::transpose`]). candle's strided copy took 11 ms for a (1408, 1024)
/// transpose.
fn transpose(t: &Tensor) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let (guard, layout) = t.storage_and_layout();
    let src = fused::cpu_f32(&guard, layout)
        .filter(|_| layout.is_contiguous())
        .and_then(|d| d.get(..rows * cols))
        .ok_or_else(|| ModelError::Kernel("transpose: not a contiguous f32 CPU tensor".into()))?;
    let dst = small_rows::transpose(src, rows, cols, true);
    drop(guard);
    Ok(Tensor::from_vec(dst, (cols, rows), t.device())?)
}

/// Row count up to which [`matmul_t`] uses its own kernel.
pub(crate) const SMALL_ROWS: usize = 32;

fn small_rows_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out, k_w) = w.dims2()?;
    fused::with_f32(w, "matmul weight", |ws| {
        small_rows::product(
            x,
            &small_rows::Weight {
                values: ws,
                scales: None,
            },
            out,
            k_w,
        )
    })
}

/// Whether two f32 tensors agree within 1e-4 everywhere (the matmul tests' tolerance).
#[cfg(test)]
pub(crate) fn close(a: &Tensor, b: &Tensor) -> bool {
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff < 1e-4
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Each of matmul_t's paths (the decode kernel, the weight on gemm's left with the
    /// transpose back, plain gemm) equals gemm, on shapes that are not multiples of the
    /// kernel's 16-wide sums, 64-column tasks or the transpose's 32-wide tiles.
    #[test]
    fn small_row_matmul_matches_gemm() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (203, 37), &dev)?;
        for rows in [1, 3, 32, 33, 100, 513] {
            let x = Tensor::randn(0f32, 1.0, (rows, 37), &dev)?;
            assert!(close(&matmul_t(&x, &w)?, &x.matmul(&w.t()?)?), "{rows} rows");
        }
        let bad = Tensor::zeros((2, 5), candle_core::DType::F32, &dev)?;
        assert!(matmul_t(&bad, &w).is_err(), "mismatched features are an error");
        Ok(())
    }
}
