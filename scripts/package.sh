#!/usr/bin/env bash
# Builds one Debian package per program (imageserver, imagetool, subd, dominator, mdb)
# into target/debian/, with cargo-deb (installed first if missing): the binary, its man
# pages and bash/zsh/fish completions (written by `docgen` from the clap definitions),
# and for the daemons their systemd unit, /etc/default file and postinst.
#
#   scripts/package.sh           release binaries (what to install on real machines)
#   scripts/package.sh --debug   the debug binaries already built by the test command
#                                (fast; for the package checks in scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

programs=(imageserver imagetool subd dominator mdb)
if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "[package] installing cargo-deb" >&2
    cargo install cargo-deb --locked --version 3.8.0
fi
profile=release
outdir=target/release
build=(cargo build --release)
if [ "${1:-}" = --debug ]; then
    profile=dev
    outdir=target/debug
    build=(cargo build)
fi
pkgs=()
for p in "${programs[@]}" docgen; do pkgs+=(-p "$p"); done
"${build[@]}" "${pkgs[@]}" --bins
rm -rf "$outdir/docs"
"$outdir/docgen" "$outdir/docs" >&2
gzip -9n "$outdir"/docs/man/*.1   # Debian policy: man pages compressed
extra=()
# cargo-deb warns that the dev profile is meant for tests only: it is (--debug).
[ "$profile" = dev ] && extra=(--fast)
for p in "${programs[@]}"; do
    cargo deb -p "$p" --no-build --profile "$profile" "${extra[@]}" -o target/debian/
done
