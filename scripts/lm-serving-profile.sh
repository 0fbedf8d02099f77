#!/usr/bin/env bash
# Where the CPU of an LM-bound call goes in `snakepool serve`: the setup of
# scripts/lm-serving-bench.sh (fake LM on 127.0.0.1 answering after 200 ms, `serve` with
# 2 workers and an LM profile, `snakepool bench --dspy-profile` as the load), then, while
# the load runs, the host process's own CPU time from /proc (the Rust side: HTTP, JSON,
# frames, scheduling) and a py-spy profile of one worker (the Python side), grouped by
# library with benches/lm_serving/cpu_breakdown.py.
#
# Prints the figures and keeps them in target/lm-serving/profile/summary.txt, which the
# report of lm-serving-bench.sh (which runs this script last) quotes.
#
# Settings (environment): PROFILE_CALLERS=64, PROFILE_SECONDS=10 (sampled), and
# LM_BENCH_MODEL / LM_BENCH_MAX_CONCURRENCY as in lm-serving-bench.sh. Installs py-spy
# into .venv when missing. Everything listens on 127.0.0.1 only.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

callers=${PROFILE_CALLERS:-64}
seconds=${PROFILE_SECONDS:-10}
model=${LM_BENCH_MODEL:-openai/gpt-4o-mini}
max_concurrency=${LM_BENCH_MAX_CONCURRENCY:-128}
python=$(sh scripts/python-env.sh)
[ -x "$(dirname "$python")/py-spy" ] || "$python" -m pip install --quiet py-spy
pyspy="$(dirname "$python")/py-spy"
cargo build --release --bin snakepool
snakepool="$root/target/release/snakepool"
out=target/lm-serving/profile
mkdir -p "$out"

pids=()
trap 'for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT

# Waits until FILE has a line starting with PREFIX; prints the rest of it.
line_after() {
  for _ in $(seq 1 1200); do
    local rest
    rest=$(sed -n "s/^$2//p" "$1" | head -n1)
    if [ -n "$rest" ]; then echo "$rest"; return 0; fi
    sleep 0.1
  done
  echo "no '$2' line in $1" >&2
  return 1
}

export LM_BENCH_FAKE_KEY=x LITELLM_LOCAL_MODEL_COST_MAP=True
"$python" benches/lm_serving/fake_lm.py --port 0 --latency-ms 200 > "$out/fake_lm.log" 2>&1 &
pids+=($!)
lm_url=$(line_after "$out/fake_lm.log" "listening on ")
"$snakepool" serve --journal memory --listen 127.0.0.1:0 --workers 2 --preload dspy --python "$python" \
  --checkout-timeout 120s --max-concurrency "$max_concurrency" \
  --lm-profile "fake:model=$model,api_base=$lm_url/v1,api_key_env=LM_BENCH_FAKE_KEY" \
  > "$out/serve.log" 2>&1 &
server=$!
pids+=("$server")
url=$(line_after "$out/serve.log" "listening on ")
line_after "$out/serve.log" "pool ready" > /dev/null
"$snakepool" bench --url "$url" --dspy-profile fake --concurrency "$callers" \
  --duration "$((seconds + 10))s" --json > "$out/bench.json" &
load=$!
sleep 5
worker=$("$python" -c "import json, sys, urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1]))['workers'][0]['pid'])" "$url/v1/pool")
ticks_before=$(awk '{print $14 + $15}' "/proc/$server/stat")
"$pyspy" record --pid "$worker" --duration "$seconds" --rate 200 --format raw \
  --output "$out/worker.txt" --nonblocking > "$out/py-spy.log" 2>&1
ticks_after=$(awk '{print $14 + $15}' "/proc/$server/stat")
wait "$load"
{
  "$python" - "$out/bench.json" "$((ticks_after - ticks_before))" "$(getconf CLK_TCK)" "$seconds" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
ticks, hz, seconds = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rate = report["throughput_rps"]
host_ms = ticks / hz / seconds / rate * 1000 if rate else float("nan")
print(f"load: {rate:.1f} calls/s; the host process (Rust) used {ticks / hz / seconds:.2f} cores, "
      f"{host_ms:.2f} ms of CPU per call")
PY
  echo "one worker (py-spy, $seconds s at 200 Hz):"
  "$python" benches/lm_serving/cpu_breakdown.py "$out/worker.txt"
} | tee "$out/summary.txt"
