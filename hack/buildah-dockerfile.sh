#!/usr/bin/env bash
# Builds the unmodified Dockerfile with buildah on a machine without a registry
# (`make image-dockerfile`; the opt-in test TestDockerfileBuildsWithBuildah in
# conformance/image runs it and compares the result with the Dockerfile, as it does
# for `make image`).
#
# The Dockerfile's two FROM images are replaced by local stand-ins, tagged with the
# names the Dockerfile uses, and the build runs with --pull=never:
#   debian:bookworm-slim   mmdebstrap bookworm minbase with debian:bookworm-slim's dpkg
#                          and apt settings (hack/tools-image.sh --slim-rootfs: the image's
#                          recipe without iptables, ca-certificates and the user)
#   golang:1.26-bookworm   the image's root file system from `make image` (bookworm
#                          minbase + ca-certificates) + the host's Go toolchain in
#                          /usr/local/go, with the official image's ENV (GOPATH=/go,
#                          PATH, GOTOOLCHAIN=local), and one addition: GOPROXY points
#                          at a file proxy inside the stand-in holding exactly the
#                          modules go.sum names, copied from the host's module cache
#                          (`make deps` fills it). The Dockerfile's `go mod download`
#                          then needs no network: from inside a build container the Go
#                          proxy's TLS certificate cannot be verified on machines
#                          whose egress goes through an intercepting proxy (its CA is
#                          in the host's trust store only), and the build is faster.
# buildah runs as root with the vfs storage driver and chroot isolation (no daemon, no
# user namespace, no overlay mounts), storage under $cache/buildah/. The runtime
# stage's apt-get reaches Debian's archive over the host network (plain HTTP, verified
# by apt's signatures), as `docker build` would. --platform linux/amd64 and
# --build-arg TARGETARCH=amd64 are what BuildKit passes by itself (buildah 1.28 leaves
# TARGETARCH empty and warns); --identity-label=false leaves out buildah's own
# io.buildah.version label, which docker does not add.
#
# Output in ${SECUREOVERLAY_CACHE_DIR:-<repo>/.cache}/buildah/:
#   oci/        OCI layout of the built image, tag $VERSION
#   build.log   buildah's output; timings.txt  how long each step took (appended)
# Idempotent: the stand-ins are rebuilt when their inputs change, the Dockerfile
# build when the build context or a stand-in changed (stamps hold hashes of the inputs;
# FORCE=1 rebuilds).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${SECUREOVERLAY_CACHE_DIR:-$repo/.cache}
out=$cache/buildah
GO=${GO:-go}
command -v "$GO" >/dev/null || GO=/usr/local/go/bin/go
VERSION=${VERSION:-0.1.0}
IMAGE=ghcr.io/secureoverlay/secureoverlay

log() { echo "buildah-dockerfile: $*" >&2; }
die() { log "error: $*"; exit 1; }

for t in buildah mmdebstrap skopeo jq; do
	command -v "$t" >/dev/null || die "missing $t (apt-get install buildah mmdebstrap skopeo jq)"
done
[ "$(id -u)" = 0 ] || die "runs as root (buildah with chroot isolation and vfs, mmdebstrap --mode=root)"
[ -s "$cache/image/rootfs.tar" ] || die "no $cache/image/rootfs.tar: run make image first"

mkdir -p "$out"
exec 9>"$out/.lock"
flock 9

bh=(buildah --root "$out/storage" --runroot "$out/run" --storage-driver vfs)
export BUILDAH_ISOLATION=chroot
timings=$(mktemp)
trap 'cat "$timings" >>"$out/timings.txt" 2>/dev/null; rm -f "$timings"' EXIT
timed() { # label command…
	local label=$1 t=$SECONDS
	shift
	"$@"
	echo "$(date -u +%FT%TZ) $label $((SECONDS - t))s" >>"$timings"
}

# The FROM names, as the Dockerfile spells them (ARG defaults substituted).
froms=$(cd "$repo" && "$GO" run ./conformance/image/cmd/dockerfile-froms Dockerfile)
build_from=$(echo "$froms" | sed -n 1p)
runtime_from=$(echo "$froms" | sed -n 2p)
[ -n "$build_from" ] && [ -n "$runtime_from" ] || die "cannot read the Dockerfile's FROM lines"
qualify() { # docker's normalisation: debian:x -> docker.io/library/debian:x
	case $1 in
	*/*/*) echo "$1" ;;
	*/*) echo "docker.io/$1" ;;
	*) echo "docker.io/library/$1" ;;
	esac
}

has_image() { "${bh[@]}" inspect --type image "$1" >/dev/null 2>&1; }

# --- stand-in for the runtime stage's base -------------------------------------
slim_hash=$({ sed -n '/^# --- stand-in for the runtime/,/^# --- end runtime/p' "$0"; cat "$repo/hack/tools-image.sh" "$repo/hack/image-packages.lock"; dpkg-query -W -f='${Version}' mmdebstrap; } | sha256sum | cut -c1-16)
if ! has_image "$(qualify "$runtime_from")" || [ "$(cat "$out/slim.stamp" 2>/dev/null)" != "$slim_hash" ]; then
	log "building the stand-in for $runtime_from (mmdebstrap minbase, hack/tools-image.sh --slim-rootfs)…"
	timed standin-slim-rootfs "$repo/hack/tools-image.sh" --slim-rootfs "$out/slim.tar"
	c=$("${bh[@]}" from --pull=never scratch)
	"${bh[@]}" add --quiet "$c" "$out/slim.tar" / >/dev/null
	rm -f "$out/slim.tar.packages"
	"${bh[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd bash "$c"
	"${bh[@]}" commit --quiet --rm --identity-label=false "$c" "$(qualify "$runtime_from")" >/dev/null
	rm -f "$out/slim.tar"
	echo "$slim_hash" >"$out/slim.stamp"
