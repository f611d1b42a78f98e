# Shared helpers for the benchmark scripts (sourced).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${BERTH_BUILD_DIR:-$ROOT/.build}

need_pkg() { # need_pkg COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 && return
    echo "installing $2" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >&2
}

# BERTH_PREBUILT=PATH: measure that berth binary (an earlier build, for a
# before/after comparison) instead of building this checkout's.
build_release() {
    if [ -n "${BERTH_PREBUILT:-}" ] && [ -x "$ROOT/target/release/bench-backend" ]; then
        BERTH=$BERTH_PREBUILT
        return
    fi
    (cd "$ROOT" && cargo build --release -q -p berth -p berth-bench >&2)
    BERTH=$ROOT/target/release/berth
}

# start_berth DATA_DIR [ENV=VALUE...]: starts berth on a free loopback port;
# sets BERTH_PID and URL.
start_berth() {
    local data=$1; shift
    local out=$data.out
    env "$@" "$BERTH" serve --bind 127.0.0.1:0 --data-dir "$data" >"$out" 2>"$data.err" &
    BERTH_PID=$!
    for _ in $(seq 1 200); do
        URL=$(sed -n 's/^berth listening on //p' "$out" | head -1)
        [ -n "$URL" ] && return 0
        sleep 0.05
    done
    echo "berth did not start:" >&2; cat "$data.err" >&2; exit 1
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# cpu_ticks PID: the process's CPU time so far in clock ticks, from
# /proc/PID/stat: utime + stime + cutime + cstime (its own threads and the
# children it has waited for). cpu_seconds TICKS: ticks as seconds.
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13 + $14 + $15}'; }
cpu_seconds() { python3 -c "import os, sys; print(int(sys.argv[1]) / os.sysconf('SC_CLK_TCK'))" "$1"; }

# bench_venv: JupyterHub 6.1.1, NativeAuthenticator 1.3.0 and DockerSpawner
# 14.0.0 from PyPI in a virtualenv under the build directory (the peer the
# hub and spawn benchmarks measure); sets VENV.
JH_PINS="jupyterhub==6.1.1 jupyterhub-nativeauthenticator==1.3.0 dockerspawner==14.0.0"
bench_venv() {
    VENV=$BUILD/bench-venv
    if [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$JH_PINS" ]; then
        echo "preparing $VENV" >&2
        python3 -m venv "$VENV"
        # shellcheck disable=SC2086
        "$VENV/bin/pip" install -q --disable-pip-version-check $JH_PINS >&2
        echo "$JH_PINS" > "$VENV/.pins"
    fi
}

# jh_noproxy_config: the start of a jupyterhub_config.py whose proxy is a
# no-op (configurable-http-proxy is an npm package, not on this machine):
# only the hub is measured, never routing through JupyterHub's proxy.
jh_noproxy_config() {
    cat <<'PY'
from jupyterhub.proxy import Proxy

class NoProxy(Proxy):
    should_start = False
    async def start(self): pass
    async def stop(self): pass
    async def add_route(self, routespec, target, data): pass
    async def delete_route(self, routespec): pass
    async def get_all_routes(self): return {}

c.JupyterHub.proxy_class = NoProxy
PY
}

# start_jupyterhub WORK_DIR: runs $VENV's jupyterhub with WORK_DIR/jupyterhub_config.py
# (which must set hub_port $JH_PORT and pid_file WORK_DIR/jupyterhub.pid) and waits
# until its API answers; sets JH (the pid) and JH_URL.
start_jupyterhub() {
    local work=$1
    (cd "$work" && exec "$VENV/bin/jupyterhub" -f "$work/jupyterhub_config.py" >"$work/out" 2>"$work/err") &
    JH=$!
    JH_URL="http://127.0.0.1:$JH_PORT"
    for _ in $(seq 1 600); do curl -s "$JH_URL/hub/api/" >/dev/null && return 0; sleep 0.1; done
    echo "JupyterHub did not start:" >&2; tail -20 "$work/err" >&2; exit 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# login_token URL USER PASSWORD: logs in with a cookie jar and prints a new API token.
login_token() {
    local url=$1 user=$2 pw=$3 jar
    jar=$(mktemp)
    curl -s -c "$jar" "$url/hub/login" >/dev/null
    local x; x=$(awk '$6=="_xsrf" {print $7}' "$jar" | tail -1)
    curl -s -b "$jar" -c "$jar" "$url/hub/login?next=" --data-urlencode "_xsrf=$x" \
        --data-urlencode "username=$user" --data-urlencode "password=$pw" -o /dev/null
    x=$(awk '$6=="_xsrf" {print $7}' "$jar" | tail -1)
    curl -s -b "$jar" -H "X-XSRFToken: $x" -X POST "$url/hub/api/users/$user/tokens" -d '{"note":"bench"}' |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
    rm -f "$jar"
}

# login_cookie URL USER PASSWORD: logs in and prints the Cookie header a
# browser would then send to the hub's origin (session, _xsrf, session id).
login_cookie() {
    local url=$1 user=$2 pw=$3 jar x
    jar=$(mktemp)
    curl -s -c "$jar" "$url/hub/login" >/dev/null
    x=$(awk '$6=="_xsrf" {print $7}' "$jar" | tail -1)
    curl -s -b "$jar" -c "$jar" "$url/hub/login?next=" --data-urlencode "_xsrf=$x" \
        --data-urlencode "username=$user" --data-urlencode "password=$pw" -o /dev/null
    awk '!/^#/ || /^#HttpOnly_/ { if (NF >= 7) printf "%s%s=%s", (n++ ? "; " : ""), $6, $7 } END { print "" }' "$jar"
    rm -f "$jar"
}

# wrk_summary: reads wrk --latency output on stdin (kept in $BUILD/bench-logs),
# prints "req/s p50 p99 errors".
wrk_summary() {
    mkdir -p "$BUILD/bench-logs"
    tee -a "$BUILD/bench-logs/wrk.log" | python3 -c '
import re, sys
t = sys.stdin.read()
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", v)
    if not m:
        return float("nan")
    n, u = float(m.group(1)), m.group(2)
    return n / 1000 if u == "us" else n * 1000 if u == "s" else n * 60000 if u == "m" else n
rps = re.search(r"Requests/sec:\s+([\d.]+)", t).group(1)
p50 = re.search(r"^\s+50%\s+(\S+)", t, re.M).group(1)
p99 = re.search(r"^\s+99%\s+(\S+)", t, re.M).group(1)
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
print(f"{float(rps):.0f} {ms(p50):.3f} {ms(p99):.3f} {errs.group(1) if errs else 0}")
'
}

# create_users URL TOKEN: creates user00000..user09999 through the API, 1,000 per request.
create_users() {
    python3 - "$1" "$2" <<'PY'
import json, sys, urllib.request
url, token = sys.argv[1], sys.argv[2]
for batch in range(10):
    names = [f"user{i:05d}" for i in range(batch * 1000, batch * 1000 + 1000)]
    req = urllib.request.Request(f"{url}/hub/api/users", data=json.dumps({"usernames": names}).encode(),
                                 headers={"Authorization": f"token {token}"}, method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        assert r.status == 201, r.status
PY
}
