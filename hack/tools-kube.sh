#!/usr/bin/env bash
# Builds the real kube-apiserver and etcd used by conformance/kube, the kubectl
# used by conformance/manifests, and the node binaries of the real-node tier
# (kubelet, kube-controller-manager, kube-scheduler; docs/lab.md "Real nodes"),
# from the pinned module in tools/kube, into
# ${SECUREOVERLAY_CACHE_DIR:-<repo>/.cache}/kube/bin/.
#
# Idempotent: the binaries are rebuilt only when one is missing or when the
# inputs changed (tools/kube's go.mod, go.sum, Go sources, and the Go version),
# detected through a stamp file holding a hash of those inputs.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${SECUREOVERLAY_CACHE_DIR:-$repo/.cache}"
out="$cache/kube/bin"
stamp="$cache/kube/stamp"
src="$repo/tools/kube"
go="${GO:-go}"

inputs_hash() {
  {
    "$go" env GOVERSION GOOS GOARCH
    cat "${BASH_SOURCE[0]}" # how we build is an input too
    cd "$src"
    find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}

bins=(etcd kube-apiserver kubectl kubelet kube-controller-manager kube-scheduler)
want="$(inputs_hash)"
uptodate=1
for b in "${bins[@]}"; do [ -x "$out/$b" ] || uptodate=0; done
if [ "$uptodate" = 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "tools-kube: ${bins[*]} are up to date in $out"
  exit 0
fi

mkdir -p "$out"
rm -f "$stamp"
if [ -x "$out/kube-apiserver" ]; then why="inputs changed"; else why="first time, several minutes"; fi

start=$SECONDS
echo "tools-kube: downloading modules for tools/kube…"
(cd "$src" && GOWORK=off "$go" mod download)

# Stamp the Kubernetes version into the API server (what /version reports),
# as upstream's build does; etcd's version is compiled in.
kver="$(cd "$src" && GOWORK=off "$go" list -m -f '{{.Version}}' k8s.io/kubernetes)"
kminor="${kver#v1.}"; kminor="${kminor%%.*}"
kldflags="-X k8s.io/component-base/version.gitVersion=$kver -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$kminor -X k8s.io/component-base/version.gitTreeState=clean"

build() { # name package [extra ldflags]
  local name=$1 pkg=$2 extra=${3:-} t=$SECONDS
  echo "tools-kube: building $name ($why)…"
  # nice: the build takes minutes of both cores; let interactive work and tests go first.
  (cd "$src" && GOWORK=off CGO_ENABLED=0 nice -n 10 "$go" build -trimpath -ldflags "-s -w $extra" -o "$out/$name.tmp" "$pkg")
  mv -f "$out/$name.tmp" "$out/$name"
  echo "tools-kube: built $name in $((SECONDS - t))s"
}
build etcd ./cmd/etcd
build kube-apiserver ./cmd/kube-apiserver "$kldflags"
build kubectl ./cmd/kubectl "$kldflags"
# The node binaries of the real-node tier (≈5, 4.5 and 0.5 min cold on 2 busy cores).
build kubelet ./cmd/kubelet "$kldflags"
build kube-controller-manager ./cmd/kube-controller-manager "$kldflags"
build kube-scheduler ./cmd/kube-scheduler "$kldflags"

echo "$want" >"$stamp"
echo "tools-kube: done in $((SECONDS - start))s; binaries in $out"
