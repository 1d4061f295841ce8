#!/usr/bin/env bash
# Benchmarks kubetune-server against HF transformers `generate` (PyTorch CPU) on the same
# randomly initialised Llama (the shape in e2e/bench/lib.sh): generated tokens/s at
# concurrency 1, 4 and 16, TTFT p50/p99, peak RSS, ratios.
#
#   server/bench/run.sh                 # build, generate the model, run both, print the table
#   SERVER_BIN=path server/bench/run.sh # benchmark another server binary (e.g. an older commit)
#   SKIP_HF=1 server/bench/run.sh       # reuse the last transformers figures
#
# Both weight formats run: f32, and --quantize int8 (against PyTorch's dynamic int8 too).
#
# Not for CI: it installs torch and transformers from PyPI into its own venv (some GB) and runs
# for minutes.
set -euo pipefail
source "$(dirname "$0")/../../e2e/bench/lib.sh"
bench_refuse_ci server/bench/run.sh
PORT=${PORT:-18123}
BENCH="$bench_root/server/bench/bench.py"

bench_build kubetune-server kubetune-model
SERVER_BIN=${SERVER_BIN:-$bench_target/release/kubetune-server}
bench_model
bench_venv

# Each weight format of ours, and the transformers reference for it: f32 against the default
# f32 model, int8 (--quantize int8) against PyTorch's dynamic int8 quantization.
for q in none int8; do
  echo "== kubetune-server --quantize $q ($SERVER_BIN)"
  "$SERVER_BIN" --model "$bench_work/model" --served-model-name bench --listen "127.0.0.1:$PORT" \
    --max-batch 16 --max-queue 64 --quantize "$q" >"$bench_work/server.log" 2>&1 &
  SERVER_PID=$!
  trap 'kill "$SERVER_PID" 2>/dev/null || true' EXIT
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$bench_work/server.log"; exit 1; }
    sleep 0.2
  done
  "$bench_python" "$BENCH" server "http://127.0.0.1:$PORT" "$bench_work/server-$q.json" "$SERVER_PID"
  kill "$SERVER_PID"
  wait "$SERVER_PID" 2>/dev/null || true
  trap - EXIT
done

for q in none int8; do
  if [[ -z "${SKIP_HF:-}" || ! -f "$bench_work/hf-$q.json" ]]; then
    echo "== transformers generate ($q)"
    "$bench_python" "$BENCH" hf "$bench_work/model" "$bench_work/hf-$q.json" "$q"
  fi
done
"$bench_python" "$BENCH" report "$bench_work/server-none.json" "$bench_work/hf-none.json" "f32: kubetune-server vs transformers"
"$bench_python" "$BENCH" report "$bench_work/server-int8.json" "$bench_work/hf-none.json" "kubetune-server --quantize int8 vs transformers f32 (the issue's reference)"
"$bench_python" "$BENCH" report "$bench_work/server-int8.json" "$bench_work/hf-int8.json" "int8: kubetune-server --quantize int8 vs transformers with PyTorch dynamic int8"
