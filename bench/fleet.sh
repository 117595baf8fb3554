#!/usr/bin/env bash
# Fleet benchmark: one real dominator process against N simulated subds (in-process HTTP,
# all behind one listening socket, each machine on its own loopback address 127.1.x.y).
# Prints rollout time, peak RSS, compliant poll size, and one `SUMMARY fleet ...` line.
# Usage: bench/fleet.sh [MACHINES=1000] [LARGE_EVERY=10]
#   (every LARGE_EVERY-th machine holds a 2,000-file tree, the others 10 files;
#    DOMINATOR_ARGS="--concurrency 400" passes flags on to the dominator)
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release -p dominator --bin dominator --example fleet_bench
exec ./target/release/examples/fleet_bench "${1:-1000}" "${2:-10}"
