# clusterd, statically linked, in an otherwise empty image. The operator's
# init container runs `/clusterd --install-to /clustered/bin/clusterd`.
#   docker build -f images/clusterd.Dockerfile -t clustered.dev/clusterd:dev .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p clusterd --target x86_64-unknown-linux-gnu \
 && cp target/x86_64-unknown-linux-gnu/release/clusterd /clusterd

FROM scratch
COPY --from=build /clusterd /clusterd
USER 65532:65532
ENTRYPOINT ["/clusterd"]
