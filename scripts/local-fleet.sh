#!/usr/bin/env bash
# Builds everything and starts a complete local fleet (imageserver, dominator, three subds)
# on loopback, with mutual TLS, images from testdata/fleet and an MDB. Ctrl-C cleans up.
#
# Builds the debug profile by default: the same build the test command (scripts/test.sh)
# uses, so running one after the other builds the workspace once (dependencies are
# optimized in that profile anyway; three machines need no more). `--release` first
# builds and runs the release binaries instead. Other arguments go to
# `dominator local-fleet` (e.g. --port 0, --dir DIR, --permit-insecure-mode).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
build=(cargo build --workspace --bins)
if [ "${1:-}" = --release ]; then
    shift
    profile=release
    build=(cargo build --release --workspace --bins)
fi
"${build[@]}"
exec "./target/$profile/dominator" local-fleet "$@"
