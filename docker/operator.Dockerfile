# syntax=docker/dockerfile:1.7
# kubetune-operator: a static-ish Rust binary (rustls, no OpenSSL) on distroless, as non-root.
#   docker build -f docker/operator.Dockerfile -t ghcr.io/kubetune/operator:dev .
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kubetune-operator \
    && install -D -m 0755 target/release/kubetune-operator /out/kubetune-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/kubetune-operator /usr/local/bin/kubetune-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kubetune-operator"]
