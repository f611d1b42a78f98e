#!/usr/bin/env bash
# The same hub API measurements as hub_api.sh, against JupyterHub 6.1.1 with
# NativeAuthenticator (from PyPI, in a virtualenv under the build directory),
# for ratios measured on the same machine. JupyterHub runs without its proxy
# (a no-op proxy class): only the hub is measured.
# Usage: bench/jupyterhub_peer.sh
source "$(dirname "$0")/lib.sh"
need_pkg wrk wrk
bench_venv
work=$(mktemp -d)
JH_PORT=$(free_port)
token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
{ jh_noproxy_config; cat <<PY
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = $JH_PORT
c.JupyterHub.db_url = "sqlite:///$work/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "$work/cookie_secret"
c.JupyterHub.pid_file = "$work/jupyterhub.pid"
c.JupyterHub.log_level = "WARN"
c.JupyterHub.authenticator_class = "native"
c.Authenticator.admin_users = {"admin"}
c.JupyterHub.services = [{"name": "bench", "api_token": "$token"}]
c.JupyterHub.load_roles = [{"name": "bench", "scopes": ["admin:users", "list:users", "read:users"], "services": ["bench"]}]
PY
} > "$work/jupyterhub_config.py"
trap 'kill $JH 2>/dev/null; sleep 1; kill -9 $JH 2>/dev/null; rm -rf "$work"' EXIT
start_jupyterhub "$work"
URL=$JH_URL
auth="Authorization: token $token"

# The admin signs up (NativeAuthenticator authorizes admin_users at once).
jar=$work/jar
curl -s -A '' -c "$jar" "$URL/hub/signup" >/dev/null
x=$(awk '$6=="_xsrf" {print $7}' "$jar" | tail -1)
curl -s -A '' -b "$jar" -c "$jar" "$URL/hub/signup" --data-urlencode "_xsrf=$x" -d username=admin \
    -d signup_password=bench-admin-pass-1 -d signup_password_confirmation=bench-admin-pass-1 >/dev/null

create_users "$URL" "$token"

run() { wrk -t2 -c8 -d10s --latency -H "$auth" "$@" | wrk_summary; }
read -r list_rps list_p50 list_p99 list_err < <(run "$URL/hub/api/users?limit=200")
read -r one_rps one_p50 one_p99 one_err < <(run "$URL/hub/api/users/user05000")
pid=$(cat "$work/jupyterhub.pid" 2>/dev/null || echo $JH)
rss=$(rss_kib "$pid")

rm -f "$jar"; curl -s -A '' -c "$jar" "$URL/hub/login" >/dev/null
export XSRF=$(awk '$6=="_xsrf" {print $7}' "$jar" | tail -1) LOGIN_USER=admin LOGIN_PASSWORD=bench-admin-pass-1
wrk -t1 -c1 -d10s --latency -H "$auth" "$URL/hub/api/users/user05000" > "$work/during.txt" &
lookup=$!
login_out=$(wrk -t2 -c8 -d10s --latency -s "$(dirname "$0")/login.lua" "$URL")
wait $lookup
read -r login_rps login_p50 login_p99 login_err < <(echo "$login_out" | wrk_summary)
read -r dur_rps dur_p50 dur_p99 dur_err < <(wrk_summary < "$work/during.txt")
cat <<MD
| measurement (JupyterHub 6.1.1 + NativeAuthenticator 1.3.0) | requests/s | p50 ms | p99 ms | non-2xx/3xx |
| --- | ---: | ---: | ---: | ---: |
| GET /hub/api/users?limit=200 (10,000 users) | $list_rps | $list_p50 | $list_p99 | $list_err |
| GET /hub/api/users/user05000 | $one_rps | $one_p50 | $one_p99 | $one_err |
| POST /hub/login, 8 clients (bcrypt) | $login_rps | $login_p50 | $login_p99 | $login_err |
| GET /hub/api/users/user05000 during the login load (1 client) | $dur_rps | $dur_p50 | $dur_p99 | $dur_err |

JupyterHub resident memory: $rss KiB after the API runs.
MD
