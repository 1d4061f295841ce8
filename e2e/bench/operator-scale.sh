#!/usr/bin/env bash
# Scale benchmark of the FineTuneJob controller: creates N FineTuneJobs (default 1000) whose
# pods land on fake nodes that KWOK (sigs.k8s.io/kwok, built by `build-binaries.sh kwok`) keeps:
# it marks the nodes Ready and their pods Running, with no kubelet and no containers. Reports how
# long until every trainer Job exists and every status is current (observedGeneration ==
# generation), and the operator's peak RSS. Goal (issue 6): 1,000 reconciled within 30 s,
# operator RSS under 100 MiB.
#
#   e2e/bench/operator-scale.sh [N]
#
# KUBETUNE_BENCH_OPERATOR: an operator binary to run instead of building this checkout's (to
# compare two builds on the same cluster). KUBETUNE_BENCH_LOG: the operator's RUST_LOG (warn).
# KUBETUNE_BENCH_STRESS=1: the operator falls behind on purpose (#18 §0): the API server runs
# without its watch cache (every list read from etcd, in pages of 500) and compacts etcd every
# 30 s, and the operator is stopped while the jobs are created and for 65 s after, so that it
# comes back to a watch that has expired and 1,000 jobs at once. The API server is restarted as
# it was at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source e2e/cluster/lib.sh
n="${1:-1000}"
fake_nodes=10
fake_selector=type=kwok,kubetune.dev/pool=fake

e2e/cluster/up.sh
"$cluster_scripts/build-binaries.sh" kwok
kwok_dir="$cache/bin/kwok-$KWOK_VERSION"
cargo build -q --release -p kubetune-operator -p kubetune-crds
target="${CARGO_TARGET_DIR:-$repo_root/target}"
operator_bin="${KUBETUNE_BENCH_OPERATOR:-$target/release/kubetune-operator}"
"$target/release/kubetune-crdgen" --stdout | kubectl apply --server-side --field-manager kubetune -f - >/dev/null
kubectl wait --for condition=Established crd/finetunejobs.kubetune.dev --timeout 60s >/dev/null

# Fake nodes with room for every pod. KWOK manages only the nodes with its annotation (never the
# real node) and the pods bound to them. They are tainted so that nothing but the benchmark's
# trainer pods, which tolerate it, lands there while it runs.
fake_node_yaml() {
  local i
  for i in $(seq 0 $((fake_nodes - 1))); do
    cat <<YAML
---
apiVersion: v1
kind: Node
metadata:
  name: kubetune-fake-$i
  annotations: {kwok.x-k8s.io/node: fake}
  labels: {type: kwok, kubetune.dev/pool: fake, kubernetes.io/hostname: kubetune-fake-$i, kubernetes.io/os: linux, kubernetes.io/arch: amd64}
spec:
  taints: [{key: kwok.x-k8s.io/node, value: fake, effect: NoSchedule}]
status:
  capacity: {cpu: "1000", memory: 4Ti, pods: "250", nvidia.com/gpu: "200"}
  allocatable: {cpu: "1000", memory: 4Ti, pods: "250", nvidia.com/gpu: "200"}
YAML
  done
}
# kwok itself runs no stage (no lifecycle for nodes or pods) unless given some. These are kwok's
# own, the ones kwokctl applies by default: a node becomes Ready (keeping the capacity above) and
# renews its lease; a pod becomes Running with an IP from --cidr (loopback, where the operator's
# progress scrape is refused at once); a deleted pod goes. Not pod-complete: the trainer pods stay
# Running, as in a training.
kwok_config="$cluster_dir/kwok-bench.yaml"
for stage in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
  pod/fast/pod-ready pod/fast/pod-delete; do
  echo ---
  cat "$kwok_dir/stages/$stage.yaml"
done >"$kwok_config"

stress="${KUBETUNE_BENCH_STRESS:-}"
if [ -n "$stress" ]; then
  stop_daemon kube-apiserver
  KUBETUNE_APISERVER_ARGS="--watch-cache=false --etcd-compaction-interval=30s" e2e/cluster/up.sh
fi

ns="bench-$(date +%s)"
cleanup() {
  if [ -n "$stress" ]; then
    stop_daemon kube-apiserver
    e2e/cluster/up.sh >/dev/null 2>&1 || log "could not restart the API server; run e2e/cluster/up.sh"
  fi
  stop_daemon operator-bench
  kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
  kubectl delete nodes -l "$fake_selector" --wait=false >/dev/null 2>&1 || true
  stop_daemon kwok-bench
}
trap cleanup EXIT

# Fake nodes that an interrupted run left behind go first.
kubectl delete nodes -l "$fake_selector" --ignore-not-found >/dev/null
start_daemon kwok-bench "$kwok_dir/kwok" --kubeconfig "$kubeconfig" --config "$kwok_config" \
  --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
  --node-lease-duration-seconds 40 --cidr 127.64.0.0/16
fake_node_yaml | kubectl create -f - >/dev/null
wait_for "fake nodes (kwok)" 60 kubectl wait --for condition=Ready node -l "$fake_selector" --timeout 5s
kubectl create namespace "$ns" >/dev/null

