#!/usr/bin/env bash
# Checks, without a container engine, that the Dockerfile ships exactly the binaries
# `make build` produces (for `make lint`):
#   - every binary in the Makefile's BINARIES has a cmd/<name>/ with Go files (so
#     `make build` produces it), and the Dockerfile's build loop builds exactly that
#     list from ./cmd/$b;
#   - each is copied from the build stage to /usr/local/bin/<name>, and nothing else
#     is copied from it; the CNI plugin is at /usr/local/bin/secureoverlay;
#   - the runtime stage's default user is not root;
#   - every /usr/local/bin/<x> that manifests/secureoverlay.yaml runs is in the image.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
dockerfile=Dockerfile
fail=0
err() { echo "check-dockerfile: $*" >&2; fail=1; }

[ -f "$dockerfile" ] || { err "no $dockerfile"; exit 1; }

# BINARIES as make evaluates it.
read -r -a binaries <<<"$(make -s --no-print-directory --eval='print-binaries: ; @echo $(BINARIES)' print-binaries)"
[ "${#binaries[@]}" -gt 0 ] || { err "Makefile BINARIES is empty"; exit 1; }

for b in "${binaries[@]}"; do
  if ! ls "cmd/$b"/*.go >/dev/null 2>&1; then
    err "Makefile binary $b has no cmd/$b/*.go, so make build does not produce it"
  fi
done

# The build loop: `for b in a b c; do` ... `go build ... ./cmd/$b`.
loop="$(grep -oE 'for b in [^;]+;' "$dockerfile" | head -n1 | sed -E 's/^for b in //; s/;$//')"
[ -n "$loop" ] || err "no 'for b in ...;' build loop in $dockerfile"
grep -qE 'go build .*-o /out/\$b \./cmd/\$b' "$dockerfile" || err "the build loop does not run 'go build ... -o /out/\$b ./cmd/\$b'"
want="$(printf '%s\n' "${binaries[@]}" | LC_ALL=C sort)"
got="$(printf '%s\n' $loop | LC_ALL=C sort)"
if [ "$want" != "$got" ]; then
  err "Dockerfile builds [$(echo $got)], Makefile BINARIES are [$(echo $want)]"
fi

# COPY --from=build /out/<b> /usr/local/bin/<b>, for exactly the binaries.
copied="$(grep -E '^COPY --from=build ' "$dockerfile" | awk '{print $3" "$4}')"
for b in "${binaries[@]}"; do
  grep -qxF "/out/$b /usr/local/bin/$b" <<<"$copied" || err "binary $b is not copied to /usr/local/bin/$b"
done
while read -r src dst; do
  [ -n "$src" ] || continue
  name="${src#/out/}"
  printf '%s\n' "${binaries[@]}" | grep -qxF "$name" || err "COPY of $src: not a Makefile binary"
  [ "$dst" = "/usr/local/bin/$name" ] || err "COPY of $src goes to $dst, want /usr/local/bin/$name"
done <<<"$copied"
grep -qxF "/out/secureoverlay /usr/local/bin/secureoverlay" <<<"$copied" || err "the CNI plugin must be at /usr/local/bin/secureoverlay"

# Non-root default user in the last stage.
user="$(awk '/^FROM /{u=""} /^USER /{u=$2} END{print u}' "$dockerfile")"
case "$user" in
  "" ) err "the runtime stage sets no USER (default would be root)" ;;
  0|0:*|root|root:*) err "the runtime stage's USER is root ($user)" ;;
esac

# Everything the manifest runs is in the image.
if [ -f manifests/secureoverlay.yaml ]; then
  for p in $(grep -oE '/usr/local/bin/[A-Za-z0-9._-]+' manifests/secureoverlay.yaml | sort -u); do
    grep -qE "^COPY --from=build /out/[^ ]+ $p\$" "$dockerfile" || err "manifests/secureoverlay.yaml runs $p, which the image does not contain"
  done
fi

if [ "$fail" -ne 0 ]; then exit 1; fi
echo "check-dockerfile: ok (${binaries[*]})"
