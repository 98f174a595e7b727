#!/usr/bin/env bash
# hack/bench.sh: run the secureoverlay benchmarks and write bench/RESULTS.md (`make bench`).
#
#   hack/bench.sh            Go benchmarks + host measurements (netns, libcni, real API server)
#                            + the data plane in the VM lab (§10; `make bench-dataplane` alone)
#   hack/bench.sh --lab      also rotation and cutover in the VM lab with 3 and 8 node namespaces
#   hack/bench.sh -- ARGS    extra arguments for bench/cmd/benchreport (-count, -only, -from, -lab-nodes)
#
# Needs root (network namespaces), Debian's CNI plugins in /usr/lib/cni (hack/install-deps.sh)
# and the kube binaries (make tools); --lab needs the lab's QEMU and kernel (hack/tools-lab.sh).
# What the figures mean: docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."

args=()
while [ $# -gt 0 ]; do
	case "$1" in
	--lab) args+=(-lab) ;;
	--) shift; args+=("$@"); break ;;
	*) echo "usage: hack/bench.sh [--lab] [-- benchreport flags]" >&2; exit 2 ;;
	esac
	shift
done

if [ "$(id -u)" != 0 ]; then
	echo "hack/bench.sh: needs root (network namespaces); run it as root or in the dev container" >&2
	exit 1
fi
exec go run ./bench/cmd/benchreport ${args[@]+"${args[@]}"}
