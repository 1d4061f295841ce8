#!/usr/bin/env bash
# Starts the local cluster's node, as kind's node has it: containerd (with runc and the CNI
# bridge plugin, from Debian's packages), kubelet and kube-proxy (built from their Go modules
# like the control plane). Its pods run in containers from images this machine builds
# (e2e/images/build.sh), on a bridge of their own, with Services through kube-proxy's iptables
# rules, and `kubectl logs`, `exec` and `port-forward` reach them through kubelet.
# NetworkPolicies are enforced, as kind's kindnetd enforces them: by kube-router's firewall alone
# (iptables and ipset rules on the bridged pod traffic; no routing, no service proxy).
#
# kubetune-device-plugin (device-plugin/) offers $NODE_GPUS fake nvidia.com/gpu devices through
# kubelet's device manager. The GPUs are fake and the binaries CPU builds, so the images that
# stand in for the chart's CUDA tags run on the CPU (e2e/images/build.sh).
#
# Needs root (containers, iptables, mounts). Idempotent: whatever already runs is kept.
# Run after up.sh has started the API server; node-down.sh undoes all of it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Writes stdin to FILE only when it differs: kube-proxy exits as soon as its configuration file
# changes, so a second node-up.sh beside a running node must leave the file alone.
write_file() {
  local file="$1" new
  new="$(cat)"
  [ -f "$file" ] && [ "$(cat "$file")" = "$new" ] && return 0
  printf '%s\n' "$new" >"$file.new" && mv "$file.new" "$file"
}

