#!/usr/bin/env bash
# The GPU sampler's cost (issue 13): 8 GPUs and 200 compute processes, the
# processes real (sleeps in one real container, so every sample attributes
# them PID → cgroup → container), read through berth's own Telemetry::sample
# (crates/bench/src/bin/gpu-sampler.rs) from
#   - the stand-in nvidia-smi (a shell script printing the real tool's csv),
#   - the NVML stand-in library (tests/fixtures/fake_nvml.c, NVML's ABI).
# The peer, measured in the same run: the same two nvidia-smi queries run
# by a plain shell loop (what any sampler built on the CLI pays).
# Usage: [SAMPLES=10000] [ONLY=nvml] [IMAGE=berth-test-singleuser:latest] bench/gpu_sampler.sh
#        (prints a Markdown table; cleans up what it creates)
source "$(dirname "$0")/lib.sh"
samples=${SAMPLES:-10000}
image=${IMAGE:-berth-test-singleuser:latest}
(cd "$ROOT" && cargo build --release -q -p berth-bench --bin gpu-sampler >&2)
bin=$ROOT/target/release/gpu-sampler
work=$(mktemp -d)
name=berth-benchgpu
cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

docker run -d --name "$name" --entrypoint /bin/sh "$image" \
    -c 'for i in $(seq 200); do sleep 3600 & done; wait' >/dev/null
cid=$(docker inspect -f '{{.Id}}' "$name")
init=$(docker inspect -f '{{.State.Pid}}' "$name")
for _ in $(seq 1 100); do
    [ "$(pgrep -c -P "$init" || true)" -ge 200 ] && break
    sleep 0.1
done
mapfile -t pids < <(pgrep -P "$init" | head -200)
[ "${#pids[@]}" -eq 200 ] || { echo "expected 200 processes in the container, found ${#pids[@]}" >&2; exit 1; }

# 8 GPUs; the 200 processes spread over them.
: > "$work/gpus.csv"; : > "$work/apps.csv"; : > "$work/nvml.txt"
for g in $(seq 0 7); do
    uuid=$(printf 'GPU-%08x-1111-2222-3333-%012x' "$g" "$g")
    echo "$g, $uuid, NVIDIA A100-SXM4-80GB, $((g * 10)), 40536, 81920, 61, 312.45" >> "$work/gpus.csv"
    echo "gpu $uuid $((g * 10)) 42505076736 85899345920 61 312450 NVIDIA A100-SXM4-80GB" >> "$work/nvml.txt"
done
i=0
for p in "${pids[@]}"; do
    uuid=$(printf 'GPU-%08x-1111-2222-3333-%012x' $((i % 8)) $((i % 8)))
    echo "$uuid, $p, 1024" >> "$work/apps.csv"
    echo "app $uuid $p 1073741824" >> "$work/nvml.txt"
    i=$((i + 1))
done
cat > "$work/nvidia-smi" <<'EOF'
#!/bin/sh
dir=$(dirname "$0")
case "$1 $2" in
  "--query-gpu=index,uuid,name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw --format=csv,noheader,nounits")
    cat "$dir/gpus.csv" ;;
  "--query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader,nounits")
    cat "$dir/apps.csv" ;;
  *) exit 2 ;;
esac
EOF
chmod +x "$work/nvidia-smi"
cc -shared -fPIC -O2 -o "$work/libnvidia-ml.so.1" "$ROOT/crates/berth/tests/fixtures/fake_nvml.c"

if [ "${ONLY:-}" = nvml ]; then
    BERTH_FAKE_NVML_DATA="$work/nvml.txt" "$bin" --source nvml --library "$work/libnvidia-ml.so.1" \
        --container "$cid" --samples "$samples"
    exit 0
fi
smi=$("$bin" --source nvidia-smi --program "$work/nvidia-smi" --container "$cid" --samples "$samples")
nvml=$(BERTH_FAKE_NVML_DATA="$work/nvml.txt" "$bin" --source nvml --library "$work/libnvidia-ml.so.1" \
    --container "$cid" --samples "$samples")

# The peer: the two queries from a shell loop, 1,000 times.
peer_n=1000
start=$(date +%s%N)
for _ in $(seq 1 $peer_n); do
    "$work/nvidia-smi" --query-gpu=index,uuid,name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw --format=csv,noheader,nounits >/dev/null
    "$work/nvidia-smi" --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader,nounits >/dev/null
done
peer_ms=$(( ($(date +%s%N) - start) / peer_n / 1000 ))

python3 - "$smi" "$nvml" "$peer_ms" "$samples" <<'EOF'
import json, sys
smi, nvml = json.loads(sys.argv[1]), json.loads(sys.argv[2])
peer_us, n = int(sys.argv[3]), sys.argv[4]
print(f"| source ({n} samples, 8 GPUs, 200 processes) | berth CPU ms/sample | child CPU ms/sample | wall ms/sample | attributed | RSS KiB after 1/10 → 1/2 → end |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for r in (smi, nvml):
    print(f"| {r['source']} | {r['cpu_ms_per_sample']:.3f} | {r['child_cpu_ms_per_sample']:.3f} | {r['wall_ms_per_sample']:.3f} "
          f"| {r['attributed']}/{r['processes']} | {r['rss_kib_after_tenth']} → {r['rss_kib_at_half']} → {r['rss_kib_at_end']} |")
print()
print(f"Peer, same run: the two nvidia-smi stand-in queries from a shell loop: {peer_us / 1000:.3f} ms wall per sample; "
      f"berth's nvidia-smi sample takes {smi['wall_ms_per_sample'] / (peer_us / 1000):.2f}× that wall time.")
EOF
