#!/usr/bin/env bash
# SSH gateway against a direct OpenSSH sshd on the same machine, same run:
# scp of a 1 GiB file up and down, and connection set-up (key auth to the
# first command's output, median of 20). berth runs its local-process
# spawner (sessions are local processes, as sshd's are); SPAWNER=docker
# measures sessions exec'd into a container instead; CIPHER=NAME makes both
# sides use that cipher (by default each negotiates its own; the table names it).
# Usage: [SPAWNER=docker] [CIPHER=aes256-gcm@openssh.com] bench/ssh.sh
#        (prints a Markdown table; cleans up what it creates)
source "$(dirname "$0")/lib.sh"
spawner=${SPAWNER:-local}
need_pkg sshd openssh-server
need_pkg scp openssh-client
build_release
work=$(mktemp -d)
cleanup() {
    kill "$BERTH_PID" "${SSHD_PID:-}" 2>/dev/null || true
    [ "$spawner" = docker ] && docker rm -f "berth-benchssh" >/dev/null 2>&1 || true
    [ "$spawner" = docker ] && for v in home workspace cache; do docker volume rm -f "berth-benchssh-$v" >/dev/null 2>&1 || true; done
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

ssh-keygen -q -t ed25519 -N '' -f "$work/id" -C bench
opts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o IdentityAgent=none
      -o IdentitiesOnly=yes -o BatchMode=yes -i "$work/id")
[ -n "${CIPHER:-}" ] && opts+=(-c "$CIPHER")
cipher_of() { # cipher_of PORT LOGIN: the cipher the client negotiated
    ssh "${opts[@]}" -v -p "$1" "$2@127.0.0.1" true 2>&1 | sed -n 's/.*kex: server->client cipher: \([^ ]*\).*/\1/p' | head -1
}

# Direct sshd: its own host key, the bench key authorized for root, default ciphers.
sshd_port=$(free_port)
ssh-keygen -q -t ed25519 -N '' -f "$work/sshd_host_key"
mkdir -p "$work/sshd-home"
cp "$work/id.pub" "$work/authorized_keys"
cat > "$work/sshd_config" <<CFG
Port $sshd_port
ListenAddress 127.0.0.1
HostKey $work/sshd_host_key
AuthorizedKeysFile $work/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PidFile $work/sshd.pid
Subsystem sftp /usr/lib/openssh/sftp-server
CFG
mkdir -p /run/sshd
/usr/sbin/sshd -D -f "$work/sshd_config" -E "$work/sshd.log" &
SSHD_PID=$!

# berth with its gateway; bench-backend stands in for the single-user server.
data=$work/data
printf 'bench-admin-pass-1\n' | "$BERTH" user add admin --admin --password-stdin --data-dir "$data" >/dev/null
printf 'bench-user-pass-1\n' | "$BERTH" user add benchssh --password-stdin --data-dir "$data" >/dev/null
env_extra=(BERTH_SPAWNER=local BERTH_LOCAL_CMD="$ROOT/target/release/bench-backend")
if [ "$spawner" = docker ]; then
    image=$("$ROOT/scripts/build-test-image")
    env_extra=(BERTH_SPAWNER=docker BERTH_DOCKER_IMAGE="$image" BERTH_SHARED_VOLUME=)
fi
gw_port=$(free_port)
start_berth "$data" BERTH_SSH_BIND=127.0.0.1:$gw_port BERTH_SSH_HOST_KEY_TYPES=ed25519 "${env_extra[@]}"
token=$(login_token "$URL" benchssh bench-user-pass-1)
curl -sf -o /dev/null -H "Authorization: token $token" -X POST "$URL/hub/api/users/benchssh/keys" \
    -d "{\"key\": \"$(cat "$work/id.pub")\"}"
# The first connection starts the server.
ssh "${opts[@]}" -p "$gw_port" benchssh@127.0.0.1 true 2>/dev/null
ssh "${opts[@]}" -p "$sshd_port" root@127.0.0.1 true

head -c 1G /dev/urandom > "$work/big.bin"
seconds() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }
mibs() { echo "1024 / $1" | bc -l; }
setup_median() { # setup_median PORT LOGIN
    for _ in $(seq 20); do seconds ssh "${opts[@]}" -p "$1" "$2@127.0.0.1" echo ready; done | sort -n | sed -n 10p
}
rm_remote() { ssh "${opts[@]}" -p "$1" "$2@127.0.0.1" rm -f big.bin; }

run() { # run NAME PORT LOGIN
    local up down setup
    up=$(seconds scp "${opts[@]}" -P "$2" "$work/big.bin" "$3@127.0.0.1:big.bin")
    down=$(seconds scp "${opts[@]}" -P "$2" "$3@127.0.0.1:big.bin" "$work/back.bin")
    cmp -s "$work/big.bin" "$work/back.bin" || { echo "$1: the file came back changed" >&2; exit 1; }
    rm_remote "$2" "$3"
    setup=$(setup_median "$2" "$3")
    echo "$1 $(mibs "$up") $(mibs "$down") $setup $(cipher_of "$2" "$3")"
}
direct=$(run sshd "$sshd_port" root)
gateway=$(run berth "$gw_port" benchssh)
rss=$(rss_kib "$BERTH_PID")
python3 - "$direct" "$gateway" "$rss" "$spawner" <<'PY'
import sys
d = sys.argv[1].split(); g = sys.argv[2].split()
du, dd, ds = map(float, d[1:4]); gu, gd, gs = map(float, g[1:4])
print(f"| path ({sys.argv[4]} spawner) | cipher | scp up MiB/s | scp down MiB/s | set-up median ms |")
print("| --- | --- | --- | --- | --- |")
print(f"| direct sshd | {d[4]} | {du:.0f} | {dd:.0f} | {ds*1000:.0f} |")
print(f"| berth gateway | {g[4]} | {gu:.0f} | {gd:.0f} | {gs*1000:.0f} |")
print(f"| ratio berth/sshd | | {gu/du:.2f} | {gd/dd:.2f} | {gs/ds:.2f} |")
print(f"berth RSS after the run: {int(sys.argv[3])//1024} MiB")
PY
