#!/usr/bin/env bash
# Real-process fleet benchmark: N real subd processes (default 200) on loopback, each on its
# own small root under $WORK (default /tmp/fleetN, one file-system, deleted at the end) and
# its own address 127.2.X.Y:6969, one real imageserver and one real dominator. Converges
# them on app.1, then times one MDB write (every RequiredImage -> app.2) until every machine
# is synced on app.2 and every root holds app.2's files. Prints the imageserver's and the
# dominator's peak RSS and one `SUMMARY real-fleet ...` line (with the load average).
# subds scan gently so N scanners do not swamp a small machine: SUBD_ARGS, default
# "--cpu-percent 5 --scan-speed-percent 5". PROFILE=debug uses the debug binaries.
# Usage: bench/real-fleet.sh [MACHINES=200]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200}
WORK=${WORK:-/tmp/fleet$N}
PROFILE=${PROFILE:-release}
SUBD_ARGS=${SUBD_ARGS:---cpu-percent 5 --scan-speed-percent 5}
IS=127.2.255.1:6971
DOM=127.2.255.2:6970
if [ "$PROFILE" = release ]; then
  cargo build --release -q -p subd -p imageserver -p imagetool -p dominator --bins
else
  cargo build -q -p subd -p imageserver -p imagetool -p dominator --bins
fi
BIN=$PWD/target/$PROFILE
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
rm -rf "$WORK"; mkdir -p "$WORK/is"
addr() { echo "127.2.$(( $1 / 250 )).$(( $1 % 250 + 1 ))"; } # machine i -> its loopback address
wait_port() { # HOST PORT
  for _ in $(seq 600); do (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return; sleep 0.05; done
  echo "$1:$2 never opened" >&2; exit 1; }
hwm() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
load1() { cut -d' ' -f1 /proc/loadavg; }

"$BIN/imageserver" --data-dir "$WORK/is" --listen $IS --permit-insecure-mode 2>"$WORK/is.log" &
ISPID=$!; PIDS+=($ISPID); wait_port ${IS%:*} ${IS#*:}

# Two images: app.2 changes one file and adds a 64 KiB one (fetched by every machine).
for v in 1 2; do
  d=$WORK/img$v; mkdir -p "$d/etc/app"; chmod 755 "$d" "$d/etc" "$d/etc/app"
  echo "config $v" >"$d/etc/app/app.conf"
  for k in $(seq 5); do echo "shared $k" >"$d/etc/app/lib$k"; done
done
head -c 65536 /dev/urandom >"$WORK/img2/etc/app/blob"
for v in 1 2; do
  "$BIN/imagetool" --image-server $IS add app.$v "$WORK/img$v" "" "" >/dev/null
done

# N small roots (20 files of the machine's own) and N subds.
for i in $(seq 0 $((N - 1))); do
  r=$WORK/m$i; mkdir -p "$r/srv"; chmod 755 "$r" "$r/srv"
  for k in $(seq 20); do echo "machine $i file $k" >"$r/srv/f$k"; done
done
for i in $(seq 0 $((N - 1))); do
  # shellcheck disable=SC2086
  "$BIN/subd" --root "$WORK/m$i" --listen "$(addr "$i"):6969" --permit-insecure-mode \
    --service-command true $SUBD_ARGS 2>"$WORK/subd$i.log" &
  PIDS+=($!)
done
for i in $(seq 0 $((N - 1))); do wait_port "$(addr "$i")" 6969; done

mdb() { # IMAGE: every machine requires it (written atomically)
  python3 - "$WORK/mdb.json" "$1" "$N" <<'PY'
import json, os, sys
path, image, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
addr = lambda i: f"127.2.{i // 250}.{i % 250 + 1}:6969"
rows = [{"Hostname": f"m{i:04}", "IpAddress": addr(i), "RequiredImage": image} for i in range(n)]
open(path + ".tmp", "w").write(json.dumps(rows)); os.rename(path + ".tmp", path)
PY
}
mdb app.1
"$BIN/dominator" --mdb "$WORK/mdb.json" --image-server $IS --listen $DOM --permit-insecure-mode \
  2>"$WORK/dominator.log" &
DOMPID=$!; PIDS+=($DOMPID); wait_port ${DOM%:*} ${DOM#*:}

synced_on() { # IMAGE TIMEOUT_S: waits until every machine is synced on IMAGE
  python3 - "http://$DOM/api/fleet" "$1" "$N" "$2" <<'PY'
import json, sys, time, urllib.request
url, image, n, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
t0 = time.time()
while True:
    v = json.load(urllib.request.urlopen(url))
    ms = v["machines"]
    done = sum(m["required_image"] == image and m["status_name"] == "synced" for m in ms)
    if len(ms) == n and done == n:
        sys.exit(0)
    if time.time() - t0 > limit:
        print(f"not synced on {image} after {limit} s: {v['counts']}", file=sys.stderr); sys.exit(1)
    time.sleep(0.2)
PY
}
t0=$(date +%s.%N); synced_on app.1 900; t1=$(date +%s.%N)
INITIAL=$(python3 -c "print(f'{$t1-$t0:.1f}')")
echo "machines: $N real subds ($SUBD_ARGS); initial convergence on app.1: $INITIAL s (load $(load1))"

t0=$(date +%s.%N); mdb app.2; synced_on app.2 900; t1=$(date +%s.%N)
ROLLOUT=$(python3 -c "print(f'{$t1-$t0:.1f}')")
LOAD=$(load1)
want=$(cat "$WORK/img2/etc/app/app.conf")
APPLIED=0
for i in $(seq 0 $((N - 1))); do
  [ "$(cat "$WORK/m$i/etc/app/app.conf" 2>/dev/null)" = "$want" ] && cmp -s "$WORK/img2/etc/app/blob" "$WORK/m$i/etc/app/blob" && APPLIED=$((APPLIED + 1))
done
IS_RSS=$(hwm $ISPID); DOM_RSS=$(hwm $DOMPID)
SUBD_RSS=$(for p in "${PIDS[@]:1:$N}"; do awk '/VmHWM/ {print $2}' "/proc/$p/status"; done | sort -n | tail -1)
echo "rollout (one MDB write -> all $N synced on app.2): $ROLLOUT s; applied on $APPLIED/$N (load $LOAD)"
echo "peak RSS: imageserver $IS_RSS MiB, dominator $DOM_RSS MiB, largest subd $(( SUBD_RSS / 1024 )) MiB"
echo "SUMMARY real-fleet machines=$N rollout_s=$ROLLOUT initial_s=$INITIAL imageserver_rss_mib=$IS_RSS dominator_rss_mib=$DOM_RSS applied=$APPLIED load1=$LOAD"
