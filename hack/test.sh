#!/usr/bin/env bash
# hack/test.sh — the test run behind `make test` (and so .ci/run): every package, in two
# go test streams side by side, one exit code.
#
# Why two streams. The lab VM's emulator (single-threaded TCG) needs one core to itself,
# and only one VM runs at a time (conformance/lab: the machine-wide VM slot). Run as one
# `go test -p 2 ./...`, a package waiting for the slot held one of the two package slots,
# and host packages running beside the emulator (with the race detector, and their own API
# servers) starved it: the real-node story ran ≈2× slower than on an idle host (run 62:
# 55 min in all; its guest's containerd timed out on its own shims).
#
#   vm stream:   every test that boots the lab VM, one package at a time — the VM packages
#                (conformance/e2e, conformance/lab; the real-node story last, when the
#                host stream is done), then the TestLab* tests of the other packages.
#   host stream: every other test, one package at a time (-p 1: one core for it, one for
#                the emulator), with the lab VM forbidden: a test that boots the VM
#                without being named TestLab* fails and says so.
#
# Output: both streams' lines on stdout (go test prints a package's lines when it ends),
# then each stream's result. Exit status: 0 only when both streams pass.
set -u
GO=${GO:-go}
TEST_TIMEOUT=${TEST_TIMEOUT:-60m}
cd "$(dirname "$0")/.."

vm_pkgs=(./conformance/e2e ./conformance/lab)
vm_last=./conformance/realnode
mod=$($GO list -m)
mapfile -t host_pkgs < <($GO list ./... | grep -v -x -e "$mod/conformance/e2e" -e "$mod/conformance/lab" -e "$mod/conformance/realnode")
# Packages outside the VM packages with a TestLab* test (they boot the VM from the host).
mapfile -t lab_pkgs < <($GO list -f '{{.ImportPath}}{{range .TestGoFiles}} {{$.Dir}}/{{.}}{{end}}{{range .XTestGoFiles}} {{$.Dir}}/{{.}}{{end}}' "${host_pkgs[@]}" |
	while read -r pkg files; do
		[ -n "$files" ] && grep -q -E '^func TestLab[A-Za-z0-9_]*\(t \*testing\.T\)' $files && echo "$pkg"
	done)

start=$(date +%s)
# gotest STREAM ARGS…: one go test run of a stream; after each package's result line it
# prints when that package ended ("test.sh: vm +734s"), so a slow run shows where its time
# went. go test's own lines pass unchanged.
gotest() {
	local stream=$1
	shift
	$GO test -race -count=1 -timeout "$TEST_TIMEOUT" -p 1 "$@" 2>&1 |
		while IFS= read -r line; do
			printf '%s\n' "$line"
			case $line in "ok  "* | "FAIL	"* | "---"*) echo "test.sh: $stream +$(($(date +%s) - start))s" ;; esac
		done
	return "${PIPESTATUS[0]}"
}

(
	rc=0
	gotest vm "${vm_pkgs[@]}" || rc=1
	if [ ${#lab_pkgs[@]} -gt 0 ]; then gotest vm -run '^TestLab' "${lab_pkgs[@]}" || rc=1; fi
	gotest vm "$vm_last" || rc=1
	echo "test.sh: vm stream $([ $rc = 0 ] && echo ok || echo FAILED) after $(($(date +%s) - start))s"
	exit $rc
) &
vm=$!
(
	rc=0
	SECUREOVERLAY_LAB_FORBIDDEN="the host stream of hack/test.sh runs no lab VM: name a test that boots one TestLab…" \
		gotest host -skip '^TestLab' "${host_pkgs[@]}" || rc=1
	echo "test.sh: host stream $([ $rc = 0 ] && echo ok || echo FAILED) after $(($(date +%s) - start))s"
	exit $rc
) &
host=$!
rc=0
wait $vm || rc=1
wait $host || rc=1
echo "test.sh: $([ $rc = 0 ] && echo PASS || echo FAIL) in $(($(date +%s) - start))s"
exit $rc
