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
model="$bench_work/model-4k"
rm -rf "$model"
cp -r "$bench_work/model" "$model"
python3 - "$model/config.json" "$CONTEXT" <<'PYEOF'
import json, sys
path, context = sys.argv[1], int(sys.argv[2])
config = json.load(open(path))
config["max_position_embeddings"] = context
json.dump(config, open(path, "w"), indent=1)
PYEOF

SERVER_PID=
stop_server() {
  [[ -n "$SERVER_PID" ]] || return 0
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}
trap stop_server EXIT

start_server() {
  "$SERVER_BIN" --model "$model" --served-model-name bench --listen "127.0.0.1:$PORT" "$@" \
    >"$bench_work/prefix-server.log" 2>&1 &
  SERVER_PID=$!
  until curl -fsS "$URL/ready" >/dev/null 2>&1; do
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$bench_work/prefix-server.log"; exit 1; }
    sleep 0.2
  done
}

for mode in off on; do
  echo "== prefix caching $mode ($SERVER_BIN)"
  if [[ $mode == off ]]; then start_server --no-enable-prefix-caching; else start_server; fi
  python3 "$PY" ttft "$URL" "$SYSTEM" "$ROUNDS" "$bench_work/prefix-$mode.json"
  stop_server
done
python3 "$PY" report "$bench_work/prefix-off.json" "$bench_work/prefix-on.json"
