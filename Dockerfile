# syntax=docker/dockerfile:1
# One image with greenlight-server, greenlight-agent and greenlightctl, for the chart in
# deploy/helm/greenlight (which runs each by its `command`):
#   docker build -t registry.example.com/greenlight/greenlight:0.1.0 .
# The build stage compiles on Debian bookworm; the runtime is the same Debian, slim, with the
# git CLI the server needs for mirror upkeep (gix cannot repack) and file:// repositories,
# run as the non-root user 65532.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep the registry and the dependencies' builds between image builds; the
# binaries are copied out of the cached target directory, which the image does not keep.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      -p greenlight-server -p greenlight-agent -p greenlight --bins \
 && mkdir -p /out \
 && cp target/release/greenlight-server target/release/greenlight-agent target/release/greenlightctl /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 65532 --user-group --no-create-home --home-dir /nonexistent greenlight
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
# gRPC (agents, operators, ingest) and HTTP (webhooks, probes, metrics).
EXPOSE 8150 8080
ENTRYPOINT ["/usr/local/bin/greenlight-server"]
