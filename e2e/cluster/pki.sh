#!/usr/bin/env bash
# Creates the local cluster's PKI once, as envtest does: a CA, the API server's serving certificate,
# a system:masters client certificate for the admin kubeconfig, a controller-manager and a scheduler
# client certificate, the real node's kubelet, kube-proxy and kube-router client certificates, the
# API server's client certificate towards kubelets (logs, exec, port-forward), and the
# service-account signing key pair.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mkdir -p "$pki"
cd "$pki"
[ -f ca.crt ] || openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
  -subj "/CN=kubetune-local-ca" 2>/dev/null

# client_cert NAME CN ORG: a client certificate signed by the CA.
client_cert() {
  local name="$1" cn="$2" org="$3"
  [ -f "$name.crt" ] && return
  openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "/CN=$cn/O=$org" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$name.crt" -days 3650 \
    -extfile "$name.ext" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

# The serving certificate names the bridge address too, where pods reach the API server; one made
# before the real node existed lacks it and is made again.
if [ -f apiserver.crt ] && ! openssl x509 -in apiserver.crt -noout -text | grep -q "IP Address:$BRIDGE_IP"; then
  rm -f apiserver.crt apiserver.key
fi
if [ ! -f apiserver.crt ]; then
  openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
  cat >apiserver.ext <<EXT
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,IP:$BRIDGE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EXT
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 3650 \
    -extfile apiserver.ext 2>/dev/null
  rm -f apiserver.csr apiserver.ext
fi
client_cert admin kubetune-admin system:masters
client_cert controller-manager system:kube-controller-manager system:kube-controller-manager
client_cert scheduler system:kube-scheduler system:kube-scheduler
# The Node authorizer knows a kubelet by this name and group, and lets it reach only its own pods' objects.
client_cert "kubelet-$NODE_NAME" "system:node:$NODE_NAME" system:nodes
client_cert kube-proxy system:kube-proxy system:node-proxier
# kube-router's firewall, the node's NetworkPolicy enforcer; node-up.sh grants this user read access.
client_cert kube-router system:kube-router kubetune:network-policy
client_cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
[ -f sa.key ] || { openssl genrsa -out sa.key 2048 2>/dev/null && openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null; }
chmod 600 ./*.key
