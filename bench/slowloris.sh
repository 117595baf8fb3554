#!/usr/bin/env bash
# Slowloris against each daemon (imageserver, subd, dominator; plain HTTP, default
# connection flags): 1,000 sockets from 127.0.0.1 each send part of a request head and
# stop. Prints, at 1 s, 10 s and 30 s after they connected, how many ESTABLISHED
# connections the daemon holds (`ss`, server side) and how long a normal request
# (`curl /metrics`) takes meanwhile.
#   bench/slowloris.sh                 # builds and measures target/release
#   BIN=/path/to/bin bench/slowloris.sh   # measures already-built binaries (e.g. an older build)
#   NOFILE=256 bench/slowloris.sh         # daemons started under a 256-descriptor limit
#   DAEMONS=subd bench/slowloris.sh       # only some of the daemons
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
if [[ -z ${BIN:-} ]]; then
  cargo build --release -q -p imageserver -p subd -p dominator
  BIN=$PWD/target/release
fi
WORK=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill $p 2>/dev/null || true; done; rm -rf "$WORK"' EXIT
ulimit -n 20000 2>/dev/null || true

wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
held() { ss -tnH state established "( sport = :$1 )" | wc -l; }
answer() { # "200 0.001s", or "no answer" within curl's 30 s
  local out; out=$(curl -s -o /dev/null -m 30 -w '%{http_code} %{time_total}s' "http://127.0.0.1:$1/metrics" || true)
  [[ $out == 000* || -z $out ]] && echo "no answer" || echo "$out"; }

start() { # name port -> starts the daemon in insecure mode
  local name=$1 port=$2 d=$WORK/$1
  mkdir -p "$d/root"
  case $name in
    imageserver) set -- --data-dir "$d/data" ;;
    subd) set -- --root "$d/root" ;;
    dominator) echo '[]' > "$d/mdb.json"; set -- --mdb "$d/mdb.json" --image-server 127.0.0.1:1 ;;
  esac
  local limit=()
  [[ -n ${NOFILE:-} ]] && limit=(prlimit "--nofile=$NOFILE:$NOFILE" --)
  RUST_LOG=warn "${limit[@]}" "$BIN/$name" "$@" --listen "127.0.0.1:$port" --permit-insecure-mode 2>"$d.log" &
  PIDS+=($!)
  wait_port "$port"
}

printf '%-12s %8s %8s %8s   %s\n' daemon "held@1s" "held@10s" "held@30s" "normal request at 1 s / 10 s / 30 s"
port=17800
for name in ${DAEMONS:-imageserver subd dominator}; do
  port=$((port + 1))
  start "$name" "$port"
  python3 - "$port" "$N" <<'PY' &
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
for _ in range(n):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /rpc/Subd.Poll HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    except OSError:
        pass
time.sleep(40)
PY
  attacker=$!
  PIDS+=($attacker)
  t0=$(date +%s.%N)
  row=()
  answers=()
  for at in 1 10 30; do
    sleep "$(python3 -c "import time; print(max(0, $t0 + $at - time.time()))")"
    row+=("$(held "$port")")
    answers+=("$(answer "$port")")
  done
  printf '%-12s %8s %8s %8s   %s / %s / %s\n' "$name" "${row[@]}" "${answers[@]}"
  kill "$attacker" 2>/dev/null || true
done
