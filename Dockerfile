# syntax=docker/dockerfile:1
#
# One image with every Herald binary: herald-ingress, herald-token, herald-renderer,
# herald-sender, herald-callback, herald-sandbox and heraldctl. There is no ENTRYPOINT: the
# command picks the binary (`docker run herald:dev herald-ingress`, or `command:` in compose).
#
#   docker build -t herald:dev .
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src

# Only what the build reads. herald-contract's build.rs compiles proto/ with protox (pure
# Rust), so no protoc is needed. tests/ is a workspace member, so its manifest must be present.
COPY Cargo.toml Cargo.lock ./
COPY proto/ proto/
COPY crates/ crates/
COPY tests/ tests/

# The registry and target directories live in BuildKit cache mounts, so a rebuild after a
# source change recompiles only the workspace crates, not the dependency set. The cache mount
# is not part of the image, hence the copy of the binaries to /out in the same step.
RUN --mount=type=cache,id=herald-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=herald-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=herald-target,target=/src/target,sharing=locked \
    cargo build --release --locked --bins \
    && mkdir -p /out \
    && cp target/release/herald-ingress \
          target/release/herald-token \
          target/release/herald-renderer \
          target/release/herald-sender \
          target/release/herald-callback \
          target/release/herald-sandbox \
          target/release/heraldctl \
          /out/

# ---------------------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

LABEL org.opencontainers.image.title="herald" \
      org.opencontainers.image.description="Herald notification service: every service binary plus heraldctl" \
      org.opencontainers.image.licenses="Apache-2.0"

# ca-certificates for HTTPS to the providers (api.weixin.qq.com) and TLS to the broker and
# databases; nothing else (no shell tools beyond Debian's essential set, no compilers).
# DL3008 (pin apt versions) is ignored on purpose: the point is the current CA bundle, and
# Debian drops superseded versions from the archive, so a pin would break the build later.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 herald \
    && useradd --system --uid 10001 --gid herald --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin herald

COPY --from=builder /out/ /usr/local/bin/

# Every binary reads ./herald.toml when HERALD_CONFIG is unset, so a file mounted at
# /etc/herald/herald.toml is found either way. HERALD_CONFIG is deliberately not set here.
WORKDIR /etc/herald
USER 10001:10001

# ingress, token service, callback receiver, provider sandbox (the renderer and sender listen
# on nothing). Each listens where its `listen` setting says: use 0.0.0.0:<port> in containers.
EXPOSE 8090 8091 8094 8099

CMD ["heraldctl", "--help"]
