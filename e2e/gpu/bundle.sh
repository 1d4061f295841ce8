#!/usr/bin/env bash
# Builds the CUDA binaries that e2e/gpu/check.sh runs, on a machine without a GPU, and packs them
# xz'd into .kubetune/gpu-bundle (about 35 MiB: under the 64 MiB a GPU machine's copy takes).
# The toolchain comes from e2e/gpu/cuda-toolchain.sh. CUDA_COMPUTE_CAP (default 90: H100/H200)
# picks the GPU the kernels are compiled for. The build goes to target-cuda/, apart from the
# CPU build's target/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
eval "$(e2e/gpu/cuda-toolchain.sh)"
export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-$root/target-cuda}"
cargo build --release --locked --features cuda -p kubetune-trainer -p kubetune-server -p kubetune-model --bins
bundle="$root/.kubetune/gpu-bundle"
rm -rf "$bundle" && mkdir -p "$bundle"
for b in kubetune-trainer kubetune-server kubetune-tiny-model kubetune-device-check; do
  strip -o "$bundle/$b" "$CARGO_TARGET_DIR/release/$b"
  xz -T0 -6 "$bundle/$b"
done
du -sh "$bundle"/*
