# secureoverlay — build, test, lint, demo.
#
#   make build        static binaries into bin/
#   make test         everything: installs apt packages + Go modules, builds the
#                     test API server, runs unit, privileged and conformance tests
#   make lint         go vet + gofmt check
#   make image        the image, without a registry or engine → .cache/image/ (docs/deploy.md)
#   make demo         the local lab: a VM with three encrypted nodes
#   make bench        benchmarks → bench/RESULTS.md
#   make bench-dataplane  the data plane in the VM lab (≈10–15 min) → its section of bench/RESULTS.md
#
# Tests that need root, network namespaces or the real API server run as part of
# `make test`; run it as root on a Debian machine.

SHELL      := /bin/bash
GO         ?= go
BIN        := $(CURDIR)/bin
CACHE      ?= $(CURDIR)/.cache
GOFLAGS    ?=
# Every binary we ship; `build` builds those whose cmd/ directory exists.
BINARIES   := secureoverlay secureoverlay-agent secureoverlay-master secureoverlay-install secureoverlayctl
LDFLAGS    := -s -w
TEST_TIMEOUT ?= 60m

export SECUREOVERLAY_BIN_DIR   := $(BIN)
export SECUREOVERLAY_CACHE_DIR := $(CACHE)
export CNI_PLUGIN_DIR          ?= /usr/lib/cni

.PHONY: all build deps tools image image-dockerfile test unit lint demo demo-cluster conformance conformance-matrix bench bench-dataplane clean

all: build