# The operator's log of this run alone: the log file is appended to.
operator_log="$logs/operator-bench.log"
touch "$operator_log"
log_from=$(($(wc -l <"$operator_log") + 1))
KUBECONFIG="$kubeconfig" RUST_LOG="${KUBETUNE_BENCH_LOG:-warn}" start_daemon operator-bench "$operator_bin" \
  --trainer-image kubetune/trainer:bench --http-addr 127.0.0.1:18181 --concurrency 16
wait_for operator 60 curl -fsS http://127.0.0.1:18181/readyz
op_pid="$(cat "$pids/operator-bench.pid")"

manifests="$cluster_dir/bench-ftjs.yaml"
for i in $(seq 1 "$n"); do
  cat <<YAML
---
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: ftj-$i, namespace: $ns}
spec:
  baseModel: {uri: s3://kubetune/models/tiny-llama}
  method: lora
  lora: {r: 8, alpha: 16}
  dataset: {uri: s3://kubetune/datasets/d.jsonl, format: text}
  training: {maxSteps: 10, learningRate: 0.001}
  output: {adapterName: bench-$i, registry: s3://kubetune/registry}
  nodeSelector: {kubetune.dev/pool: fake}
  tolerations: [{key: kwok.x-k8s.io/node, operator: Exists, effect: NoSchedule}]
YAML
done >"$manifests"

log "creating $n FineTuneJobs in $ns"
t0=$(date +%s.%N)
goal=$((SECONDS + 30))
if [ -n "$stress" ]; then
  kill -STOP "$op_pid"
  kubectl create -f "$manifests" >/dev/null
  t_created=$(date +%s.%N)
  # Not a wait for a condition: the outage is the test. Two compaction intervals make sure the
  # operator's watch has expired when it comes back.
  sleep 65
  kill -CONT "$op_pid"
  t_resumed=$(date +%s.%N)
  goal=$((SECONDS + 30))
  log "operator resumed after a 65 s stop"
else
  kubectl create -f "$manifests" >/dev/null
  t_created=$(date +%s.%N)
fi
current() {
  local jobs statuses
  jobs=$(kubectl get jobs -n "$ns" --no-headers 2>/dev/null | wc -l)
  statuses=$(kubectl get ftj -n "$ns" -o jsonpath='{range .items[*]}{.metadata.generation}={.status.observedGeneration}{"\n"}{end}' \
    | awk -F= '$1==$2' | wc -l)
  echo "$jobs $statuses"
  [ "$jobs" -ge "$n" ] && [ "$statuses" -ge "$n" ]
}
# The FineTuneJobs not reconciled yet, by name: without a Job (the Job has the FineTuneJob's
# name) or with a status older than their spec. A lost event shows up here as the same names
# staying behind.
stragglers() {
  local no_job stale
  no_job=$(comm -23 \
    <(kubectl get ftj -n "$ns" -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | sort) \
    <(kubectl get jobs -n "$ns" -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | sort))
  stale=$(kubectl get ftj -n "$ns" \
    -o jsonpath='{range .items[*]}{.metadata.name} {.metadata.generation} {.status.observedGeneration}{"\n"}{end}' \
    | awk '$2 != $3 {print $1}')
  printf '%s\n%s\n' "$no_job" "$stale" | sed '/^$/d' | sort -u | tr '\n' ' '
}
deadline=$((SECONDS + 600))
late=""
until state=$(current); do
  if [ $SECONDS -ge "$goal" ] && [ -z "$late" ]; then
    late=$(stragglers)
    log "not reconciled within the 30 s goal: ${late:-none}"
  fi
  [ $SECONDS -lt $deadline ] || die "not all reconciled after 600 s (jobs, current statuses: $state); stragglers: $(stragglers)"
  sleep 1
done
t_done=$(date +%s.%N)
rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$op_pid/status")
awk -v n="$n" -v c="$t_created" -v d="$t_done" -v t0="$t0" -v r="$rss_kib" 'BEGIN {
  c -= t0; d -= t0
  printf "FineTuneJobs:                      %d\n", n
  printf "kubectl create took:               %.1f s\n", c
  printf "all Jobs exist, statuses current:  %.1f s after the first create (goal 30 s; ratio %.2f)\n", d, d / 30
  printf "operator peak RSS:                 %.1f MiB (goal 100 MiB; ratio %.2f)\n", r / 1024, r / 1024 / 100
}'
if [ -n "$stress" ]; then
  awk -v r="$t_resumed" -v d="$t_done" 'BEGIN { printf "after the operator resumed:        %.1f s\n", d - r }'
fi
echo "late past the 30 s goal:           ${late:-none}"
failed=$(tail -n "+$log_from" "$operator_log" | grep -c 'reconcile failed' || true)
immutable=$(tail -n "+$log_from" "$operator_log" | grep -c 'field is immutable' || true)
echo "failed reconciles (retried):       $failed, of which 'field is immutable': $immutable"
# The operator's sweep names each object whose trigger was lost (no reconcile had started).
swept=$(tail -n "+$log_from" "$operator_log" | grep 'no reconcile had started' | grep -o 'ftj-[0-9]*' | sort -u | tr '\n' ' ' || true)
echo "lost triggers found by the sweep:   ${swept:-none}"
