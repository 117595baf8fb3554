#!/bin/sh
# The imageserver's GetImage answer time while 500 GetObjects streams are open whose
# clients never read, against the same GetImage on the idle server (one run, as a ratio).
# Usage: bench/slow-readers.sh [STREAMS] [IMAGESERVER]
# (the default server is this tree's release build, with bounds raised so every stream
# is really open; with the default bounds one address holds at most 128 connections and
# 32 streams: the rest are shed or answered 503).
set -eu
cd "$(dirname "$0")/.."
streams=${1:-500}
cargo build --release -q -p imageserver --bins --example slow_readers
server=${2:-target/release/imageserver}
echo "== $server, bounds raised to 1000"
target/release/examples/slow_readers "$server" "$streams" \
    --max-object-streams 1000 --max-object-streams-per-caller 1000 --max-connections-per-peer 1000
echo "== $server, default bounds"
target/release/examples/slow_readers "$server" "$streams"
