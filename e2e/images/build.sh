#!/usr/bin/env bash
# Builds container images of kubetune's binaries as OCI image-layout tars, with no Docker engine
# and no registry (oci_image.py), and imports them into the local cluster's real node.
#
#   e2e/images/build.sh [--import] [IMAGE...]     IMAGE: pause tools operator trainer server
#
# With no IMAGE, builds them all. kubetune/{operator,trainer,server} hold the workspace's debug
# binaries (`cargo build --bins` first) with their shared libraries, CA certificates and the user
# 65532, tagged as the chart's CPU variant (<appVersion>); the Dockerfiles in docker/ build the
# same images where Docker runs. kubetune.local/pause is the pods' sandbox and kubetune.local/tools
# (a static busybox) is what tests exec into. Tars land in $KUBETUNE_STATE/images/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../cluster/lib.sh"

images_dir="$state/images"
target="${CARGO_TARGET_DIR:-$repo_root/target}"
version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$repo_root/charts/kubetune/Chart.yaml")"
import=0
[ "${1:-}" = --import ] && { import=1; shift; }
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(pause tools operator trainer server)
mkdir -p "$images_dir"

oci() { python3 "$repo_root/e2e/images/oci_image.py" "$@"; }

build_pause() {
  local bin="$images_dir/pause"
  gcc -static -Os -o "$bin" "$repo_root/e2e/images/pause.c"
  oci --name "$PAUSE_IMAGE" --out "$images_dir/pause.tar" --file "$bin:/pause" --entrypoint /pause --user 65535:65535
}

build_tools() {
  local busybox=/bin/busybox
  [ -x "$busybox" ] || die "$busybox is missing: install Debian's busybox-static (e2e/cluster/node-up.sh does)"
  # busybox runs as whichever applet its name says; sh and the rest come through `busybox sh`.
  oci --name "$TOOLS_IMAGE" --out "$images_dir/tools.tar" --file "$busybox:/bin/busybox" \
    --file "$busybox:/bin/sh" --entrypoint /bin/sh
}

build_kubetune() {
  local name="$1" bin="$target/debug/kubetune-$1"
  [ -x "$bin" ] || die "$bin is missing: run cargo build --bins first"
  oci --name "docker.io/kubetune/$name:$version" --out "$images_dir/$name.tar" \
    --file "$bin:/usr/local/bin/kubetune-$name" --entrypoint "/usr/local/bin/kubetune-$name" \
    --user 65532:65532
}

for image in "${wanted[@]}"; do
  case "$image" in
    pause) build_pause ;;
    tools) build_tools ;;
    operator|trainer|server) build_kubetune "$image" ;;
    *) die "unknown image $image (pause, tools, operator, trainer, server)" ;;
  esac
  if [ "$import" = 1 ]; then
    node_images import "$images_dir/$image.tar" >/dev/null
  fi
  log "image $image: $images_dir/$image.tar"
done
