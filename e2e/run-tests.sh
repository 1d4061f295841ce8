#!/usr/bin/env bash
# The project's test command (README, CI): brings the local cluster up (building what is not
# cached), runs every unit and end-to-end test in the workspace against it, and stops the cluster.
# KUBETUNE_KEEP_CLUSTER=1 leaves the cluster running afterwards.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source e2e/cluster/lib.sh

start=$SECONDS
if [ "${KUBETUNE_KEEP_CLUSTER:-0}" != 1 ]; then
  trap 'e2e/cluster/down.sh >/dev/null 2>&1 || true' EXIT
fi
e2e/cluster/up.sh
# The workspace's binaries, and the kubetune/* images the operator, trainer and server pods run
# on the local node, made from them.
cargo build --locked --workspace --bins -q
e2e/images/build.sh --import operator trainer server
# The official `openai` Python client against the server on the tiny model (no cluster needed;
# openai from PyPI, cached).
KUBETUNE_SKIP_BUILD=1 e2e/openai-client.sh
# helm, promtool, lua and actionlint for the chart, alert, Argo CD and CI workflow tests (built or unpacked once, then cached).
e2e/tools.sh >/dev/null
# The end-to-end tests install their own operator and need the cluster to themselves; `make demo`
# leaves its release running (make demo installs it again in under a minute).
if kubectl -n kubetune-system get deployment kubetune >/dev/null 2>&1; then
  log "removing make demo's kubetune release: the tests run their own operator"
  "$(e2e/tools.sh helm)" uninstall kubetune --namespace kubetune-system --kubeconfig "$kubeconfig" --wait >/dev/null
fi
export KUBECONFIG="$kubeconfig" KUBECTL="$kube_bin/kubectl" KUBETUNE_S3_ENV="$state/s3.env"
cargo test --workspace --locked "$@"
log "all tests passed in $((SECONDS - start))s"
