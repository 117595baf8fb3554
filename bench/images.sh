#!/usr/bin/env bash
# Image pipeline benchmark: imagetool add into a fresh local imageserver (release build)
# against sha512sum baselines measured in the same run. Needs the Debian corpus built by
# ../shared/corpus/make-rootfs.sh at $CORPUS (default /tmp/bench/fs) — set BUILD_CORPUS=1
# to build it here. Prints a figures table to stdout (and to $OUT if set).
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-/tmp/bench/fs}
# Work (server data, spools, copies) lives on the corpus's own file-system: this machine's
# root slows 3-8x after large deletes, and syncfs there waits for everyone's dirty pages.
WORK=${WORK:-$CORPUS/images-work}
if [[ ! -d $CORPUS/rootfs || ! -d $CORPUS/rootfs2 ]]; then
  if [[ ${BUILD_CORPUS:-0} == 1 ]]; then ../shared/corpus/make-rootfs.sh; else
    echo "corpus missing at $CORPUS (set BUILD_CORPUS=1 to build it)" >&2; exit 2; fi
fi
cargo build --release -q -p imageserver -p imagetool
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
BIN=$PWD/target/release
rm -rf "$WORK"; mkdir -p "$WORK"
# Each timed step starts with nothing dirty: a previous delete or write still being written
# back would otherwise be billed to it.
quiesce() { sync; sleep 1; }
PORT=${PORT:-16999}
export IMAGE_SERVER=127.0.0.1:$PORT
export TMPDIR=$WORK  # imagetool spools large tar members here

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.2f}')"; }
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
maxrss() { awk -F': ' '/Maximum resident/ {printf "%.1f", $2/1024}' "$1"; }

start_server() {
  "$BIN/imageserver" --data-dir "$1" --listen "127.0.0.1:$PORT" --permit-insecure-mode 2>"$WORK/server.log" &
  SERVER=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return; sleep 0.05; done
  echo "imageserver did not start" >&2; exit 1
}
server_hwm() { awk '/VmHWM/ {printf "%.1f", $2/1024}' /proc/$SERVER/status; }
stop_server() { kill $SERVER; wait $SERVER 2>/dev/null || true; }

add() { # name path -> sets ADD_S, ADD_JSON, ADD_RSS
  local t0 t1; quiesce; t0=$(now)
  ADD_JSON=$(/usr/bin/time -v -o "$WORK/time.${1//\//_}" "$BIN/imagetool" --json add "$1" "$2" "" "")
  t1=$(now); ADD_S=$(secs "$t0" "$t1"); ADD_RSS=$(maxrss "$WORK/time.${1//\//_}")
}
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$ADD_JSON" "$1"; }

sha_baseline() { # dir -> seconds (two cores, as in the issue)
  local t0 t1; quiesce; t0=$(now)
  (cd "$1" && find . -type f -print0 | xargs -0 -P2 -n 256 sha512sum >/dev/null)
  t1=$(now); secs "$t0" "$t1"
}

# Warm the page cache so baseline and add read the same way.
sha_baseline "$CORPUS/rootfs" >/dev/null; sha_baseline "$CORPUS/rootfs2" >/dev/null
B1=$(sha_baseline "$CORPUS/rootfs"); B2=$(sha_baseline "$CORPUS/rootfs2")

start_server "$WORK/data"
add bench/rootfs "$CORPUS/rootfs"; A1=$ADD_S; R1=$ADD_RSS; N1=$(field new_objects); S1=$(field bytes_sent)
add bench/rootfs2 "$CORPUS/rootfs2"; A2=$ADD_S; R2=$ADD_RSS; N2=$(field new_objects); S2=$(field bytes_sent)

