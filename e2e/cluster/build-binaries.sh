#!/usr/bin/env bash
# Builds the local cluster's Go binaries from their Go modules through the module proxy:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy,
# crictl, MinIO and kube-router (the default targets), and on request helm and actionlint
# (`build-binaries.sh helm actionlint`, for the chart and CI workflow tests) and kwok
# (`build-binaries.sh kwok`, for the operator scale benchmark).
# Each lands in $KUBETUNE_CACHE/bin/<name>-<version>/ and is skipped when already there,
# so only the first run on a machine pays for the compile.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
proxy="${GOPROXY:-https://proxy.golang.org}"
proxy="${proxy%%,*}"
export GOFLAGS="-mod=mod" GOTOOLCHAIN=local CGO_ENABLED=0
# A cold build fills Go's module and build caches with several GB (Kubernetes and MinIO pull in
# much of the Go ecosystem). Only the binaries are kept, so the caches live under the build
# directory and go when this script ends; a later build downloads its modules again.
go_scratch="$cache/build/go"
export GOMODCACHE="$go_scratch/mod" GOCACHE="$go_scratch/cache"
drop_go_scratch() {
  [ -d "$go_scratch" ] || return 0
  chmod -R u+w "$go_scratch" 2>/dev/null || true  # the module cache is read-only
  rm -rf "$go_scratch"
}
trap drop_go_scratch EXIT

log() { echo "[build-binaries] $*" >&2; }

# A throwaway consumer module: `go build` of a main package from a dependency is the only way to
# build these without cloning their repositories.
new_module() {
  local dir="$1"
  rm -rf "$dir" && mkdir -p "$dir"
  printf 'module kubetune.dev/localcluster/build\n\ngo 1.26\n' >"$dir/go.mod"
}

# The control plane, kubectl, and the node's kubelet and kube-proxy. Each binary is built only
# when missing, so a cache from before the node had its own binaries gains just those.
kubernetes_commands=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)

