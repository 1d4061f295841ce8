# syntax=docker/dockerfile:1.7
# kubetune-trainer, two variants (build targets):
#   cpu  (default tag <version>):      docker build -f docker/trainer.Dockerfile --target cpu  -t ghcr.io/kubetune/trainer:dev .
#   cuda (tag <version>-cuda):         docker build -f docker/trainer.Dockerfile --target cuda -t ghcr.io/kubetune/trainer:dev-cuda .
# The CUDA build compiles candle's kernels with nvcc for CUDA_COMPUTE_CAP (90 = H100; 80 = A100;
# 89 = L4/L40S) and needs the trainer's `cuda` feature (which turns on kubetune-model/cuda).
# Both run as uid 65532; the operator mounts a writable scratch volume, the root filesystem can be read-only.
ARG RUST_VERSION=1.95
ARG CUDA_VERSION=12.6.3
ARG CUDA_COMPUTE_CAP=90

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build-cpu
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kubetune-trainer \
    && install -D -m 0755 target/release/kubetune-trainer /out/kubetune-trainer

FROM docker.io/nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build-cuda
ARG RUST_VERSION
ARG CUDA_COMPUTE_CAP
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gcc pkg-config \
    && rm -rf /var/lib/apt/lists/* \
    && curl -fsSL https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kubetune-trainer --features cuda \
    && install -D -m 0755 target/release/kubetune-trainer /out/kubetune-trainer

FROM gcr.io/distroless/cc-debian12:nonroot AS cpu
COPY --from=build-cpu /out/kubetune-trainer /usr/local/bin/kubetune-trainer
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/kubetune-trainer"]

# The runtime image brings cuBLAS and cuRAND; the driver's libcuda comes from the node. CA
# certificates for HTTPS to object storage and Hugging Face.
FROM docker.io/nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 kubetune \
    && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin kubetune
COPY --from=build-cuda /out/kubetune-trainer /usr/local/bin/kubetune-trainer
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/kubetune-trainer"]
