//! NF4 with double quantization (QLoRA paper, Dettmers et al. 2023), for the frozen base.
//!
//! Why NF4 rather than candle's k-quants: k-quant matmuls are custom ops without a backward,
//! so gradients could not flow through the base to earlier layers' adapters; and NF4 is what
//! PEFT users mean by QLoRA, so adapters trained here behave like theirs. The weight stays
//! packed (two 4-bit codes per byte) and is expanded to f32 only for the one matmul that uses
//! it, and again for that matmul's backward product (`linear::frozen_matmul`), so gradients
//! flow through the base while no step holds more than one expanded weight at a time.
//!
//! Layout: blocks of 64 weights share one absmax. Double quantization stores those absmaxes
//! as int8 around their mean, with one f32 scale per 256 absmaxes: 4 + 8/64 + 32/(64*256)
//! ≈ 4.13 bits per weight. (The paper's second level uses an 8-bit float map; a linear int8
//! map is simpler and its error is far below the 4-bit codes' own.)

use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

pub const BLOCK: usize = 64;
pub const ABSMAX_BLOCK: usize = 256;

/// The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
const LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

#[derive(Debug, Clone)]
pub struct Nf4Tensor {
    /// Two codes per byte, low nibble first.
    codes: Vec<u8>,
    absmax_q: Vec<i8>,
    absmax_scale: Vec<f32>,
    absmax_offset: f32,
    dims: Vec<usize>,
    device: Device,
}

impl Nf4Tensor {
    pub fn quantize(t: &Tensor) -> Result<Self> {
        let dims = t.dims().to_vec();
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if values.len() % BLOCK != 0 {
            return Err(ModelError::Adapter(format!(
                "cannot quantize a tensor of shape {dims:?} to NF4: {} elements is not a multiple of {BLOCK}",
                values.len()
            )));
        }
        let absmax: Vec<f32> =
            values.chunks(BLOCK).map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs()))).collect();
        let mut codes = vec![0u8; values.len().div_ceil(2)];
        for (i, v) in values.iter().enumerate() {
            let m = absmax[i / BLOCK];
            let x = if m > 0.0 { v / m } else { 0.0 };
            let code = nearest_level(x);
            codes[i / 2] |= code << (4 * (i % 2));
        }
        let absmax_offset = absmax.iter().sum::<f32>() / absmax.len() as f32;
        let mut absmax_q = Vec::with_capacity(absmax.len());
        let mut absmax_scale = Vec::with_capacity(absmax.len().div_ceil(ABSMAX_BLOCK));
        for chunk in absmax.chunks(ABSMAX_BLOCK) {
            let range = chunk.iter().fold(0.0f32, |m, a| m.max((a - absmax_offset).abs()));
            let scale = if range > 0.0 { range / 127.0 } else { 1.0 };
            absmax_scale.push(scale);
            absmax_q.extend(chunk.iter().map(|a| ((a - absmax_offset) / scale).round().clamp(-127.0, 127.0) as i8));
        }
        Ok(Self { codes, absmax_q, absmax_scale, absmax_offset, dims, device: t.device().clone() })
    }

    /// Expands to an f32 tensor of the original shape.
    pub fn dequantize(&self) -> Result<Tensor> {
        // QLoRA expands every weight twice a step (forward and backward product), so this runs
        // on all cores: one task per group of blocks sharing a second-level scale.
        let mut out = vec![0f32; self.absmax_q.len() * BLOCK];
        out.par_chunks_mut(BLOCK * ABSMAX_BLOCK).enumerate().for_each(|(group, values)| {
            for (j, block_values) in values.chunks_mut(BLOCK).enumerate() {
                let block = group * ABSMAX_BLOCK + j;
                let absmax = self.absmax_q[block] as f32 * self.absmax_scale[group] + self.absmax_offset;
                for (k, v) in block_values.iter_mut().enumerate() {
                    let i = block * BLOCK + k;
                    let code = (self.codes[i / 2] >> (4 * (i % 2))) & 0x0f;
                    *v = LEVELS[code as usize] * absmax;
                }
            }
        });
        Ok(Tensor::from_vec(out, self.dims.as_slice(), &self.device)?)
    }

    /// Bytes held for this weight (codes and both quantization levels).
    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + self.absmax_q.len() + 4 * self.absmax_scale.len() + 4
    }

    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }
}

fn nearest_level(x: f32) -> u8 {
    let mut best = 0;
    for (i, level) in LEVELS.iter().enumerate() {
        if (x - level).abs() < (x - LEVELS[best]).abs() {
            best = i;
        }
    }
    best as u8
}

/// Loader hook that quantizes every projection weight as it is read.
pub struct Nf4Store;

impl crate::linear::WeightStore for Nf4Store {
    fn store(&self, dense: Tensor) -> Result<crate::linear::BaseWeight> {
        Ok(crate::linear::BaseWeight::Nf4(Nf4Tensor::quantize(&dense)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_small_and_storage_is_about_four_bits() -> Result<()> {
        let t = Tensor::randn(0f32, 0.02, (128, 256), &Device::Cpu)?;
        let q = Nf4Tensor::quantize(&t)?;
        let back = q.dequantize()?;
        let err = (back - &t)?.abs()?.mean_all()?.to_scalar::<f32>()?;
        let mean = t.abs()?.mean_all()?.to_scalar::<f32>()?;
        assert!(err < 0.12 * mean, "mean abs error {err} vs mean abs value {mean}");
        let bits = 8.0 * q.storage_bytes() as f64 / q.elem_count() as f64;
        assert!(bits < 4.2, "{bits} bits per weight");
        Ok(())
    }
}
