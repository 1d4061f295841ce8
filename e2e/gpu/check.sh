#!/usr/bin/env bash
# The GPU proof of issue 16, one prepared script for a GPU machine (CUDA driver, PyTorch,
# transformers and PEFT installed; no Rust, no network). It prints one JSON object and a table:
# - correctness: kubetune-device-check, bf16 on the device against f32 on the CPU (logits, one
#   LoRA step's loss and adapter gradients, dense and NF4 base);
# - training: tokens/s and peak GPU memory of kubetune-trainer against PyTorch + PEFT (bf16 base,
#   f32 adapters) on the benchmark shape of e2e/bench/lib.sh and a larger one generated here;
#   LoRA and QLoRA, with and without checkpointing, and LoRA at the trainer's default dropout;
# - profile: one decoder layer's pieces (projections, attention, norm, activation, head),
#   forward and backward, each timed alone, ours against PyTorch + PEFT: where a step's time goes;
# - serving: kubetune-server's generated tokens/s and TTFT at concurrency 1 and 16 against
#   transformers `generate` in bf16.
#
#   make gpu-bundle                     # on a CPU machine: the CUDA binaries, xz'd, ~35 MiB
#   e2e/gpu/check.sh                    # on the GPU machine, from the repo root
#   e2e/gpu/check.sh --device cpu       # the same flow on the CPU (small shape, few steps)
#
# PARTS (default "correctness bench large profile serving") picks what runs; large is skipped on
# the CPU.
# RUNS (default "lora:false qlora:false lora:true qlora:true") picks our training runs
# (method:checkpointing); STEP_TIMES (default "lora qlora") the large runs timed by phase.
# Binaries: .kubetune/gpu-bundle/*.xz (GPU_BUNDLE), else target/release. Output: $OUT, else
# .kubetune/gpu-check. Each phase has its own time limit; the whole runs in about 6 minutes on
# an H200. A phase that fails is reported and the rest still run.
set -uo pipefail
device=cuda
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    *) echo "usage: $0 [--device cuda|cpu]" >&2; exit 2 ;;
  esac
done
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bundle="${GPU_BUNDLE:-$root/.kubetune/gpu-bundle}"
work="${GPU_WORK:-/tmp/kubetune-gpu-check}"
out="${OUT:-$root/.kubetune/gpu-check}"
mkdir -p "$work/bin" "$out"
log() { echo "== [${SECONDS}s] $*" >&2; }
parts=" ${PARTS:-correctness bench large profile serving} "
want() { [[ "$parts" == *" $1 "* ]]; }

# --- binaries and the libraries they need ---------------------------------------------------
bins="$work/bin"
PY="${PYTHON:-python3}"
if compgen -G "$bundle/*.xz" >/dev/null; then
  for f in "$bundle"/*.xz; do
    # Python's lzma, in case the GPU machine has no xz.
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$f" "$bins/$(basename "$f" .xz)" && chmod +x "$bins/$(basename "$f" .xz)"
  done
else
  for b in kubetune-trainer kubetune-server kubetune-tiny-model kubetune-device-check; do
    ln -sf "$root/target/release/$b" "$bins/$b"
  done
fi
if ! "$PY" -c 'import torch, transformers, peft' 2>/dev/null; then
  source "$root/e2e/bench/lib.sh"
  bench_venv
  PY="$bench_python"
fi
if [[ "$device" != cpu ]]; then
  # The CUDA 13 runtime and cuBLAS of PyTorch's wheels (nvidia/cu13/lib), or a system CUDA.
  libs=$("$PY" -c 'import glob, os, site
print(":".join(sorted({os.path.dirname(p) for b in site.getsitepackages() for p in glob.glob(b + "/nvidia/**/libcublas.so.*", recursive=True)})))')
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:/usr/local/cuda/lib64"
  missing=$(ldd "$bins/kubetune-trainer" | grep 'not found' || true)
  [[ -z "$missing" ]] || { echo "missing libraries: $missing" >&2; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fi
export KUBETUNE_DEVICE="$device" DEVICE="$device"

# --- correctness ----------------------------------------------------------------------------
if want correctness; then
  log "correctness: $device bf16 against CPU f32"
  timeout 180 "$bins/kubetune-device-check" --device "$device" >"$out/correctness.json" 2>"$out/correctness.log" ||
    echo "device check failed: $(tail -3 "$out/correctness.log")" >&2
fi

# --- training -------------------------------------------------------------------------------
# Both are read through `train`'s nameref.
# shellcheck disable=SC2034
bench_shape=(--vocab-size 8192 --hidden-size 512 --intermediate-size 1408 --layers 8 --heads 8 --kv-heads 4)
# shellcheck disable=SC2034
large_shape=(--vocab-size 16384 --hidden-size 2048 --intermediate-size 5632 --layers 16 --heads 16 --kv-heads 8)
train_bench="$root/trainer/bench/bench.py"

# config METHOD CHECKPOINTING MODEL DATA STEPS BATCH SEQ OUTPUT
config() {
  cat <<YAML
model: $3
dataset: { path: $4, format: text }
method: $1
lora: { r: 16, alpha: 32, dropout: ${DROPOUT:-0}, targetModules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] }
training: { maxSteps: $5, batchSize: $6, maxSeqLength: $7, learningRate: 0.0001, scheduler: constant, loggingSteps: 1, gradientCheckpointing: $2 }
output: $8
YAML
}

