#!/usr/bin/env bash
# What prefix caching buys, on the benchmark Llama of e2e/bench/lib.sh with a 4k context, on
# our server alone (standard-library Python client): the time to first token of requests that
# share a SYSTEM-token system prompt (2048) and differ in a 16-token question, with the prefix
# cache on (the default) against --no-enable-prefix-caching. The first request of each run
# fills the cache and is not counted; the next ROUNDS (8) are.
#
#   server/bench/prefix.sh
#   SERVER_BIN=path SYSTEM=1024 server/bench/prefix.sh
#
# Not for CI: it measures time.
set -euo pipefail
source "$(dirname "$0")/../../e2e/bench/lib.sh"
if [[ -n "${CI:-}" ]]; then
  echo "server/bench/prefix.sh: not run in CI (it measures time)"
  exit 0
fi
PORT=${PORT:-18125}
SYSTEM=${SYSTEM:-2048}
ROUNDS=${ROUNDS:-8}
CONTEXT=4096
PY="$bench_root/server/bench/prefix.py"
URL="http://127.0.0.1:$PORT"

if [[ -z "${SERVER_BIN:-}" ]]; then
  bench_build kubetune-server kubetune-model
  SERVER_BIN=$bench_target/release/kubetune-server
fi
bench_model
bench_model_with_context "$CONTEXT"
model="$bench_context_model"

trap bench_server_stop EXIT
start_server() {
  bench_server_start "$model" "$bench_work/prefix-server.log" "$@"
}

for mode in off on; do
  echo "== prefix caching $mode ($SERVER_BIN)"
  if [[ $mode == off ]]; then start_server --no-enable-prefix-caching; else start_server; fi
  python3 "$PY" ttft "$URL" "$SYSTEM" "$ROUNDS" "$bench_work/prefix-$mode.json"
  bench_server_stop
done
python3 "$PY" report "$bench_work/prefix-off.json" "$bench_work/prefix-on.json"
