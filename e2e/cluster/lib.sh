# Shared paths and helpers of the local-cluster scripts. Sourced, not run.
# shellcheck shell=bash
# The variables set here are read by the scripts that source this file.
# shellcheck disable=SC2034
cluster_scripts="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$cluster_scripts/../.." && pwd)"
# shellcheck source=versions.env
source "$cluster_scripts/versions.env"

cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
state="${KUBETUNE_STATE:-$repo_root/.kubetune}"
cluster_dir="$state/cluster"
pki="$cluster_dir/pki"
logs="$cluster_dir/logs"
pids="$cluster_dir/pids"
kube_bin="$cache/bin/kubernetes-$KUBERNETES_VERSION"
etcd_bin="$cache/bin/etcd-$ETCD_VERSION/etcd"
minio_bin="$cache/bin/minio-$MINIO_VERSION/minio"
kubeconfig="$cluster_dir/admin.kubeconfig"
crictl_bin="$cache/bin/cri-tools-$CRI_TOOLS_VERSION/crictl"

# The real node (node-up.sh): containerd, kubelet and kube-proxy on this machine. Its pods live on
# a bridge of their own, whose address is the node's IP (and in the API server's certificate, for
# when pods reach it there).
NODE_NAME="${KUBETUNE_NODE_NAME:-kubetune-node-0}"
node_dir="$cluster_dir/node"
containerd_sock="$node_dir/containerd/containerd.sock"
BRIDGE="${KUBETUNE_BRIDGE:-kubetune0}"
BRIDGE_IP=10.244.0.1
POD_NETWORK=10.244.0.0/16
# The real node's pods take their addresses from here (the node agent's pods use loopback ones).
NODE_POD_CIDR=10.244.1.0/24
SERVICE_CIDR=10.0.0.0/24
# kubelet looks for device plugins here whatever its --root-dir: one kubelet per machine.
device_plugins=/var/lib/kubelet/device-plugins
# Fake GPUs the device plugin offers on the real node.
NODE_GPUS=2
PAUSE_IMAGE=kubetune.local/pause:1
TOOLS_IMAGE=kubetune.local/tools:1

ETCD_PORT="${KUBETUNE_ETCD_PORT:-23790}"
APISERVER_PORT="${KUBETUNE_APISERVER_PORT:-26443}"
S3_PORT="${KUBETUNE_S3_PORT:-29000}"
S3_BUCKET="${KUBETUNE_S3_BUCKET:-kubetune}"

log() { echo "[$(basename "$0")] $*" >&2; }
die() { log "error: $*"; exit 1; }

kubectl() { "$kube_bin/kubectl" --kubeconfig "$kubeconfig" "$@"; }
node_images() { ctr --address "$containerd_sock" --namespace k8s.io images "$@"; }
crictl() { "$crictl_bin" --runtime-endpoint "unix://$containerd_sock" --timeout 30s "$@"; }

# Polls a command until it succeeds, up to a deadline; this is how every start waits for readiness.
wait_for() {
  local what="$1" timeout="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "$what not ready after ${timeout}s (logs: $logs)"
    sleep 0.2
  done
}

port_free() { ! (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Starts a daemon in its own session with its pid recorded, so stop_daemon can end it and its children.
start_daemon() {
  local name="$1"; shift
  mkdir -p "$logs" "$pids"
  setsid "$@" >>"$logs/$name.log" 2>&1 </dev/null &
  echo $! >"$pids/$name.pid"
}

daemon_running() { [ -f "$pids/$1.pid" ] && kill -0 "$(cat "$pids/$1.pid")" 2>/dev/null; }

stop_daemon() {
  local name="$1" pid
  [ -f "$pids/$name.pid" ] || return 0
  pid="$(cat "$pids/$name.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pids/$name.pid"
}
