#!/usr/bin/env bash
# Stops the local cluster: its node (node-down.sh), the control plane and MinIO, then removes the
# bridge they listened on. Keeps the state (etcd data, S3 data, PKI, imported images) so the next
# up.sh is warm, unless --purge is given.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
"$cluster_scripts/node-down.sh"
for d in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_daemon "$d"; done
"$cluster_scripts/s3-down.sh" "$@"
if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link delete "$BRIDGE"; fi
[ "${1:-}" = "--purge" ] && rm -rf "$cluster_dir"
log "cluster stopped"
