#!/usr/bin/env bash
# Benchmarks kubetune-trainer against PyTorch + PEFT on the same model and the same random data
# (the shape in e2e/bench/lib.sh; batch 4 x 256 tokens; LoRA r=16 on all seven projections):
# tokens/s and peak RSS of each, our QLoRA's peak RSS, and the ratios; each side once as is and
# once with gradient checkpointing. PROFILE=1 also records our LoRA run with perf and prints
# where the time goes.
#
#   trainer/bench/run.sh
#   STEPS=20 trainer/bench/run.sh       # more steps (default 12, the first is not timed)
#   SKIP_PEFT=1 trainer/bench/run.sh    # reuse the last PEFT figures
#
# Not for CI: it installs torch, transformers and peft from PyPI into its own venv (some GB) and
# runs for minutes.
set -euo pipefail
source "$(dirname "$0")/../../e2e/bench/lib.sh"
bench_refuse_ci trainer/bench/run.sh
BENCH="$bench_root/trainer/bench/bench.py"
export STEPS="${STEPS:-12}" BATCH=4 SEQ=256
work="$bench_work/trainer"
mkdir -p "$work"

bench_build kubetune-trainer kubetune-model
trainer="$bench_target/release/kubetune-trainer"
bench_model
bench_venv
"$bench_python" "$BENCH" data "$bench_work/model" "$work/data.jsonl" $((STEPS * BATCH))

# Ours train on the same sequences in the same order as PEFT does (no shuffle matters: every
# sequence is random), with a constant learning rate and no evaluation or checkpoints.
config() {
  cat <<YAML
model: $bench_work/model
dataset: { path: $work/data.jsonl, format: text }
method: $1
lora: { r: 16, alpha: 32, dropout: 0, targetModules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] }
training: { maxSteps: $STEPS, batchSize: $BATCH, maxSeqLength: $SEQ, learningRate: 0.0001, scheduler: constant, loggingSteps: 1, gradientCheckpointing: $2 }
output: $work/out-$1
YAML
}
config lora false >"$work/ours.yaml"
config qlora false >"$work/qlora.yaml"
config lora true >"$work/ours-ckpt.yaml"
config qlora true >"$work/qlora-ckpt.yaml"

for run in ours qlora ours-ckpt qlora-ckpt; do
  echo "== kubetune-trainer $run"
  "$bench_python" "$BENCH" ours "$trainer" "$work/$run.yaml" "$work/$run.json"
done
if [[ -z "${SKIP_PEFT:-}" || ! -f "$work/peft.json" || ! -f "$work/peft-ckpt.json" ]]; then
  echo "== PyTorch + PEFT"
  "$bench_python" "$BENCH" peft "$bench_work/model" "$work/data.jsonl.ids.json" "$work/peft.json"
  echo "== PyTorch + PEFT, gradient checkpointing"
  GRAD_CKPT=1 "$bench_python" "$BENCH" peft "$bench_work/model" "$work/data.jsonl.ids.json" "$work/peft-ckpt.json"
fi
"$bench_python" "$BENCH" report "$work"

if [[ -n "${PROFILE:-}" ]]; then
  echo "== profile of our LoRA run (perf record, self time by symbol)"
  perf record -q -F 499 -o "$work/perf.data" -- "$trainer" --config "$work/${PROFILE_RUN:-ours}.yaml" 2>/dev/null
  perf report -i "$work/perf.data" --no-children --sort symbol --percent-limit 1.5 --stdio 2>/dev/null \
    | grep -E '^ +[0-9.]+%' | head -25
fi
