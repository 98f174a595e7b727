#!/usr/bin/env bash
# The container runtime of the real-node tier (conformance/realnode): Debian's containerd
# and runc, unpacked from their packages into
# ${SECUREOVERLAY_CACHE_DIR:-<repo>/.cache}/node/bin/ (containerd, containerd-shim-runc-v2,
# ctr, runc) and shared into the lab VM. They are downloaded with `apt-get download` and
# unpacked with `dpkg-deb -x`, never installed: no containerd daemon starts on this
# machine, and a machine with Docker's containerd.io package (which conflicts with
# Debian's containerd) is left alone.
#
# Idempotent: a rerun with the same package versions (and this script) does nothing.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${SECUREOVERLAY_CACHE_DIR:-$repo/.cache}"
out="$cache/node"
pkgs=(containerd runc)
bins=(containerd containerd-shim-runc-v2 ctr runc)

versions() {
  for p in "${pkgs[@]}"; do
    printf '%s=%s\n' "$p" "$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')"
  done
}
if ! versions | grep -q '=[0-9]'; then
  apt-get update -qq
fi
stamp=$( { versions; cat "${BASH_SOURCE[0]}"; } | sha256sum | cut -d' ' -f1)
uptodate=1
for b in "${bins[@]}"; do [ -x "$out/bin/$b" ] || uptodate=0; done
if [ "$uptodate" = 1 ] && [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
  echo "tools-node: ${bins[*]} are up to date in $out/bin"
  exit 0
fi

rm -rf "$out/deb" "$out/root" "$out/stamp"
mkdir -p "$out/deb" "$out/root" "$out/bin"
echo "tools-node: downloading $(versions | tr '\n' ' ')"
(cd "$out/deb" && apt-get download -q -o APT::Sandbox::User=root "${pkgs[@]}" >/dev/null)
for d in "$out"/deb/*.deb; do dpkg-deb -x "$d" "$out/root"; done
for b in "${bins[@]}"; do
  f=$(find "$out/root" -type f -name "$b" -perm -u+x | head -1)
  [ -n "$f" ] || { echo "tools-node: $b not found in ${pkgs[*]}" >&2; exit 1; }
  install -m 0755 "$f" "$out/bin/$b"
done
rm -rf "$out/deb" "$out/root"
versions >"$out/versions.txt"
echo "$stamp" >"$out/stamp"
echo "tools-node: ${bins[*]} in $out/bin ($(tr '\n' ' ' <"$out/versions.txt"))"
