# Shared parts of the model benchmarks (server/bench/run.sh, trainer/bench/run.sh). Sourced.
# Both compare against PyTorch on the same randomly initialised Llama, the benchmark shape of
# issues 3 and 5: hidden 512, 8 layers, 8 heads / 4 KV heads, intermediate 1408, vocab 8192.
# Everything they write goes under .kubetune/bench/ (ignored by Git).
# shellcheck shell=bash
# The variables set here (bench_python, ...) are read by the scripts that source this file.
# shellcheck disable=SC2034

bench_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bench_work="${BENCH_DIR:-$bench_root/.kubetune/bench}"
bench_target="${CARGO_TARGET_DIR:-$bench_root/target}"
bench_shape=(--vocab-size 8192 --hidden-size 512 --intermediate-size 1408 --layers 8 --heads 8 --kv-heads 4)
mkdir -p "$bench_work"

bench_refuse_ci() {
  if [[ -n "${CI:-}" ]]; then
    echo "$1: not run in CI (it downloads PyTorch and takes minutes)"
    exit 0
  fi
}

# Release build of the given packages' binaries.
bench_build() {
  echo "== build (release): $*"
  local p args=()
  for p in "$@"; do args+=(-p "$p"); done
  (cd "$bench_root" && cargo build --release --locked "${args[@]}" --bins)
}

# Generates the benchmark model into $bench_work/model, again only when the generator binary or
# the shape changed (a stamp records both).
bench_model() {
  local generator="$bench_target/release/kubetune-tiny-model"
  local stamp
  stamp="$(sha256sum "$generator" | cut -c1-16) ${bench_shape[*]}"
  if [[ ! -f "$bench_work/model/config.json" || "$(cat "$bench_work/model.stamp" 2>/dev/null)" != "$stamp" ]]; then
    echo "== model (${bench_shape[*]})"
    "$generator" --out "$bench_work/model" "${bench_shape[@]}"
    echo "$stamp" >"$bench_work/model.stamp"
  fi
}

# A copy of the benchmark model whose context is $1 tokens (max_position_embeddings), for the
# server's scheduler and prefix benchmarks; sets $bench_context_model.
bench_model_with_context() {
  bench_context_model="$bench_work/model-ctx$1"
  rm -rf "$bench_context_model"
  cp -r "$bench_work/model" "$bench_context_model"
  python3 - "$bench_context_model/config.json" "$1" <<'PYEOF'
import json, sys
path, context = sys.argv[1], int(sys.argv[2])
config = json.load(open(path))
config["max_position_embeddings"] = context
json.dump(config, open(path, "w"), indent=1)
PYEOF
}

# Starts $SERVER_BIN serving model $1 on 127.0.0.1:$PORT as `bench`, logging to $2, with the
# flags that follow, and waits until it is ready; sets $bench_server_pid. Stopped by
# bench_server_stop, which the caller also traps on EXIT.
bench_server_pid=
bench_server_start() {
  local model=$1 log=$2
  shift 2
  "$SERVER_BIN" --model "$model" --served-model-name bench --listen "127.0.0.1:$PORT" "$@" >"$log" 2>&1 &
  bench_server_pid=$!
  until curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1; do
    kill -0 "$bench_server_pid" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.2
  done
}

bench_server_stop() {
  [[ -n "$bench_server_pid" ]] || return 0
  kill "$bench_server_pid" 2>/dev/null || true
  wait "$bench_server_pid" 2>/dev/null || true
  bench_server_pid=
}

# A venv with torch, transformers and peft from PyPI (some GB, once); sets $bench_python.
bench_venv() {
  local venv="$bench_work/venv"
  if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import torch, transformers, peft' 2>/dev/null; then
    echo "== venv: pip install torch transformers peft (PyPI)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet torch transformers peft
  fi
  bench_python="$venv/bin/python"
}
