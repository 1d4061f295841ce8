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
kube_router_bin="$cache/bin/kube-router-$KUBE_ROUTER_VERSION/kube-router"

# The node (node-up.sh): containerd, kubelet, kube-proxy and kube-router on this machine. Its pods
# live on a bridge of their own, whose address is the node's IP. The API server and MinIO listen on
# that address too (it is in the API server's certificate): pods reach them there, and nothing of
# the cluster listens on the machine's other interfaces.
NODE_NAME="${KUBETUNE_NODE_NAME:-kubetune-node-0}"
node_dir="$cluster_dir/node"
containerd_sock="$node_dir/containerd/containerd.sock"
BRIDGE="${KUBETUNE_BRIDGE:-kubetune0}"
BRIDGE_IP=10.244.0.1
POD_NETWORK=10.244.0.0/16
# The node's pods take their addresses from here.
NODE_POD_CIDR=10.244.1.0/24
SERVICE_CIDR=10.0.0.0/24
# kubelet looks for device plugins here whatever its --root-dir: one kubelet per machine.
device_plugins=/var/lib/kubelet/device-plugins
# Fake GPUs the device plugin offers on the node: as many as the end-to-end flow holds at once
# (two server replicas and a trainer, each with one, as GPU pods are by default).
NODE_GPUS=4
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

# port_free HOST PORT: nothing listens there yet.
port_free() { ! (echo >"/dev/tcp/$1/$2") 2>/dev/null; }

# The Debian packages the node needs (and `ip`, for the bridge; ipset, for kube-router's firewall).
install_node_packages() {
  local missing=() p
  for p in containerd runc containernetworking-plugins iptables ipset conntrack iproute2 busybox-static; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing ${missing[*]} (Debian packages)"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } >/dev/null
}

# The bridge exists before anything listens on its address, and before kubelet starts: kubelet
# takes it as the node IP. The CNI bridge plugin attaches each pod's veth to it.
bridge_up() {
  [ "$(id -u)" = 0 ] || die "the local cluster needs root: its node runs containers, iptables rules and mounts"
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  # Read whole before matching: grep -q would stop reading early, and pipefail would count
  # ip's broken pipe as "no address".
  local addresses
  addresses="$(ip -4 addr show dev "$BRIDGE")"
  grep -q "inet $BRIDGE_IP/" <<<"$addresses" || ip addr add "$BRIDGE_IP/${POD_NETWORK#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  sysctl -qw net.ipv4.ip_forward=1
  # Pod-to-Service traffic that stays on the bridge only meets kube-proxy's rules through
  # br_netfilter; a kernel without the module still serves host-to-Service and pod-to-pod.
  modprobe br_netfilter 2>/dev/null || true
  [ -f /proc/sys/net/bridge/bridge-nf-call-iptables ] && sysctl -qw net.bridge.bridge-nf-call-iptables=1
  return 0
}

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
