#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the tests need
# (headless Chromium for the status-page screenshot test, systemd-analyze for the unit
# checks), builds all binaries (the
# end-to-end tests start the real imageserver, subd, dominator, imagetool and mdb), then
# runs the whole suite, after `cargo fmt --check` and clippy with warnings as errors, then
# the package checks (scripts/check-packages.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v curl >/dev/null 2>&1 || need+=(curl)       # status-page and admin.p12 tests
command -v openssl >/dev/null 2>&1 || need+=(openssl) # the browser's key pin, admin.p12
command -v pk12util >/dev/null 2>&1 || need+=(libnss3-tools) # admin.p12 into a browser's NSS db
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)   # the unit checks
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[test] installing ${need[*]}" >&2
        apt-get update -qq >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "[test] WARNING: ${need[*]} missing and cannot be installed (not root): browser tests will fail" >&2
    fi
fi

# Garage, for the imageserver's S3 tests (a debug build when absent: a few minutes).
./scripts/install-garage.sh

# Style and lints are part of the tests: CI fails on either.
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace "$@"
# The Debian packages (from the debug binaries just built; cargo-deb installed if missing):
# contents, units (systemd-analyze verify), man pages, completions, binaries run.
./scripts/check-packages.sh
