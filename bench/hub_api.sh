#!/usr/bin/env bash
# Hub API at scale: 10,000 users created through the API, then bounded wrk
# runs (10 s, 8 connections) against the user list and a single user, the
# resident memory, and logins per second with 8 clients while a ninth
# measures the single-user lookup. Prints a Markdown table.
# Usage: bench/hub_api.sh
source "$(dirname "$0")/lib.sh"
need_pkg wrk wrk
build_release
BERTH_PID=; work=$(mktemp -d); trap 'kill $BERTH_PID 2>/dev/null; rm -rf "$work"' EXIT
data=$work/data
printf 'bench-admin-pass-1\n' | "$BERTH" user add admin --admin --password-stdin --data-dir "$data" >/dev/null
start_berth "$data"
token=$(login_token "$URL" admin bench-admin-pass-1)
auth="Authorization: token $token"

create_users "$URL" "$token"

run() { wrk -t2 -c8 -d10s --latency -H "$auth" "$@" | wrk_summary; }
read -r list_rps list_p50 list_p99 list_err < <(run "$URL/hub/api/users?limit=200")
read -r one_rps one_p50 one_p99 one_err < <(run "$URL/hub/api/users/user05000")
rss=$(rss_kib "$BERTH_PID")

# Logins: 8 clients for 10 s; meanwhile one client measures the lookup.
jar=$(mktemp); curl -s -c "$jar" "$URL/hub/login" >/dev/null
export XSRF=$(awk '$6=="_xsrf" {print $7}' "$jar" | tail -1) LOGIN_USER=admin LOGIN_PASSWORD=bench-admin-pass-1
rm -f "$jar"
wrk -t1 -c1 -d10s --latency -H "$auth" "$URL/hub/api/users/user05000" > "$work/during.txt" &
lookup=$!
login_out=$(wrk -t2 -c8 -d10s --latency -s "$(dirname "$0")/login.lua" "$URL")
wait $lookup
read -r login_rps login_p50 login_p99 login_err < <(echo "$login_out" | wrk_summary)
read -r dur_rps dur_p50 dur_p99 dur_err < <(wrk_summary < "$work/during.txt")
ok_logins=$(curl -s -H "$auth" "$URL/hub/api/users/admin" >/dev/null; echo "$login_rps")
rss_after=$(rss_kib "$BERTH_PID")

cat <<MD
| measurement | requests/s | p50 ms | p99 ms | non-2xx/3xx |
| --- | ---: | ---: | ---: | ---: |
| GET /hub/api/users?limit=200 (10,000 users) | $list_rps | $list_p50 | $list_p99 | $list_err |
| GET /hub/api/users/user05000 | $one_rps | $one_p50 | $one_p99 | $one_err |
| POST /hub/login, 8 clients (argon2id 19 MiB, t=2) | $ok_logins | $login_p50 | $login_p99 | $login_err |
| GET /hub/api/users/user05000 during the login load (1 client) | $dur_rps | $dur_p50 | $dur_p99 | $dur_err |

berth resident memory: $rss KiB after the API runs, $rss_after KiB after the login run.
MD
