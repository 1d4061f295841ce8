#!/usr/bin/env bash
# Benchmarks kubetune-server against HF transformers `generate` (PyTorch CPU) on the same
# randomly initialised Llama (the shape in e2e/bench/lib.sh): generated tokens/s, TTFT p50/p99,
# peak RSS, ratios. Cases (CASES picks some, in this order):
#   base      128-token prompts, 128 new tokens, greedy, concurrency 1, 4 and 16; f32 and
#             --quantize int8 (against PyTorch's dynamic int8 too)
#   long      a 4096-token prompt (a copy of the model with an 8192-token context), 64 new
#             tokens, concurrency 1 and 4
#   default   chat requests without max_tokens (a chat template added to a copy of the model
#             with a 1024-token context): each runs to the end of the context, concurrency 1
#             and 16
#   sampling  non-greedy (temperature 0.8, top_p 0.95) on a copy of the model with a
#             151,936-token vocabulary (Qwen2's), concurrency 1 and 16
#   adapters  50 LoRA adapters (r 8, PEFT-made) in a file:// registry, requests spread over them,
#             the server loading them on demand with 8 loaded at a time; transformers holds all
#             50 in PEFT and generates mixed-adapter batches; concurrency 16
# The new cases run f32 on both sides. Each case runs both sides level by level (see levels).
#
#   server/bench/run.sh                 # build, generate the models, run every case
#   CASES="long adapters" server/bench/run.sh
#   SERVER_BIN=path server/bench/run.sh # benchmark another server binary (e.g. an older commit)
#   SKIP_HF=1 server/bench/run.sh       # reuse the last transformers figures
#
# Not for CI: it installs torch, transformers and peft from PyPI into its own venv (some GB)
# and runs for many minutes.
set -euo pipefail
source "$(dirname "$0")/../../e2e/bench/lib.sh"
bench_refuse_ci server/bench/run.sh
PORT=${PORT:-18123}
BENCH="$bench_root/server/bench/bench.py"
CASES=${CASES:-base long default sampling adapters}

bench_build kubetune-server kubetune-model kubetune-storage
SERVER_BIN=${SERVER_BIN:-$bench_target/release/kubetune-server}
bench_model
bench_venv
trap bench_server_stop EXIT

# The concurrency levels of the case (its CONCURRENCY). Both sides run level by level, one
# after the other (compare), so that the two figures of a ratio are taken minutes apart at most,
# under the same load: on shared cores a whole side run before the other saw different loads.
levels() {
  echo "${CONCURRENCY:-1 4 16}"
}

# serve NAME MODEL C [FLAG...]: our server on MODEL with the flags, loaded at concurrency C by
# bench.py under the case's environment; figures in server-NAME-cC.json.
serve() {
  local name=$1 model=$2 c=$3
  shift 3
  echo "== kubetune-server: $name, concurrency $c ($SERVER_BIN $*)"
  bench_server_start "$model" "$bench_work/server-$name.log" --max-batch 16 --max-queue 64 "$@"
  CONCURRENCY=$c "$bench_python" "$BENCH" server "http://127.0.0.1:$PORT" "$bench_work/server-$name-c$c.json" \
    "$bench_server_pid"
  bench_server_stop
}

# reference NAME MODEL C [int8]: transformers on MODEL at batch size C under the case's
# environment; figures in hf-NAME-cC.json, kept from an earlier run with SKIP_HF.
reference() {
  local name=$1 model=$2 c=$3 quantize=${4:-none}
  if [[ -z "${SKIP_HF:-}" || ! -f "$bench_work/hf-$name-c$c.json" ]]; then
    echo "== transformers generate: $name, batch $c"
    CONCURRENCY=$c "$bench_python" "$BENCH" hf "$model" "$bench_work/hf-$name-c$c.json" "$quantize"
  fi
}

# merge SIDE NAME: one figures file, SIDE-NAME.json, from the levels' files.
merge() {
  local side=$1 name=$2 c files=()
  for c in $(levels); do files+=("$bench_work/$side-$name-c$c.json"); done
  "$bench_python" "$BENCH" merge "$bench_work/$side-$name.json" "${files[@]}"
}

