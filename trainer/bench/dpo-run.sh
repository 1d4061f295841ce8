#!/usr/bin/env bash
# Benchmarks kubetune-trainer's DPO step against TRL's DPOTrainer with PEFT on the same model (the
# shape in e2e/bench/lib.sh) and the same random preference pairs: BATCH pairs a step (default
# 2), each sequence SEQ tokens (default 256), LoRA r=16 on all seven projections, sigmoid loss,
# beta 0.1, f32 on the CPU. Prints pairs/s, tokens/s and peak RSS of each side and the ratios,
# and, from an SFT run of each side on the same sequences, what a DPO step costs against an SFT
# step on the same tokens (see dpo.py for what each side's step holds).
#
#   trainer/bench/dpo-run.sh
#   STEPS=20 BATCH=4 trainer/bench/dpo-run.sh   # more steps (default 10; the first is not timed)
#   SKIP_SFT=1 trainer/bench/dpo-run.sh         # the DPO runs only
#   PRECOMPUTE_REF=1 trainer/bench/dpo-run.sh   # TRL precomputes the reference too, as ours does
#
# Not for CI: it installs torch, transformers and, pinned in dpo-requirements.txt, trl and peft
# from PyPI into the benchmarks' venv, and runs for minutes.
set -euo pipefail
source "$(dirname "$0")/../../e2e/bench/lib.sh"
bench_refuse_ci trainer/bench/dpo-run.sh
here="$bench_root/trainer/bench"
export STEPS="${STEPS:-10}" BATCH="${BATCH:-2}" SEQ="${SEQ:-256}"
work="$bench_work/trainer-dpo"
mkdir -p "$work"

bench_build kubetune-trainer kubetune-model
trainer="$bench_target/release/kubetune-trainer"
bench_model
bench_venv
if ! "$bench_python" - "$here/dpo-requirements.txt" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version
pins = [l.split("==") for l in open(sys.argv[1]) if "==" in l and not l.startswith("#")]
sys.exit(any(version(name) != want.strip() for name, want in pins))
PY
  echo "== venv: pip install -r dpo-requirements.txt (PyPI)"
  "$bench_python" -m pip install --quiet -r "$here/dpo-requirements.txt"
fi
"$bench_python" "$here/dpo.py" data "$bench_work/model" "$work" $((STEPS * BATCH))

lora='{ r: 16, alpha: 32, dropout: 0, targetModules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] }'
training() { echo "{ maxSteps: $STEPS, batchSize: $1, maxSeqLength: $SEQ, learningRate: 0.0001, scheduler: constant, loggingSteps: 1 }"; }
cat >"$work/ours.yaml" <<YAML
model: $bench_work/model
dataset: { path: $work/pairs.jsonl, format: preference }
method: dpo
dpo: { beta: 0.1, loss: sigmoid, labelSmoothing: 0 }
lora: $lora
training: $(training "$BATCH")
output: $work/out-dpo
YAML
# The SFT reference: every chosen and rejected sequence as text, two per pair, so a step holds
# the same tokens as a DPO step.
cat >"$work/ours-sft.yaml" <<YAML
model: $bench_work/model
dataset: { path: $work/sft.jsonl, format: text }
method: lora
lora: $lora
training: $(training $((2 * BATCH)))
output: $work/out-sft
YAML

echo "== kubetune-trainer DPO"
"$bench_python" "$here/dpo.py" ours "$trainer" "$work/ours.yaml" "$work/ours.json"
echo "== TRL DPOTrainer + PEFT"
"$bench_python" "$here/dpo.py" trl "$bench_work/model" "$work" "$work/trl.json"
rm -f "$work/ours-sft.json" "$work/peft-sft.json"
if [[ -z "${SKIP_SFT:-}" ]]; then
  echo "== kubetune-trainer SFT, same sequences"
  BATCH=$((2 * BATCH)) "$bench_python" "$here/bench.py" ours "$trainer" "$work/ours-sft.yaml" "$work/ours-sft.json"
  echo "== PyTorch + PEFT SFT, same sequences"
  BATCH=$((2 * BATCH)) "$bench_python" "$here/bench.py" peft "$bench_work/model" "$work/sft.jsonl.ids.json" "$work/peft-sft.json"
fi
"$bench_python" "$here/dpo.py" report "$work"
