#!/usr/bin/env bash
# subd's memory under full polls nobody reads (issue 9 #9): a root of FILES files, POLLS
# raw connections each sending a full Subd.Poll and never reading (4 KiB receive buffer),
# then subd's VmRSS before and at its peak, and how long a short poll takes meanwhile.
# Usage: bench/unread-polls.sh [FILES=60000] [POLLS=200] [SUBD=target/debug/subd]
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${1:-60000} POLLS=${2:-200} SUBD=${3:-target/debug/subd}
[[ $# -ge 3 ]] || cargo build -q -p subd --bin subd
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 - "$SUBD" "$WORK" "$FILES" "$POLLS" <<'PY'
import json, os, socket, subprocess, sys, time, urllib.request
subd, work, files, polls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for i in range(files):
    d = os.path.join(work, "dir-%03d" % (i % 600))
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "file-with-a-fairly-long-name-%06d" % i), "w").write(str(i))
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
p = subprocess.Popen([subd, "--root", work, "--listen", "127.0.0.1:%d" % port,
                      "--permit-insecure-mode"], stderr=subprocess.DEVNULL)
def rss():
    return next(int(l.split()[1]) // 1024 for l in open("/proc/%d/status" % p.pid) if l.startswith("VmRSS:"))
def poll(short, source="127.0.0.1"):
    # The short poll during the attack comes from another address, as the dominator's
    # would: the attacker's own address is held to --max-connections-per-peer.
    import http.client
    body = json.dumps({"have_generation": 0, "short_only": short}).encode()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    c.request("POST", "/rpc/Subd.Poll", body=body, headers={"content-type": "application/json"})
    return c.getresponse().read()
try:
    while True:
        try:
            b = poll(False)
            if json.loads(b)["generation"] > 0: break
        except OSError: pass
        time.sleep(0.2)
    time.sleep(1)
    before = rss()
    req = b'{"have_generation":0,"short_only":false}'
    conns = []
    for _ in range(polls):
        c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect(("127.0.0.1", port))
        c.sendall(b"POST /rpc/Subd.Poll HTTP/1.1\r\nhost: subd\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n" % len(req) + req)
        conns.append(c)
    peak = before
    for _ in range(40):
        time.sleep(0.5); peak = max(peak, rss())
    t0 = time.time()
    try:
        poll(True, "127.0.0.2"); short = "%.3f s (from 127.0.0.2)" % (time.time() - t0)
    except OSError as e:
        short = "failed after %.0f s (%s)" % (time.time() - t0, e)
    print("%d files, tree reply %.1f MiB, %d unread full polls: VmRSS %d MiB -> %d MiB; short poll %s"
          % (files, len(b) / 2**20, polls, before, peak, short))
finally:
    p.kill(); p.wait()
PY
