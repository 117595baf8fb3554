#!/usr/bin/env bash
# Installs Garage (the S3-compatible store the imageserver's S3 tests run against) into
# ~/.cargo/bin unless the pinned version is already there or on PATH. A debug build of the
# sqlite-only feature set: a few minutes on two cores where a release build takes 13-22;
# ample for the tests' small objects. GARAGE_TARGET_DIR (default: a temp directory,
# removed afterwards) holds the build, without debug info.
set -euo pipefail
version=2.5.0
have() { "$1" --version 2>/dev/null | grep -q "v\?$version\b"; }
for g in "${GARAGE:-}" "$(command -v garage || true)" "$HOME/.cargo/bin/garage"; do
    if [ -n "$g" ] && [ -x "$g" ] && have "$g"; then
        echo "[garage] $g is version $version" >&2
        exit 0
    fi
done
target=${GARAGE_TARGET_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/garage-target.XXXXXX")}
trap 'rm -rf "$target"' EXIT
echo "[garage] building garage $version (debug, sqlite) in $target" >&2
start=$(date +%s)
CARGO_TARGET_DIR=$target CARGO_PROFILE_DEV_DEBUG=false nice -n 10 cargo install garage --locked --version "$version" \
    --no-default-features --features bundled-libs,sqlite --debug
echo "[garage] installed $(~/.cargo/bin/garage --version | head -1) in $(( $(date +%s) - start )) s" >&2
