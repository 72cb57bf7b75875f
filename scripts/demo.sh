#!/usr/bin/env bash
# Builds the mesh and runs `meshctl demo`: a two-node mesh on loopback, traffic through
# it, and a table of what happened.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p ztunnel -p meshctl
exec target/release/meshctl demo "$@"