build:
	@mkdir -p $(BIN)
	@set -e; for b in $(BINARIES); do \
	  if ls cmd/$$b/*.go >/dev/null 2>&1; then \
	    echo "go build -> bin/$$b"; \
	    CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/$$b ./cmd/$$b; \
	  fi; \
	done
	@ln -sf secureoverlayctl $(BIN)/kubectl-secureoverlay 2>/dev/null || true

# apt packages the tests and the lab need (idempotent, fast when present).
deps:
	@hack/install-deps.sh
	@$(GO) mod download

# Test tools built from pinned Go modules and Debian packages, cached under .cache/
# (the image, kube-apiserver, etcd, kubectl, the node binaries, the lab kernel).
tools: deps
	@set -e; for s in hack/tools-*.sh; do [ -x "$$s" ] && "$$s"; done; true

# The project's image from Debian packages and our binaries, reproducibly
# (hack/tools-image.sh: mmdebstrap → umoci → skopeo; also run by `make tools`):
# .cache/image/secureoverlay.tar (docker-archive), .cache/image/oci/ (OCI layout).
image: deps
	@hack/tools-image.sh

# The unmodified Dockerfile built by buildah on local stand-ins for its FROM images
# (no registry); slow, so not part of `make test` (docs/architecture.md).
image-dockerfile: deps
	@hack/buildah-dockerfile.sh

lint:
	$(GO) vet ./...
	@if [ -x hack/check-dockerfile.sh ]; then hack/check-dockerfile.sh; fi
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.cache/*')); \
	  if [ -n "$$out" ]; then echo "gofmt needs to run on:"; echo "$$out"; exit 1; fi
	@echo "lint: ok"

unit:
	$(GO) test -race -count=1 -short ./...

test: export SECUREOVERLAY_REQUIRE_ALL = 1
test: deps tools build lint
	@mkdir -p $(CACHE)
	@GO=$(GO) TEST_TIMEOUT=$(TEST_TIMEOUT) hack/test.sh 2>&1 | tee $(CACHE)/test.log; exit $${PIPESTATUS[0]}

# The end-to-end scenarios in the VM lab (also part of `make test`).
conformance: export SECUREOVERLAY_REQUIRE_ALL = 1
conformance: deps tools build
	$(GO) test -race -count=1 -v -timeout $(TEST_TIMEOUT) ./conformance/...

# The kernel matrix (docs/lab.md): the lab's data-path and conformance scenarios on each
# Debian kernel series in LAB_KERNELS — bookworm's 6.1 (what `make test` boots), trixie's
# 6.12, and trixie-backports' 6.18 and 7.3 (per-CPU SAs exist from 6.13; the archive no
# longer carries 6.19's module packages). Each image comes from the Debian archive through
# a private apt configuration under .cache/apt; one log per kernel in .cache/matrix-<k>.log.
LAB_KERNELS ?= 6.1 6.12 6.18 7.3
MATRIX_TESTS ?= ./conformance/e2e ./conformance/lab
conformance-matrix: export SECUREOVERLAY_REQUIRE_ALL = 1
conformance-matrix: deps tools build
	@set -e; fail=""; for k in $(LAB_KERNELS); do \
	  log=$(CURDIR)/.cache/matrix-$$k.log; echo "== kernel $$k (log: $$log)"; \
	  SECUREOVERLAY_LAB_KERNEL=$$k hack/tools-lab.sh; \
	  if SECUREOVERLAY_LAB_KERNEL=$$k $(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) -v $(MATRIX_TESTS) >$$log 2>&1 && \
	     SECUREOVERLAY_LAB_KERNEL=$$k $(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) -v -run '^TestLab' ./reconciler/... >>$$log 2>&1; then \
	    echo "   $$k: PASS ($$(grep -m1 -o 'kernel [0-9][^)]*' $$log))"; \
	  else echo "   $$k: FAIL"; grep -E -e '--- FAIL|^FAIL' $$log | head -n 20; fail="$$fail $$k"; fi; \
	done; if [ -n "$$fail" ]; then echo "conformance-matrix: failed on$$fail"; exit 1; fi; echo "conformance-matrix: PASS on $(LAB_KERNELS)"

# The main job: a local lab VM with encrypted nodes; prints a report, exits non-zero on any violation.
demo: deps tools build
	$(GO) run ./conformance/demo

# The same story on real nodes: two kubelets with containerd, runc and Calico's CNI chain
# in the lab VM, the manifest applied by kubectl, secureoverlayctl against the real
# masters and agents, a rolling update, a node reboot, kubectl delete (≈15 min; the
# whole log goes to .cache/demo-cluster.log). `make test` runs it too (docs/lab.md).
demo-cluster: deps tools build
	@log=$(CURDIR)/.cache/demo-cluster.log; echo "real-node demo (≈15 min); full log: $$log"; \
	( SECUREOVERLAY_REQUIRE_ALL=1 $(GO) test ./conformance/realnode -run '^TestRealClusterEncrypts$$' -count=1 -v -timeout 45m; echo "exit $$?" ) 2>&1 | \
	  tee $$log | sed -u -n 's/^ *cluster_test.go:[0-9]*: demo: //p'; \
	if tail -n 1 $$log | grep -qx 'exit 0'; then echo "PASS"; else grep -E -e '--- FAIL|^FAIL|_test.go:[0-9]+: ' $$log | grep -v ': demo: ' | tail -n 20; echo "FAIL (see $$log)"; exit 1; fi

# Benchmarks → bench/RESULTS.md (docs/performance.md explains each figure).
# BENCH_FLAGS=--lab adds rotation/cutover and SA programming in the lab VM.
# The data-plane benchmark (in the lab VM; part of `make bench`) is sized by DP_ROUNDS
# (rounds, modes' order rotated each round), DP_DURATION (seconds per test) and
# DP_STREAMS (the N of "TCP N streams").
DP_ROUNDS   ?= 5
DP_DURATION ?= 3
DP_STREAMS  ?= 4
bench bench-dataplane: export SECUREOVERLAY_BENCH_DP_ROUNDS   = $(DP_ROUNDS)
bench bench-dataplane: export SECUREOVERLAY_BENCH_DP_DURATION = $(DP_DURATION)
bench bench-dataplane: export SECUREOVERLAY_BENCH_DP_STREAMS  = $(DP_STREAMS)
bench: deps tools build
	hack/bench.sh $(BENCH_FLAGS)

# Only the data plane: plaintext IPIP vs ESP as the agent programs it vs ESP with the null
# cipher vs WireGuard in the VM lab, plus the host's AEAD rates; replaces section 10 of
# bench/RESULTS.md and keeps the others. Fails on a correctness check (ESP counters,
# xfrm errors, plaintext on the wire), never on a figure. Needs the lab image (built here)
# and no root.
bench-dataplane: deps
	@hack/tools-lab.sh
	$(GO) run ./bench/cmd/benchreport -only dataplane -update

clean:
	rm -rf $(BIN)
