# syntax=docker/dockerfile:1
# One image for `portpolicy operator` and `portpolicy agent`:
#   docker build -t portpolicy:dev .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin portpolicy \
    && cp target/release/portpolicy /portpolicy \
    && strip /portpolicy

# Debian slim with nftables: the agent replaces its masquerading table with one `nft -f -`
# batch. The operator runs as the non-root user 65532; the agent DaemonSet overrides it with
# root, which NET_ADMIN needs to be effective.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /portpolicy /usr/local/bin/portpolicy
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/portpolicy"]
