#!/usr/bin/env bash
# Starts a real S3 server (MinIO, built from its Go module) on the node's bridge address (where
# pods and this machine both reach it), creates the bucket, and writes the credentials to
# $KUBETUNE_STATE/s3.env. Idempotent: a running server is left as it is.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ -x "$minio_bin" ] || "$cluster_scripts/build-binaries.sh" minio
s3_env="$state/s3.env"
mkdir -p "$state/s3/data"
if ! daemon_running minio; then
  port_free "$BRIDGE_IP" "$S3_PORT" || die "port $S3_PORT is taken; set KUBETUNE_S3_PORT"
  # Credentials are generated once per state directory and never printed.
  if [ ! -f "$state/s3/credentials" ]; then
    (umask 077; printf 'kubetune%s\n%s\n' "$(openssl rand -hex 4)" "$(openssl rand -hex 20)" >"$state/s3/credentials")
  fi
  { read -r access; read -r secret; } <"$state/s3/credentials"
  MINIO_ROOT_USER="$access" MINIO_ROOT_PASSWORD="$secret" MINIO_BROWSER=off MINIO_UPDATE=off \
    start_daemon minio "$minio_bin" server --quiet --address "$BRIDGE_IP:$S3_PORT" "$state/s3/data"
fi
{ read -r access; read -r secret; } <"$state/s3/credentials"
endpoint="http://$BRIDGE_IP:$S3_PORT"
wait_for "minio" 60 curl -fsS "$endpoint/minio/health/ready"
# Create the bucket through the S3 API itself (SigV4-signed by curl); 409 means it exists already.
# MinIO can report ready a moment before its object layer answers (HTTP 503), so this is waited
# for like the readiness itself.
deadline=$((SECONDS + 60))
while :; do
  code=$(curl -sS -o /dev/null -w '%{http_code}' -X PUT --user "$access:$secret" \
    --aws-sigv4 "aws:amz:us-east-1:s3" "$endpoint/$S3_BUCKET")
  case "$code" in
    200|409) break ;;
    503) [ $SECONDS -lt $deadline ] || die "creating bucket $S3_BUCKET still answered HTTP 503 after 60 s" ;;
    *) die "creating bucket $S3_BUCKET answered HTTP $code" ;;
  esac
  sleep 0.2
done
(umask 077; cat >"$s3_env" <<ENV
AWS_ENDPOINT_URL=$endpoint
AWS_ACCESS_KEY_ID=$access
AWS_SECRET_ACCESS_KEY=$secret
AWS_REGION=us-east-1
AWS_ALLOW_HTTP=true
KUBETUNE_S3_BUCKET=$S3_BUCKET
ENV
)
log "S3 ready at $endpoint, bucket $S3_BUCKET; credentials in $s3_env"
