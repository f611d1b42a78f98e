#!/usr/bin/env bash
# The one-port proxy against nginx, on one backend in one run: requests/s and
# p50/p99 for 1 KB and 1 MiB responses at 1 and 64 connections (wrk, 10 s
# each), WebSocket round trips (20,000 small messages), and each proxy's
# resident memory. berth is measured twice: authenticated by an API token
# (`berth`) and by a browser's session cookie (`berth-cookie`, the Cookie
# header a logged-in browser sends). Each case runs ROUNDS times (3 by
# default) with the targets taking turns; the table has each target's median
# round and the forwarding process's CPU time per request. Prints a Markdown
# table.
# Usage: bench/proxy.sh   (SECS=10 sets each wrk run's length, ROUNDS=3,
# BODIES="1k 1m" and CONNS="1 64" which cases run, SYSCALLS=1 adds system
# calls and context switches per request, counted by perf)
source "$(dirname "$0")/lib.sh"
need_pkg wrk wrk
need_pkg nginx nginx-light
build_release
work=$(mktemp -d); SAMPLER=; BERTH_PID=
cleanup() {
    kill "$BERTH_PID" "$SAMPLER" 2>/dev/null || true
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    pkill -f "$ROOT/target/release/bench-backend" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
data=$work/data
printf 'bench-admin-pass-1\n' | "$BERTH" user add admin --admin --password-stdin --data-dir "$data" >/dev/null
start_berth "$data" BERTH_SPAWNER=local BERTH_LOCAL_CMD="$ROOT/target/release/bench-backend" BERTH_LOG=warn \
    BERTH_LOCAL_ISOLATE_USERS=false
token=$(login_token "$URL" admin bench-admin-pass-1)
auth="Authorization: token $token"
cookie="Cookie: $(login_cookie "$URL" admin bench-admin-pass-1)"
case "$cookie" in *berth-session=*) ;; *) echo "no session cookie after logging in: $cookie" >&2; exit 1 ;; esac
# berth starts the backend as admin's server; everyone uses that one process.
curl -s -X POST -H "$auth" "$URL/hub/api/users/admin/server" -o /dev/null -w '%{http_code}\n' >&2
backend_port=$(curl -s -H "$auth" "$URL/hub/api/users/admin" | python3 -c 'import json,sys; print(json.load(sys.stdin)["servers"][""]["state"]["port"])')
direct="http://127.0.0.1:$backend_port"
berth="$URL"
berth_cookie="$URL"

nginx_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$work/nginx"
cat > "$work/nginx.conf" <<NGINX
worker_processes auto;
pid $work/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/nginx; proxy_temp_path $work/nginx; fastcgi_temp_path $work/nginx;
    uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
    upstream backend { server 127.0.0.1:$backend_port; keepalive 64; }
    server {
        listen 127.0.0.1:$nginx_port;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header Host \$host;
            proxy_buffering off;
            proxy_request_buffering off;
        }
    }
}
NGINX
nginx -c "$work/nginx.conf" -e "$work/nginx/error.log"
nginx="http://127.0.0.1:$nginx_port"
for _ in $(seq 1 100); do curl -s "$nginx/user/admin/api" >/dev/null && break; sleep 0.05; done

# Peak resident memory of berth and of nginx (all its processes) while the load runs.
( peak_b=0; peak_n=0
  while true; do
      b=$(rss_kib "$BERTH_PID" 2>/dev/null || echo 0)
      n=$(for p in $(pgrep -f "nginx -c $work/nginx.conf"; pgrep -P "$(cat "$work/nginx.pid")"); do rss_kib "$p"; done | awk '{s+=$1} END {print s+0}')
      [ "$b" -gt "$peak_b" ] && peak_b=$b; [ "$n" -gt "$peak_n" ] && peak_n=$n
      echo "$peak_b $peak_n" > "$work/peak"; sleep 0.2
  done ) &
SAMPLER=$!

# Each target answers 200 (a redirect to the log-in page would count as success in wrk).
for pair in "direct:" "nginx:" "berth:$auth" "berth_cookie:$cookie"; do
    base=${pair%%:*}; h=${pair#*:}
    code=$(curl -s -o /dev/null -w '%{http_code}' ${h:+-H "$h"} "${!base}/user/admin/1k")
    [ "$code" = 200 ] || { echo "$base answers $code on /user/admin/1k" >&2; exit 1; }
done

# CPU ticks of the process(es) doing the forwarding: none for direct.
proxy_ticks() {
    case $1 in
        nginx) for p in $(pgrep -P "$(cat "$work/nginx.pid")"); do cpu_ticks "$p"; done | awk '{s+=$1} END {print s+0}' ;;
        berth|berth-cookie) cpu_ticks "$BERTH_PID" ;;
        *) echo 0 ;;
    esac
}

