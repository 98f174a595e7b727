#!/usr/bin/env bash
# Builds the project's image without a registry or a container engine (`make image`,
# also run by `make tools`): the same content as the Dockerfile's runtime stage, from
# Debian packages and the project's own binaries, reproducibly.
#
#   mmdebstrap  bookworm minbase + iptables + ca-certificates + user/group nonroot
#               (65532), with debian:bookworm-slim's dpkg excludes, at the exact
#               package versions in hack/image-packages.lock      -> rootfs.tar
#   go build    the Dockerfile's five binaries with its flags (CGO_ENABLED=0
#               -trimpath -ldflags '-s -w'), plus kubectl-secureoverlay -> secureoverlayctl
#   umoci       layer 1 = rootfs.tar, layer 2 = the binaries, the Dockerfile's config
#               (USER, ENTRYPOINT, LABELs; PATH as debian:bookworm-slim)   -> oci/
#   skopeo      docker-archive with both names                 -> secureoverlay.tar
#   pause       a static Go pause (tools/pause) as an OCI archive, standing in for
#               registry.k8s.io/pause on nodes without a registry  -> pause.tar
#
# Output in ${SECUREOVERLAY_CACHE_DIR:-<repo>/.cache}/image/:
#   oci/               OCI layout, tags $VERSION and $VERSION-<12 hex of the config digest>
#   secureoverlay.tar  docker-archive: ghcr.io/secureoverlay/secureoverlay:$VERSION and the content tag
#   pause.tar          OCI archive: localhost/secureoverlay/pause:1
#   image.env          IMAGE, TAG, CONTENT_TAG, CONFIG_DIGEST, MANIFEST_DIGEST, PAUSE_IMAGE
#   manifest.txt       packages, layers, digests
#   rootfs.tar, debs/  the root file system layer and the downloaded .debs (offline rebuilds)
#
# Reproducible: every time stamp is the lock file's source-date-epoch, tar entries are
# sorted with numeric owners 0/65532, and the same inputs give the same digests
# (`--reproducible` rebuilds everything in a scratch directory and compares).
# Idempotent: the root file system is rebuilt only when its recipe or the lock file
# changes, the image only when the rootfs, the Go sources of cmd/... or this script
# change (stamps hold a hash of the inputs).
#
# Usage: hack/tools-image.sh                 build what is out of date (quiet when nothing is)
#        hack/tools-image.sh --check         exit 0 when the image is up to date, 1 when not
#        hack/tools-image.sh --update-lock   resolve the archive's current versions, rewrite the lock
#        hack/tools-image.sh --reproducible  build twice from scratch (no cache but .debs), compare digests
#        hack/tools-image.sh --slim-rootfs DEST.tar   the stand-in for debian:bookworm-slim
#                                            (hack/buildah-dockerfile.sh)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${SECUREOVERLAY_CACHE_DIR:-$repo/.cache}
out=${SECUREOVERLAY_IMAGE_DIR:-$cache/image}
lock=$repo/hack/image-packages.lock
GO=${GO:-go}
command -v "$GO" >/dev/null || GO=/usr/local/go/bin/go

IMAGE=ghcr.io/secureoverlay/secureoverlay
VERSION=${VERSION:-0.1.0}
PAUSE_IMAGE=localhost/secureoverlay/pause:1
# The Dockerfile's build loop and runtime config (conformance/image checks that they agree).
binaries=(secureoverlay secureoverlay-agent secureoverlay-master secureoverlay-install secureoverlayctl)
labels=(
	"org.opencontainers.image.title=secureoverlay"
	"org.opencontainers.image.description=Transparent IPsec for Calico IPIP pod traffic"
	"org.opencontainers.image.source=https://github.com/secureoverlay/secureoverlay"
)
user=65532:65532
entrypoint=/usr/local/bin/secureoverlayctl
# debian:bookworm-slim's environment (the runtime stage inherits it).
env_path="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

