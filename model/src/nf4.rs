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
    /// The dtype expansions come out in: the dense weight's.
    dtype: DType,
    /// The codes and absmaxes as tensors on the device, for every base but f32 on the CPU:
    /// there the hand-written expansion into host memory is the fast path; anywhere else (a GPU,
    /// or bf16) a weight is expanded where it is used by tensor ops, and nothing crosses PCIe.
    on_device: Option<DeviceCodes>,
}

/// [`Nf4Tensor`]'s data on its device: the packed codes (u8, two per byte, low nibble first),
/// one f32 absmax per block (the double quantization undone once at load), and the levels of
/// both codes of each of the 256 bytes, (256, 2).
#[derive(Debug, Clone)]
struct DeviceCodes {
    codes: Tensor,
    absmax: Tensor,
    byte_levels: Tensor,
}

/// Both levels of each byte value, low nibble first: a byte's two weights in one lookup.
fn byte_levels() -> Vec<f32> {
    (0..=255u8)
        .flat_map(|b| [LEVELS[(b & 15) as usize], LEVELS[(b >> 4) as usize]])
        .collect()
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
        let absmax: Vec<f32> = values
            .chunks(BLOCK)
            .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())))
            .collect();
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
            absmax_q.extend(
                chunk
                    .iter()
                    .map(|a| ((a - absmax_offset) / scale).round().clamp(-127.0, 127.0) as i8),
            );
        }
        Self {
            codes,
            absmax_q,
            absmax_scale,
            absmax_offset,
            dims,
            device: t.device().clone(),
            dtype: DType::F32,
            on_device: None,
        }
        .expanding_to(t.dtype())
    }

    /// This weight, expanded to `dtype` from now on. The loader quantizes the checkpoint's f32
    /// values and then asks for the activations' dtype, so a bf16 base holds the same codes as
    /// an f32 one: quantizing bf16-rounded values would move some weights a whole level.
    /// Off the host path the packed codes live on the device alone: a GPU's QLoRA run held a
    /// second copy of the whole NF4 base in host memory.
    pub fn expanding_to(mut self, dtype: DType) -> Result<Self> {
        self.dtype = dtype;
        let host_path = self.device.is_cpu() && dtype == DType::F32;
        match (host_path, self.on_device.take()) {
            (true, Some(d)) => self.codes = d.codes.to_vec1::<u8>()?,
            (true, None) => {}
            (false, Some(d)) => self.on_device = Some(d),
            (false, None) => {
                self.on_device = Some(self.device_codes()?);
                self.codes = Vec::new();
            }
        }
        Ok(self)
    }

    fn device_codes(&self) -> Result<DeviceCodes> {
        let absmax: Vec<f32> = (0..self.absmax_q.len()).map(|b| self.absmax(b)).collect();
        Ok(DeviceCodes {
            codes: Tensor::from_slice(&self.codes, self.codes.len(), &self.device)?,
            absmax: Tensor::from_vec(absmax, self.absmax_q.len(), &self.device)?,
            byte_levels: Tensor::from_vec(byte_levels(), (256, 2), &self.device)?,
        })
    }

    /// The absmax of block `block`, its double quantization undone.
    fn absmax(&self, block: usize) -> f32 {
        self.absmax_q[block] as f32 * self.absmax_scale[block / ABSMAX_BLOCK] + self.absmax_offset
    }

    /// Elements `first..first + len` of the flattened weight, expanded on the device by tensor
    /// ops: the whole blocks that hold them are looked up a byte (two weights) at a time,
    /// scaled, and cut to the range. The lookup by byte keeps the temporaries at about 12 bytes a
    /// weight (the indices, f32 levels, their scaled copy, the result); unpacking the nibbles
    /// with float ops took twice that.
    fn expand_on_device(&self, d: &DeviceCodes, first: usize, len: usize) -> Result<Tensor> {
        let (b0, b1) = (first / BLOCK, (first + len).div_ceil(BLOCK));
        // As u32: candle's index_select reads the largest value of the index type as "no row"
        // and gives zeros for it, so a u8 index of 255 (two codes of 15) would expand to 0.
        let bytes = d
            .codes
            .narrow(0, b0 * BLOCK / 2, (b1 - b0) * BLOCK / 2)?
            .to_dtype(DType::U32)?;
        let values = d.byte_levels.index_select(&bytes, 0)?.reshape((b1 - b0, BLOCK))?;
        let values = values.broadcast_mul(&d.absmax.narrow(0, b0, b1 - b0)?.unsqueeze(1)?)?;
        Ok(values
            .flatten_all()?
            .narrow(0, first - b0 * BLOCK, len)?
            .to_dtype(self.dtype)?)
    }

    /// Expands to an f32 tensor of the original shape.
    pub fn dequantize(&self) -> Result<Tensor> {
        if let Some(d) = &self.on_device {
            return Ok(self
                .expand_on_device(d, 0, self.elem_count())?
                .reshape(self.dims.as_slice())?);
        }
        // QLoRA expands every weight twice a step (forward and backward product), so this runs
        // on all cores: one task per group of blocks sharing a second-level scale.
        let mut out = vec![0f32; self.elem_count()];
        let group = BLOCK * ABSMAX_BLOCK;
        out.par_chunks_mut(group)
            .enumerate()
            .for_each(|(g, values)| self.expand(g * group, values));
        Ok(Tensor::from_vec(out, self.dims.as_slice(), &self.device)?)
    }

    /// Rows `start..start + len` of a 2-D weight, expanded: (len, cols).
    pub fn dequantize_rows(&self, start: usize, len: usize) -> Result<Tensor> {
        let (rows, cols) = self.dims2()?;
        if start + len > rows {
            return Err(ModelError::ShapeMismatch(format!(
                "NF4 rows {start}..{} of a weight with {rows} rows",
                start + len
            )));
        }
        if let Some(d) = &self.on_device {
            return Ok(self
                .expand_on_device(d, start * cols, len * cols)?
                .reshape((len, cols))?);
        }
        let mut out = vec![0f32; len * cols];
        out.par_chunks_mut(cols)
            .with_min_len(8)
            .enumerate()
            .for_each(|(r, values)| self.expand((start + r) * cols, values));
        Ok(Tensor::from_vec(out, (len, cols), &self.device)?)
    }

    /// The rows of a 2-D table (an embedding) at `ids` (u32, one dimension), expanded:
    /// (ids, cols). Off the host path by tensor ops on the device, so the ids are not read back.
    pub fn gather_rows(&self, ids: &Tensor) -> Result<Tensor> {
        let (rows, cols) = self.dims2()?;
        if let Some(d) = &self.on_device {
            if cols % BLOCK != 0 {
                // Rows that split blocks: expanded whole (no model of ours has such a width).
                return Ok(self.dequantize()?.index_select(ids, 0)?);
            }
            // Whole blocks per row: a row's bytes and absmaxes are rows of their own tables.
            let n = ids.dim(0)?;
            let bytes = d.codes.reshape((rows, cols / 2))?.index_select(ids, 0)?;
            let values = d
                .byte_levels
                .index_select(&bytes.flatten_all()?.to_dtype(DType::U32)?, 0)?
                .reshape((n * cols / BLOCK, BLOCK))?;
            let absmax = d.absmax.reshape((rows, cols / BLOCK))?.index_select(ids, 0)?;
            let values = values.broadcast_mul(&absmax.flatten_all()?.unsqueeze(1)?)?;
            return Ok(values.reshape((n, cols))?.to_dtype(self.dtype)?);
        }
        let ids = ids.to_vec1::<u32>()?;
        if let Some(id) = ids.iter().find(|&&id| id as usize >= rows) {
            return Err(ModelError::TokenOutOfVocab(format!(
                "token id {id} is outside the embedding table of {rows} rows"
            )));
        }
        let mut out = vec![0f32; ids.len() * cols];
        out.par_chunks_mut(cols)
            .zip(ids.par_iter())
            .for_each(|(values, &id)| self.expand(id as usize * cols, values));
        Ok(Tensor::from_vec(out, (ids.len(), cols), &self.device)?.to_dtype(self.dtype)?)
    }

    /// Writes elements `first..first + out.len()` of the flattened weight, expanded, to `out`.
    fn expand(&self, first: usize, out: &mut [f32]) {
        let mut done = 0;
        while done < out.len() {
            // One piece per block (or the part of it in range), so one absmax serves it.
            let i = first + done;
            let block = i / BLOCK;
            let len = (BLOCK - i % BLOCK).min(out.len() - done);
            let absmax = self.absmax(block);
            for (k, v) in out[done..done + len].iter_mut().enumerate() {
                let j = i + k;
                let code = (self.codes[j / 2] >> (4 * (j % 2))) & 0x0f;
                *v = LEVELS[code as usize] * absmax;
            }
            done += len;
        }
    }

    pub(crate) fn dims2(&self) -> Result<(usize, usize)> {
        match self.dims.as_slice() {
            &[rows, cols] => Ok((rows, cols)),
            dims => Err(ModelError::ShapeMismatch(format!(
                "expected a 2-D NF4 weight, got shape {dims:?}"
            ))),
        }
    }

    /// Bytes held for this weight (codes and both quantization levels).
    pub fn storage_bytes(&self) -> usize {
        match &self.on_device {
            // Codes, one f32 absmax per block, and the levels of every byte.
            Some(d) => d.codes.elem_count() + 4 * d.absmax.elem_count() + 4 * d.byte_levels.elem_count(),
            None => self.codes.len() + self.absmax_q.len() + 4 * self.absmax_scale.len() + 4,
        }
    }

    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }
}

