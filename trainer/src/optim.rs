//! AdamW over the adapter variables only, the learning-rate schedule and gradient clipping.
//! Written here rather than taken from candle-nn because checkpoints need the moment
//! estimates, which candle-nn's optimizer keeps private.

use crate::config::Scheduler;
use crate::error::Result;
use candle_core::{Tensor, Var};
use kubetune_model::lora::NamedVar;
use std::collections::BTreeMap;

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken so far (bias correction uses it).
    pub steps: u64,
    params: Vec<Param>,
}

struct Param {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

impl AdamW {
    pub fn new(vars: &[NamedVar], weight_decay: f64) -> Result<Self> {
        let params = vars
            .iter()
            .map(|nv| {
                Ok(Param {
                    name: nv.name.clone(),
                    var: nv.var.clone(),
                    m: nv.var.zeros_like()?,
                    v: nv.var.zeros_like()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            steps: 0,
            params,
        })
    }

    /// One update with `grads` (keyed by variable name) at learning rate `lr`:
    /// decoupled weight decay, then the bias-corrected Adam step.
    pub fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let c1 = 1.0 - self.beta1.powi(t);
        let c2 = 1.0 - self.beta2.powi(t);
        for p in &mut self.params {
            let Some(g) = grads.get(&p.name) else { continue };
            p.m = ((&p.m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            p.v = ((&p.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&p.m / c1)? / ((&p.v / c2)?.sqrt()? + self.eps)?)?;
            let decayed = (p.var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            p.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Moment estimates under `{name}.exp_avg` / `{name}.exp_avg_sq` for checkpoints.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            out.insert(format!("{}.exp_avg", p.name), p.m.clone());
            out.insert(format!("{}.exp_avg_sq", p.name), p.v.clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`]; every parameter must be present.
    pub fn load_state(&mut self, mut state: BTreeMap<String, Tensor>, steps: u64) -> std::result::Result<(), String> {
        for p in &mut self.params {
            for (suffix, slot) in [("exp_avg", &mut p.m), ("exp_avg_sq", &mut p.v)] {
                let key = format!("{}.{suffix}", p.name);
                let t = state
                    .remove(&key)
                    .ok_or_else(|| format!("optimizer state lacks {key}"))?;
                if t.dims() != slot.dims() {
                    return Err(format!(
                        "optimizer state {key} has shape {:?}, expected {:?}",
                        t.dims(),
                        slot.dims()
                    ));
                }
                *slot = t;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Learning rate for optimizer step `step` (0-based) of `total`. Warmup rises linearly to the
/// peak reaching it at step `warmup - 1` (so the first step already moves), then the schedule
/// decays from the peak towards 0 at `total`.
pub fn learning_rate(peak: f64, scheduler: Scheduler, warmup: u64, step: u64, total: u64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match scheduler {
        Scheduler::Constant => peak,
        Scheduler::Linear => peak * (1.0 - progress),
        Scheduler::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// Scales the gradients so their global L2 norm is at most `max_norm` (0: no clipping);
/// returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    // Summed on the device and read once: one read per gradient waited on the GPU 224 times
    // a step for a LoRA on all projections of 16 layers.
    let mut sum: Option<Tensor> = None;
    for g in grads.values() {
        let part = g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?;
        sum = Some(match sum {
            Some(s) => (s + part)?,
            None => part,
        });
    }
    let norm = match sum {
        Some(s) => s.to_scalar::<f64>()?.sqrt(),
        None => 0.0,
    };
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_decay_to_zero() {
        let lr = |s, step| learning_rate(1.0, s, 2, step, 10);
        assert_eq!(lr(Scheduler::Linear, 0), 0.5);
        assert_eq!(lr(Scheduler::Linear, 1), 1.0);
        assert_eq!(lr(Scheduler::Linear, 2), 1.0);
        assert_eq!(lr(Scheduler::Linear, 6), 0.5);
        assert!((lr(Scheduler::Cosine, 6) - 0.5).abs() < 1e-12);
        assert_eq!(lr(Scheduler::Constant, 9), 1.0);
        assert!(lr(Scheduler::Cosine, 9) < 0.05);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_against_the_gradient_sign() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -1.0], &dev)?)?;
        let mut opt = AdamW::new(
            &[NamedVar {
                name: "w".into(),
                var: var.clone(),
            }],
            0.1,
        )?;
        let grads = BTreeMap::from([("w".to_string(), Tensor::new(&[0.5f32, -2.0], &dev)?)]);
        opt.step(&grads, 0.01)?;
        let w = var.as_tensor().to_vec1::<f32>()?;
        // decay: 1 * (1 - 0.001) = 0.999, then minus lr * sign(g).
        assert!((w[0] - (0.999 - 0.01)).abs() < 1e-5, "{w:?}");
        assert!((w[1] - (-0.999 + 0.01)).abs() < 1e-5, "{w:?}");
        Ok(())
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let mut grads = BTreeMap::from([
            ("a".to_string(), Tensor::new(&[3.0f32], &dev)?),
            ("b".to_string(), Tensor::new(&[4.0f32], &dev)?),
        ]);
        let norm = clip_grad_norm(&mut grads, 1.0)?;
        assert!((norm - 5.0).abs() < 1e-6);
        let after = clip_grad_norm(&mut grads, 0.0)?;
        assert!((after - 1.0).abs() < 1e-4, "{after}");
        Ok(())
    }
}
