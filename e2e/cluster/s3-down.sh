#!/usr/bin/env bash
# Stops the local S3 server. Its data stays in $KUBETUNE_STATE/s3 unless --purge is given.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
stop_daemon minio
[ "${1:-}" = "--purge" ] && rm -rf "$state/s3" "$state/s3.env"
log "S3 stopped"
