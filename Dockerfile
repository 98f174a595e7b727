# syntax=docker/dockerfile:1
#
# One image for every secureoverlay binary (docs/deploy.md):
#
#   docker build -t ghcr.io/secureoverlay/secureoverlay:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ... --push .
#
# /usr/local/bin/secureoverlay            CNI plugin (copied to the host by the installer)
# /usr/local/bin/secureoverlay-agent      node agent (needs root + NET_ADMIN, set by the DaemonSet)
# /usr/local/bin/secureoverlay-master     key manager (runs as the default non-root user)
# /usr/local/bin/secureoverlay-install    CNI installer (root for the host CNI dirs, no capabilities)
# /usr/local/bin/secureoverlayctl         CLI (also as kubectl-secureoverlay)
#
# hack/check-dockerfile.sh (make lint) checks that the binaries built and copied here
# are exactly the Makefile's BINARIES with a cmd/ directory each.

ARG GO_VERSION=1.26

# ---- build: static binaries, the same flags as `make build` ----
FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG TARGETOS=linux
ARG TARGETARCH
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    set -e; mkdir -p /out; \
    for b in secureoverlay secureoverlay-agent secureoverlay-master secureoverlay-install secureoverlayctl; do \
      CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
        go build -trimpath -ldflags '-s -w' -o /out/$b ./cmd/$b; \
    done

# ---- runtime ----
# Not distroless: the agent programs its fail-closed plaintext drops with
# iptables/iptables-restore (go-iptables runs the binaries), so the image carries
# Debian's iptables (nft and legacy variants; the nft one is the default, as on the
# hosts of current distributions). Everything else is static Go.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin nonroot
COPY --from=build /out/secureoverlay /usr/local/bin/secureoverlay
COPY --from=build /out/secureoverlay-agent /usr/local/bin/secureoverlay-agent
COPY --from=build /out/secureoverlay-master /usr/local/bin/secureoverlay-master
COPY --from=build /out/secureoverlay-install /usr/local/bin/secureoverlay-install
COPY --from=build /out/secureoverlayctl /usr/local/bin/secureoverlayctl
RUN ln -s secureoverlayctl /usr/local/bin/kubectl-secureoverlay
LABEL org.opencontainers.image.title="secureoverlay" \
      org.opencontainers.image.description="Transparent IPsec for Calico IPIP pod traffic" \
      org.opencontainers.image.source="https://github.com/secureoverlay/secureoverlay"
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/secureoverlayctl"]
