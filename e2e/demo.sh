#!/usr/bin/env bash
# The main job, as a new user meets it, on the local cluster:
#   1. bring the cluster up (control plane, S3 store, GPU node agent)
#   2. install the CRDs and the operator from the Helm chart
#   3. upload the tiny base model and the sample instruction dataset to the S3 store
#   4. apply examples/finetunejob.yaml and show progress and loss as it trains
#   5. apply examples/modeldeployment.yaml
#   6. send a chat completion to the deployment and print the answer
# Running it again is safe: every step is idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source e2e/cluster/lib.sh

e2e/cluster/up.sh
bin="${CARGO_TARGET_DIR:-$repo_root/target}/debug"
log "building kubetune (the node agent runs the kubetune/* images from these binaries)"
cargo build --locked --workspace --bins -q
helm="$(e2e/tools.sh helm)"

log "installing kubetune from charts/kubetune into namespace kubetune-system"
"$helm" upgrade --install kubetune charts/kubetune --kubeconfig "$kubeconfig" \
  --namespace kubetune-system --create-namespace \
  --set operator.image.repository=kubetune/operator \
  --set trainer.image.repository=kubetune/trainer \
  --set server.image.repository=kubetune/server \
  --wait --timeout 5m
kubectl -n kubetune-system get deploy

log "uploading the tiny base model and the sample dataset to s3://kubetune"
"$bin/kubetune-tiny-model" --out "$state/demo/tiny-llama" >/dev/null
"$bin/kubetune-upload" --env-file "$state/s3.env" "$state/demo/tiny-llama" s3://kubetune/models/tiny-llama
"$bin/kubetune-upload" --env-file "$state/s3.env" examples/data/support-facts.jsonl s3://kubetune/datasets/support-facts.jsonl

log "fine-tuning: kubectl apply -f examples/finetunejob.yaml"
kubectl apply -f examples/finetunejob.yaml
phase=""
deadline=$((SECONDS + 900))
# A progress display, not a test: print the printer columns until the job ends.
while :; do
  phase="$(kubectl get ftj support-bot -o jsonpath='{.status.phase}')"
  kubectl get ftj support-bot --no-headers
  case "$phase" in Succeeded | Failed) break ;; esac
  [ $SECONDS -lt $deadline ] || die "the FineTuneJob did not finish in 15 minutes"
  sleep 5
done
if [ "$phase" != Succeeded ]; then
  kubectl get ftj support-bot -o jsonpath='{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}'
  die "the FineTuneJob failed"
fi
kubectl get ftj support-bot -o jsonpath='adapter {.status.adapter.name} v{.status.adapter.version} at {.status.adapter.uri}{"\n"}'

log "serving: kubectl apply -f examples/modeldeployment.yaml"
kubectl apply -f examples/modeldeployment.yaml
kubectl wait --for condition=Ready mdep/support --timeout 5m
kubectl get mdep support

# There is no kube-proxy on the local cluster: pods are reached by their IP (127.0.x.y).
pod_ip="$(kubectl get pods -l kubetune.dev/modeldeployment=support -o jsonpath='{.items[0].status.podIP}')"
question="When does the library open?"
log "asking the deployment: $question"
body="$(python3 -c 'import json,sys; print(json.dumps({"model": "support-bot", "messages": [{"role": "user", "content": sys.argv[1]}], "max_tokens": 24, "temperature": 0}))' "$question")"
answer="$(curl -sS --fail-with-body -H 'Content-Type: application/json' -d "$body" "http://$pod_ip:8000/v1/chat/completions")"
echo "$answer" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("answer:", r["choices"][0]["message"]["content"])'

cat <<MSG

kubetune fine-tuned the tiny model on examples/data/support-facts.jsonl and serves the adapter.
Query it yourself (inside a real cluster, use the Service: kubectl get mdep support -o jsonpath='{.status.endpoint}'):
  curl -s http://$pod_ip:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "support-bot", "messages": [{"role": "user", "content": "How many books can I borrow?"}], "temperature": 0}'
Look around:
  export KUBECONFIG=$kubeconfig PATH=$kube_bin:\$PATH
  kubectl get ftj,mdep
Tear everything down: e2e/cluster/down.sh   (add --purge to delete its data too)
MSG
