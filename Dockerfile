# syntax=docker/dockerfile:1
#
# strait sidecar image: one static binary on distroless, running as nonroot (65532).
#
#   docker build -t strait:$(git describe --tags --always) --build-arg VERSION=$(git describe --tags --always) .
#   docker buildx build --platform linux/amd64,linux/arm64 ...   (cross-compiled on the build host: no emulation)
#
# The image has no shell, no libc and no CA bundle beyond distroless's; strait needs none of them
# (deploy/container_test.go runs the same build in an empty root to prove it).

FROM --platform=$BUILDPLATFORM golang:1.26.8-bookworm AS build
ENV GOTOOLCHAIN=local
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG TARGETOS TARGETARCH
# Empty VERSION keeps the version compiled into cmd/strait.
ARG VERSION=
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -buildvcs=false -ldflags "-s -w ${VERSION:+-X main.version=$VERSION}" -o /out/strait ./cmd/strait

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/strait /strait
USER nonroot:nonroot
# 20000: a conventional public mTLS port (the real one comes from the registration or -listen);
# 19100: admin (/ready, /live, /metrics) when bound beyond loopback with -admin-bind.
EXPOSE 20000 19100
ENTRYPOINT ["/strait"]
