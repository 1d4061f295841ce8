#!/usr/bin/env bash
# Installs a CUDA 13.0 toolchain from pinned PyPI wheels into the kubetune cache (outside the repo) and
# prints the environment a `--features cuda` build needs. Usage: eval "$(e2e/gpu/cuda-toolchain.sh)".
#
# Why wheels: they are the only CUDA 13 the registries here ship (Debian's toolkit is 11.8, with no
# sm_90a). Why 13.0: H100/H200 nodes run driver 580 (CUDA 13.0), which refuses PTX from a newer nvcc.
# Two gaps the wheels leave are filled here:
# - unversioned `.so` names, which the linker needs;
# - `libcuda.so`, the driver, which no wheel ships: a link-time stub with the driver's soname goes to
#   `lib/stubs/`. It is never on a library path where the binaries run; the node's driver is.
set -euo pipefail
cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
root="$cache/cuda-13.0"
cu="$root/site/nvidia/cu13"
wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
)
stamp="$root/installed-$(printf '%s\n' "${wheels[@]}" | sha256sum | cut -c1-16)"

if [ ! -f "$stamp" ]; then
  echo "cuda-toolchain: installing ${#wheels[@]} wheels into $root" >&2
  rm -rf "$root" && mkdir -p "$root"
  python3 -m pip install -q --no-deps --no-compile --disable-pip-version-check --target "$root/site" "${wheels[@]}" >&2
  for lib in cudart cublas cublasLt curand nvrtc; do
    versioned=$(cd "$cu/lib" && printf '%s\n' "lib$lib.so."* | sort | head -n1)
    ln -sf "$versioned" "$cu/lib/lib$lib.so"
  done
  [ -d "$cu/lib64" ] || ln -s lib "$cu/lib64"
  # The stub defines every cu* entry point cudarc's driver bindings declare, so `-lcuda` resolves.
  cudarc_src=$(find "$HOME/.cargo/registry/src" -maxdepth 1 -type d -name '*' -print0 2>/dev/null |
    xargs -0 -I{} find {} -maxdepth 1 -type d -name 'cudarc-*' 2>/dev/null | sort -V | tail -n1)
  mkdir -p "$cu/lib/stubs" "$root/stub"
  if [ -n "$cudarc_src" ] && [ -f "$cudarc_src/src/driver/sys/mod.rs" ]; then
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$cudarc_src"/src/driver/sys/*.rs | sort -u >"$root/stub/symbols"
  fi
  # cudarc may not be downloaded yet: keep a core list that always links, topped up from its source.
  printf '%s\n' cuInit cuGetErrorString cuDeviceGet cuDeviceGetCount cuCtxCreate_v2 >>"$root/stub/symbols"
  sort -u "$root/stub/symbols" | awk '{ printf "void %s(void) {}\n", $1 }' >"$root/stub/stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" "$root/stub/stub.c"
  ln -sf libcuda.so "$cu/lib/stubs/libcuda.so.1"
  "$cu/bin/nvcc" --version >&2
  touch "$stamp"
fi

cat <<ENV
export CUDA_HOME="$cu"
export PATH="$cu/bin:\$PATH"
export NVCC="$cu/bin/nvcc"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$cu/lib:$cu/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
ENV
