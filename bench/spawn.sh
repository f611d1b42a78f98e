#!/usr/bin/env bash
# Spawns against the peer (issue 15 item 3): COUNT concurrent starts of the
# same server image (the bench backend on top of the test image) through the
# REST API of berth (Docker spawner) and then of JupyterHub 6.1.1 with
# DockerSpawner 14.0.0 (bench/spawn_jupyterhub.sh, configured as the seed
# deployment configures it). For each hub: time from the first request until
# all are ready, starts lost, and the hub's CPU seconds per start from
# /proc/PID/stat (utime+stime of the hub and its waited-for children, over
# the same window, which includes the same polling of the user list, one
# call every 0.2 s, for both). Prints a Markdown table. Cleans up what it
# creates. PERF=1: a perf profile of each hub over the window, kept in
# $BUILD/bench-logs/spawn-HUB.perf.
# Usage: bench/spawn.sh [COUNT]      (COUNT=50 by default)
#        HUBS=berth bench/spawn.sh   (only berth; HUBS=jupyterhub only the peer)
source "$(dirname "$0")/lib.sh"
count=${1:-50}
hubs=${HUBS:-berth jupyterhub}
build_release
base_image=$("$ROOT/scripts/build-test-image")
work=$(mktemp -d)
image="berth-bench-backend:$$"
BERTH_PID= JH=
cleanup() {
    [ -n "$BERTH_PID" ] && kill "$BERTH_PID" 2>/dev/null
    [ -n "$JH" ] && kill "$JH" 2>/dev/null
    for n in "berth-bench-$$" "jh-bench-$$"; do
        docker ps -aq --filter "network=$n" | xargs -r docker rm -f >/dev/null 2>&1 || true
        docker network rm "$n" >/dev/null 2>&1 || true
    done
    for i in $(seq 0 $((count - 1))); do
        docker rm -f "berth-bench$i" "jupyterlab-bench$i" >/dev/null 2>&1 || true
        for v in home workspace cache; do
            docker volume rm -f "berth-bench$i-$v" "jupyterlab-bench${i}_$v" >/dev/null 2>&1 || true
        done
    done
    docker rmi --no-prune -f "$image" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/ctx"
cp "$ROOT/target/release/bench-backend" "$work/ctx/"
printf 'FROM %s\nCOPY bench-backend /usr/local/bin/bench-backend\nCMD ["bench-backend"]\n' "$base_image" > "$work/ctx/Dockerfile"
docker build -q -t "$image" "$work/ctx" >/dev/null

# start_all URL TOKEN COUNT: creates users bench0..bench(COUNT-1), starts a
# server for each at once (one thread per start) and polls (every 0.2 s, at
# most 600 s) until none is pending. Prints "accepted ready lost seconds".
start_all() {
    python3 - "$@" <<'PY'
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
url, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = [f"bench{i}" for i in range(n)]
def call(method, path, body=None):
    req = urllib.request.Request(url + path, data=body, method=method, headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
def poll():
    """One list call a poll, as a dashboard would: (ready, active)."""
    status, body = call("GET", "/hub/api/users?state=active&limit=200")
    assert status == 200, (status, body)
    users = json.loads(body)
    return sum(bool(u["servers"].get("", {}).get("ready")) for u in users), len(users)
status, body = call("POST", "/hub/api/users", json.dumps({"usernames": names}).encode())
assert status == 201, (status, body)
t0 = time.time()
with ThreadPoolExecutor(n) as pool:
    codes = list(pool.map(lambda u: call("POST", f"/hub/api/users/{u}/server", b"{}")[0], names))
accepted = sum(c in (201, 202) for c in codes)
while True:
    ready, active = poll()
    if ready == active or time.time() - t0 > 600:
        break
    time.sleep(0.2)
t1 = time.time()
print(accepted, ready, n - ready, f"{t1 - t0:.1f}")
if accepted < n:
    print("refused:", sorted(set(codes)), file=sys.stderr)
PY
}

declare -A secs lost cpu
for hub in $hubs; do
    case $hub in
        berth)
            data=$work/data
            printf 'bench-admin-pass-1\n' | "$BERTH" user add admin --admin --password-stdin --data-dir "$data" >/dev/null
            start_berth "$data" BERTH_SPAWNER=docker BERTH_DOCKER_IMAGE="$image" BERTH_DOCKER_NETWORK="berth-bench-$$" \
                BERTH_SHARED_VOLUME= BERTH_MAX_CONCURRENT_STARTS="$count" BERTH_START_TIMEOUT=300 BERTH_LOG=info
            token=$(login_token "$URL" admin bench-admin-pass-1)
            pid=$BERTH_PID url=$URL ;;
        jupyterhub)
            source "$(dirname "$0")/spawn_jupyterhub.sh"
            pid=$JH url=$JH_URL ;;
    esac
    if [ -n "${PERF:-}" ]; then
        mkdir -p "$BUILD/bench-logs"
        perf record -q -F 499 -g -p "$pid" -o "$BUILD/bench-logs/spawn-$hub.perf" 2>/dev/null &
        perf_pid=$!
        sleep 1
    fi
    c0=$(cpu_ticks "$pid")
    read -r accepted ready lost_n took < <(start_all "$url" "$token" "$count")
    c1=$(cpu_ticks "$pid")
    [ -n "${PERF:-}" ] && { kill -INT "$perf_pid"; wait "$perf_pid" || true; }
    secs[$hub]=$took lost[$hub]=$lost_n
    cpu[$hub]=$(python3 -c "import os,sys; print(f'{(int(sys.argv[2]) - int(sys.argv[1])) / os.sysconf(\"SC_CLK_TCK\") / int(sys.argv[3]):.3f}')" "$c0" "$c1" "$count")
    echo "$hub: $count requested, $accepted accepted, $ready ready, $lost_n lost, ${took} s, ${cpu[$hub]} CPU s per start" >&2
    if [ "$hub" = berth ]; then
        python3 - "$data.err" <<'PY' >&2
