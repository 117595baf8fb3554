#!/usr/bin/env bash
# Rebuild of a dead host (issue 11 §3) on the Debian corpus (../shared/corpus/make-rootfs.sh,
# at $CORPUS, default /tmp/bench/fs), against a baseline measured in the same run:
#   rebuild: a real imageserver holding the corpus's rootfs as a full image, a real dominator
#     with an MDB whose record `m1` points at a dead address, and each round a fresh real subd
#     on an empty root (its own directory under $WORK). Timed: from `mdb set m1 --address`
#     (the edit that points the record at the replacement) until the dominator's
#     /api/machines shows m1 `synced` on the image (polled every 10 ms).
#   baseline: `rsync -aH` from an rsync daemon on loopback pulling the same tree into an
#     empty directory, followed by `sync -f` of the work file-system (the same durability:
#     subd's update ends with a syncfs).
# ROUNDS rounds (default 3), medians, the ratio printed (target <= 1.5). Release builds;
# every daemon runs with --permit-insecure-mode, i.e. plain HTTP on 127.0.0.1, as in
# bench/subd.sh. The dominator runs with --poll-interval-ms $POLL_MS (default 50), so its
# polls add at most that much per step; it sees the MDB edit through inotify on the MDB's
# directory (its 250 ms identity check is only the fallback).
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-/tmp/bench/fs}
# Everything written lives on the corpus's own file-system (see bench/subd.sh), in $WORK
# only: rootfs and rootfs2 are read, never written.
WORK=${WORK:-$CORPUS/rebuild-work}
PORT=${PORT:-17989}
ROUNDS=${ROUNDS:-3}
POLL_MS=${POLL_MS:-50}
[[ -d $CORPUS/rootfs ]] || { echo "corpus missing at $CORPUS" >&2; exit 2; }
command -v rsync >/dev/null || apt-get install -y -q rsync >/dev/null
# BIN=DIR runs binaries already built there instead (e.g. to try the script on a debug build).
if [[ -z ${BIN:-} ]]; then
  cargo build --release -q -p subd -p imageserver -p imagetool -p dominator -p mdb
  BIN=$PWD/target/release
fi
rm -rf "$WORK"; mkdir -p "$WORK"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill $p 2>/dev/null || true; done' EXIT

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.3f}')"; }
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
median() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float,sys.argv[1:])):.3f}')" "$@"; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v k="$2" '$1==k {print $2}'; }
wait_scans() { # port count
  for _ in $(seq 1200); do local n; n=$(metric "$1" subd_scan_count); [[ -n $n && $n -ge $2 ]] && return; sleep 0.1; done
  echo "subd never finished $2 scans" >&2; exit 1; }
mdb() { "$BIN/mdb" --mdb "$WORK/mdb.json" "$@" >/dev/null; }
# Waits until the dominator's report on m1 satisfies a Python condition on `m`.
wait_machine() { # condition what
  python3 - "$DPORT" "$1" "$2" <<'PY'
import json, sys, time, urllib.request
port, cond, what = sys.argv[1:]
t0 = time.time()
while True:
    try:
        # The fleet list, not /api/machines/m1: that one carries the machine's last plan
        # (megabytes for this root), whose rendering 100 times a second would take CPU
        # from the rebuild being timed.
        ms = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/machines", timeout=5))
        m = next(x for x in ms if x["host"] == "m1")
    except Exception:
        m = None
    if m is not None and eval(cond):
        break
    if time.time() - t0 > 300:
        sys.exit(f"m1 never {what}; last report: {m}")
    time.sleep(0.01)
PY
}

echo "machine: $(nproc) CPUs, work on $(df --output=source,fstype "$WORK" | tail -1 | tr -s " "), $(awk '/MemTotal/ {print int($2/1024) " MiB"}' /proc/meminfo), $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "corpus: $(grep -o "manifest [0-9a-f]*" "$CORPUS/../corpus-stats.txt" 2>/dev/null | head -1 | tr "\n" " ")at $CORPUS/rootfs; code $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || echo +changes)"
echo "dominator flags: --poll-interval-ms $POLL_MS (MDB edits seen through inotify, 250 ms check as fallback); subd: --scan-speed-percent 100 --cpu-percent 100; plain HTTP on 127.0.0.1 (--permit-insecure-mode)"

# The imageserver with the corpus as a full image (empty filter).
"$BIN/imageserver" --data-dir "$WORK/images" --listen "127.0.0.1:$PORT" --permit-insecure-mode 2>"$WORK/imageserver.log" & PIDS+=($!)
wait_port $PORT
: >"$WORK/empty-filter"
"$BIN/imagetool" --image-server "127.0.0.1:$PORT" add bench/rootfs "$CORPUS/rootfs" "$WORK/empty-filter" "" >/dev/null

# The dominator; m1's record points at a dead address (a closed port).
mdb add m1 --ip 127.0.0.1:1 --required bench/rootfs
DPORT=$((PORT+1))
"$BIN/dominator" --mdb "$WORK/mdb.json" --image-server "127.0.0.1:$PORT" --listen "127.0.0.1:$DPORT" \
  --permit-insecure-mode --poll-interval-ms "$POLL_MS" 2>"$WORK/dominator.log" & PIDS+=($!)
