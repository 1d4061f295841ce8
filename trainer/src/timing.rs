//! Where a training step's time goes, for `KUBETUNE_STEP_TIMES=1`.
//!
//! On a GPU the host queues work and goes on, so a wall clock around a phase measures the
//! queueing, not the work. With the variable set, each mark waits for the device first, which
//! slows the step a little and makes each phase's figure its own. Off by default.

use candle_core::Device;
use std::time::Instant;

pub struct StepTimer {
    device: Option<Device>,
    last: Instant,
    /// (phase, milliseconds) summed since the last report.
    phases: Vec<(&'static str, f64)>,
}

impl StepTimer {
    pub fn from_env(device: &Device) -> Self {
        let on = std::env::var("KUBETUNE_STEP_TIMES").is_ok_and(|v| v == "1");
        Self {
            device: on.then(|| device.clone()),
            last: Instant::now(),
            phases: Vec::new(),
        }
    }

    /// Ends phase `name`: the time since the last mark, the device's queue included.
    pub fn mark(&mut self, name: &'static str) {
        let Some(device) = &self.device else { return };
        if let Err(e) = device.synchronize() {
            tracing::warn!(error = %e, "step timing: cannot wait for the device");
        }
        let ms = self.last.elapsed().as_secs_f64() * 1e3;
        self.last = Instant::now();
        match self.phases.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += ms,
            None => self.phases.push((name, ms)),
        }
    }

    /// Logs the phases summed over `steps` steps, per step, and starts again.
    pub fn report(&mut self, step: u64, steps: u64) {
        if self.device.is_none() || self.phases.is_empty() {
            return;
        }
        let per_step: Vec<String> = self
            .phases
            .drain(..)
            .map(|(n, ms)| format!("{n}={:.1}", ms / steps.max(1) as f64))
            .collect();
        tracing::info!(step, ms_per_step = %per_step.join(" "), "step times");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_without_the_variable_records_nothing() {
        let mut t = StepTimer {
            device: None,
            last: Instant::now(),
            phases: Vec::new(),
        };
        t.mark("forward_backward");
        assert!(t.phases.is_empty());
    }

    #[test]
    fn marks_of_one_phase_add_up() {
        let mut t = StepTimer {
            device: Some(Device::Cpu),
            last: Instant::now(),
            phases: Vec::new(),
        };
        t.mark("a");
        t.mark("b");
        t.mark("a");
        assert_eq!(t.phases.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["a", "b"]);
    }
}
