#!/usr/bin/env bash
# What block-allocated KV and chunked prefill buy, on the benchmark Llama of e2e/bench/lib.sh
# with a 32k context (max_position_embeddings 32768), on our server alone (standard-library
# Python client, no PyTorch):
# 1. concurrency: 16 chat requests without max_tokens at once (each may run to the whole
#    context): how many run together in the default 1 GiB KV budget, against what reserving
#    prompt + max_tokens up front (the previous design) admits;
# 2. gap: a stream's largest gap between two tokens while a LONG-token prompt (4096) is
#    prefilled, with --prefill-chunk-tokens 512 against the whole prompt in one step (the
#    previous behaviour), and that prompt's time to first token; peak RSS of each server.
#
#   server/bench/scheduler.sh
#   SERVER_BIN=path LONG=8192 server/bench/scheduler.sh
#
# Not for CI: it measures time.
set -euo pipefail
source "$(dirname "$0")/../../e2e/bench/lib.sh"
if [[ -n "${CI:-}" ]]; then
  echo "server/bench/scheduler.sh: not run in CI (it measures time)"
  exit 0
fi
PORT=${PORT:-18124}
LONG=${LONG:-4096}
CONTEXT=32768
PY="$bench_root/server/bench/scheduler.py"
URL="http://127.0.0.1:$PORT"

bench_build kubetune-server kubetune-model
SERVER_BIN=${SERVER_BIN:-$bench_target/release/kubetune-server}
bench_model
bench_model_with_context "$CONTEXT"
model="$bench_context_model"
# Keys and values, f32, per layer and KV head: 2 x 8 layers x 4 KV heads x 64 dims x 4 bytes.
KV_BYTES=16384
BUDGET=$((1024 << 20))

trap bench_server_stop EXIT
start_server() {
  bench_server_start "$model" "$bench_work/scheduler-server.log" --max-batch 16 --kv-cache-mb $((BUDGET >> 20)) "$@"
}

peak_rss_mib() {
  awk '/VmHWM/ {printf "%.0f MiB", $2 / 1024}' "/proc/$bench_server_pid/status"
}

echo "== concurrency ($SERVER_BIN)"
start_server
python3 "$PY" concurrency "$URL" 16 "$CONTEXT" "$KV_BYTES" "$BUDGET"
echo "  peak RSS: $(peak_rss_mib)"
bench_server_stop

for chunk in "$CONTEXT" 512; do
  echo "== gap: --prefill-chunk-tokens $chunk"
  start_server --prefill-chunk-tokens "$chunk"
  python3 "$PY" gap "$URL" "$LONG" "$bench_work/gap-$chunk.json"
  echo "  peak RSS: $(peak_rss_mib)"
  bench_server_stop
done
python3 "$PY" report "$bench_work/gap-$CONTEXT.json" "$bench_work/gap-512.json"
