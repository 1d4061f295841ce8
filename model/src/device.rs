//! Which device a binary runs on, and the dtype its frozen base is held in there.
//!
//! Both binaries take `--device auto|cpu|cuda|cuda:N`. `auto` picks CUDA when the binary was
//! built with it and a device opens, else the CPU. An explicit `cuda` never falls back: a job that
//! asked for a GPU and got a CPU-only binary (or no visible GPU) must fail, not train slowly on
//! the CPU while it holds the GPU.

use crate::error::{ModelError, Result};
use candle_core::{DType, Device};

/// A parsed `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        let ordinal = |n: &str| {
            n.parse::<usize>()
                .map_err(|_| device_error(s, "expected a device number after `cuda:`"))
        };
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => Ok(Self::Cuda(ordinal(n)?)),
                None => Err(device_error(s, "expected auto, cpu, cuda or cuda:N")),
            },
        }
    }
}

/// `--device` as clap's value parser: the error is the message clap prints.
pub fn parse_flag(value: &str) -> std::result::Result<DeviceChoice, String> {
    value.parse().map_err(|e: ModelError| e.to_string())
}

fn device_error(value: &str, reason: &str) -> ModelError {
    ModelError::Device(format!("`{value}`: {reason}"))
}

/// Whether this binary was built with the `cuda` feature.
pub fn cuda_compiled() -> bool {
    candle_core::utils::cuda_is_available()
}

/// Opens the chosen device. With `Auto`, also returns why CUDA was not taken, for the log.
pub fn open(choice: DeviceChoice) -> Result<(Device, Option<String>)> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, None)),
        DeviceChoice::Cuda(n) => Ok((open_cuda(n)?, None)),
        DeviceChoice::Auto if !cuda_compiled() => Ok((Device::Cpu, Some("built without CUDA".into()))),
        DeviceChoice::Auto => match open_cuda(0) {
            Ok(device) => Ok((device, None)),
            Err(e) => Ok((Device::Cpu, Some(e.to_string()))),
        },
    }
}

fn open_cuda(ordinal: usize) -> Result<Device> {
    if !cuda_compiled() {
        return Err(ModelError::Device(format!(
            "cuda:{ordinal}: this binary was built without CUDA support (build with --features cuda)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| ModelError::Device(format!("cuda:{ordinal}: no usable CUDA device: {e}")))
}

/// The dtype the frozen base and the activations are held in on `device`: bf16 on a GPU, whose
/// matrix units multiply it at full rate with f32 accumulation (PEFT's mixed precision holds the
/// same); f32 on the CPU, where the hand-written f32 step is the fast path.
pub fn base_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// A short name for the log line that says where a binary runs, e.g. `cuda:0`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_values_parse_and_bad_ones_name_the_flag() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("cuda".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(3));
        for bad in ["gpu", "cuda:x", "cuda:", ""] {
            let e = bad.parse::<DeviceChoice>().unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")) && e.contains("expected"), "{bad}: {e}");
        }
    }

    #[test]
    fn auto_runs_on_the_cpu_in_a_build_without_cuda_and_cuda_is_an_error_there() {
        if cuda_compiled() {
            return; // a CUDA build's auto depends on the machine's GPUs
        }
        let (device, why) = open(DeviceChoice::Auto).unwrap();
        assert!(device.is_cpu());
        assert_eq!(why.as_deref(), Some("built without CUDA"));
        let e = open(DeviceChoice::Cuda(0)).unwrap_err().to_string();
        assert!(e.contains("built without CUDA support"), "{e}");
    }

    #[test]
    fn the_base_is_f32_on_the_cpu() {
        assert_eq!(base_dtype(&Device::Cpu), DType::F32);
    }
}
