#!/usr/bin/env bash
# The previous release's binaries, for the upgrade scenario of the VM lab
# (conformance/e2e TestScenario0UpgradeFrom01): secureoverlay-agent and
# secureoverlay-master of 0.1 — the commit below, the last before NodeReports, NodeKeys
# and protocol v2 (reports as the Node annotation, every generation's root in the Secret) —
# built from this repository's own history (`git archive`, no download) into
# ${SECUREOVERLAY_CACHE_DIR:-<repo>/.cache}/release-0.1/bin/.
#
# A checkout without that history (a shallow clone, a source tarball) writes the reason to
# release-0.1/unavailable instead of failing: the scenario then fails under
# SECUREOVERLAY_REQUIRE_ALL=1 with that reason (`git fetch --unshallow` mends it).
#
# Idempotent: a rerun with the same commit, Go version and script does nothing.
set -euo pipefail

release=0.1
commit=688597ce99d4d79cf235a4bd34126856706355b8
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${SECUREOVERLAY_CACHE_DIR:-$repo/.cache}"
out="$cache/release-$release"
go="${GO:-go}"
bins=(secureoverlay-agent secureoverlay-master)

mkdir -p "$out"
if ! full=$(git -C "$repo" rev-parse --verify -q "$commit^{commit}" 2>/dev/null); then
  echo "commit $commit (release $release) is not in this checkout's history (a shallow clone or a tarball; git fetch --unshallow)" >"$out/unavailable"
  echo "tools-release: $(cat "$out/unavailable"); the upgrade scenario cannot run" >&2
  exit 0
fi
stamp=$( { echo "$full"; "$go" version; cat "${BASH_SOURCE[0]}"; } | sha256sum | cut -d' ' -f1)
uptodate=1
for b in "${bins[@]}"; do [ -x "$out/bin/$b" ] || uptodate=0; done
if [ "$uptodate" = 1 ] && [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
  echo "tools-release: $release (${full:0:12}) is up to date in $out/bin"
  exit 0
fi

rm -rf "$out/src" "$out/bin" "$out/stamp" "$out/unavailable"
mkdir -p "$out/src" "$out/bin"
git -C "$repo" archive "$full" | tar -x -C "$out/src"
for b in "${bins[@]}"; do
  (cd "$out/src" && CGO_ENABLED=0 "$go" build -trimpath -ldflags '-s -w' -o "$out/bin/$b" "./cmd/$b")
done
rm -rf "$out/src"
echo "$full" >"$out/commit"
echo "$stamp" >"$out/stamp"
echo "tools-release: $release (${full:0:12}) ${bins[*]} in $out/bin"
