#!/usr/bin/env bash
# Installs what building and testing the mesh needs on a fresh Debian machine.
# Safe to run again: it only installs what is missing.
set -euo pipefail

need=()
for tool in curl:curl openssl:openssl ip:iproute2 iptables:iptables unshare:util-linux protoc:protobuf-compiler clang:clang iperf3:iperf3 python3:python3 tcpdump:tcpdump wrk:wrk h2load:nghttp2-client; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
# libbpf's headers, for the eBPF programs mesh-ebpf compiles with clang.
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo (Rust stable) is required" >&2; exit 1; }
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
