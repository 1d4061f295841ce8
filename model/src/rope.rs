//! Rotary position embeddings with the frequency scalings the config may ask for.

use crate::config::Config;
use crate::error::Result;
use candle_core::{Device, Tensor, D};

/// Inverse frequencies, already scaled; positions are multiplied by them at each forward.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(config: &Config) -> Self {
        let dim = config.head_dim();
        let base: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / config.rope_theta.powf(2.0 * i as f64 / dim as f64))
            .collect();
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
/// fused kernel, anything else basic ops (candle's fused rope has no backward).
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if crate::fused::fusable(x) {
        return Ok(crate::fused::rope(x, cos, sin)?);
    }
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[a, b], D::Minus1)?)
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
}
