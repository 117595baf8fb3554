#!/usr/bin/env bash
# The imageserver's S3 back-end (issue 14 §1) on the Debian corpus ($CORPUS/rootfs, see
# ../shared/corpus/make-rootfs.sh; default /tmp/bench/fs), against the local-directory
# back-end measured in the same run:
#   1. `imagetool add` of rootfs into an empty imageserver  (Garage-backed vs local)
#   2. birth of an empty root from it: the whole `imagetool patch-directory` process
#                                                            (Garage-backed vs local)
# Each timed step starts after a `sync`; ROUNDS=3 rounds (each into an empty server: a fresh
# data directory, and for S3 a fresh bucket prefix), medians, release build of ours.
# Garage runs as one node on loopback (sqlite metadata, replication 1) with its data on the
# corpus's file-system. The garage scripts/install-garage.sh installs is a DEBUG build
# (about 14-20 MiB/s on large objects): the ratios then charge Garage's own slowness to S3;
# set GARAGE=/path/to/a/release/garage to measure with a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-/tmp/bench/fs}
WORK=${WORK:-$CORPUS/s3-work}
PORT=${PORT:-17980}
ROUNDS=${ROUNDS:-3}
[[ -d $CORPUS/rootfs ]] || { echo "corpus missing at $CORPUS/rootfs" >&2; exit 2; }
cargo build --release -q -p imageserver -p imagetool
BIN=$PWD/target/release
scripts/install-garage.sh
GARAGE=${GARAGE:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
rm -rf "$WORK"; mkdir -p "$WORK"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.3f}')"; }
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
median() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float,sys.argv[1:])):.3f}')" "$@"; }
wait_port() { for _ in $(seq 400); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# One Garage node: the bucket `bench`, a key that owns it.
G=$WORK/garage; mkdir -p "$G"
cat >"$G/garage.toml" <<CONF
metadata_dir = "$G/meta"
data_dir = "$G/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((PORT+10))"
rpc_public_addr = "127.0.0.1:$((PORT+10))"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$((PORT+11))"
root_domain = ".s3.garage.localhost"
CONF
gcli() { "$GARAGE" -c "$G/garage.toml" "$@"; }
RUST_LOG=garage=warn "$GARAGE" -c "$G/garage.toml" server >"$G/log" 2>&1 & PIDS+=($!)
for _ in $(seq 300); do gcli status >/dev/null 2>&1 && break; sleep 0.2; done
gcli layout assign -z dc1 -c 100G "$(gcli node id -q | cut -d@ -f1)" >/dev/null
gcli layout apply --version 1 >/dev/null
KEY=$(gcli key create bench)
field() { sed -n "s/^$1: *//p" <<<"$KEY" | head -1; }
printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\nAWS_REGION=garage\n' \
  "$(field 'Key ID')" "$(field 'Secret key')" >"$WORK/s3-credentials"
gcli bucket create bench >/dev/null
gcli bucket allow --read --write --owner bench --key bench >/dev/null

echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024) " MiB"}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg), work on $(df --output=source,fstype "$WORK" | tail -1 | tr -s " ")"
echo "corpus: $(du -sh --apparent-size "$CORPUS/rootfs" | cut -f1), $(find "$CORPUS/rootfs" -xdev -type f | wc -l) files at $CORPUS/rootfs; code $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || echo +changes)"
echo "garage: $("$GARAGE" --version | head -1) at $GARAGE$( [[ -z ${GARAGE_IS_RELEASE:-} ]] && echo ' (a DEBUG build as scripts/install-garage.sh makes: about 14-20 MiB/s on large objects; set GARAGE_IS_RELEASE=1 with a release build)')"

# start_server KIND ROUND: an empty imageserver of KIND (local|s3) on $PORT; sets SERVER.
start_server() {
  local data=$WORK/data-$1-$2 extra=()
  if [[ $1 == s3 ]]; then
    extra=(--object-store "s3://bench/r$2" --s3-endpoint "http://127.0.0.1:$((PORT+11))" --s3-credentials "$WORK/s3-credentials")
  fi
  "$BIN/imageserver" --data-dir "$data" --listen "127.0.0.1:$PORT" --permit-insecure-mode "${extra[@]}" 2>"$WORK/imageserver-$1-$2.log" &
  SERVER=$!; PIDS+=($SERVER)
  wait_port "$PORT"
}
stop_server() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; }
# timed VAR cmd…: runs cmd after a sync, sets VAR to its wall seconds.
timed() { local t0 t1; sync; t0=$(now); "${@:2}" >/dev/null; t1=$(now); printf -v "$1" '%s' "$(secs "$t0" "$t1")"; }

: >"$WORK/empty-filter"
declare -A ADD BIRTH
for r in $(seq "$ROUNDS"); do
  for kind in local s3; do
    start_server "$kind" "$r"
    timed A "$BIN/imagetool" --image-server "127.0.0.1:$PORT" add "bench/$kind" "$CORPUS/rootfs" "$WORK/empty-filter" ""
    rm -rf "$WORK/birth"
    timed B "$BIN/imagetool" --image-server "127.0.0.1:$PORT" patch-directory "bench/$kind" "$WORK/birth"
    ADD[$kind]+=" $A"; BIRTH[$kind]+=" $B"
    echo "round $r, $kind: add $A s, birth $B s"
    stop_server
    rm -rf "$WORK/birth" "$WORK/data-$kind-$r"
  done
  gcli bucket info bench | grep -i -m1 size || true
done
# shellcheck disable=SC2086
{
  AL=$(median ${ADD[local]}); AS=$(median ${ADD[s3]})
  BL=$(median ${BIRTH[local]}); BS=$(median ${BIRTH[s3]})
}
echo "imagetool add rootfs (median of $ROUNDS): local $AL s, Garage $AS s, ratio $(ratio "$AS" "$AL")"
echo "birth from it, patch-directory (median of $ROUNDS): local $BL s, Garage $BS s, ratio $(ratio "$BS" "$BL")"
