//! LoRA dropout's mask from a counter-based generator: the same values on every device.
//!
//! Why not candle's `Tensor::rand`: a mask that a backward or a recomputed part draws again
//! needs its generator re-seeded, and candle re-seeds a GPU by creating a new cuRAND generator
//! and freeing the old one (a free waits for the device): once per projection, forward and
//! backward, of every micro-batch, at the trainer's default dropout of 0.05. Here element `i`
//! of a stream is a function of the stream and `i` alone (SplitMix64's output `i + 1`), so any
//! rows are drawn on their own, in any order, without state: on a GPU by our kernel
//! (`cuda/dropout.cu`, compiled to PTX by `build.rs`), elsewhere on the host, with the same
//! values. `kubetune-device-check` compares the two on a GPU.

use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Whether element `index` of `stream` is dropped: SplitMix64's output `index + 1` from seed
/// `stream`, its top 24 bits as the draw, below `threshold`.
pub(crate) fn dropped(stream: u64, index: u64, threshold: u32) -> bool {
    let mut z = stream.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as u32) < threshold
}

/// The 24-bit draws below this are dropped at probability `p`: a draw k stands for k / 2^24,
/// and k / 2^24 < p exactly when k < ceil(p 2^24).
pub(crate) fn threshold(p: f64) -> u32 {
    (p.clamp(0.0, 1.0) * (1u64 << 24) as f64).ceil() as u32
}

/// Elements `first..first + n` of `stream`'s mask at probability `p`: 0, or 1/(1-p) for those
/// kept.
pub(crate) fn host_values(stream: u64, first: u64, n: usize, p: f64) -> Vec<f32> {
    let (cut, keep) = (threshold(p), (1.0 / (1.0 - p)) as f32);
    (0..n)
        .into_par_iter()
        .with_min_len(1 << 14)
        .map(|i| {
            if dropped(stream, first + i as u64, cut) {
                0.0
            } else {
                keep
            }
        })
        .collect()
}

/// Elements `first..first + rows * cols` of `stream`'s mask as a (rows, cols) f32 tensor on
/// `device`: drawn there on a GPU, on the host otherwise.
pub(crate) fn mask(stream: u64, first: u64, (rows, cols): (usize, usize), p: f64, device: &Device) -> Result<Tensor> {
    let n = rows * cols;
    if n == 0 || !(device.is_cpu() || device.is_cuda()) {
        let values = host_values(stream, first, n, p);
        return Ok(Tensor::from_vec(values, (rows, cols), &Device::Cpu)?.to_device(device)?);
    }
    let op = DropoutMask { stream, first, n, p };
    // The op reads no input: this one-byte tensor only says which device it runs on.
    let on = Tensor::zeros(1, DType::U8, device)?;
    Ok(on.apply_op1_no_bwd(&op)?.reshape((rows, cols))?)
}

struct DropoutMask {
    stream: u64,
    first: u64,
    n: usize,
    p: f64,
}

impl CustomOp1 for DropoutMask {
    fn name(&self) -> &'static str {
        "dropout-mask"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let values = host_values(self.stream, self.first, self.n, self.p);
        Ok((CpuStorage::F32(values), Shape::from(self.n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        on: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx"));
        let dev = on.device();
        let func = dev.get_or_load_custom_func("kubetune_dropout_mask", "kubetune_dropout", PTX)?;
        // SAFETY: the kernel writes every one of the n elements.
        let out = unsafe { dev.alloc::<f32>(self.n) }?;
        let keep = (1.0 / (1.0 - self.p)) as f32;
        let mut builder = func.builder();
        builder.arg(&out);
        candle_core::builder_arg!(builder, self.stream, self.first, self.n as u64, threshold(self.p), keep);
        // SAFETY: the arguments are those of kubetune_dropout_mask in cuda/dropout.cu, in order.
        unsafe { builder.launch(LaunchConfig::for_num_elems(self.n as u32)) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(self.n),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64 from seed 1234567 (its reference outputs), read as draws: the first output
    /// is 6457827717110365317, whose top 24 bits are 5873360.
    #[test]
    fn the_draws_are_splitmix64s_outputs() {
        let top = 6457827717110365317u64 >> 40;
        assert_eq!(top, 5873360);
        assert!(dropped(1234567, 0, top as u32 + 1));
        assert!(!dropped(1234567, 0, top as u32));
    }

    /// About p of a large mask is dropped, the rest scaled by 1/(1-p); no draw is dropped at
    /// p = 0; and any range of a stream equals that range of a longer draw.
    #[test]
    fn a_mask_drops_about_p_and_ranges_agree_with_longer_draws() -> Result<()> {
        let values = host_values(99, 0, 100_000, 0.1);
        let dropped = values.iter().filter(|&&v| v == 0.0).count() as f64 / values.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "{dropped}");
        assert!(values.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        assert!(host_values(99, 0, 1000, 0.0).iter().all(|&v| v == 1.0));
        assert_eq!(host_values(99, 700, 300, 0.1), values[700..1000]);
        let on = mask(99, 700, (3, 100), 0.1, &Device::Cpu)?;
        assert_eq!(on.dims(), [3, 100]);
        assert_eq!(on.flatten_all()?.to_vec1::<f32>()?, values[700..1000]);
        assert_eq!(mask(99, 0, (0, 5), 0.1, &Device::Cpu)?.dims(), [0, 5]);
        Ok(())
    }
}
