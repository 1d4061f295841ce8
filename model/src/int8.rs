//! int8 weights for serving (`kubetune-server --quantize int8`).
//!
//! Why: decoding one sequence reads every weight once per token, so its speed is the memory
//! bandwidth divided by the weights' bytes; int8 reads a quarter of f32's. On CPUs with
//! AVX-512 VNNI the products quantize their inputs per row too and multiply in int8
//! (`kernels::vnni`); elsewhere inputs stay f32, the weight is expanded in registers
//! (`kernels::small_rows`) for decode-sized inputs and to f32 for one gemm for prefill-sized ones.
//!
//! Layout: one f32 scale per output row (absmax / 127) and the row's values rounded to the
//! nearest of -127..=127; the round-trip error is at most half a step, absmax / 254, per
//! weight. Per-row rather than per-block scales keep the kernels' inner loops plain
//! multiply-adds (the scale is applied once per output).

use crate::error::{ModelError, Result};
use crate::kernels::small_rows::{self, Weight};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Int8Tensor {
    /// (out, k), row-major. Shared, so clones are cheap as a Tensor's are.
    values: Arc<[i8]>,
    /// One per output row.
    scales: Arc<[f32]>,
    /// `128 * sum` of each row, for the int8-input kernel ([`crate::kernels::vnni`]).
    compensation: Arc<[i32]>,
    out: usize,
    k: usize,
    device: Device,
}

impl Int8Tensor {
    /// Quantizes a 2-D weight (out, k).
    pub fn quantize(t: &Tensor) -> Result<Self> {
        let (out, k) = t.dims2()?;
        let dense = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(i) = dense.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::Quantize(format!(
                "cannot quantize a weight of shape ({out}, {k}) to int8: element ({}, {}) is {}",
                i / k.max(1),
                i % k.max(1),
                dense[i]
            )));
        }
        let mut values = vec![0i8; out * k];
        let mut scales = vec![0f32; out];
        if k > 0 {
            values
                .par_chunks_mut(k)
                .zip(dense.par_chunks(k))
                .zip(scales.par_iter_mut())
                .for_each(|((q, row), scale)| {
                    let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    // An all-zero row keeps scale 1: its values are zero either way.
                    *scale = if absmax > 0.0 { absmax / 127.0 } else { 1.0 };
                    q.iter_mut()
                        .zip(row)
                        .for_each(|(q, v)| *q = (v / *scale).round().clamp(-127.0, 127.0) as i8);
                });
        }
        let compensation = crate::kernels::vnni::compensation(&values, k);
        Ok(Self {
            values: values.into(),
            scales: scales.into(),
            compensation: compensation.into(),
            out,
            k,
            device: t.device().clone(),
        })
    }

    /// The f32 weight the int8 values stand for.
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut dense = vec![0f32; self.out * self.k];
        if self.k > 0 {
            dense
                .par_chunks_mut(self.k)
                .zip(self.values.par_chunks(self.k))
                .zip(&self.scales[..])
                .for_each(|((d, q), s)| {
                    d.iter_mut().zip(q).for_each(|(d, q)| *d = *q as f32 * s);
                });
        }
        Ok(Tensor::from_vec(dense, (self.out, self.k), &self.device)?)
    }

    pub fn storage_bytes(&self) -> usize {
        self.values.len() + self.scales.len() * 4
    }

    /// `x @ w^T` for `x` (rows, k) of f32 on the CPU, reading the int8 values directly; None
    /// for other inputs, which the caller multiplies with [`Int8Tensor::dequantize`].
    ///
    /// With AVX-512 VNNI every row count takes [`crate::kernels::vnni`], which quantizes the input rows
    /// too; without it, decode-sized inputs (up to `small_rows_limit` rows) take
    /// [`crate::kernels::small_rows`] with f32 inputs.
    pub(crate) fn matmul_t(&self, x: &Tensor, small_rows_limit: usize) -> Result<Option<Tensor>> {
        if !crate::kernels::fused::fusable(x) || !self.device.is_cpu() {
            return Ok(None);
        }
        let (rows, k) = x.dims2()?;
        if k != self.k {
            return Err(ModelError::ShapeMismatch(format!(
                "matmul: input has {k} features, the weight {}",
                self.k
            )));
        }
        if crate::kernels::vnni::available() {
            // Read in place: a copy of a prefill's input cost as much as quantizing it.
            let w = crate::kernels::vnni::Int8Weight {
                values: &self.values,
                scales: &self.scales,
                compensation: &self.compensation,
            };
            let y = crate::kernels::fused::with_f32(x, "int8 product input", |xs| {
                crate::kernels::vnni::matmul_t(xs, rows, &w, self.out, self.k)
            })?;
            return Ok(Some(Tensor::from_vec(y, (rows, self.out), x.device())?));
        }
        if rows > small_rows_limit {
            return Ok(None);
        }
        let w = Weight {
            values: &self.values,
            scales: Some(&self.scales),
        };
        Ok(Some(small_rows::product(x, &w, self.out, self.k)?))
    }

    /// [`crate::kernels::small_rows`] with f32 inputs, whatever the CPU: the kernel the int8-input one
    /// replaces, for comparisons.
    #[cfg(test)]
    pub(crate) fn matmul_t_f32_inputs(&self, x: &Tensor) -> Result<Tensor> {
        let w = Weight {
            values: &self.values,
            scales: Some(&self.scales),
        };
        small_rows::product(x, &w, self.out, self.k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every weight comes back within half a quantization step of its row, and the product
    /// equals the one with the expanded weight.
    #[test]
    fn round_trip_error_is_at_most_half_a_step() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 70), &dev)?;
        let zero_row = Tensor::zeros((1, 70), DType::F32, &dev)?;
        let w = Tensor::cat(&[&w, &zero_row], 0)?;
        let q = Int8Tensor::quantize(&w)?;
        assert_eq!(q.storage_bytes(), 38 * 70 + 38 * 4);
        let back = q.dequantize()?;
        let rows = w.to_vec2::<f32>()?;
        for (r, (orig, got)) in rows.iter().zip(back.to_vec2::<f32>()?).enumerate() {
            let step = orig.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in orig.iter().zip(&got) {
                assert!((a - b).abs() <= step / 2.0 + 1e-6, "row {r}: {a} came back as {b}");
            }
        }
        let x = Tensor::randn(0f32, 1.0, (3, 70), &dev)?;
        let direct = q.matmul_t_f32_inputs(&x)?;
        let expanded = x.matmul(&back.t()?)?;
        let diff = (direct - expanded)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "kernel and expanded weight differ by {diff}");
        Ok(())
    }

    #[test]
    fn non_finite_weights_are_an_error_naming_the_element() -> Result<()> {
        let w = Tensor::new(&[[1f32, 2.0], [f32::NAN, 0.0]], &Device::Cpu)?;
        let err = Int8Tensor::quantize(&w).expect_err("NaN must not quantize").to_string();
        assert!(err.contains("(1, 0)") && err.contains("NaN"), "{err}");
        Ok(())
    }
}
