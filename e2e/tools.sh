#!/usr/bin/env bash
# Makes sure the tools of the chart, alert and Argo CD tests are there, and prints the path of
# each one asked for (one per line, in order):
#   helm      built from its Go module by e2e/cluster/build-binaries.sh (version in versions.env)
#   promtool  Prometheus's rule tester, from the distribution's `prometheus` package
#   lua       a Lua 5.4 interpreter (Argo CD runs health checks in Lua 5.x), package `lua5.4`
#   actionlint  GitHub Actions workflow linter, built from its Go module like helm
# A tool already on PATH is used as is; otherwise the package is fetched with `apt-get download`
# and unpacked into $KUBETUNE_CACHE/bin/<package>-<version>/ (no root, no daemon started).
# Serialised with a lock, so concurrent test binaries do not build the same thing twice.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=cluster/versions.env
source "$here/cluster/versions.env"
cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
mkdir -p "$cache/bin"
log() { echo "[tools] $*" >&2; }

exec 9>"$cache/tools.lock"
flock 9

# Unpacks one binary of a distribution package into the cache; prints its path.
from_package() {
  local package="$1" binary="$2"
  local version
  version="$(apt-cache policy "$package" 2>/dev/null | sed -n 's/^ *Candidate: *//p')"
  if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    # A fresh machine may have no package lists yet.
    log "refreshing the package lists to find $package"
    apt-get update -qq >/dev/null 2>&1 || true
    version="$(apt-cache policy "$package" 2>/dev/null | sed -n 's/^ *Candidate: *//p')"
  fi
  if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    log "package $package unknown to apt; run 'apt-get update' or put $binary on PATH"
    return 1
  fi
  local out="$cache/bin/$package-$version"
  if [ ! -x "$out/$binary" ]; then
    log "fetching $package $version"
    local work
    work="$(mktemp -d "$cache/build/$package.XXXXXX" 2>/dev/null || { mkdir -p "$cache/build" && mktemp -d "$cache/build/$package.XXXXXX"; })"
    (cd "$work" && apt-get download "$package=$version" >/dev/null 2>&1) \
      || { rm -rf "$work"; log "apt-get download $package failed"; return 1; }
    dpkg-deb -x "$work"/*.deb "$work/root"
    mkdir -p "$out.tmp" && cp "$work/root/usr/bin/$binary" "$out.tmp/$binary"
    rm -rf "$out" && mv "$out.tmp" "$out" && rm -rf "$work"
  fi
  echo "$out/$binary"
}

tool() {
  case "$1" in
    helm)
      "$here/cluster/build-binaries.sh" helm >&2
      echo "$cache/bin/helm-$HELM_VERSION/helm" ;;
    actionlint)
      "$here/cluster/build-binaries.sh" actionlint >&2
      echo "$cache/bin/actionlint-$ACTIONLINT_VERSION/actionlint" ;;
    promtool)
      command -v promtool || from_package prometheus promtool ;;
    lua)
      command -v lua5.4 || from_package lua5.4 lua5.4 ;;
    *) log "unknown tool $1"; return 2 ;;
  esac
}

[ $# -gt 0 ] || set -- helm promtool lua actionlint
for t in "$@"; do tool "$t"; done