report() {
  "$bench_python" "$BENCH" report "$bench_work/server-$1.json" "$bench_work/hf-$2.json" "$3"
}

# compare NAME MODEL TITLE [FLAG...]: one case, f32 on both sides.
compare() {
  local name=$1 model=$2 title=$3 c
  shift 3
  for c in $(levels); do
    serve "$name" "$model" "$c" "$@"
    reference "$name" "$model" "$c"
  done
  merge server "$name"
  merge hf "$name"
  report "$name" "$name" "$title"
}

case_base() {
  local model="$bench_work/model" c
  for c in $(levels); do
    serve none "$model" "$c"
    serve int8 "$model" "$c" --quantize int8
    reference none "$model" "$c"
    reference int8 "$model" "$c" int8
  done
  merge server none
  merge server int8
  merge hf none
  merge hf int8
  report none none "f32: kubetune-server vs transformers"
  report int8 none "kubetune-server --quantize int8 vs transformers f32 (the issue's reference)"
  report int8 int8 "int8: kubetune-server --quantize int8 vs transformers with PyTorch dynamic int8"
}

case_long() {
  bench_model_with_context 8192
  PROMPT_TOKENS=4096 NEW_TOKENS=64 CONCURRENCY="1 4" ROUNDS=1 \
    compare long "$bench_context_model" "long prompt: 4096 tokens"
}

# Chat requests (a completion without max_tokens stops at 16 tokens, as in OpenAI's API), so
# the copy gets a chat template that both sides apply.
case_default() {
  bench_model_with_context 1024
  python3 - "$bench_context_model/tokenizer_config.json" <<'PYEOF'
import json, sys
path = sys.argv[1]
config = json.load(open(path))
config["chat_template"] = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                           "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
json.dump(config, open(path, "w"), indent=1)
PYEOF
  PROMPT_TOKENS=128 NEW_TOKENS=default CONTEXT=1024 CONCURRENCY="1 16" ROUNDS=1 \
    compare default "$bench_context_model" "default requests: chat without max_tokens"
}

case_sampling() {
  local model="$bench_work/model-vocab151936"
  if [[ ! -f "$model/config.json" || "$(cat "$model.stamp" 2>/dev/null)" != "$(cat "$bench_work/model.stamp")" ]]; then
    echo "== model with a 151936-token vocabulary"
    "$bench_target/release/kubetune-tiny-model" --out "$model" --vocab-size 151936 "${bench_shape[@]:2}"
    cp "$bench_work/model.stamp" "$model.stamp"
  fi
  SAMPLING=top_p CONCURRENCY="1 16" compare sampling "$model" "non-greedy sampling, 151936-token vocabulary"
}

case_adapters() {
  local adapters="$bench_work/adapters" registry="$bench_work/registry" n=50
  if [[ ! -f "$adapters/a$((n - 1))/adapter_config.json" || ! -d "$registry/adapters/a$((n - 1))" ]]; then
    echo "== $n random adapters, published to file://$registry"
    rm -rf "$adapters" "$registry"
    "$bench_python" "$BENCH" adapters "$bench_work/model" "$adapters" "$n"
    for k in $(seq 0 $((n - 1))); do
      "$bench_target/release/kubetune-adapters" --registry "file://$registry" push "a$k" "$adapters/a$k" \
        --base-model "$bench_work/model" --dataset file:///bench/random >/dev/null
    done
  fi
  rm -rf "$bench_work/adapter-cache"
  ADAPTERS=$n ADAPTER_DIR="$adapters" NEW_TOKENS=64 CONCURRENCY=16 \
    compare adapters "$bench_work/model" "$n adapters, 8 loaded at a time (on demand) vs all $n in PEFT" \
    --registry "file://$registry" --cache-dir "$bench_work/adapter-cache" --adapter-on-demand --max-adapters 8
}

for c in $CASES; do
  declare -F "case_$c" >/dev/null || { echo "unknown case $c (base long default sampling adapters)" >&2; exit 2; }
done
for c in $CASES; do
  "case_$c"
done