# The forwarding processes' ids, for perf (SYSCALLS=1): nginx's workers,
# berth's process (all its threads).
proxy_pids() {
    case $1 in
        nginx) pgrep -P "$(cat "$work/nginx.pid")" | paste -sd, ;;
        berth|berth-cookie) echo "$BERTH_PID" ;;
    esac
}
# SYSCALLS=1: perf counts the forwarding processes' system calls and context
# switches during each run (tracepoints, no sampling); the table gets them
# per request.
syscalls=${SYSCALLS:-0}
[ "$syscalls" = 1 ] && { command -v perf >/dev/null || need_pkg perf linux-perf; }

# Each cell is measured ROUNDS times (default 3), the targets taking turns
# within a round, so a slow spell of the machine falls on all of them; the
# table has each target's median round and its CPU per request (the
# forwarding process's utime+stime over its rounds / requests served).
rounds=${ROUNDS:-3}
if [ "$syscalls" = 1 ]; then
    echo "| target | body | connections | requests/s | p50 ms | p99 ms | errors | CPU µs per request | system calls per request | context switches per request |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
else
    echo "| target | body | connections | requests/s | p50 ms | p99 ms | errors | CPU µs per request |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
fi
for body in ${BODIES:-1k 1m}; do
    for c in ${CONNS:-1 64}; do
        t=$([ "$c" = 1 ] && echo 1 || echo 2)
        : > "$work/cell"
        for _ in $(seq 1 "$rounds"); do
            for target in direct nginx berth berth-cookie; do
                base=${target/-/_}; base=${!base}
                hdr=(); [ "$target" = berth ] && hdr=(-H "$auth"); [ "$target" = berth-cookie ] && hdr=(-H "$cookie")
                secs=${SECS:-10}
                perf_pid=
                if [ "$syscalls" = 1 ] && [ "$target" != direct ]; then
                    perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$(proxy_pids "$target")" \
                        -o "$work/perf" 2>/dev/null &
                    perf_pid=$!
                    sleep 0.2
                fi
                t0=$(proxy_ticks "$target")
                read -r rps p50 p99 err < <(wrk -t"$t" -c"$c" -d"${secs}s" --latency "${hdr[@]}" "$base/user/admin/$body" | wrk_summary)
                t1=$(proxy_ticks "$target")
                sc=0; cs=0
                if [ -n "$perf_pid" ]; then
                    kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
                    sc=$(awk -F, '/raw_syscalls:sys_enter/ {print $1}' "$work/perf"); cs=$(awk -F, '/context-switches/ {print $1}' "$work/perf")
                fi
                echo "$target $rps $p50 $p99 $err $((t1 - t0)) $secs ${sc:-0} ${cs:-0}" >> "$work/cell"
            done
        done
        python3 - "$body" "$c" "$work/cell" "$syscalls" <<'PY'
import os, statistics, sys
body, c, path, syscalls = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
hz = os.sysconf("SC_CLK_TCK")
rows = {}
for line in open(path):
    t, rps, p50, p99, err, ticks, secs, sc, cs = line.split()
    rows.setdefault(t, []).append((float(rps), float(p50), float(p99), int(err), int(ticks), float(secs), int(sc), int(cs)))
for t in ["direct", "nginx", "berth", "berth-cookie"]:
    r = sorted(rows[t])
    mid = r[len(r) // 2]
    served = sum(x[0] * x[5] for x in r)
    per = lambda i: "–" if t == "direct" or not served else f"{sum(x[i] for x in r) / served:.2f}"
    cpu = sum(x[4] for x in r) / hz / served * 1e6 if t != "direct" and served else float("nan")
    cpu_s = "–" if t == "direct" else f"{cpu:.1f}"
    extra = f" {per(6)} | {per(7)} |" if syscalls else ""
    print(f"| {t} | {body} | {c} | {mid[0]:.0f} | {mid[1]:.3f} | {mid[2]:.3f} | {sum(x[3] for x in r)} | {cpu_s} |{extra}")
PY
    done
done
echo
echo "| target | WebSocket round trip p50 µs | p99 µs |"
echo "| --- | ---: | ---: |"
for target in direct nginx berth; do
    base=${!target}
    ws=${base/http:/ws:}/user/admin/ws
    hdr=(); [ "$target" = berth ] && hdr=("$auth")
    out=$("$ROOT/target/release/ws-rtt" "$ws" 20000 "${hdr[@]}")
    p50=$(echo "$out" | sed -n 's/.*p50_us=\([0-9.]*\).*/\1/p'); p99=$(echo "$out" | sed -n 's/.*p99_us=\([0-9.]*\).*/\1/p')
    echo "| $target | $p50 | $p99 |"
done
read -r peak_b peak_n < "$work/peak"
echo
echo "Peak resident memory under this load: berth $peak_b KiB, nginx (all processes) $peak_n KiB."