wait_port $DPORT
wait_machine 'm.get("last_error") and m.get("last_poll") is None' "was polled as dead"

# The rsync daemon on loopback serving the corpus.
R=$((PORT+2))
cat >"$WORK/rsyncd.conf" <<CONF
uid = root
gid = root
use chroot = no
[corpus]
path = $CORPUS
read only = yes
CONF
rsync --daemon --no-detach --config="$WORK/rsyncd.conf" --port=$R --address=127.0.0.1 & PIDS+=($!)
wait_port $R

# The timed part of a rebuild: the MDB edit, then m1 `synced` on the image.
timed_rebuild() { # subd-port: sets RB and T0 (the edit's time)
  local t0 t1
  t0=$(now); T0=$t0
  mdb set m1 --address "127.0.0.1:$1"
  wait_machine 'm.get("status_name") == "synced" and (m.get("last_update") or {}).get("image_name") == "bench/rootfs"' "synced"
  t1=$(now); RB=$(secs "$t0" "$t1"); }

T_RB=(); T_RS=(); T_UE=()
for r in $(seq "$ROUNDS"); do
  # rsync -aH + sync into an empty directory.
  rm -rf "$WORK/rsync"; sync
  t0=$(now); rsync -aH "rsync://127.0.0.1:$R/corpus/rootfs/" "$WORK/rsync/"; sync -f "$WORK/rsync"; t1=$(now)
  RS=$(secs "$t0" "$t1")
  rm -rf "$WORK/rsync"
  # The replacement: a subd on an empty root, its first scan done, then the MDB edit.
  root="$WORK/root$r"; P=$((PORT+10+r))
  rm -rf "$root"; mkdir -p "$root"
  # Nothing excluded (subd's default exclusions would leave /tmp, /var/log ... unmanaged).
  "$BIN/subd" --root "$root" --listen "127.0.0.1:$P" --permit-insecure-mode --service-command true \
    --scan-speed-percent 100 --cpu-percent 100 --scan-exclude '/bench-manages-everything$' \
    2>"$WORK/subd$r.log" & SUBD=$!; PIDS+=($SUBD)
  wait_port $P; wait_scans $P 1
  sync
  timed_rebuild $P
  DIFFS=$(rsync -aHJn --delete --checksum --itemize-changes --exclude=/.subd --exclude=/var/lib/patched-image "$CORPUS/rootfs/" "$root/" | { grep -v '^\.d\.\.t' || true; } | wc -l)
  curl -s "http://127.0.0.1:$DPORT/api/machines/m1" >"$WORK/report$r.json"
  UPD=$(python3 -c 'import json,sys; u=json.load(sys.stdin)["last_update"]; print("rebuild", u.get("rebuild"), "errors", len(u.get("errors") or []))' <"$WORK/report$r.json")
  RPCS="$(grep -c 'fetch done' "$WORK/subd$r.log" || true) fetches, $(grep -c 'update to ' "$WORK/subd$r.log" || true) updates"
  # When subd's (last) update ended, from its log: the rest of the time is the dominator
  # waiting for the scans after it.
  UPD_END=$(python3 - "$WORK/subd$r.log" "$T0" <<'PY2'
import datetime, re, sys
ends = [l for l in open(sys.argv[1]) if "update phases" in l]
m = re.search(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", re.sub("\x1b\\[[0-9;]*m", "", ends[-1])) if ends else None
t = datetime.datetime.fromisoformat(m.group(1)[:26]).replace(tzinfo=datetime.timezone.utc).timestamp() if m else None
print(f"{t - float(sys.argv[2]):.3f}" if t else "?")
PY2
)
  echo "round $r: rebuild (MDB edit -> synced) $RB s, of which MDB edit -> update done $UPD_END s ($RPCS, last update: $UPD, $DIFFS differences from rootfs); rsync -aH + sync $RS s"
  T_UE+=("$UPD_END")
  T_RB+=("$RB"); T_RS+=("$RS")
  # Back to dead: the record points at a closed port again and the subd stops.
  mdb set m1 --address 127.0.0.1:1
  kill $SUBD; wait $SUBD 2>/dev/null || true
  wait_machine 'm.get("last_error") and m.get("status_name") != "synced"' "was seen dead again"
  rm -rf "$root"
done
MB=$(median "${T_RB[@]}"); MS=$(median "${T_RS[@]}")
echo "rebuild (median of $ROUNDS): MDB edit -> synced $MB s; rsync -aH + sync $MS s; ratio $(ratio "$MB" "$MS") (target <= 1.5)"
if UE=$(median "${T_UE[@]}" 2>/dev/null); then
  echo "MDB edit -> subd's update done (median) $UE s, ratio $(ratio "$UE" "$MS"); the rest waits for the scans the dominator needs after an update"
fi
[[ -n ${KEEP:-} ]] || rm -rf "$WORK"
