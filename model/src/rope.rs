//! Rotary position embeddings with the frequency scalings the config may ask for.

use crate::config::Config;
use crate::error::Result;
use candle_core::{Device, Tensor};

/// Inverse frequencies, already scaled; positions are multiplied by them at each forward.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// The RoPE of the config's full-attention layers: `rope_theta`, scaled by `rope_scaling`.
    pub fn new(config: &Config) -> Self {
        let base = base_frequencies(config.head_dim(), config.rope_theta);
        let inv_freq = match &config.rope_scaling {
            None => base,
            Some(s) => match s.rope_type.as_str() {
                "linear" => base.iter().map(|f| f / s.factor).collect(),
                // Config::validate guarantees the llama3 fields are present.
                "llama3" => llama3_scale(
                    &base,
                    s.factor,
                    s.low_freq_factor.unwrap_or(1.0),
                    s.high_freq_factor.unwrap_or(4.0),
                    s.original_max_position_embeddings.unwrap_or(8192) as f64,
                ),
                _ => base,
            },
        };
        Self {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
        }
    }

    /// The RoPE of Gemma 3's sliding layers: `rope_local_base_freq`, never scaled (the
    /// config falls back to `rope_theta` when it has no local base).
    pub fn local(config: &Config) -> Self {
        let theta = config.rope_local_base_freq.unwrap_or(config.rope_theta);
        Self {
            inv_freq: base_frequencies(config.head_dim(), theta)
                .into_iter()
                .map(|f| f as f32)
                .collect(),
        }
    }

    /// (cos, sin) for positions offset..offset+len, each of shape (len, head_dim / 2).
    pub fn tables(&self, offset: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(len * half);
        for p in offset..offset + len {
            angles.extend(self.inv_freq.iter().map(|f| p as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (len, half), device)?;
        Ok((angles.cos()?, angles.sin()?))
    }

    /// (cos, sin) for one position per row of a decode batch, each (rows, 1, head_dim / 2): the
    /// layout candle's fused rope takes for per-row positions.
    pub fn tables_at(&self, positions: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &self.inv_freq {
                // The same f32 product as `tables`, so both paths rotate identically.
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (positions.len(), 1, half);
        Ok((
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        ))
    }
}

/// theta^(-2i/dim) for each pair of features.
fn base_frequencies(dim: usize, theta: f64) -> Vec<f64> {
    (0..dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / dim as f64))
        .collect()
}

/// Llama 3.1's scaling: long wavelengths are slowed by `factor`, short ones kept, and the band
/// between is interpolated smoothly.
fn llama3_scale(base: &[f64], factor: f64, low: f64, high: f64, original: f64) -> Vec<f64> {
    let low_wavelen = original / low;
    let high_wavelen = original / high;
    base.iter()
        .map(|&freq| {
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                freq
            } else if wavelen > low_wavelen {
                freq / factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 - smooth) * freq / factor + smooth * freq
            }
        })
        .collect()
}

/// Applies RoPE in HF's "rotate half" layout to x of shape (batch, heads, seq, head_dim),
/// with `cos` and `sin` of shape (seq, head_dim / 2). Differentiable: f32 on the CPU takes our
/// fused kernel; anything else candle's fused kernel, with [`RopeBackward`] in a graph.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if crate::kernels::fused::fusable(x) {
        return Ok(crate::kernels::fused::rope(x, cos, sin)?);
    }
    let y = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, cos, sin)?;
    Ok(crate::custom_grad::with_backward(
        x,
        y,
        RopeBackward {
            cos: cos.clone(),
            sin: sin.clone(),
        },
    )?)
}

/// RoPE rotates each pair of features by a position's angle, so its backward rotates the
/// gradient back: the same kernel with the sine negated. The basic ops it replaces kept half a
/// dozen copies of q and k for the backward and launched nine kernels each way.
struct RopeBackward {
    cos: Tensor,
    sin: Tensor,
}

impl crate::custom_grad::Backward for RopeBackward {
    const NAME: &'static str = "rope";

    fn backward(&self, _x: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::rotary_emb::rope(&grad.contiguous()?, &self.cos, &self.sin.neg()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_slows_low_frequencies() {
        let base = [1.0, 1e-2, 1e-4];
        let scaled = llama3_scale(&base, 8.0, 1.0, 4.0, 8192.0);
        assert_eq!(scaled[0], 1.0);
        assert!((scaled[2] - 1e-4 / 8.0).abs() < 1e-12);
    }
    /// candle's kernel with our backward against the rotation built from basic ops, in f64 (off
    /// the f32 CPU path, and exact enough to compare tightly): output and input gradient.
    #[test]
    fn the_rope_backward_rotates_the_gradient_back() {
        use candle_core::{DType, Var, D};
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap(),
        )
        .unwrap();
        let angles = Tensor::randn(0f64, 1.0, (5, 4), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let plain = {
            let x1 = x.narrow(D::Minus1, 0, 4).unwrap();
            let x2 = x.narrow(D::Minus1, 4, 4).unwrap();
            let a = (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
            let b = (x2.broadcast_mul(&cos).unwrap() + x1.broadcast_mul(&sin).unwrap()).unwrap();
            Tensor::cat(&[a, b], D::Minus1).unwrap()
        };
        let fused = apply(&x, &cos, &sin).unwrap();
        let w = Tensor::randn(0f64, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!(max_diff(&fused, &plain) < 1e-9);
        let g_plain = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g_fused = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g_fused.get(&x).unwrap(), g_plain.get(&x).unwrap()) < 1e-9);
    }
}
