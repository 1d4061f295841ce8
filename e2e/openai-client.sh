#!/usr/bin/env bash
# The official `openai` Python client against kubetune-server (server/tests/openai_client/):
# chat, completions, streaming, n, logprobs, request ids, models, an adapter, and the errors,
# as a second check of the wire format beside the Rust tests. Needs no cluster: it starts the
# debug server on a free loopback port with the tiny generated model and a seeded adapter.
#
# `openai` (pinned below) comes from PyPI into a venv cached in $KUBETUNE_CACHE (no PyTorch).
# Builds the two binaries it needs unless KUBETUNE_SKIP_BUILD=1 (e2e/run-tests.sh has built
# the workspace already). Arguments go to unittest: e2e/openai-client.sh -k logprobs
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

openai_version=2.54.0
cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
venv="$cache/venv/openai-$openai_version"
target="${CARGO_TARGET_DIR:-$repo_root/target}"
suite="$repo_root/server/tests/openai_client"
start=$SECONDS

log() { echo "openai-client: $*" >&2; }

# The venv: made once per pinned version; the stamp is written last, so a half-made one is
# made again.
if [[ ! -f "$venv/.complete" ]]; then
  log "installing openai==$openai_version from PyPI into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$openai_version"
  touch "$venv/.complete"
fi
python="$venv/bin/python"

if [[ "${KUBETUNE_SKIP_BUILD:-0}" != 1 ]]; then
  cargo build --locked -q -p kubetune-server -p kubetune-model --bin kubetune-server --bin kubetune-tiny-model
fi

work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

"$target/debug/kubetune-tiny-model" --out "$work/model" >/dev/null
# A chat template that shows tools and writes calls as Hermes does, for the tool-call tests.
cp "$repo_root/server/tests/fixtures/chat_template_hermes.jinja" "$work/model/chat_template.jinja"
"$python" "$suite/write_adapter.py" --model "$work/model" --out "$work/adapter" --name ada --version 1 --base tiny

# Inference behind an API key, as a deployment with clients outside the cluster runs it: the
# client sends it as `Authorization: Bearer`.
api_key="sk-kubetune-client-suite"
echo "$api_key" >"$work/api-keys"

# A port the kernel hands out as free now; the server binds it a moment later.
port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$target/debug/kubetune-server" --model "$work/model" --served-model-name tiny \
  --adapter "ada=$work/adapter" --listen "127.0.0.1:$port" --kv-cache-mb 64 --api-keys-file "$work/api-keys" \
  >"$work/server.log" 2>&1 &
server_pid=$!

url="http://127.0.0.1:$port"
deadline=$((SECONDS + 120))
until curl -fsS -o /dev/null "$url/ready" 2>/dev/null; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    log "kubetune-server exited before it was ready:"
    cat "$work/server.log" >&2
    exit 1
  fi
  if ((SECONDS > deadline)); then
    log "kubetune-server not ready after 120 s:"
    cat "$work/server.log" >&2
    exit 1
  fi
  sleep 0.2
done

cd "$suite"
if ! KUBETUNE_OPENAI_BASE_URL="$url/v1" KUBETUNE_OPENAI_MODEL=tiny KUBETUNE_OPENAI_ADAPTER=ada \
  KUBETUNE_OPENAI_API_KEY="$api_key" \
  "$python" -m unittest "$@" test_client; then
  log "failed; the server's log:"
  tail -n 50 "$work/server.log" >&2
  exit 1
fi
log "passed in $((SECONDS - start))s (openai $openai_version)"