/// Weights of more elements than this are expanded a slice of rows at a time for a product:
/// the head of a 8192-token vocabulary at hidden 512 would be 16 MiB of f32 at once, more than
/// its NF4 form saves. The benchmark model's projections stay below and expand whole; a 7B
/// model's are sliced too.
const SLICE_ABOVE: usize = 1 << 20;
/// Elements per expanded slice (1 MiB of f32).
const SLICE_ELEMS: usize = 1 << 18;

impl Nf4Tensor {
    /// The row ranges expanded one at a time by [`Nf4Tensor::matmul_t`] and
    /// [`Nf4Tensor::grad_matmul`]: the whole weight, or slices of about [`SLICE_ELEMS`].
    pub(crate) fn row_slices(&self) -> Result<Vec<(usize, usize)>> {
        let (rows, _) = self.dims2()?;
        let per = self.rows_per_slice()?.max(1);
        Ok((0..rows)
            .step_by(per)
            .map(|start| (start, per.min(rows - start)))
            .collect())
    }

    /// Rows expanded at once: all of them, or about [`SLICE_ELEMS`] values' worth.
    fn rows_per_slice(&self) -> Result<usize> {
        let (rows, cols) = self.dims2()?;
        // On a GPU a product of a few hundred rows leaves most of the chip idle: slices there
        // are 16 times larger (8 MiB of bf16, about 40 MiB of temporaries), and weights up to
        // 16M values (a 7B model's MLP projections) expand whole. A head (32M values at
        // vocabulary 16k, hidden 2048) is sliced: expanded whole, its temporaries took more
        // than the whole NF4 base saved.
        let (above, elems) = match self.on_device {
            Some(_) => (SLICE_ABOVE << 4, SLICE_ELEMS << 4),
            None => (SLICE_ABOVE, SLICE_ELEMS),
        };
        Ok(if rows * cols > above {
            (elems / cols.max(1)).max(1)
        } else {
            rows
        })
    }

