# syntax=docker/dockerfile:1
# One image for `portpolicy operator` and `portpolicy agent`:
#   docker build -t portpolicy:dev .
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin portpolicy \
    && cp target/release/portpolicy /portpolicy \
    && strip /portpolicy

# glibc, CA certificates and a non-root user (65532), nothing else. The operator runs as that
# user; the agent DaemonSet overrides it with root, which NET_ADMIN needs to be effective.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /portpolicy /usr/local/bin/portpolicy
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/portpolicy"]
