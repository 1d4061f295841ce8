#!/usr/bin/env bash
# Stops the node and leaves nothing of it behind: no processes (containers and their shims
# included), mounts, network namespaces, veths, iptables chains, ipsets or cgroups. Keeps the
# imported images and containerd's content, so that the next node-up.sh is warm, and the bridge,
# whose address the API server and MinIO listen on (down.sh removes it last).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ -d "$node_dir" ] || exit 0
stop_daemon device-plugin
stop_daemon kubelet
stop_daemon kube-proxy
stop_daemon kube-router
# kube-proxy undoes its own rules; kubelet leaves its canary chains, removed below.
if [ -x "$kube_bin/kube-proxy" ]; then "$kube_bin/kube-proxy" --cleanup >/dev/null 2>&1 || true; fi

# Pods go through the CRI so that CNI tears their networks down (veths, addresses, NAT rules).
if daemon_running containerd && [ -x "$crictl_bin" ]; then
  for pod in $(crictl pods -q 2>/dev/null); do
    crictl stopp "$pod" >/dev/null 2>&1 || true
    crictl rmp -f "$pod" >/dev/null 2>&1 || true
  done
fi
stop_daemon containerd
# containerd's shims run in sessions of their own; any left (a pod that would not stop) ends here.
pkill -KILL -f "containerd-shim-runc-v2 -namespace k8s.io -address $containerd_sock" 2>/dev/null || true

# Innermost first: pod volumes and sandboxes' shm inside kubelet's and containerd's directories,
# then kubelet's bind mount of its own root.
for m in $(findmnt -rn -o TARGET | grep -F "$node_dir/" | sort -r || true); do umount -l "$m" 2>/dev/null || true; done
for ns in $(ip netns list 2>/dev/null | awk '/^cni-/ {print $1}' || true); do
  ip netns pids "$ns" 2>/dev/null | grep -q . || ip netns delete "$ns" 2>/dev/null || true
done

# The chains of kube-proxy, kubelet and kube-router (KUBE-*: kube-router's are KUBE-ROUTER-*,
# KUBE-POD-FW-* and KUBE-NWPLCY-*), and those the CNI bridge plugin made for our network's pods
# (CNI-*, their rules commented `name: "kubetune"`) if a pod's teardown left any.
ours() { [[ "$1" == KUBE-* ]] || { [[ "$1" == CNI-* ]] && grep -qF 'name: \"kubetune\"' <<<"$2"; }; }
remove_chains() {
  local table chain rules own doomed
  for table in filter nat mangle; do
    rules="$(iptables -t "$table" -S 2>/dev/null)" || continue
    doomed=()
    while read -r chain; do
      own="$(grep -F -- "-A $chain " <<<"$rules" || true)"
      if ours "$chain" "$own" || [[ "$chain" == CNI-* && -z "$own" ]]; then doomed+=("$chain"); fi
    done < <(awk '$1 == "-N" {print $2}' <<<"$rules")
    [ ${#doomed[@]} -gt 0 ] || continue
    # The jumps into them go first (eval: iptables quotes its comments), then their rules, then
    # the chains themselves, once nothing refers to them.
    awk '$1 == "-A" {print}' <<<"$rules" | while read -r _ rest; do
      chain="$(awk '{for (i = 1; i < NF; i++) if ($i == "-j") print $(i + 1)}' <<<"$rest")"
      if [[ " ${doomed[*]} " == *" $chain "* ]]; then eval "iptables -t $table -D $rest" 2>/dev/null || true; fi
    done
    for chain in "${doomed[@]}"; do iptables -t "$table" -F "$chain" 2>/dev/null || true; done
    for chain in "${doomed[@]}"; do iptables -t "$table" -X "$chain" 2>/dev/null || true; done
  done
}

command -v iptables >/dev/null && remove_chains
# kube-router's ipsets (its policies' pod addresses), once no rule refers to them.
if command -v ipset >/dev/null; then
  for set in $(ipset list -n 2>/dev/null | grep -E '^(KUBE-SRC-|KUBE-DST-|kube-router-)' || true); do
    ipset destroy "$set" 2>/dev/null || true
  done
fi

# kubelet's cgroups, under its cgroupRoot in every v1 hierarchy; empty once no container runs.
for hierarchy in /sys/fs/cgroup/*/kubetune; do
  if [ -d "$hierarchy" ]; then find "$hierarchy" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
done
rm -rf "$node_dir/cni/ipam" "$node_dir/kubelet"
# What kubelet and the plugin left in the one directory kubelet does not take from --root-dir.
rm -f "$device_plugins"/{kubelet.sock,kubelet_internal_checkpoint,kubetune-gpu.sock}
rmdir "$device_plugins" "$(dirname "$device_plugins")" 2>/dev/null || true
log "node stopped"
