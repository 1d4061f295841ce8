#!/usr/bin/env bash
# Stops the local cluster and everything its node agent runs. Keeps the state (etcd data, S3 data,
# PKI) so the next up.sh is warm, unless --purge is given.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
for d in node-agent kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_daemon "$d"; done
"$cluster_scripts/s3-down.sh" "$@"
[ "${1:-}" = "--purge" ] && rm -rf "$cluster_dir"
log "cluster stopped"