    /// Whether products expand this weight in slices rather than whole.
    pub(crate) fn is_sliced(&self) -> bool {
        match (self.dims2(), self.rows_per_slice()) {
            (Ok((rows, _)), Ok(per)) => per < rows,
            _ => false,
        }
    }

    /// `x @ w^T` for `x` (rows, in): (rows, out).
    pub(crate) fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        if !self.is_sliced() {
            return crate::kernels::matmul::matmul_t(x, &self.dequantize()?);
        }
        let (out, _) = self.dims2()?;
        if crate::kernels::fused::fusable(x) {
            let values = self.product_cpu(&x.contiguous()?)?;
            return Ok(Tensor::from_vec(values, (x.dim(0)?, out), x.device())?);
        }
        let parts = self
            .row_slices()?
            .into_iter()
            .map(|(start, len)| crate::kernels::matmul::matmul_t(x, &self.dequantize_rows(start, len)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// [`Nf4Tensor::matmul_t`] of a contiguous f32 CPU input, as the values of the (rows, out)
    /// result: each slice's product is copied into its columns.
    pub(crate) fn product_cpu(&self, x: &Tensor) -> Result<Vec<f32>> {
        let (n, _) = self.dims2()?;
        let m = x.dim(0)?;
        let mut out = vec![0f32; m * n];
        for (start, len) in self.row_slices()? {
            let y = crate::kernels::matmul::matmul_t(x, &self.dequantize_rows(start, len)?)?;
            crate::kernels::fused::with_f32(&y, "NF4 product", |part| {
                for (row, values) in out.chunks_mut(n).zip(part.chunks(len)) {
                    row[start..start + len].copy_from_slice(values);
                }
                Ok(())
            })?;
        }
        Ok(out)
    }

    /// `grad @ w` for `grad` (rows, out): the input's gradient of [`Nf4Tensor::matmul_t`].
    pub(crate) fn grad_matmul(&self, grad: &Tensor) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for (start, len) in self.row_slices()? {
            let g = if len == grad.dim(1)? {
                grad.clone()
            } else {
                grad.narrow(1, start, len)?.contiguous()?
            };
            let part = g.matmul(&self.dequantize_rows(start, len)?)?;
            crate::row_chunks::accumulate(&mut sum, part)?;
        }
        sum.ok_or_else(|| ModelError::ShapeMismatch("NF4 product with an empty weight".into()))
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

    /// Rows expanded alone, and rows gathered by id (an embedding lookup), equal those rows of
    /// the whole expansion; ranges that do not start or end on a block boundary included.
    #[test]
    fn row_ranges_and_gathered_rows_equal_the_whole_expansion() -> Result<()> {
        let t = Tensor::randn(0f32, 0.02, (40, 96), &Device::Cpu)?;
        let q = Nf4Tensor::quantize(&t)?;
        let whole = q.dequantize()?;
        let same = |a: &Tensor, b: &Tensor| -> Result<bool> { Ok(a.eq(b)?.min_all()?.to_scalar::<u8>()? == 1) };
        assert!(same(&q.dequantize_rows(3, 17)?, &whole.narrow(0, 3, 17)?)?);
        assert!(same(&q.dequantize_rows(0, 40)?, &whole)?);
        let ids = [5u32, 0, 39, 5, 22];
        let ids_t = Tensor::new(&ids, &Device::Cpu)?;
        assert!(same(&q.gather_rows(&ids_t)?, &whole.index_select(&ids_t, 0)?)?);
        assert!(q.dequantize_rows(30, 11).is_err(), "rows past the end");
        let past = Tensor::new(&[1u32, 40], &Device::Cpu)?;
        let err = q.gather_rows(&past).expect_err("an id past the table").to_string();
        assert!(err.contains("token id 40") && err.contains("40 rows"), "{err}");
        Ok(())
    }
    /// A bf16 base (or any base off the f32 CPU path) expands by tensor ops on its device; the
    /// result equals the host expansion of the same weight, rounded to bf16, for whole weights
    /// and for row ranges that cut blocks.
    #[test]
    fn the_tensor_op_expansion_equals_the_host_expansion() -> Result<()> {
        // Large enough to hold every byte value, 255 (two codes of 15) among them.
        let t = Tensor::randn(0f32, 0.02, (512, 1408), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let on_device = Nf4Tensor::quantize(&t)?;
        let host = Nf4Tensor::quantize(&t.to_dtype(DType::F32)?)?;
        let device_codes = on_device.on_device.as_ref().expect("codes on the device");
        assert!(host.on_device.is_none());
        assert!(on_device.codes.is_empty(), "no second copy of the codes on the host");
        let bytes = device_codes.codes.to_vec1::<u8>()?;
        assert!(bytes.contains(&255), "the weight holds the byte 255");
        let same = |a: Tensor, b: Tensor| -> Result<bool> {
            Ok(a.to_dtype(DType::F32)?
                .eq(&b.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)?
                .min_all()?
                .to_scalar::<u8>()?
                == 1)
        };
        assert_eq!(on_device.dequantize()?.dtype(), DType::BF16);
        assert!(same(on_device.dequantize()?, host.dequantize()?)?);
        assert!(same(on_device.dequantize_rows(3, 17)?, host.dequantize_rows(3, 17)?)?);
        let ids = Tensor::new(&[5u32, 0, 39, 511], &Device::Cpu)?;
        assert!(same(on_device.gather_rows(&ids)?, host.gather_rows(&ids)?)?);
        // Rows that split blocks (96 values) take the whole expansion.
        let narrow = Tensor::randn(0f32, 0.02, (40, 96), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let (narrow_device, narrow_host) = (
            Nf4Tensor::quantize(&narrow)?,
            Nf4Tensor::quantize(&narrow.to_dtype(DType::F32)?)?,
        );
        let ids = Tensor::new(&[5u32, 0, 39], &Device::Cpu)?;
        assert!(same(narrow_device.gather_rows(&ids)?, narrow_host.gather_rows(&ids)?)?);
        // Back on the host path, the codes come back from the device.
        let back = on_device.expanding_to(DType::F32)?;
        assert_eq!(back.codes, host.codes);
        assert!(same(back.dequantize()?.to_dtype(DType::BF16)?, host.dequantize()?)?);
        Ok(())
    }
}
