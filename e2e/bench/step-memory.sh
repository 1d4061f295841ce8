#!/usr/bin/env bash
# The memory of one training step on the GPU's code path, measured on the CPU, against PyTorch +
# PEFT: both sides hold the base in bf16 and the adapter in f32 (PEFT's mixed precision), as on a
# GPU, and run one forward and backward of the same tokens (LoRA r=16 on all seven projections).
# Printed: the peak resident memory above what was held before the step (the activations and
# the step's temporaries; Linux's high-water mark, reset before the step), ours against PEFT's,
# plain and with gradient checkpointing; and our QLoRA's whole peak (base and step) against our
# LoRA's.
#
#   e2e/bench/step-memory.sh                    # the benchmark shape (4 x 256 tokens) and a
#                                               # large one (hidden 2048, 2 layers, 4 x 512)
#   SHAPES=bench e2e/bench/step-memory.sh       # the benchmark shape alone (about 1 minute)
#   SKIP_PEFT=1 ...                             # reuse the last PEFT figures
#   DROPOUT=0.05 ...                            # LoRA dropout on both sides (default 0, as
#                                               # e2e/gpu/check.sh; the trainer's default is 0.05)
#
# Why the CPU: the graph holds the same tensors on either device, so the activation memory of
# the GPU path can be measured and cut on a machine without a GPU (e2e/gpu/check.sh measures the
# GPU itself). Every allocation of 64 KiB or more is its own mapping on both sides
# (MALLOC_MMAP_THRESHOLD_), so the resident set follows what is live. Our side also counts its
# allocations exactly (model/examples/step_memory.rs); the two figures agree within a few MiB.
# Not for CI: it installs torch, transformers and peft from PyPI (some GB); about 4 minutes here.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bench_refuse_ci e2e/bench/step-memory.sh
work="$bench_work/step-memory${DROPOUT:+-dropout$DROPOUT}"
mkdir -p "$work"

echo "== build (release): kubetune-model's step_memory example and kubetune-tiny-model"
(cd "$bench_root" && cargo build --release --locked -p kubetune-model --example step_memory --bin kubetune-tiny-model)
# KUBETUNE_BENCH_STEP_MEMORY=<binary> measures another build's example (an earlier commit's).
ours="${KUBETUNE_BENCH_STEP_MEMORY:-$bench_target/release/examples/step_memory}"
bench_venv
export MALLOC_MMAP_THRESHOLD_=65536

# The large shape has the width of e2e/gpu/check.sh's large one and two of its 16 layers: the
# CPU runs bf16 slowly, and the memory of a layer does not depend on how many there are.
declare -A shape_flags=(
  [bench]="${bench_shape[*]}"
  [large]="--vocab-size 16384 --hidden-size 2048 --intermediate-size 5632 --layers 2 --heads 16 --kv-heads 8"
)
declare -A shape_tokens=([bench]="4 256" [large]="4 512")

peak() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["resident_step_peak_mib"])' "$1"; }
whole() {
  python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(r["resident_before_mib"] + r["resident_step_peak_mib"])' "$1"
}
ratio() { python3 -c 'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.2f}x")' "$1" "$2"; }

for shape in ${SHAPES:-bench large}; do
  model="$work/model-$shape"
  read -r batch seq <<<"${shape_tokens[$shape]}"
  # shellcheck disable=SC2086 # the flags are words
  [[ -f "$model/config.json" ]] || "$bench_target/release/kubetune-tiny-model" --out "$model" ${shape_flags[$shape]} >/dev/null
  for run in lora lora-ckpt qlora qlora-ckpt; do
    flags=(--batch "$batch" --seq "$seq" --dropout "${DROPOUT:-0}")
    [[ $run == qlora* ]] && flags+=(--nf4)
    [[ $run == *-ckpt ]] && flags+=(--checkpointing)
    echo "== $shape: ours $run"
    "$ours" "$model" "${flags[@]}" | tee "$work/$shape-$run.json"
  done
  for run in peft peft-ckpt; do
    [[ -n "${SKIP_PEFT:-}" && -f "$work/$shape-$run.json" ]] && continue
    flags=(--dropout "${DROPOUT:-0}")
    [[ $run == *-ckpt ]] && flags+=(--checkpointing)
    echo "== $shape: PyTorch + PEFT $run"
    "$bench_python" "$bench_root/e2e/bench/step_memory.py" "$model" "$batch" "$seq" "${flags[@]}" 2>/dev/null |
      tee "$work/$shape-$run.json"
  done
done

echo
echo "Peak memory of one step above what was held before it, MiB (bf16 base, f32 adapter, CPU):"
printf '%-6s %-15s %9s %9s %10s %18s\n' shape tokens ours PEFT "ours/PEFT" "QLoRA/LoRA, whole"
for shape in ${SHAPES:-bench large}; do
  read -r batch seq <<<"${shape_tokens[$shape]}"
  for ckpt in "" -ckpt; do
    lora=$(peak "$work/$shape-lora$ckpt.json")
    peft=$(peak "$work/$shape-peft$ckpt.json")
    printf '%-6s %-15s %9s %9s %10s %18s\n' "$shape" "${batch}x$seq${ckpt:+ ckpt}" "$lora" "$peft" \
      "$(ratio "$lora" "$peft")" "$(ratio "$(whole "$work/$shape-qlora$ckpt.json")" "$(whole "$work/$shape-lora$ckpt.json")")"
  done
done
