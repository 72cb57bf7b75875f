#!/usr/bin/env bash
# The whole test suite, as CI runs it: lints, unit and integration tests, a short
# benchmark run and the end-to-end demo check. One build profile (release) throughout.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

step() { printf '\n==> %s\n' "$*"; }

step "format"
cargo fmt --all -- --check
step "clippy"
cargo clippy --release --workspace --all-targets -- -D warnings
step "build"
cargo build --release --workspace --all-targets
step "tests"
cargo nextest run --release --workspace --no-fail-fast
step "capture tests again, with the iptables TPROXY fallback (the run above used eBPF)"
MESH_CAPTURE_MODE=iptables cargo nextest run --release --workspace --no-fail-fast \
  -E 'test(/^netns_capture_|^netns_mesh_/)'
step "benchmark (short run; asserts nothing about speed)"
cargo run --release -q -p mesh-tests --bin mesh-bench -- l4 --quick
cargo run --release -q -p mesh-tests --bin mesh-bench -- controlplane --quick
cargo run --release -q -p mesh-tests --bin mesh-bench -- netns --quick
cargo run --release -q -p mesh-tests --bin mesh-bench -- l7 --quick
step "demo (as root: network namespaces, transparent capture)"
cargo run --release -q -p meshctl -- demo --check
step "demo on loopback (what runs without root)"
cargo run --release -q -p meshctl -- demo --loopback --check