write_containerd_config() {
  mkdir -p "$node_dir/containerd" "$node_dir/cni/conf" "$node_dir/cni/ipam"
  write_file "$node_dir/cni/conf/10-kubetune.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "kubetune",
  "plugins": [
    {
      "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$node_dir/cni/ipam",
        "ranges": [[{"subnet": "$POD_NETWORK", "gateway": "$BRIDGE_IP",
                     "rangeStart": "${NODE_POD_CIDR%.*}.2", "rangeEnd": "${NODE_POD_CIDR%.*}.254"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
  # restrict_oom_score_adj: root here lacks CAP_SYS_RESOURCE, and without it every sandbox fails
  # ("can't get final child's PID from pipe"). The sandbox image is ours: nothing is pulled.
  write_file "$node_dir/containerd/config.toml" <<TOML
version = 2
root = "$node_dir/containerd/root"
state = "$node_dir/containerd/state"
[grpc]
  address = "$containerd_sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node_dir/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
TOML
}

node_kubeconfig() {
  local file="$1" cert="$2"
  write_file "$file" <<KC
apiVersion: v1
kind: Config
clusters:
- name: kubetune-local
  cluster: {server: "https://$BRIDGE_IP:$APISERVER_PORT", certificate-authority: "$pki/ca.crt"}
users:
- name: $cert
  user: {client-certificate: "$pki/$cert.crt", client-key: "$pki/$cert.key"}
contexts:
- name: kubetune-local
  context: {cluster: kubetune-local, user: $cert}
current-context: kubetune-local
KC
}

# cgroup v1 on this VM: kubelet 1.36 runs on it only when told so in its configuration file (the
# flag alone is not enough). Imported images are never garbage-collected (nothing could pull them
# back), and eviction waits for a nearly full disk: a test machine's disk is not the node's.
write_kubelet_config() {
  node_kubeconfig "$node_dir/kubelet.kubeconfig" "kubelet-$NODE_NAME"
  write_file "$node_dir/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /kubetune
address: $BRIDGE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$pki/ca.crt"}
authorization: {mode: Webhook}
containerRuntimeEndpoint: "unix://$containerd_sock"
podCIDR: $NODE_POD_CIDR
maxPods: 40
failSwapOn: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"}
resolvConf: /etc/resolv.conf
clusterDomain: cluster.local
serializeImagePulls: false
YAML
}

write_kube_proxy_config() {
  node_kubeconfig "$node_dir/kube-proxy.kubeconfig" kube-proxy
  write_file "$node_dir/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$node_dir/kube-proxy.kubeconfig"}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $POD_NETWORK
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave the kernel's conntrack limits as they are: a VM may not let them be raised.
conntrack: {maxPerCore: 0}
YAML
}

# kube-router reads pods, namespaces and NetworkPolicies, and at start Services, Endpoints,
# EndpointSlices and Nodes (its informers wait for all of them), with a client certificate as
# kube-proxy does; no built-in ClusterRole fits, so it gets one that reads those and nothing more.
write_kube_router_rbac() {
  node_kubeconfig "$node_dir/kube-router.kubeconfig" kube-router
  kubectl apply -f - >/dev/null <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "kubetune-local:kube-router"}
rules:
- apiGroups: [""]
  resources: [namespaces, pods, services, endpoints, nodes]
  verbs: [get, list, watch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "kubetune-local:kube-router"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "kubetune-local:kube-router"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:kube-router"}
YAML
}

node_ready() {
  [ "$(kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

install_node_packages
if [ ! -x "$kube_bin/kubelet" ] || [ ! -x "$crictl_bin" ]; then
  "$cluster_scripts/build-binaries.sh" kubernetes crictl
fi
bridge_up
write_containerd_config
if ! daemon_running containerd; then
  start_daemon containerd containerd --config "$node_dir/containerd/config.toml"
fi
wait_for containerd 60 ctr --address "$containerd_sock" version
"$repo_root/e2e/images/build.sh" --import pause tools >/dev/null

write_kubelet_config
# kubelet nests its pods' cgroups under cgroupRoot, which must exist in every v1 hierarchy.
for hierarchy in /sys/fs/cgroup/*/; do
  [ -d "$hierarchy" ] && mkdir -p "${hierarchy}kubetune"
done
if ! daemon_running kubelet; then
  # A Node left from an earlier start (etcd keeps it) still says Ready with its old status, taints
  # and labels; kubelet registers it afresh. The Nodes an older local cluster's node agent
  # registered go too (label kubetune.dev/pool=local).
  kubectl delete node "$NODE_NAME" --ignore-not-found --wait=true --timeout=60s >/dev/null
  kubectl delete nodes -l kubetune.dev/pool=local --ignore-not-found --wait=false >/dev/null
  start_daemon kubelet "$kube_bin/kubelet" --config "$node_dir/kubelet.yaml" \
    --kubeconfig "$node_dir/kubelet.kubeconfig" --root-dir "$node_dir/kubelet" \
    --cert-dir "$node_dir/kubelet-pki" \
    --hostname-override "$NODE_NAME" --node-ip "$BRIDGE_IP" --v 1
fi
# Fake GPUs through kubelet's device manager, as NVIDIA's device plugin would offer real ones.
(cd "$repo_root" && cargo build -q -p kubetune-device-plugin)
if ! daemon_running device-plugin; then
  start_daemon device-plugin "${CARGO_TARGET_DIR:-$repo_root/target}/debug/kubetune-device-plugin" \
    --socket-dir "$device_plugins" --devices "$NODE_GPUS"
fi
write_kube_proxy_config
if ! daemon_running kube-proxy; then
  start_daemon kube-proxy "$kube_bin/kube-proxy" --config "$node_dir/kube-proxy.yaml" --v 1
fi
# NetworkPolicies: kube-router's firewall only. Its health and metrics servers stay off (they would
# listen on every interface); it sees bridged pod-to-pod traffic through br_netfilter (bridge_up).
if [ ! -x "$kube_router_bin" ]; then
  "$cluster_scripts/build-binaries.sh" kube-router
fi
write_kube_router_rbac
if ! daemon_running kube-router; then
  start_daemon kube-router "$kube_router_bin" --kubeconfig "$node_dir/kube-router.kubeconfig" \
    --hostname-override "$NODE_NAME" --run-firewall=true --run-router=false --run-service-proxy=false \
    --enable-cni=false --health-port=0 --metrics-port=0 --service-cluster-ip-range "$SERVICE_CIDR" --v 0
fi
wait_for "node $NODE_NAME" 120 node_ready
node_gpus() { [ "$(kubectl get node "$NODE_NAME" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')" = "$NODE_GPUS" ]; }
wait_for "the device plugin's $NODE_GPUS GPUs on $NODE_NAME" 60 node_gpus
# Its top-level chain exists once the firewall has started; policies already in the API server are
# enforced within its first sync.
wait_for "kube-router's firewall" 60 iptables -w -n -L KUBE-ROUTER-FORWARD
log "node $NODE_NAME ready (pods on $BRIDGE, $NODE_POD_CIDR)"