build_kubernetes() {
  local out="$cache/bin/kubernetes-$KUBERNETES_VERSION" c missing=()
  for c in "${kubernetes_commands[@]}"; do [ -x "$out/$c" ] || missing+=("k8s.io/kubernetes/cmd/$c"); done
  [ ${#missing[@]} -gt 0 ] || { log "kubernetes $KUBERNETES_VERSION cached"; return; }
  local work="$cache/build/kubernetes-$KUBERNETES_VERSION"
  new_module "$work"
  local minor="${KUBERNETES_VERSION#v}"; minor="${minor#*.}"; minor="${minor%%.*}"
  local staging="v0.${KUBERNETES_VERSION#v1.}"
  # k8s.io/kubernetes points its staging modules at ./staging/src; map each to its published v0.x tag.
  curl -fsS "$proxy/k8s.io/kubernetes/@v/$KUBERNETES_VERSION.mod" \
    | sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\1#p' >"$work/staging.txt"
  {
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    while read -r m; do echo "replace $m => $m $staging"; done <"$work/staging.txt"
  } >>"$work/go.mod"
  local pkg=k8s.io/component-base/version cpkg=k8s.io/client-go/pkg/version ld=""
  for p in $pkg $cpkg; do
    ld+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  log "building ${missing[*]##*/} $KUBERNETES_VERSION (cold: several minutes each)"
  (cd "$work" && go get k8s.io/kubernetes@"$KUBERNETES_VERSION" \
    && mkdir -p "$work/out" \
    && go build -trimpath -ldflags "-s -w $ld" -o "$work/out/" "${missing[@]}")
  mkdir -p "$out" && mv "$work/out/"* "$out/"
}

build_etcd() {
  local out="$cache/bin/etcd-$ETCD_VERSION"
  [ -x "$out/etcd" ] && { log "etcd $ETCD_VERSION cached"; return; }
  local work="$cache/build/etcd-$ETCD_VERSION"
  new_module "$work"
  log "building etcd $ETCD_VERSION"
  (cd "$work" && go get go.etcd.io/etcd/server/v3@"$ETCD_VERSION" \
    && go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" \
      -o "$work/out/etcd" go.etcd.io/etcd/server/v3)
  rm -rf "$out" && mkdir -p "$(dirname "$out")" && mv "$work/out" "$out"
}

build_minio() {
  local out="$cache/bin/minio-$MINIO_VERSION"
  [ -x "$out/minio" ] && { log "minio $MINIO_VERSION cached"; return; }
  local work="$cache/build/minio-$MINIO_VERSION"
  new_module "$work"
  log "building minio $MINIO_VERSION"
  # The pseudo-version's timestamp and commit become MinIO's own release tag and commit id.
  local stamp="${MINIO_VERSION#v0.0.0-}" commit="${MINIO_VERSION##*-}"
  stamp="${stamp%%-*}"
  local tag="RELEASE.${stamp:0:4}-${stamp:4:2}-${stamp:6:2}T${stamp:8:2}-${stamp:10:2}-${stamp:12:2}Z"
  local m=github.com/minio/minio/cmd
  (cd "$work" && go get github.com/minio/minio@"$MINIO_VERSION" \
    && go build -trimpath -ldflags "-s -w -X $m.Version=$tag -X $m.ReleaseTag=$tag -X $m.CommitID=$commit -X $m.ShortCommitID=$commit" \
      -o "$work/out/minio" github.com/minio/minio)
  rm -rf "$out" && mkdir -p "$(dirname "$out")" && mv "$work/out" "$out"
}

build_crictl() {
  local out="$cache/bin/cri-tools-$CRI_TOOLS_VERSION"
  [ -x "$out/crictl" ] && { log "crictl $CRI_TOOLS_VERSION cached"; return; }
  local work="$cache/build/cri-tools-$CRI_TOOLS_VERSION"
  new_module "$work"
  log "building crictl $CRI_TOOLS_VERSION"
  (cd "$work" && go get sigs.k8s.io/cri-tools@"$CRI_TOOLS_VERSION" \
    && go build -trimpath -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRI_TOOLS_VERSION" \
      -o "$work/out/crictl" sigs.k8s.io/cri-tools/cmd/crictl)
  rm -rf "$out" && mkdir -p "$(dirname "$out")" && mv "$work/out" "$out"
}

build_helm() {
  local out="$cache/bin/helm-$HELM_VERSION"
  [ -x "$out/helm" ] && { log "helm $HELM_VERSION cached"; return; }
  local work="$cache/build/helm-$HELM_VERSION"
  new_module "$work"
  log "building helm $HELM_VERSION"
  local major="${HELM_VERSION%%.*}"
  local m="helm.sh/helm/$major"
  # Without the version stamp `helm version` says v4-dev-ish and chart apiVersion checks still
  # pass, but a pinned tool should say which it is.
  (cd "$work" && go get "$m@$HELM_VERSION" \
    && go build -trimpath -ldflags "-s -w -X $m/internal/version.version=$HELM_VERSION -X $m/internal/version.gitTreeState=clean" \
      -o "$work/out/helm" "$m/cmd/helm")
  rm -rf "$out" && mkdir -p "$(dirname "$out")" && mv "$work/out" "$out"
}

build_actionlint() {
  local out="$cache/bin/actionlint-$ACTIONLINT_VERSION"
  [ -x "$out/actionlint" ] && { log "actionlint $ACTIONLINT_VERSION cached"; return; }
  local work="$cache/build/actionlint-$ACTIONLINT_VERSION"
  new_module "$work"
  log "building actionlint $ACTIONLINT_VERSION"
  (cd "$work" && go get github.com/rhysd/actionlint@"$ACTIONLINT_VERSION" \
    && go build -trimpath -ldflags "-s -w" \
      -o "$work/out/actionlint" github.com/rhysd/actionlint/cmd/actionlint)
  rm -rf "$out" && mkdir -p "$(dirname "$out")" && mv "$work/out" "$out"
}

# kube-router's firewall, the real node's NetworkPolicy enforcer (node-up.sh starts it with only
# --run-firewall: iptables and ipset rules, no routing, no service proxy). Test-only: see
# versions.env.
build_kube_router() {
  local out="$cache/bin/kube-router-$KUBE_ROUTER_VERSION"
  [ -x "$out/kube-router" ] && { log "kube-router $KUBE_ROUTER_VERSION cached"; return; }
  local work="$cache/build/kube-router-$KUBE_ROUTER_VERSION" m=github.com/cloudnativelabs/kube-router/v2
  new_module "$work"
  log "building kube-router $KUBE_ROUTER_VERSION"
  (cd "$work" && go get "$m@$KUBE_ROUTER_VERSION" \
    && go build -trimpath -ldflags "-s -w -X $m/pkg/version.Version=$KUBE_ROUTER_VERSION -X $m/pkg/version.BuildDate=1970-01-01T00:00:00Z" \
      -o "$work/out/kube-router" "$m/cmd/kube-router")
  rm -rf "$out" && mkdir -p "$(dirname "$out")" && mv "$work/out" "$out"
}

# kwok runs no stage (the configurations that move fake nodes and pods through their lifecycle)
# unless given some, and its defaults live in kwokctl: the module's own stage files go beside
# the binary, in stages/ (as in the module's kustomize/stage/), for the scripts to pick from.
# Each part is made only when missing.
build_kwok() {
  local out="$cache/bin/kwok-$KWOK_VERSION"
  [ -x "$out/kwok" ] && [ -d "$out/stages" ] && { log "kwok $KWOK_VERSION cached"; return; }
  local work="$cache/build/kwok-$KWOK_VERSION" m=sigs.k8s.io/kwok src
  new_module "$work"
  mkdir -p "$work/out"
  (cd "$work" && go get "$m@$KWOK_VERSION")
  if [ ! -x "$out/kwok" ]; then
    log "building kwok $KWOK_VERSION"
    (cd "$work" && go build -trimpath -ldflags "-s -w -X $m/pkg/consts.Version=${KWOK_VERSION#v}" \
      -o "$work/out/kwok" "$m/cmd/kwok")
  fi
  src="$(cd "$work" && go mod download -json "$m@$KWOK_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
  [ -d "$src/kustomize/stage" ] || { log "kwok's stages not found in the module ($src)"; return 1; }
  cp -r "$src/kustomize/stage" "$work/out/stages" && chmod -R u+w "$work/out/stages"
  mkdir -p "$out" && rm -rf "$out/stages" && mv "$work/out/"* "$out/"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(etcd kubernetes crictl minio kube-router)
for t in "${targets[@]}"; do "build_${t//-/_}"; done