suite=bookworm
mirrors=(
	"deb http://deb.debian.org/debian $suite main"
	"deb http://deb.debian.org/debian $suite-updates main"
	"deb http://deb.debian.org/debian-security $suite-security main"
)
include=iptables,ca-certificates
# debian:bookworm-slim's dpkg settings (debuerreotype's slimify excludes and
# docker-apt-speedup).
slim=(
	'force-unsafe-io'
	'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright'
	'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/groff/*' 'path-exclude=/usr/share/info/*'
	'path-exclude=/usr/share/lintian/*' 'path-exclude=/usr/share/linda/*' 'path-exclude=/usr/share/locale/*'
)
# debian:bookworm-slim's apt settings (debuerreotype's /etc/apt/apt.conf.d/docker-*),
# written after the install (docker-clean would delete the .debs we keep).
apt_conf=(
	$'docker-clean=DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\nDir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";'
	'docker-autoremove-suggests=Apt::AutoRemove::SuggestsImportant "false";'
	'docker-gzip-indexes=Acquire::GzipIndexes "true";'
	'docker-no-languages=Acquire::Languages "none";'
)
# The Dockerfile's RUN, after apt-get install.
user_hooks=(
	'chroot "$1" groupadd --system --gid 65532 nonroot'
	'chroot "$1" useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin nonroot'
)

log() { echo "tools-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

mode=build
case "${1:-}" in
"") ;;
--check) mode=check ;;
--update-lock) mode=update-lock ;;
--reproducible) mode=reproducible ;;
--slim-rootfs)
	mode=slim
	slim_dest=${2:?--slim-rootfs needs a destination .tar}
	;;
*) die "unknown argument $1 (see the header of $0)" ;;
esac

need() {
	local missing=()
	for t in "$@"; do command -v "$t" >/dev/null || missing+=("$t"); done
	[ "${#missing[@]}" -eq 0 ] || die "missing ${missing[*]} (run hack/install-deps.sh)"
}

# The lock file's source-date-epoch; --update-lock sets a new one (today, 00:00 UTC).
epoch() {
	if [ -n "${new_epoch:-}" ]; then echo "$new_epoch"; return; fi
	local e
	e=$(awk '/^# source-date-epoch:/{print $3}' "$lock")
	[[ $e =~ ^[0-9]+$ ]] || die "$lock has no '# source-date-epoch: N' line"
	echo "$e"
}

rootfs_hash() {
	{
		echo "$suite ${mirrors[*]} $include"
		printf '%s\n' "${slim[@]}" "${apt_conf[@]}" "${user_hooks[@]}"
		declare -f build_rootfs # the recipe itself
		dpkg-query -W -f='${Package} ${Version}\n' mmdebstrap apt dpkg 2>/dev/null || true
		cat "$lock"
	} | sha256sum | cut -d' ' -f1
}

# Everything the binaries are built from: the module's packages that cmd/... and
# tools/pause import (their Go files), go.mod/go.sum (which pin the rest), the Go
# version, and this script.
image_hash() {
	{
		echo "$1" # the rootfs hash
		cat "${BASH_SOURCE[0]}"
		"$GO" env GOVERSION GOOS GOARCH
		cd "$repo"
		sha256sum go.mod go.sum
		GOWORK=off "$GO" list -deps -f '{{if not .Standard}}{{$d := .Dir}}{{range .GoFiles}}{{$d}}/{{.}}{{"\n"}}{{end}}{{end}}' \
			$(printf './cmd/%s ' "${binaries[@]}") ./tools/pause | LC_ALL=C sort -u | xargs sha256sum
	} | sha256sum | cut -d' ' -f1
}

