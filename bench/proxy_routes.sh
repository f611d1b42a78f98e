#!/usr/bin/env bash
# Routes at scale (issue 15 item 2): requests/s through one route with one
# route in the table, then with 1,000 (999 more users' servers started by
# the local spawner, each its own bench-backend process), then with one
# again after they stop (the drift of the machine between runs). 1 KB
# responses, token authentication, at 1 and 64 connections (wrk, SECS
# seconds each, 10 by default). Prints a Markdown table.
# Usage: bench/proxy_routes.sh [ROUTES]   (ROUTES=1000 by default)
source "$(dirname "$0")/lib.sh"
need_pkg wrk wrk
build_release
routes=${1:-1000}
work=$(mktemp -d); BERTH_PID=
cleanup() {
    kill "$BERTH_PID" 2>/dev/null || true
    pkill -f "$ROOT/target/release/bench-backend" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
data=$work/data
printf 'bench-admin-pass-1\n' | "$BERTH" user add admin --admin --password-stdin --data-dir "$data" >/dev/null
start_berth "$data" BERTH_SPAWNER=local BERTH_LOCAL_CMD="$ROOT/target/release/bench-backend" BERTH_LOG=warn \
    BERTH_LOCAL_ISOLATE_USERS=false \
    BERTH_MAX_CONCURRENT_STARTS=64
token=$(login_token "$URL" admin bench-admin-pass-1)
auth="Authorization: token $token"
curl -s -X POST -H "$auth" "$URL/hub/api/users/admin/server" -o /dev/null -w '%{http_code}\n' >&2
for _ in $(seq 1 100); do [ "$(curl -s -o /dev/null -w '%{http_code}' -H "$auth" "$URL/user/admin/1k")" = 200 ] && break; sleep 0.1; done

# others N start|stop: starts (or stops) N-1 more users' servers, 32 at a
# time, and waits (at most 300 s) until that many are running (or none).
others() {
    python3 - "$URL" "$token" "$1" "$2" <<'PY'
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
url, token, n, what = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
names = [f"route{i:04d}" for i in range(1, n)]
def call(method, path, body=None):
    req = urllib.request.Request(url + path, data=body, method=method, headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
if what == "start":
    status, _ = call("POST", "/hub/api/users", json.dumps({"usernames": names}).encode())
    assert status in (201, 409), status
    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(lambda u: call("POST", f"/hub/api/users/{u}/server")[0], names))
    assert all(c in (201, 202) for c in codes), sorted(set(codes))
else:
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda u: call("DELETE", f"/hub/api/users/{u}/server"), names))
want = len(names) if what == "start" else 0
deadline = time.time() + 300
while True:
    req = urllib.request.Request(url + "/hub/api/users?state=ready&name_filter=route&limit=1", headers={
        "Authorization": f"token {token}", "Accept": "application/jupyterhub-pagination+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        ready = json.load(r)["_pagination"]["total"]
    if ready == want or time.time() > deadline:
        print(ready)
        break
    time.sleep(0.5)
PY
}

measure() { # measure LABEL
    for c in 1 64; do
        t=$([ "$c" = 1 ] && echo 1 || echo 2)
        read -r rps p50 p99 err < <(wrk -t"$t" -c"$c" -d"${SECS:-10}s" --latency -H "$auth" "$URL/user/admin/1k" | wrk_summary)
        echo "| $1 | $c | $rps | $p50 | $p99 | $err |"
    done
}

# The other servers' processes (all bench-backends but admin's).
admin_pid=$(curl -s -H "$auth" "$URL/hub/api/users/admin" | python3 -c 'import json,sys; print(json.load(sys.stdin)["servers"][""]["state"]["pid"])')
other_pids() { pgrep -f "$ROOT/target/release/bench-backend" | grep -vx "$admin_pid" || true; }

echo "| routes in the table | connections | requests/s | p50 ms | p99 ms | errors |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
measure 1
running=$(others "$routes" start)
[ "$running" = $((routes - 1)) ] || { echo "only $running of $((routes - 1)) other servers are running" >&2; exit 1; }
measure "$routes"
# The same table with the other servers' processes paused: what is left is
# the table's cost, not the other processes' share of the two cores.
pids=$(other_pids)
# shellcheck disable=SC2086
kill -STOP $pids
measure "$routes, other processes paused"
# shellcheck disable=SC2086
kill -CONT $pids
measure "$routes (again)"
others "$routes" stop >/dev/null
measure "1 (again)"
echo
echo "berth resident memory at the end: $(rss_kib "$BERTH_PID") KiB."
