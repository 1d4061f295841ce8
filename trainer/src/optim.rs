//! AdamW over the adapter variables only, the learning-rate schedule and gradient clipping.
//! Written here rather than taken from candle-nn because checkpoints need the moment
//! estimates, which candle-nn's optimizer keeps private.

use crate::config::Scheduler;
use crate::error::{Result, TrainError};
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
    /// Both moments of every parameter, end to end in `params`' order: the update runs as a
    /// dozen ops over all of them rather than a dozen per tensor (a LoRA on all projections
    /// of 16 layers has 224 tensors: 3,600 small kernels a step on a GPU).
    m: Tensor,
    v: Tensor,
}

struct Param {
    name: String,
    var: Var,
    /// Where its values sit in the flat moments.
    start: usize,
}

impl Param {
    fn slice(&self, flat: &Tensor) -> candle_core::Result<Tensor> {
        flat.narrow(0, self.start, self.var.elem_count())?
            .reshape(self.var.shape())
    }
}

impl AdamW {
    pub fn new(vars: &[NamedVar], weight_decay: f64) -> Result<Self> {
        let mut start = 0;
        let params: Vec<Param> = vars
            .iter()
            .map(|nv| {
                let p = Param {
                    name: nv.name.clone(),
                    var: nv.var.clone(),
                    start,
                };
                start += nv.var.elem_count();
                p
            })
            .collect();
        let (dtype, device) = match vars.first() {
            Some(nv) => (nv.var.dtype(), nv.var.device().clone()),
            None => (candle_core::DType::F32, candle_core::Device::Cpu),
        };
        Ok(Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            steps: 0,
            params,
            m: Tensor::zeros(start, dtype, &device)?,
            v: Tensor::zeros(start, dtype, &device)?,
        })
    }

    /// One update with `grads` (keyed by variable name; one for every parameter) at learning
    /// rate `lr`: decoupled weight decay, then the bias-corrected Adam step.
    pub fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        if self.params.is_empty() {
            return Ok(());
        }
        let flat = self
            .params
            .iter()
            .map(|p| match grads.get(&p.name) {
                Some(g) => Ok(g.flatten_all()?),
                // Every adapter tensor is in every forward's graph: a missing one is a bug.
                None => Err(TrainError::Candle(candle_core::Error::Msg(format!(
                    "no gradient reached {}",
                    p.name
                )))),
            })
            .collect::<Result<Vec<_>>>()?;
        let g = Tensor::cat(&flat, 0)?;
        self.steps += 1;
        let t = self.steps as i32;
        let c1 = 1.0 - self.beta1.powi(t);
        let c2 = 1.0 - self.beta2.powi(t);
        self.m = ((&self.m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
        self.v = ((&self.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
        let update = (((&self.m / c1)? / ((&self.v / c2)?.sqrt()? + self.eps)?)? * lr)?;
        for p in &self.params {
            let decayed = (p.var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            p.var.set(&(decayed - p.slice(&update)?)?)?;
        }
        Ok(())
    }

    /// Moment estimates under `{name}.exp_avg` / `{name}.exp_avg_sq` for checkpoints.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            for (suffix, flat) in [("exp_avg", &self.m), ("exp_avg_sq", &self.v)] {
                if let Ok(t) = p.slice(flat) {
                    out.insert(format!("{}.{suffix}", p.name), t);
                }
            }
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`]; every parameter must be present.
    pub fn load_state(&mut self, mut state: BTreeMap<String, Tensor>, steps: u64) -> std::result::Result<(), String> {
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for p in &self.params {
            for (suffix, parts) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
                let key = format!("{}.{suffix}", p.name);
                let t = state
                    .remove(&key)
                    .ok_or_else(|| format!("optimizer state lacks {key}"))?;
                if t.dims() != p.var.dims() {
                    return Err(format!(
                        "optimizer state {key} has shape {:?}, expected {:?}",
                        t.dims(),
                        p.var.dims()
                    ));
                }
                let t = t.to_device(p.var.device()).and_then(|t| t.to_dtype(p.var.dtype()));
                parts.push(t.and_then(|t| t.flatten_all()).map_err(|e| format!("{key}: {e}"))?);
            }
        }
        if !self.params.is_empty() {
            self.m = Tensor::cat(&m, 0).map_err(|e| e.to_string())?;
            self.v = Tensor::cat(&v, 0).map_err(|e| e.to_string())?;
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

    /// Two tensors of different shapes share the flat moments; two steps of each element
    /// equal AdamW written out for that element alone, and a missing gradient is an error.
    #[test]
    fn every_tensor_steps_as_adamw_written_out_per_element() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[0.5f32, -0.25], &dev)?)?;
        let b = Var::from_tensor(&Tensor::new(&[[1.0f32, 2.0], [-3.0, 0.0]], &dev)?)?;
        let named = |n: &str, v: &Var| NamedVar {
            name: n.into(),
            var: v.clone(),
        };
        let mut opt = AdamW::new(&[named("a", &a), named("b", &b)], 0.01)?;
        let ga = [0.3f32, -0.1];
        let gb = [0.2f32, 0.0, -0.7, 1.5];
        let grads = BTreeMap::from([
            ("a".to_string(), Tensor::new(&ga, &dev)?),
            ("b".to_string(), Tensor::new(&gb, &dev)?.reshape((2, 2))?),
        ]);
        let (lr, wd) = (0.05f64, 0.01f64);
        let expected = |w0: f32, g: f32| {
            let (mut w, mut m, mut v) = (w0 as f64, 0f64, 0f64);
            for t in 1..=2 {
                m = 0.9 * m + 0.1 * g as f64;
                v = 0.999 * v + 0.001 * (g as f64).powi(2);
                let update = (m / (1.0 - 0.9f64.powi(t))) / ((v / (1.0 - 0.999f64.powi(t))).sqrt() + 1e-8);
                w = w * (1.0 - lr * wd) - lr * update;
            }
            w
        };
        let before: Vec<f32> = [
            a.as_tensor().to_vec1::<f32>()?,
            b.as_tensor().flatten_all()?.to_vec1::<f32>()?,
        ]
        .concat();
        opt.step(&grads, lr)?;
        opt.step(&grads, lr)?;
        let after: Vec<f32> = [
            a.as_tensor().to_vec1::<f32>()?,
            b.as_tensor().flatten_all()?.to_vec1::<f32>()?,
        ]
        .concat();
        for (i, (w0, g)) in before.iter().zip(ga.iter().chain(&gb)).enumerate() {
            assert!(
                (after[i] as f64 - expected(*w0, *g)).abs() < 1e-5,
                "element {i}: {} vs {}",
                after[i],
                expected(*w0, *g)
            );
        }
        assert_eq!(opt.state()["b.exp_avg"].dims(), &[2, 2]);
        let partial = BTreeMap::from([("a".to_string(), Tensor::new(&ga, &dev)?)]);
        let err = opt.step(&partial, lr).expect_err("b has no gradient").to_string();
        assert!(err.contains("no gradient reached b"), "{err}");
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