# build_rootfs DEST.tar DEBCACHE [lock|unpinned] [image|slim]: mmdebstrap into a tar.
# "slim" is the stand-in for debian:bookworm-slim that hack/buildah-dockerfile.sh
# builds the Dockerfile on: the same recipe without the runtime stage's packages and
# user; its packages must be locked ones.
build_rootfs() {
	local dest=$1 debs=$2 pin=${3:-lock} kind=${4:-image} work
	work=$(mktemp -d "$(dirname "$dest")/.rootfs.XXXXXX")
	mkdir -p "$debs"
	local prefs=$work/prefs pkgs=$work/pkgs
	: >"$prefs"
	if [ "$pin" = lock ]; then
		grep -v '^#' "$lock" | while read -r p v; do
			[ -n "$p" ] || continue
			printf 'Package: %s\nPin: version %s\nPin-Priority: 1001\n\n' "$p" "$v"
		done >"$prefs"
	fi
	mkdir -p "$work/apt"
	local a
	for a in "${apt_conf[@]}"; do printf '%s\n' "${a#*=}" >"$work/apt/${a%%=*}"; done
	local args=(--variant=minbase --mode=root --format=tar --skip=output/dev)
	[ "$kind" = slim ] || args+=(--include="$include")
	args+=( --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr --aptopt='Acquire::Check-Valid-Until "false"' --aptopt='Acquire::Retries "3"')
	for o in "${slim[@]}"; do args+=(--dpkgopt="$o"); done
	args+=(
		--setup-hook='mkdir -p "$1"/etc/apt/preferences.d "$1"/var/cache/apt/archives'
		--setup-hook="copy-in $prefs /etc/apt/preferences.d/"
		--setup-hook="sync-in $debs /var/cache/apt/archives/"
	)
	if [ "$kind" != slim ]; then
		for h in "${user_hooks[@]}"; do args+=(--customize-hook="$h"); done
	fi
	args+=(
		--customize-hook="sync-out /var/cache/apt/archives $debs"
		--customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb'
		--customize-hook="copy-in $(cd "$work/apt" && printf "$work/apt/%s " *) /etc/apt/apt.conf.d/"
		--customize-hook='rm -f "$1"/etc/apt/preferences.d/prefs'
		--customize-hook="chroot \"\$1\" dpkg-query -W -f='\${Package} \${Version}\n' >$pkgs"
	)
	local t=$SECONDS
	if ! SOURCE_DATE_EPOCH=$(epoch) nice -n 10 mmdebstrap "${args[@]}" "$suite" "$work/rootfs.tar" "${mirrors[@]}" >"$work/mmdebstrap.log" 2>&1; then
		tail -n 30 "$work/mmdebstrap.log" >&2
		rm -rf "$work"
		die "mmdebstrap failed (log above)"
	fi
	rm -f "$debs"/lock "$debs"/partial -r
	# mmdebstrap's final clean-up regenerates apt's binary caches, which
	# debian:bookworm-slim's docker-clean keeps out of the image.
	tar --delete -f "$work/rootfs.tar" ./var/cache/apt/pkgcache.bin ./var/cache/apt/srcpkgcache.bin 2>/dev/null || true
	LC_ALL=C sort "$pkgs" >"$work/pkgs.sorted"
	if [ "$kind" = slim ]; then
		if [ -n "$(LC_ALL=C comm -13 <(grep -v '^#' "$lock" | LC_ALL=C sort) "$work/pkgs.sorted")" ]; then
			log "the slim root file system holds packages the lock does not:"
			LC_ALL=C comm -13 <(grep -v '^#' "$lock" | LC_ALL=C sort) "$work/pkgs.sorted" >&2
			rm -rf "$work"
			die "run hack/tools-image.sh --update-lock"
		fi
	elif [ "$pin" = lock ]; then
		if ! diff <(grep -v '^#' "$lock" | LC_ALL=C sort) "$work/pkgs.sorted" >"$work/diff"; then
			log "the root file system does not hold exactly the locked packages (< lock, > built):"
			grep '^[<>]' "$work/diff" >&2
			rm -rf "$work"
			die "Debian's archive no longer serves these versions (a point release or security update replaced them). Run hack/tools-image.sh --update-lock, review and commit hack/image-packages.lock"
		fi
	fi
	mv -f "$work/pkgs.sorted" "$dest.packages"
	mv -f "$work/rootfs.tar" "$dest"
	rm -rf "$work"
	log "built the root file system in $((SECONDS - t))s ($(du -h "$dest" | cut -f1))"
}

