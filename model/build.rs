//! Compiles our CUDA kernels (`src/kernels/cuda/*.cu`) to PTX when the `cuda` feature is on,
//! with the nvcc of `e2e/gpu/cuda-toolchain.sh` (`NVCC`, else `nvcc` on the PATH), for
//! `CUDA_COMPUTE_CAP` (default 80; the driver compiles PTX on for newer GPUs). A CPU build
//! needs no CUDA toolchain.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 1] = ["dropout"];

fn main() {
    println!("cargo:rerun-if-changed=src/kernels/cuda");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    for kernel in KERNELS {
        let ptx = out.join(format!("{kernel}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("--gpu-architecture=compute_{cap}"), "-o"])
            .arg(&ptx)
            .arg(format!("src/kernels/cuda/{kernel}.cu"))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{nvcc} failed on src/kernels/cuda/{kernel}.cu: {s}"),
            Err(e) => panic!(
                "cannot run {nvcc} ({e}): the cuda feature needs a CUDA toolchain; \
                 eval \"$(e2e/gpu/cuda-toolchain.sh)\" provides one"
            ),
        }
    }
}
