#!/usr/bin/env bash
# Installs what `make test` and `make demo` need on a fresh Debian machine (run as root).
# Idempotent: packages already present are skipped without touching apt.
set -euo pipefail

pkgs=(
  iproute2 iptables kmod            # netns, veth, xfrm policies, iptables rules
  containernetworking-plugins       # ptp/bridge/host-local/tuning: the stand-in primary CNI plugin
  tcpdump                           # captures in the lab
  qemu-system-x86 busybox-static cpio zstd xz-utils iputils-ping   # the VM lab (ping -M do for DF probes)
  mmdebstrap umoci skopeo jq        # make image: the image without a registry (hack/tools-image.sh)
  python3-cryptography              # keys: the independent check of the v2 derivation vectors
  iperf3 wireguard-tools            # the data-plane benchmark: copied into the lab image (make bench-dataplane)
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages ${missing[*]} and not root; install them or run as root" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
stamp=/var/lib/apt/periodic/update-success-stamp
if [ ! -d /var/lib/apt/lists ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ] || [ "${SO_APT_UPDATE:-}" = 1 ]; then
  apt-get update -qq
fi
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
