#!/usr/bin/env bash
# Spawn throughput with the Docker spawner: 50 concurrent starts of a small
# server image (the bench backend on top of the test image), time until all
# are ready, and berth's own time per start outside the engine's
# create/start/inspect calls (from berth's log: prepare_ms + spawn_ms -
# engine_ms + finish_ms). Prints a Markdown table. Cleans up what it creates.
# Usage: bench/spawn.sh [COUNT]
source "$(dirname "$0")/lib.sh"
count=${1:-50}
build_release
base_image=$("$ROOT/scripts/build-test-image")
work=$(mktemp -d)
net="berth-bench-$$"
image="berth-bench-backend:$$"
cleanup() {
    kill "$BERTH_PID" 2>/dev/null || true
    docker ps -aq --filter "label=berth.managed=true" --filter "network=$net" | xargs -r docker rm -f >/dev/null 2>&1 || true
    for i in $(seq 0 $((count - 1))); do
        docker rm -f "berth-bench$i" >/dev/null 2>&1 || true
        for v in home workspace cache; do docker volume rm -f "berth-bench$i-$v" >/dev/null 2>&1 || true; done
    done
    docker network rm "$net" >/dev/null 2>&1 || true
    docker rmi -f "$image" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/ctx"
cp "$ROOT/target/release/bench-backend" "$work/ctx/"
printf 'FROM %s\nCOPY bench-backend /usr/local/bin/bench-backend\nCMD ["bench-backend"]\n' "$base_image" > "$work/ctx/Dockerfile"
docker build -q -t "$image" "$work/ctx" >/dev/null

data=$work/data
printf 'bench-admin-pass-1\n' | "$BERTH" user add admin --admin --password-stdin --data-dir "$data" >/dev/null
start_berth "$data" BERTH_SPAWNER=docker BERTH_DOCKER_IMAGE="$image" BERTH_DOCKER_NETWORK="$net" \
    BERTH_SHARED_VOLUME= BERTH_MAX_CONCURRENT_STARTS=$count BERTH_LOG=info,berth_web=debug
token=$(login_token "$URL" admin bench-admin-pass-1)
auth="Authorization: token $token"
names=$(python3 -c "import json; print(json.dumps({'usernames': ['bench%d' % i for i in range($count)]}))")
curl -s -o /dev/null -X POST -H "$auth" "$URL/hub/api/users" -d "$names"

echo "{}" > "$work/options.json"
t0=$(date +%s.%N)
seq 0 $((count - 1)) | xargs -P "$count" -I{} curl -s -o "$work/body{}" -w '%{http_code}\n' -X POST -H "$auth" \
    "$URL/hub/api/users/bench{}/server" -d @"$work/options.json" > "$work/codes"
while :; do
    ready=$(curl -s -H "$auth" "$URL/hub/api/users?state=ready&limit=200" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
    [ "$ready" -ge "$count" ] && break
    failed=$(grep -c "server failed to start" "$data.err" || true)
    [ "$failed" -gt 0 ] && { echo "some starts failed:" >&2; grep "failed to start" "$data.err" >&2; exit 1; }
    if (( $(echo "$(date +%s.%N) - $t0 > 600" | bc) )); then echo "timed out; ready: $ready; codes: $(sort "$work/codes" | uniq -c | tr "\n" " ") $(cat "$work"/body0)" >&2; tail -5 "$data.err" >&2; exit 1; fi
    sleep 0.2
done
t1=$(date +%s.%N)
python3 - "$data.err" "$count" "$t0" "$t1" "$work/codes" <<'PY'
import re, sys, statistics
log, count, t0, t1, codes = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
text = re.sub(r"\x1b\[[0-9;]*m", "", open(log).read())
num = lambda k, line: float(re.search(k + r"=([\d.]+)", line).group(1))
prepare = [num("prepare_ms", l) for l in text.splitlines() if "start prepared" in l]
spawn = [(num("spawn_ms", l), num("engine_ms", l)) for l in text.splitlines() if "started container" in l]
finish = [num("finish_ms", l) for l in text.splitlines() if "server ready" in l]
assert len(spawn) == count and len(finish) == count, (len(spawn), len(finish))
own = [p + (s - e) + f for p, (s, e), f in zip(prepare, spawn, finish)]
ok = sum(1 for c in open(codes) if c.strip() in ("201", "202"))
print("| measurement | value |\n| --- | ---: |")
print(f"| starts requested / accepted / ready | {count} / {ok} / {len(finish)} |")
print(f"| time until all {count} are ready | {t1 - t0:.1f} s |")
print(f"| berth's own time per start, median | {statistics.median(own):.1f} ms |")
print(f"| berth's own time per start, max | {max(own):.1f} ms |")
print(f"| of which preparing (tokens, OAuth client, records), median | {statistics.median(prepare):.1f} ms |")
print(f"| engine create/start/inspect per start, median | {statistics.median(e for _, e in spawn):.1f} ms |")
PY
