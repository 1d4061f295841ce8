#!/usr/bin/env bash
# Builds container images of kubetune's binaries as OCI image-layout tars, with no Docker engine
# and no registry (oci_image.py), and imports them into the local cluster's real node.
#
#   e2e/images/build.sh [--import] [IMAGE...]     IMAGE: pause tools operator trainer server
#
# With no IMAGE, builds them all. kubetune/{operator,trainer,server} hold the workspace's debug
# binaries (`cargo build --bins` first) with their shared libraries, CA certificates and the user
# 65532, tagged as the chart's CPU variant (<appVersion>); the Dockerfiles in docker/ build the
# same images where Docker runs. The trainer and server also get the tag the chart gives pods
# that hold a GPU (<appVersion>-cuda), standing in for the CUDA build on the local node, whose
# GPUs are fake: the same CPU binary, started by a shell line that tells it to use the CPU. kubetune.local/pause is the pods' sandbox and kubetune.local/tools
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

# The operator tells a pod holding a GPU to open CUDA (KUBETUNE_DEVICE=cuda), which a CPU build
# refuses; the stand-in overrides it for the binary alone, whatever the pod's environment says.
build_cuda_stand_in() {
  local name="$1" bin="$target/debug/kubetune-$1"
  oci --name "docker.io/kubetune/$name:$version-cuda" --out "$images_dir/$name-cuda.tar" \
    --file "$bin:/usr/local/bin/kubetune-$name" --file /bin/busybox:/bin/sh \
    --entrypoint /bin/sh --entrypoint=-c \
    --entrypoint "KUBETUNE_DEVICE=cpu exec /usr/local/bin/kubetune-$name \"\$@\"" \
    --entrypoint "kubetune-$name" --user 65532:65532
}

for image in "${wanted[@]}"; do
  tars=("$image")
  case "$image" in
    pause) build_pause ;;
    tools) build_tools ;;
    operator) build_kubetune "$image" ;;
    trainer|server)
      build_kubetune "$image"
      build_cuda_stand_in "$image"
      tars+=("$image-cuda")
      ;;
    *) die "unknown image $image (pause, tools, operator, trainer, server)" ;;
  esac
  for tar in "${tars[@]}"; do
    if [ "$import" = 1 ]; then
      node_images import "$images_dir/$tar.tar" >/dev/null
    fi
    log "image $tar: $images_dir/$tar.tar"
  done
done