# Mode-, owner- and symlink-only changes send no objects.
cp -a "$CORPUS/rootfs2" "$WORK/meta"
chmod 0600 "$WORK/meta/etc/hostname"; chown 123:456 "$WORK/meta/etc/passwd"
ln -sfn /nowhere "$WORK/meta/$(cd "$WORK/meta" && find . -type l | head -1)"
add bench/meta "$WORK/meta"; A3=$ADD_S; N3=$(field new_objects); S3=$(field bytes_sent)
rm -rf "$WORK/meta"
HWM1=$(server_hwm); stop_server

# Tarball: one pass over the .tar.gz, into a fresh server (everything is sent).
tar -C "$CORPUS/rootfs" -czf "$WORK/rootfs.tar.gz" .
gzip -dc "$WORK/rootfs.tar.gz" | sha512sum >/dev/null
quiesce; t0=$(now); gzip -dc "$WORK/rootfs.tar.gz" | sha512sum >/dev/null; t1=$(now); BG=$(secs "$t0" "$t1")
start_server "$WORK/data-tgz"
add bench/tgz "$WORK/rootfs.tar.gz"; AT=$ADD_S; RT=$ADD_RSS; NT=$(field new_objects)
# …and again into the same server (only hashing and existence checks).
add bench/tgz2 "$WORK/rootfs.tar.gz"; AT2=$ADD_S; RT2=$ADD_RSS; NT2=$(field new_objects)
HWM2=$(server_hwm); stop_server

MIB() { python3 -c "print(f'{$1/1048576:.2f} MiB')"; }
report=$(cat <<TXT
machine: $(nproc) cores, work on $(df --output=source,fstype "$WORK" | tail -1 | tr -s " "), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); corpus: $(head -1 /tmp/bench/corpus-stats.txt 2>/dev/null | cut -c1-80)
| measurement | time (s) | baseline (s) | ratio | objects sent | bytes sent | imagetool peak RSS (MiB) |
|---|---|---|---|---|---|---|
| add rootfs (fresh server) | $A1 | $B1 (find|xargs -P2 sha512sum) | $(ratio "$A1" "$B1") | $N1 | $(MIB "$S1") | $R1 |
| add rootfs2 (second add) | $A2 | $B2 (same, rootfs2) | $(ratio "$A2" "$B2") | $N2 | $(MIB "$S2") | $R2 |
| add mode/owner/symlink-only change | $A3 | $B2 | $(ratio "$A3" "$B2") | $N3 | $(MIB "$S3") | - |
| add rootfs.tar.gz (fresh server) | $AT | $BG (gzip -dc|sha512sum) | $(ratio "$AT" "$BG") | $NT | - | $RT |
| add rootfs.tar.gz again (all present) | $AT2 | $BG | $(ratio "$AT2" "$BG") | $NT2 | - | $RT2 |
imageserver peak RSS (VmHWM): directory adds $HWM1 MiB; tarball adds $HWM2 MiB
TXT
)
# Memory with one 2 GiB file: a fresh server receives it from the real imagetool (a
# sparse file, so it costs no disk on the client side; the server stores 2 GiB).
if [[ ${RSS_2GIB:-1} == 1 ]]; then
  mkdir -p "$WORK/big"; truncate -s 2G "$WORK/big/two-gib"
  start_server "$WORK/data-big"
  add bench/big "$WORK/big"; AB=$ADD_S; RB=$ADD_RSS; SB=$(field bytes_sent)
  HWM3=$(server_hwm); stop_server
  rm -rf "$WORK/big" "$WORK/data-big"
  report+=$'\n'"2 GiB file: add ${AB} s, $(MIB "$SB") sent; imagetool peak RSS $RB MiB; imageserver peak RSS (VmHWM) $HWM3 MiB (limit 100 MiB)"
  if python3 -c "import sys; sys.exit(0 if $HWM3 < 100 else 1)"; then :; else report+=" FAILED"; fi
fi
report+=$'\n'"load average at the start: $LOAD0; at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$report"
if [[ -n ${OUT:-} ]]; then echo "$report" >"$OUT"; fi
