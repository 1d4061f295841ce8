#!/usr/bin/env bash
# The main job, as a new user meets it: bring the local cluster up, install kubetune's CRDs, and
# apply the example FineTuneJob and ModelDeployment.
#
# Status: the operator, trainer and server are still being built (see the issues), so the demo
# stops after showing the resources the API server accepted. Each of those issues extends it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source e2e/cluster/lib.sh

e2e/cluster/up.sh
log "installing the CRDs"
cargo run -q -p kubetune-crds --bin kubetune-crdgen -- --stdout | kubectl apply --server-side --field-manager kubetune -f -
kubectl wait --for condition=Established crd/finetunejobs.kubetune.dev crd/modeldeployments.kubetune.dev --timeout 60s
log "applying examples/finetunejob.yaml and examples/modeldeployment.yaml"
kubectl apply -f examples/finetunejob.yaml -f examples/modeldeployment.yaml
kubectl get nodes
kubectl get ftj,mdep
cat <<MSG

The local cluster is up. Use it yourself:
  export KUBECONFIG=$kubeconfig
  export PATH=$kube_bin:\$PATH
  kubectl get ftj,mdep
Tear it down with: e2e/cluster/down.sh   (add --purge to delete its data too)
MSG
