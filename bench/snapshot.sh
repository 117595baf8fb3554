#!/usr/bin/env bash
# Snapshot of a live host (issue 12 §1): `imagetool adds` of the Debian corpus served by a
# real subd into an empty imageserver, as a ratio to `imagetool add` of the same directory
# into another empty imageserver, in one run (release builds, `sync` before each timed
# step); then a second snapshot of the unchanged host (0 objects expected) and its time.
#
# The corpus ($CORPUS/rootfs) is only read: subd's root is a copy in $WORK (subd keeps its
# lock and object cache in ROOT/.subd, so it must never be pointed at the corpus itself).
# subd runs with an exclusion matching nothing, so both images hold the same tree, and
# otherwise with its defaults (its background scan throttled after the first one, which
# finishes before anything is timed). Everything written lives under $WORK, deleted at
# the end (KEEP=1 keeps it). Prints a figures table (and writes it to $OUT if set).
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-/tmp/bench/fs}
WORK=${WORK:-$CORPUS/snap-work}
[[ -d $CORPUS/rootfs ]] || { echo "corpus missing at $CORPUS/rootfs" >&2; exit 2; }
cargo build --release -q -p imageserver -p imagetool -p subd
BIN=$PWD/target/release
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  if [[ ${KEEP:-0} != 1 ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
rm -rf "$WORK"; mkdir -p "$WORK"
export TMPDIR=$WORK
quiesce() { sync; sleep 1; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.2f}')"; }
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
wait_port() {
  for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done
  echo "nothing listens on port $1" >&2; exit 1
}
imageserver() { # data-dir port
  "$BIN/imageserver" --data-dir "$1" --listen "127.0.0.1:$2" --permit-insecure-mode 2>"$1.log" &
  PIDS+=($!); wait_port "$2"
}
timed() { # variable-prefix command… -> PREFIX_S (seconds), PREFIX_JSON (stdout)
  local prefix=$1 t0 t1 out; shift; quiesce; t0=$(now)
  out=$("$@"); t1=$(now)
  printf -v "${prefix}_S" '%s' "$(secs "$t0" "$t1")"; printf -v "${prefix}_JSON" '%s' "$out"
}

IS_ADD=${PORT_ADD:-17011}; IS_SNAP=${PORT_SNAP:-17012}; SUBD=${PORT_SUBD:-17013}

# The host: a copy of the corpus under a real subd; its first scan is done before timing.
cp -a "$CORPUS/rootfs" "$WORK/root"
"$BIN/subd" --root "$WORK/root" --listen "127.0.0.1:$SUBD" --permit-insecure-mode \
  --scan-exclude '^/nothing-is-excluded-here$' 2>"$WORK/subd.log" &
PIDS+=($!); wait_port "$SUBD"
until [[ $(curl -s -X POST -H 'content-type: application/json' -d '{"short_only":true}' \
  "http://127.0.0.1:$SUBD/rpc/Subd.Poll" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])') != 0 ]]; do
  sleep 0.2
done
# Warm the page cache for both readers (subd reads the copy, add reads the corpus).
find "$CORPUS/rootfs" "$WORK/root" -type f -print0 | xargs -0 cat >/dev/null

# Baseline: imagetool add of the same directory into an empty imageserver.
imageserver "$WORK/data-add" "$IS_ADD"
timed ADD "$BIN/imagetool" --image-server "127.0.0.1:$IS_ADD" --json add bench/add "$CORPUS/rootfs" "" ""
# The snapshot into another empty imageserver, then again with nothing changed.
imageserver "$WORK/data-snap" "$IS_SNAP"
timed SNAP "$BIN/imagetool" --image-server "127.0.0.1:$IS_SNAP" --json adds bench/snap/1 "127.0.0.1:$SUBD" "" ""
timed AGAIN "$BIN/imagetool" --image-server "127.0.0.1:$IS_SNAP" --json adds bench/snap/2 "127.0.0.1:$SUBD" "" ""
DIFF=$("$BIN/imagetool" --image-server "127.0.0.1:$IS_SNAP" diff bench/snap/1 bench/snap/2 | wc -l)

MIB() { python3 -c "print(f'{$1/1048576:.1f} MiB')"; }
report=$(cat <<TXT
machine: $(nproc) cores, work on $(df --output=source,fstype "$WORK" | tail -1 | tr -s " "), $(uname -r); commit $(git rev-parse --short HEAD)
| measurement | time (s) | ratio to add | files | objects sent | bytes sent |
|---|---|---|---|---|---|
| imagetool add rootfs (empty server) | $ADD_S | 1.00 | $(field "$ADD_JSON" files) | $(field "$ADD_JSON" new_objects) | $(MIB "$(field "$ADD_JSON" bytes_sent)") |
| imagetool adds from subd (empty server) | $SNAP_S | $(ratio "$SNAP_S" "$ADD_S") | $(field "$SNAP_JSON" files) | $(field "$SNAP_JSON" new_objects) | $(MIB "$(field "$SNAP_JSON" bytes_sent)") |
| second adds, host unchanged | $AGAIN_S | $(ratio "$AGAIN_S" "$ADD_S") | $(field "$AGAIN_JSON" files) | $(field "$AGAIN_JSON" new_objects) | $(MIB "$(field "$AGAIN_JSON" bytes_sent)") |
diff bench/snap/1 bench/snap/2: $DIFF lines
load average at the start: $LOAD0; at the end: $(cut -d' ' -f1-3 /proc/loadavg)
TXT
)
echo "$report"
if [[ -n ${OUT:-} ]]; then echo "$report" >"$OUT"; fi
