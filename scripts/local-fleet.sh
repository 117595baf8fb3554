#!/usr/bin/env bash
# Builds everything and starts a complete local fleet (imageserver, dominator, three subds)
# on loopback, with mutual TLS, images from testdata/fleet and an MDB. Ctrl-C cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
exec ./target/release/dominator local-fleet "$@"
