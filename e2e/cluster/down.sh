#!/usr/bin/env bash
# Stops the local cluster, everything its node agent runs and the real node (node-down.sh). Keeps
# the state (etcd data, S3 data, PKI, imported images) so the next up.sh is warm, unless --purge
# is given.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
stop_daemon node-agent
"$cluster_scripts/node-down.sh"
for d in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_daemon "$d"; done
"$cluster_scripts/s3-down.sh" "$@"
[ "${1:-}" = "--purge" ] && rm -rf "$cluster_dir"
log "cluster stopped"