import re, sys, statistics
text = re.sub(r"\x1b\[[0-9;]*m", "", open(sys.argv[1]).read())
num = lambda k, line: float(re.search(k + r"=([\d.]+)", line).group(1))
spawn = [(num("spawn_ms", l), num("engine_ms", l)) for l in text.splitlines() if "started container" in l]
if spawn:
    print(f"berth: engine create/start/inspect per start, median {statistics.median(e for _, e in spawn):.0f} ms;"
          f" the Docker spawner's own time around it, median {statistics.median(s - e for s, e in spawn):.1f} ms")
PY
        kill "$BERTH_PID"; wait "$BERTH_PID" 2>/dev/null || true; BERTH_PID=
    else
        kill "$JH"; wait "$JH" 2>/dev/null || true; JH=
    fi
    # The servers go before the next hub starts, so it finds an idle engine.
    docker ps -aq --filter "network=$( [ "$hub" = berth ] && echo "berth-bench-$$" || echo "jh-bench-$$")" | xargs -r docker rm -f >/dev/null 2>&1 || true
done

echo "| $count concurrent starts, same image | $(echo "$hubs" | sed 's/ / | /g') |"
echo "| --- |$(for _ in $hubs; do printf ' ---: |'; done)"
echo "| time until all are ready (s) |$(for h in $hubs; do printf ' %s |' "${secs[$h]}"; done)"
echo "| starts lost |$(for h in $hubs; do printf ' %s |' "${lost[$h]}"; done)"
echo "| hub CPU seconds per start |$(for h in $hubs; do printf ' %s |' "${cpu[$h]}"; done)"
if [ -n "${secs[berth]:-}" ] && [ -n "${secs[jupyterhub]:-}" ]; then
    python3 - "${secs[berth]}" "${secs[jupyterhub]}" "${cpu[berth]}" "${cpu[jupyterhub]}" <<'PY'
import sys
bs, js, bc, jc = map(float, sys.argv[1:])
print(f"\nberth / JupyterHub: time until all ready {bs / js:.2f}×, CPU per start {bc / jc if jc else float('nan'):.3f}×.")
PY
fi
