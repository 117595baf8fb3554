#!/usr/bin/env bash
# Fleet benchmark: one real dominator process against N simulated subds (in-process HTTP
# servers on their own loopback ports). Prints rollout time, peak RSS, compliant poll size.
# Usage: bench/fleet.sh [MACHINES=1000]
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || true
cargo build --release -p dominator --bin dominator --example fleet_bench
exec ./target/release/examples/fleet_bench "${1:-1000}"