# build_image OUTDIR ROOTFS.tar: binaries, layers, config, archives; writes OUTDIR/image.env.
build_image() {
	local dir=$1 rootfs=$2 sde work t=$SECONDS
	sde=$(epoch)
	local created
	created=$(date -u -d "@$sde" +%Y-%m-%dT%H:%M:%SZ)
	work=$(mktemp -d "$dir/.image.XXXXXX")
	# Binaries: exactly the Dockerfile's build loop. -buildvcs=false: the Dockerfile's
	# build context has no .git (.dockerignore), so its binaries carry no VCS stamp.
	local stage=$work/bins
	mkdir -p "$stage/usr/local/bin" "$work/pause/rootfs"
	for b in "${binaries[@]}"; do
		(cd "$repo" && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 nice -n 10 "$GO" build -buildvcs=false -trimpath -ldflags '-s -w' -o "$stage/usr/local/bin/$b" "./cmd/$b")
	done
	ln -s secureoverlayctl "$stage/usr/local/bin/kubectl-secureoverlay"
	(cd "$repo" && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 "$GO" build -buildvcs=false -trimpath -ldflags '-s -w' -o "$work/pause/rootfs/pause" ./tools/pause)
	chmod 0755 "$stage/usr" "$stage/usr/local" "$stage/usr/local/bin" "$stage/usr/local/bin"/* "$work/pause/rootfs/pause"
	local tarflags=(--sort=name --format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime
		--mtime="@$sde" --clamp-mtime --owner=0 --group=0 --numeric-owner --no-xattrs --no-acls --no-selinux)
	tar "${tarflags[@]}" -C "$stage" -cf "$work/bins.tar" usr
	tar "${tarflags[@]}" -C "$work/pause/rootfs" -cf "$work/pause.layer.tar" pause

	# The image: rootfs layer, binaries layer, the Dockerfile's config.
	local oci=$work/oci tag=$VERSION
	umoci init --layout "$oci"
	umoci new --image "$oci:$tag"
	umoci raw add-layer --image "$oci:$tag" --history.created "$created" \
		--history.created_by "mmdebstrap --variant=minbase --include=$include $suite (hack/tools-image.sh)" "$rootfs"
	umoci raw add-layer --image "$oci:$tag" --history.created "$created" \
		--history.created_by "go build -trimpath -ldflags '-s -w' ./cmd/{$(IFS=,; echo "${binaries[*]}")} (hack/tools-image.sh)" "$work/bins.tar"
	local cfg=(--no-history --created "$created" --author "" --architecture amd64 --os linux
		--config.user "$user" --config.entrypoint "$entrypoint" --config.env "$env_path" --clear config.cmd)
	for l in "${labels[@]}"; do cfg+=(--config.label "$l"); done
	umoci config --image "$oci:$tag" "${cfg[@]}"

	# The pause image: one layer, upstream's config (user 65535, entrypoint /pause).
	umoci new --image "$oci:pause"
	umoci raw add-layer --image "$oci:pause" --history.created "$created" \
		--history.created_by "go build -trimpath -ldflags '-s -w' ./tools/pause (hack/tools-image.sh)" "$work/pause.layer.tar"
	umoci config --image "$oci:pause" --no-history --created "$created" --author "" --architecture amd64 --os linux \
		--config.user 65535:65535 --config.entrypoint /pause --clear config.cmd --clear config.env
	umoci gc --layout "$oci"

	local mdigest cdigest ctag
	mdigest=$(jq -r --arg t "$tag" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$oci/index.json")
	cdigest=$(jq -r .config.digest "$oci/blobs/sha256/${mdigest#sha256:}")
	ctag=$VERSION-$(echo "${cdigest#sha256:}" | cut -c1-12)
	umoci tag --image "$oci:$tag" "$ctag"

	skopeo copy -q "oci:$oci:$tag" "docker-archive:$work/secureoverlay.tar:$IMAGE:$tag" --additional-tag "$IMAGE:$ctag"
	# skopeo's oci-archive writer stamps the archive's entries with the current time:
	# write the layout with skopeo, tar it ourselves.
	skopeo copy -q "oci:$oci:pause" "oci:$work/pause-oci:$PAUSE_IMAGE"
	tar "${tarflags[@]}" -C "$work/pause-oci" -cf "$work/pause.tar" oci-layout index.json blobs
	# The pause image stays only in pause.tar; the layout holds the project's image.
	umoci rm --image "$oci:pause"
	umoci gc --layout "$oci"
	# The archives' own mtimes, for tidy listings (their content does not depend on
	# the clock: --reproducible checks).
	touch -h -d "@$sde" "$work/secureoverlay.tar" "$work/pause.tar"

	cat >"$work/image.env" <<EOF
IMAGE=$IMAGE
TAG=$tag
CONTENT_TAG=$ctag
MANIFEST_DIGEST=$mdigest
CONFIG_DIGEST=$cdigest
PAUSE_IMAGE=$PAUSE_IMAGE
PAUSE_DIGEST=$(sha256sum "$work/pause.tar" | cut -d' ' -f1)
ARCHIVE_DIGEST=$(sha256sum "$work/secureoverlay.tar" | cut -d' ' -f1)
SOURCE_DATE_EPOCH=$sde
EOF
	{
		echo "image: $IMAGE:$tag and $IMAGE:$ctag"
		echo "manifest $mdigest, config $cdigest"
		echo "layers (compressed digest, size):"
		jq -r '.layers[] | "  \(.digest) \(.size)"' "$oci/blobs/sha256/${mdigest#sha256:}"
		echo "config:"
		jq -c '.config' "$oci/blobs/sha256/${cdigest#sha256:}" | sed 's/^/  /'
		echo "Debian packages ($suite, hack/image-packages.lock):"
		sed 's/^/  /' "$rootfs.packages"
	} >"$work/manifest.txt"
	rm -rf "${dir:?}/oci"
	mv "$oci" "$dir/oci"
	for f in secureoverlay.tar pause.tar image.env manifest.txt; do mv -f "$work/$f" "$dir/$f"; done
	rm -rf "$work"
	log "built $IMAGE:$tag ($ctag, $(du -h "$dir/secureoverlay.tar" | cut -f1) docker-archive) in $((SECONDS - t))s"
}

[ "$mode" = check ] || need mmdebstrap umoci skopeo jq tar sha256sum
[ -f "$lock" ] || [ "$mode" = update-lock ] || die "no $lock (run hack/tools-image.sh --update-lock)"
mkdir -p "$out"
if [ "$mode" != check ]; then # --check only reads (tests call it while a build may run)
	exec 9>"$out/.lock"
	flock 9
fi

case $mode in
slim)
	[ "$(id -u)" = 0 ] || die "mmdebstrap --mode=root needs root"
	build_rootfs "$slim_dest" "$out/debs" lock slim
	exit 0
	;;
update-lock)
	[ "$(id -u)" = 0 ] || die "mmdebstrap --mode=root needs root"
	tmp=$(mktemp -d "$out/.lock.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	log "resolving $suite minbase + $include at the archive's current versions…"
	new_epoch=$(date -u -d "$(date -u +%Y-%m-%d)" +%s)
	build_rootfs "$tmp/rootfs.tar" "$out/debs" unpinned
	{
		echo "# The Debian packages of the image's root file system, exact versions (hack/tools-image.sh)."
		echo "# Written by hack/tools-image.sh --update-lock on $(date -u +%Y-%m-%d) from: ${mirrors[*]}"
		echo "# source-date-epoch: $new_epoch"
		cat "$tmp/rootfs.tar.packages"
	} >"$lock"
	log "wrote $lock ($(grep -vc '^#' "$lock") packages); run hack/tools-image.sh to build"
	exit 0
	;;
reproducible)
	[ "$(id -u)" = 0 ] || die "mmdebstrap --mode=root needs root"
	tmp=$(mktemp -d "$out/.repro.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	for i in 1 2; do
		mkdir -p "$tmp/$i"
		build_rootfs "$tmp/$i/rootfs.tar" "$out/debs"
		build_image "$tmp/$i" "$tmp/$i/rootfs.tar"
	done
	fail=0
	for f in rootfs.tar secureoverlay.tar pause.tar; do
		a=$(sha256sum "$tmp/1/$f" | cut -d' ' -f1) b=$(sha256sum "$tmp/2/$f" | cut -d' ' -f1)
		if [ "$a" = "$b" ]; then log "reproducible: $f sha256:$a"; else log "NOT reproducible: $f $a != $b"; fail=1; fi
	done
	if ! diff -r "$tmp/1/oci" "$tmp/2/oci" >/dev/null; then log "NOT reproducible: the OCI layouts differ"; fail=1; fi
	grep -E 'MANIFEST_DIGEST|CONFIG_DIGEST' "$tmp/1/image.env" | sed 's/^/tools-image: reproducible: /' >&2
	if [ -f "$out/image.env" ] && ! diff <(grep DIGEST "$out/image.env") <(grep DIGEST "$tmp/1/image.env") >/dev/null; then
		log "note: the cached image in $out has other digests (its inputs differ, or it is not reproducible across cache states)"
		diff <(grep DIGEST "$out/image.env") <(grep DIGEST "$tmp/1/image.env") >&2 || true
		fail=1
	fi
	exit $fail
	;;
esac

rhash=$(rootfs_hash)
ihash=$(image_hash "$rhash")
if [ "$mode" = check ]; then
	[ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$ihash" ] && [ -f "$out/image.env" ] && [ -d "$out/oci" ]
	exit
fi
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$ihash" ] && [ -f "$out/image.env" ] && [ -s "$out/secureoverlay.tar" ] && [ -s "$out/pause.tar" ]; then
	exit 0
fi
[ "$(id -u)" = 0 ] || die "mmdebstrap --mode=root needs root"
rm -f "$out/stamp"
if ! { [ -f "$out/rootfs.stamp" ] && [ "$(cat "$out/rootfs.stamp")" = "$rhash" ] && [ -s "$out/rootfs.tar" ]; }; then
	log "building the root file system (mmdebstrap $suite minbase + $include; minutes the first time)…"
	rm -f "$out/rootfs.stamp"
	build_rootfs "$out/rootfs.tar" "$out/debs"
	echo "$rhash" >"$out/rootfs.stamp"
fi
build_image "$out" "$out/rootfs.tar"
echo "$ihash" >"$out/stamp"
