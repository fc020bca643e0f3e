# The two commands of the README:
#   make demo   local single-node Kubernetes + the operator + the seed's app
#   make test   everything: lint, unit, real processes, real API server, end to end,
#               and the API tier again on the oldest Kubernetes supported
#
# Builds and caches stay outside the repository (~/.cache/clustered).

CACHE ?= $(or $(CLUSTERED_CACHE),$(HOME)/.cache/clustered)
export CARGO_TARGET_DIR ?= $(CACHE)/target
# The shipped binaries are linked statically: clusterd must run in whatever
# app image it is copied into, and both images hold nothing but the binary.
STATIC_TARGET := x86_64-unknown-linux-gnu
export CLUSTERD_BIN := $(CARGO_TARGET_DIR)/$(STATIC_TARGET)/release/clusterd
export OPERATOR_BIN := $(CARGO_TARGET_DIR)/$(STATIC_TARGET)/release/clustered-operator
# `kubectl clustered` (kubectl-plugin/), which the end-to-end tests run.
export KUBECTL_CLUSTERED_BIN := $(CARGO_TARGET_DIR)/$(STATIC_TARGET)/release/kubectl-clustered

# Nodes of the local cluster (e2e/cluster/up): CI and `make test` run 3
# (e2e/tests/nodes.rs needs them); `NODES=1 make demo` starts a lighter one.
export NODES ?= 3

.PHONY: demo test lint build images cluster down bench

demo: images
	e2e/demo

test: lint images
	cargo test --workspace --release --locked
	e2e/cluster/floor test

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --features clustered-e2e/bench --locked -- -D warnings

build:
	RUSTFLAGS="-C target-feature=+crt-static" \
		cargo build --release --locked -p clusterd -p clustered-operator -p kubectl-clustered --target $(STATIC_TARGET)

cluster:
	e2e/cluster/up

images: build cluster
	e2e/cluster/images

down:
	e2e/cluster/floor down
	e2e/cluster/down

bench: build
	benches/run
	benches/autoscale --if-cluster-up
	benches/fleet --if-cluster-up
