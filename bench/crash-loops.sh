#!/usr/bin/env bash
# The long version of the crash loops in systest/tests/crash_loops.rs: 100 rounds each of
# kill -9 of the imageserver during uploads and of subd during fetch and activation.
#   bench/crash-loops.sh [ROUNDS]       (CRASH_SEED=N to replay a run)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
CRASH_ITERATIONS=${1:-100} cargo test -p systest --test crash_loops -- --nocapture --test-threads 1 2>&1 |
    grep -E '^test |CRASH_SEED|rounds|kills|panicked|test result'
