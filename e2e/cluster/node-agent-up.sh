#!/usr/bin/env bash
# Builds kubetune's node agent and starts it: it registers the local cluster's Nodes (with fake
# nvidia.com/gpu capacity) and runs the pods scheduled onto them as local processes.
# Container images map to the workspace's binaries through $cluster_dir/node-agent.yaml.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

target="${CARGO_TARGET_DIR:-$repo_root/target}"
(cd "$repo_root" && cargo build -q -p kubetune-node-agent)
# The Nodes' GPUs are fake and the binaries are CPU builds: the operator tells a pod that
# requests a GPU to open CUDA (KUBETUNE_DEVICE=cuda), which a CPU build refuses. The stand-ins
# for the trainer and server images therefore run on the CPU whatever device the pod is told.
on_cpu="$cluster_dir/on-cpu"
mkdir -p "$on_cpu"
for name in kubetune-trainer kubetune-server; do
  printf '#!/bin/sh\nexport KUBETUNE_DEVICE=cpu\nexec '"'"'%s'"'"' "$@"\n' "$target/debug/$name" >"$on_cpu/$name"
  chmod +x "$on_cpu/$name"
done
cat >"$cluster_dir/node-agent.yaml" <<YAML
# Image (tag ignored) -> local binary that stands in for the image's entrypoint. Only the short
# kubetune/* names map: a chart installed with its default ghcr.io images (as the chart tests do)
# stays unstarted, so only an install that asks for these names runs a live operator.
images:
  kubetune/operator: $target/debug/kubetune-operator
  kubetune/trainer: $on_cpu/kubetune-trainer
  kubetune/server: $on_cpu/kubetune-server
YAML
if ! daemon_running node-agent; then
  start_daemon node-agent "$target/debug/kubetune-node-agent" \
    --kubeconfig "$kubeconfig" --config "$cluster_dir/node-agent.yaml" --state-dir "$cluster_dir/node-agent" \
    --node kubetune-gpu-0 --node kubetune-gpu-1 --gpus 2 --gpu-memory-mib 24576 \
    --label kubetune.dev/pool=local
fi
ready_nodes() { [ "$(kubectl get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True)" -ge 2 ]; }
wait_for "node agent's Nodes" 60 ready_nodes
log "nodes ready; pod logs under $cluster_dir/node-agent"