fi
# --- end runtime

# --- stand-in for the build stage's base -----------------------------------------
goroot=$("$GO" env GOROOT)
gover=$("$GO" env GOVERSION)
golang_hash=$({ sha256sum "$cache/image/rootfs.tar.packages" "$repo/go.sum" 2>/dev/null; echo "$gover $goroot"; sed -n '/^# --- stand-in for the build/,/^# --- end build/p' "$0"; } | sha256sum | cut -c1-16)
if ! has_image "$(qualify "$build_from")" || [ "$(cat "$out/golang.stamp" 2>/dev/null)" != "$golang_hash" ]; then
	log "building the stand-in for $build_from (bookworm + ca-certificates + $gover)…"
	t=$SECONDS
	c=$("${bh[@]}" from --pull=never scratch)
	"${bh[@]}" add --quiet "$c" "$cache/image/rootfs.tar" / >/dev/null
	"${bh[@]}" copy --quiet "$c" "$goroot" /usr/local/go >/dev/null
	# The file proxy: every module version go.sum names (.mod, and .zip/.info where
	# go.sum has the module's own hash) that the host's module cache holds; what the
	# build needs is there after the host's `go mod download`.
	modcache=$(cd "$repo" && "$GO" env GOMODCACHE)/cache/download
	proxy=$(mktemp -d "$out/.goproxy.XXXXXX")
	(cd "$repo" && "$GO" mod download) || die "go mod download on the host failed"
	while read -r mod ver _; do
		esc=$(echo "$mod" | sed 's/[A-Z]/!\L&/g')
		v=${ver%/go.mod}
		mkdir -p "$proxy/$esc/@v"
		for ext in mod info zip; do
			[ "$ext" != zip ] || [ "$ver" = "$v" ] || continue
			f=$modcache/$esc/@v/$v.$ext
			[ ! -f "$f" ] || cp "$f" "$proxy/$esc/@v/" # go.sum may name more than the build needs
		done
		echo "$v" >>"$proxy/$esc/@v/list"
	done <"$repo/go.sum"
	"${bh[@]}" copy --quiet "$c" "$proxy" /goproxy >/dev/null
	rm -rf "$proxy"
	"${bh[@]}" config --env GOLANG_VERSION="${gover#go}" --env GOTOOLCHAIN=local --env GOPATH=/go \
		--env GOPROXY=file:///goproxy \
		--env PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		--workingdir /go --cmd bash --user 0:0 "$c"
	"${bh[@]}" run "$c" -- mkdir -p /go/src /go/bin
	"${bh[@]}" commit --quiet --rm --identity-label=false "$c" "$(qualify "$build_from")" >/dev/null
	echo "$(date -u +%FT%TZ) standin-golang $((SECONDS - t))s" >>"$timings"
	echo "$golang_hash" >"$out/golang.stamp"
fi
# --- end build

# --- the Dockerfile, unmodified ------------------------------------------------------
# The build context as .dockerignore leaves it (.git, .cache, bin, tools/kube, *.test, *.out).
ctx_hash=$({
	cat "$out/slim.stamp" "$out/golang.stamp"
	cd "$repo" && find . \( -path ./.git -o -path ./.cache -o -path ./bin -o -path ./tools/kube \) -prune -o \
		-type f ! -name '*.test' ! -name '*.out' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
} | sha256sum | cut -c1-16)
if [ "${FORCE:-}" != 1 ] && [ "$(cat "$out/build.stamp" 2>/dev/null)" = "$ctx_hash" ] && [ -f "$out/oci/index.json" ]; then
	exit 0
fi
rm -f "$out/build.stamp"
log "buildah bud on the Dockerfile (--pull=never; $build_from and $runtime_from are the local stand-ins)…"
"${bh[@]}" rmi --force "$IMAGE:$VERSION" >/dev/null 2>&1 || true
t=$SECONDS
if ! nice -n 10 "${bh[@]}" bud --pull=never --isolation chroot --network host --layers=false \
	--platform linux/amd64 --build-arg TARGETARCH=amd64 --identity-label=false \
	-f "$repo/Dockerfile" -t "$IMAGE:$VERSION" "$repo" >"$out/build.log" 2>&1; then
	tail -40 "$out/build.log" >&2
	die "buildah bud failed (full log: $out/build.log)"
fi
echo "$(date -u +%FT%TZ) buildah-bud $((SECONDS - t))s" >>"$timings"
rm -rf "$out/oci"
"${bh[@]}" push --quiet "$IMAGE:$VERSION" "oci:$out/oci:$VERSION" >/dev/null
echo "$ctx_hash" >"$out/build.stamp"
"${bh[@]}" rmi --prune >/dev/null 2>&1 || true # earlier builds and stand-ins, now untagged
log "built $IMAGE:$VERSION from the Dockerfile in $((SECONDS - t))s; OCI layout $out/oci"
