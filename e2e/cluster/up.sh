#!/usr/bin/env bash
# Brings up the local Kubernetes cluster: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler (all built from their Go modules and cached per version), MinIO as the S3 store,
# and a node (node-up.sh: containerd, kubelet, kube-proxy, fake GPUs through a device plugin).
# Everything listens on the node's bridge address, where pods reach it. Needs root.
# Idempotent: whatever already runs is kept. Writes the admin kubeconfig to
# $KUBETUNE_STATE/cluster/admin.kubeconfig (default .kubetune/ in the repo).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start=$SECONDS

"$cluster_scripts/build-binaries.sh"
"$cluster_scripts/pki.sh"
install_node_packages
bridge_up
mkdir -p "$cluster_dir/etcd" "$logs"

write_kubeconfig() {
  local file="$1" cert="$2"
  cat >"$file" <<KC
apiVersion: v1
kind: Config
clusters:
- name: kubetune-local
  cluster:
    server: https://$BRIDGE_IP:$APISERVER_PORT
    certificate-authority: $pki/ca.crt
users:
- name: $cert
  user:
    client-certificate: $pki/$cert.crt
    client-key: $pki/$cert.key
contexts:
- name: kubetune-local
  context: {cluster: kubetune-local, user: $cert}
current-context: kubetune-local
KC
}
write_kubeconfig "$kubeconfig" admin
write_kubeconfig "$cluster_dir/controller-manager.kubeconfig" controller-manager
write_kubeconfig "$cluster_dir/scheduler.kubeconfig" scheduler

if ! daemon_running etcd; then
  port_free 127.0.0.1 "$ETCD_PORT" || die "port $ETCD_PORT is taken; set KUBETUNE_ETCD_PORT"
  start_daemon etcd "$etcd_bin" --data-dir "$cluster_dir/etcd" --name kubetune-local \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "kubetune-local=http://127.0.0.1:$((ETCD_PORT + 1))" \
    --unsafe-no-fsync --quota-backend-bytes 4294967296 --log-level warn
fi
wait_for etcd 60 curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

# KUBETUNE_APISERVER_ARGS: more kube-apiserver flags (the operator scale benchmark's stress mode).
read -ra apiserver_args <<<"${KUBETUNE_APISERVER_ARGS:-}"
if ! daemon_running kube-apiserver; then
  port_free "$BRIDGE_IP" "$APISERVER_PORT" || die "port $APISERVER_PORT is taken; set KUBETUNE_APISERVER_PORT"
  start_daemon kube-apiserver "$kube_bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address "$BRIDGE_IP" --advertise-address "$BRIDGE_IP" --secure-port "$APISERVER_PORT" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --kubelet-preferred-address-types InternalIP \
    --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
    --allow-privileged=true --profiling=false \
    --cert-dir "$cluster_dir/apiserver-certs" --v 1 "${apiserver_args[@]}"
fi
wait_for kube-apiserver 120 kubectl get --raw /readyz

if ! daemon_running kube-controller-manager; then
  start_daemon kube-controller-manager "$kube_bin/kube-controller-manager" \
    --kubeconfig "$cluster_dir/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$cluster_dir/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$cluster_dir/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
    --use-service-account-credentials --leader-elect=false --profiling=false \
    --controllers '*,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller' --v 1
fi
if ! daemon_running kube-scheduler; then
  start_daemon kube-scheduler "$kube_bin/kube-scheduler" \
    --kubeconfig "$cluster_dir/scheduler.kubeconfig" \
    --authentication-kubeconfig "$cluster_dir/scheduler.kubeconfig" \
    --authorization-kubeconfig "$cluster_dir/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false --profiling=false --v 1
fi

"$cluster_scripts/s3-up.sh"
"$cluster_scripts/node-up.sh"

# The object-store credentials, as the Secret FineTuneJobs and ModelDeployments reference.
wait_for "default namespace" 60 kubectl get namespace default
kubectl create secret generic kubetune-storage --dry-run=client -o yaml --from-env-file "$state/s3.env" \
  | kubectl apply -f - >/dev/null

log "cluster up in $((SECONDS - start))s; export KUBECONFIG=$kubeconfig; kubectl: $kube_bin/kubectl"
