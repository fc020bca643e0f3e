# The operator, statically linked, non-root.
#   docker build -f images/operator.Dockerfile -t clustered.dev/operator:dev .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p clustered-operator --target x86_64-unknown-linux-gnu \
 && cp target/x86_64-unknown-linux-gnu/release/clustered-operator /clustered-operator

FROM scratch
COPY --from=build /clustered-operator /clustered-operator
USER 65532:65532
ENTRYPOINT ["/clustered-operator"]