# ours DIR RES TAG METHOD CHECKPOINTING: one kubetune-trainer run on DIR's model and data;
# STEPS, BATCH, SEQ and DROPOUT come from the environment.
ours() {
  local dir=$1 res=$2 tag=$3
  config "$4" "$5" "$dir/model" "$dir/data.jsonl" "$STEPS" "$BATCH" "$SEQ" "$dir/out-$tag" >"$dir/$tag.yaml"
  log "kubetune-trainer $(basename "$dir") $tag"
  timeout 150 "$PY" "$train_bench" ours "$bins/kubetune-trainer" "$dir/$tag.yaml" "$res/ours-$tag.json" || true
}

# peft DIR RES TAG: PyTorch + PEFT on the same model and data (GRAD_CKPT and DROPOUT from the
# environment).
peft() {
  log "PyTorch + PEFT $(basename "$1") $3"
  timeout 150 "$PY" "$train_bench" peft "$1/model" "$1/data.jsonl.ids.json" "$2/$3.json" || true
}

# train NAME SHAPE-ARRAY-NAME STEPS BATCH SEQ: ours (LoRA, QLoRA, each plain and checkpointed)
# and PEFT (plain and checkpointed) on one generated model.
train() {
  local name=$1 steps=$3 batch=$4 seq=$5
  local -n shape=$2
  local dir="$work/$name" res="$out/train-$name"
  mkdir -p "$dir" "$res"
  log "training, $name shape: ${shape[*]}, batch $batch x $seq, $steps steps"
  [[ -f "$dir/model/config.json" ]] || timeout 300 "$bins/kubetune-tiny-model" --out "$dir/model" "${shape[@]}" >/dev/null
  export STEPS=$steps BATCH=$batch SEQ=$seq
  "$PY" "$train_bench" data "$dir/model" "$dir/data.jsonl" $((steps * batch))
  for run in ${RUNS:-lora:false qlora:false lora:true qlora:true}; do
    local method=${run%:*} ckpt=${run#*:} tag=${run%:*}
    [[ $ckpt == true ]] && tag="$tag-ckpt"
    ours "$dir" "$res" "$tag" "$method" "$ckpt"
  done
  peft "$dir" "$res" peft
  GRAD_CKPT=1 peft "$dir" "$res" peft-ckpt
}

# train_dropout NAME: plain LoRA at the trainer's default dropout (0.05), ours and PEFT's, on
# the model, data and sizes train NAME used last; those runs use none. Our masks come from our
# own kernel on a GPU (model/src/kernels/dropout.rs).
train_dropout() {
  local dir="$work/$1" res="$out/train-$1"
  DROPOUT=0.05 ours "$dir" "$res" lora-dropout lora false
  DROPOUT=0.05 peft "$dir" "$res" peft-dropout
}
if [[ "$device" == cpu ]]; then
  want bench && train bench bench_shape 3 4 256 && train_dropout bench
else
  want bench && train bench bench_shape 12 4 256
fi
if [[ "$device" != cpu ]] && want large; then
  train large large_shape 8 4 512
  train_dropout large
  # Where a step's time goes (each phase waits for the GPU), for the LoRA run of the large shape.
  for tag in ${STEP_TIMES:-lora qlora}; do
    [[ -f "$work/large/$tag.yaml" ]] || continue
    log "step times, large $tag (KUBETUNE_STEP_TIMES=1)"
    sed "s|out-$tag|times-$tag|" "$work/large/$tag.yaml" >"$work/large/times-$tag.yaml"
    KUBETUNE_STEP_TIMES=1 timeout 120 "$bins/kubetune-trainer" --config "$work/large/times-$tag.yaml" 2>&1 |
      grep '"step times"' | tail -1 | tee "$out/step-times-$tag.txt"
  done
fi

# --- where a layer's time goes --------------------------------------------------------------
# kubetune-device-check --profile and layer_profile.py time the same pieces of one decoder layer:
# the large shape's width on a GPU, the bench shape's on the CPU.
if want profile; then
  if [[ "$device" == cpu ]]; then
    profile_shape=(--batch 4 --seq 256 --hidden 512 --intermediate 1408 --heads 8 --kv-heads 4 --vocab 8192 --reps 2)
  else
    profile_shape=(--batch 4 --seq 512 --hidden 2048 --intermediate 5632 --heads 16 --kv-heads 8 --vocab 16384 --reps 20)
  fi
  log "profile: one layer's pieces, ours and PyTorch + PEFT's"
  rm -f "$out/profile-ours.json" "$out/profile-torch.json"
  timeout 120 "$bins/kubetune-device-check" --device "$device" --profile "${profile_shape[@]}" \
    >"$out/profile-ours.json" 2>"$out/profile-ours.log" ||
    echo "profile failed: $(tail -3 "$out/profile-ours.log")" >&2
  timeout 120 "$PY" "$root/e2e/gpu/layer_profile.py" --device "$device" "${profile_shape[@]}" \
    >"$out/profile-torch.json" 2>"$out/profile-torch.log" ||
    echo "PyTorch profile failed: $(tail -3 "$out/profile-torch.log")" >&2
fi

# --- serving --------------------------------------------------------------------------------
if ! want serving; then
  "$PY" "$root/e2e/gpu/report.py" "$out" "$device"
  exit 0
fi
serve_bench="$root/server/bench/bench.py"
model="$work/bench/model"
[[ -f "$model/config.json" ]] || "$bins/kubetune-tiny-model" --out "$model" "${bench_shape[@]}" >/dev/null
port=${PORT:-18133}
export CONCURRENCY="1 16"
log "kubetune-server on $device"
if [[ "$device" != cpu ]]; then
  GPU_BASELINE_MIB=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0)
  export GPU_BASELINE_MIB
fi
"$bins/kubetune-server" --model "$model" --served-model-name bench --listen "127.0.0.1:$port" --max-batch 16 \
  --max-queue 64 >"$out/server.log" 2>&1 &
server=$!
for _ in $(seq 1 600); do
  "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
    "http://127.0.0.1:$port/ready" 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || break
  sleep 0.1
done
timeout 200 "$PY" "$serve_bench" server "http://127.0.0.1:$port" "$out/serve-ours.json" "$server" || true
kill "$server" 2>/dev/null
wait "$server" 2>/dev/null
log "transformers generate on $device"
timeout 150 "$PY" "$serve_bench" hf "$model" "$out/serve-hf.json" || true

"$PY" "$root/e2e/gpu/report.py" "$out" "$device"
