#!/usr/bin/env bash
# 1,000 running servers (issue 15 item 4): the local spawner runs one
# bench-backend process per server (a copy of the binary under a temporary
# path, so only this run's processes are ever signalled). Measures berth's
# resident memory with all of them running, `GET /hub/api/users?state=active`
# (wrk, SECS seconds, 10 by default, at 1 and 8 connections) and, after
# `kill -9` of berth and a restart on the same data directory, the time from
# the new listener opening until every server's route answers 200 again
# (all routes polled, at most 60 s). Prints a Markdown table.
# Usage: bench/servers_1000.sh [SERVERS]   (SERVERS=1000 by default)
#        PROFILE=massif bench/servers_1000.sh   (berth under valgrind's massif
#        for the start-up and 1,000 starts; the profile is kept in $BUILD/bench-logs)
source "$(dirname "$0")/lib.sh"
need_pkg wrk wrk
build_release
n=${1:-1000}
work=$(mktemp -d); BERTH_PID=
backend=$work/bench-backend
cp "$ROOT/target/release/bench-backend" "$backend"
# kill_backends: ends this run's bench-backend processes, found by their
# executable (the copy under $work), by pid.
kill_backends() {
    local p
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = "$backend" ] && kill "${p#/proc/}" 2>/dev/null
    done
    return 0
}
cleanup() {
    [ -n "$BERTH_PID" ] && kill "$BERTH_PID" 2>/dev/null
    kill_backends
    rm -rf "$work"
}
trap cleanup EXIT
data=$work/data
env_=(BERTH_SPAWNER=local BERTH_LOCAL_CMD="$backend" BERTH_LOG=warn BERTH_LOCAL_ISOLATE_USERS=false
    BERTH_MAX_CONCURRENT_STARTS=64)
printf 'bench-admin-pass-1\n' | "$BERTH" user add admin --admin --password-stdin --data-dir "$data" >/dev/null
if [ "${PROFILE:-}" = massif ]; then
    real=$BERTH
    BERTH="valgrind --tool=massif --massif-out-file=$work/massif.out $real"
fi
start_berth "$data" "${env_[@]}"
rss_idle=$(rss_kib "$BERTH_PID")
token=$(login_token "$URL" admin bench-admin-pass-1)
auth="Authorization: token $token"

# The servers srv0000.. start 32 at a time; waits (at most 600 s) until all are ready.
python3 - "$URL" "$token" "$n" <<'PY' >&2
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
url, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = [f"srv{i:04d}" for i in range(n)]
def call(method, path, body=None, headers={}):
    req = urllib.request.Request(url + path, data=body, method=method,
                                 headers={"Authorization": f"token {token}", **headers})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
status, _ = call("POST", "/hub/api/users", json.dumps({"usernames": names}).encode())
assert status == 201, status
t0 = time.time()
with ThreadPoolExecutor(32) as pool:
    codes = list(pool.map(lambda u: call("POST", f"/hub/api/users/{u}/server")[0], names))
assert all(c in (201, 202) for c in codes), sorted(set(codes))
while True:
    _, body = call("GET", "/hub/api/users?state=ready&name_filter=srv&limit=1",
                   headers={"Accept": "application/jupyterhub-pagination+json"})
    ready = json.loads(body)["_pagination"]["total"]
    if ready == n:
        break
    assert time.time() - t0 < 600, f"only {ready} of {n} ready after 600 s"
    time.sleep(0.5)
print(f"{n} servers ready in {time.time() - t0:.1f} s")
PY
sleep 2
rss=$(rss_kib "$BERTH_PID")
if [ "${PROFILE:-}" = massif ]; then
    kill "$BERTH_PID"; wait "$BERTH_PID" 2>/dev/null || true; BERTH_PID=
    mkdir -p "$BUILD/bench-logs"
    cp "$work/massif.out" "$BUILD/bench-logs/massif-$n.out"
    ms_print "$work/massif.out" | head -80
    echo "berth resident memory (under valgrind) with $n servers: $rss KiB; profile in $BUILD/bench-logs/massif-$n.out"
    exit 0
fi
list() { wrk -t"$1" -c"$2" -d"${SECS:-10}s" --latency -H "$auth" "$URL/hub/api/users?state=active" | wrk_summary; }
read -r l1_rps l1_p50 l1_p99 l1_err < <(list 1 1)
read -r l8_rps l8_p50 l8_p99 l8_err < <(list 2 8)
rss_after=$(rss_kib "$BERTH_PID")
bytes=$(curl -s -H "$auth" "$URL/hub/api/users?state=active" | wc -c)

# kill -9, restart on the same data directory (a new port), every route polled.
kill -9 "$BERTH_PID"; wait "$BERTH_PID" 2>/dev/null || true
start_berth "$data" "${env_[@]}"
t_listen=$(date +%s.%N)
recover=$(python3 - "$URL" "$token" "$n" "$t_listen" <<'PY'
import sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
url, token, n, t0 = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
todo = {f"srv{i:04d}" for i in range(n)}
def ok(u):
    req = urllib.request.Request(f"{url}/user/{u}/1k", headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status == 200
    except Exception:
        return False
with ThreadPoolExecutor(16) as pool:
    while todo and time.time() - t0 < 60:
        todo -= {u for u, good in zip(list(todo), pool.map(ok, list(todo))) if good}
        if todo:
            time.sleep(0.05)
print(f"{time.time() - t0:.2f} {len(todo)}")
PY
)
read -r recover_s missing <<<"$recover"
rss_restart=$(rss_kib "$BERTH_PID")
cat <<MD
| measurement ($n servers, local spawner, bench-backend) | value |
| --- | ---: |
| berth resident memory, no servers | $rss_idle KiB |
| berth resident memory, $n servers running | $rss KiB |
| the same after the list load | $rss_after KiB |
| GET /hub/api/users?state=active ($bytes bytes), 1 connection: requests/s, p50, p99 ms | $l1_rps, $l1_p50, $l1_p99 |
| the same, 8 connections: requests/s, p50, p99 ms | $l8_rps, $l8_p50, $l8_p99 |
| non-2xx/3xx responses in those runs | $l1_err, $l8_err |
| after kill -9 and a restart: listener open until all $n routes answer 200 | $recover_s s ($missing not answering) |
| berth resident memory after the restart, $n servers adopted | $rss_restart KiB |
MD
