#!/usr/bin/env bash
# Builds the mesh and runs `meshctl demo`: the controller and a two-node mesh (network
# namespaces with transparent capture as root, else loopback), traffic through it, and
# tables of what happened. Flags go to meshctl demo (--check, --loopback, --capture).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p controller -p ztunnel -p meshctl
exec target/release/meshctl demo "$@"
