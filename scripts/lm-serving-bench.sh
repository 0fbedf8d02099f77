#!/usr/bin/env bash
# LM-bound serving: `snakepool serve` against DSPy's documented deployment (FastAPI +
# uvicorn, `await program.acall(...)`), both against the same fake OpenAI-compatible LM
# on 127.0.0.1 answering every chat completion after LM_BENCH_LATENCY_MS.
#
# Sets up .venv (scripts/python-env.sh) and the bench-only packages of
# benches/lm_serving/requirements.txt (pip runs only when one is missing or another
# version), builds the release binary, starts the fake LM, then for each round starts
# each server in turn (the order alternates between rounds), loads it with
# `snakepool bench --url ... --dspy-profile fake --json` for LM_BENCH_DURATION at each
# number of callers, records the report with the server's and the fake LM's CPU time
# and memory (`--watch`), and stops it. At the end it writes $LM_BENCH_OUT/lm_serving.json
# and .md, docs/bench/lm_serving.png and the last section of BENCHMARKS.md.
#
# Settings (environment):
#   LM_BENCH_ROUNDS=2                rounds (each server started anew per round)
#   LM_BENCH_CALLERS="64 256"        concurrent callers, loaded in turn
#   LM_BENCH_DURATION=20s            counted calling time per load
#   LM_BENCH_LATENCY_MS=200          the fake LM's latency per completion
#   LM_BENCH_SNAKEPOOL_WORKERS="2"   snakepool worker counts (each is a server of its own)
#   LM_BENCH_MAX_CONCURRENCY=128     calls one snakepool worker runs at once
#   LM_BENCH_UVICORN_WORKERS=2       uvicorn worker processes
#   LM_BENCH_PROGRAM=predict         predict or chain_of_thought, on both sides
#   LM_BENCH_MODEL=openai/gpt-4o-mini  the model name both sides give the fake LM (a known
#                                    one, so litellm finds it in its local cost map)
#   LM_BENCH_CHECKOUT_TIMEOUT=120s   snakepool's longest wait in its queue
#   LM_BENCH_OUT=target/lm-serving   raw results, JSON and markdown
#   LM_BENCH_NO_REPORT=1             leave BENCHMARKS.md and the plot alone
#   LM_BENCH_NO_PROFILE=1            skip scripts/lm-serving-profile.sh (where the CPU goes)
# Everything listens on 127.0.0.1 only. Takes about 5 minutes with the defaults.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

rounds=${LM_BENCH_ROUNDS:-2}
callers_list=${LM_BENCH_CALLERS:-"64 256"}
duration=${LM_BENCH_DURATION:-20s}
latency_ms=${LM_BENCH_LATENCY_MS:-200}
snakepool_workers=${LM_BENCH_SNAKEPOOL_WORKERS:-2}
max_concurrency=${LM_BENCH_MAX_CONCURRENCY:-128}
uvicorn_workers=${LM_BENCH_UVICORN_WORKERS:-2}
program=${LM_BENCH_PROGRAM:-predict}
model=${LM_BENCH_MODEL:-openai/gpt-4o-mini}
checkout_timeout=${LM_BENCH_CHECKOUT_TIMEOUT:-120s}
out=${LM_BENCH_OUT:-target/lm-serving}
started=$(date +%s)
# This run's command, with the settings it was given.
command=""
for var in $(env | sed -n 's/^\(LM_BENCH_[A-Z_]*\)=.*/\1/p' | sort); do
  command="$command$var=\"${!var}\" "
done
command="${command}scripts/lm-serving-bench.sh"

python=$(sh scripts/python-env.sh)
export SNAKEPOOL_PYTHON="$python"
echo "Python: $python"

# Bench-only packages, installed only when one is missing or another version.
missing=$("$python" - benches/lm_serving/requirements.txt <<'EOF'
import sys
from importlib import metadata
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, _, version = line.partition("==")
    try:
        if metadata.version(name) != version:
            print(line)
    except metadata.PackageNotFoundError:
        print(line)
EOF
)
if [ -n "$missing" ]; then
  echo "installing bench packages into .venv: $(echo "$missing" | tr '\n' ' ')"
  "$python" -m pip install --quiet --disable-pip-version-check -r benches/lm_serving/requirements.txt
fi

# Build first, so compiling does not share the machine with the measurements.
cargo build --release --bin snakepool
snakepool="$root/target/release/snakepool"

mkdir -p "$out"
results="$out/results.jsonl"
: > "$results"
logs="$out/logs"
mkdir -p "$logs"

# Processes this script started, stopped on exit (by pid).
pids=()
stop() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  for pid in "${pids[@]}"; do stop "$pid"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits until FILE has a line "listening on URL"; prints the URL.
listening_url() {
  local file=$1
  for _ in $(seq 1 600); do
    local url
    url=$(sed -n 's/^listening on //p' "$file" | head -n1)
    if [ -n "$url" ]; then echo "$url"; return 0; fi
    sleep 0.1
  done
  echo "no 'listening on' line in $file" >&2
  return 1
}

# Waits until URL/health answers 200 (up to 120 s).
wait_healthy() {
  local url=$1
  for _ in $(seq 1 1200); do
    if "$python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "$url/health" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "$url/health never answered 200" >&2
  return 1
}

free_port() {
  "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# The fake LM.
"$python" benches/lm_serving/fake_lm.py --port 0 --latency-ms "$latency_ms" \
  > "$logs/fake_lm.log" 2>&1 &
lm_pid=$!
pids+=("$lm_pid")
lm_url=$(listening_url "$logs/fake_lm.log")
echo "fake LM: $lm_url (pid $lm_pid), ${latency_ms} ms per completion"

export LM_BENCH_FAKE_KEY=x
# No Python process of the run fetches DSPy's model metadata from the internet
# (snakepool's workers have this by default; the FastAPI app sets it too).
export LITELLM_LOCAL_MODEL_COST_MAP=True

# Starts a server; sets server_pid and server_url.
start_server() {
  local side=$1 workers=$2 log=$3
  case "$side" in
    fastapi)
      local port
      port=$(free_port)
      LM_SERVING_API_BASE="$lm_url/v1" LM_SERVING_PROGRAM="$program" LM_SERVING_MODEL="$model" \
        "$python" -m uvicorn fastapi_app:app --app-dir benches/lm_serving \
        --host 127.0.0.1 --port "$port" --workers "$workers" \
        --no-access-log --log-level warning > "$log" 2>&1 &
      server_pid=$!
      server_url="http://127.0.0.1:$port"
      ;;
    snakepool)
      "$snakepool" serve --journal memory --listen 127.0.0.1:0 --workers "$workers" --preload dspy \
        --checkout-timeout "$checkout_timeout" --max-concurrency "$max_concurrency" \
        --lm-profile "fake:model=$model,api_base=$lm_url/v1,api_key_env=LM_BENCH_FAKE_KEY" \
        > "$log" 2>&1 &
      server_pid=$!
      server_url=$(listening_url "$log")
      # Every worker ready (the health check passes with one).
      for _ in $(seq 1 1200); do
        grep -q '^pool ready' "$log" && break
        sleep 0.1
      done
      ;;
  esac
  pids+=("$server_pid")
  wait_healthy "$server_url"
}

# The servers of a round: "side:workers:label".
servers=("fastapi:$uvicorn_workers:FastAPI + uvicorn, $uvicorn_workers workers")
for w in $snakepool_workers; do
  servers+=("snakepool:$w:snakepool serve, $w workers")
done

for round in $(seq 1 "$rounds"); do
  # Alternate the order: the first server of odd rounds goes last in even ones.
  order=("${servers[@]}")
  if [ $((round % 2)) -eq 0 ]; then
    order=()
    for ((i = ${#servers[@]} - 1; i >= 0; i--)); do order+=("${servers[i]}"); done
  fi
  for server in "${order[@]}"; do
    IFS=: read -r side workers label <<< "$server"
    tag="$side-w$workers-r$round"
    echo "round $round: $label"
    start_server "$side" "$workers" "$logs/$tag.log"
    for callers in $callers_list; do
      "$python" -c "import json, sys, urllib.request; r = urllib.request.urlopen(urllib.request.Request(sys.argv[1], method='POST', data=b'')); sys.stdout.write(r.read().decode())" \
        "$lm_url/stats/reset" > "$out/lm-before.json"
      "$snakepool" bench --url "$server_url" --dspy-profile fake --dspy-program "$program" \
        --concurrency "$callers" --duration "$duration" --json \
        --watch "server=$server_pid" --watch "lm=$lm_pid" > "$out/$tag-c$callers.json"
      "$python" benches/lm_serving/report.py record --results "$results" --side "$side" \
        --label "$label" --workers "$workers" --round "$round" --callers "$callers" \
        --bench "$out/$tag-c$callers.json" --lm-before "$out/lm-before.json" --lm-url "$lm_url"
      "$python" -c "
import json, sys
r = json.load(open(sys.argv[1]))
s = r['resources']['watched']['server']
print(f\"  {sys.argv[2]:>4} callers: {r['throughput_rps']:7.1f} calls/s, p50 {r['latency_us']['p50'] / 1000:7.0f} ms, \"
      f\"p99 {r['latency_us']['p99'] / 1000:7.0f} ms, server {s['cpu_us_per_call'] / 1000:.2f} ms CPU/call, \"
      f\"PSS {s['pss_kib'] / 1024:.0f} MiB, errors {sum(r['errors'].values())}\")
" "$out/$tag-c$callers.json" "$callers"
    done
    stop "$server_pid"
  done
done

stop "$lm_pid"
# Where the CPU goes (quoted by the report).
if [ -z "${LM_BENCH_NO_PROFILE:-}" ]; then
  scripts/lm-serving-profile.sh
fi
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
elapsed=$(($(date +%s) - started))

versions=$("$python" - <<'EOF'
import json, platform
from importlib import metadata
print(json.dumps({
    "python": platform.python_version(),
    **{name: metadata.version(name) for name in ("dspy", "litellm", "fastapi", "uvicorn")},
}))
EOF
)
git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then git_rev="$git_rev with local changes"; fi

LM_BENCH_COMMAND_LINE="$command" "$python" - "$out/meta.json" <<EOF
import json, os, sys
meta = json.loads('''$versions''')
meta.update({
    "date": "$(date -u '+%Y-%m-%d %H:%M UTC')",
    "elapsed_s": $elapsed,
    "git": "$git_rev",
    "cores": $(nproc),
    "load_before": "$load_before",
    "load_after": "$load_after",
    "rounds": $rounds,
    "callers": "$callers_list",
    "duration": "$duration",
    "latency_ms": $latency_ms,
    "snakepool_workers": "$snakepool_workers",
    "max_concurrency": $max_concurrency,
    "uvicorn_workers": $uvicorn_workers,
    "program": "$program",
    "model": "$model",
    "checkout_timeout": "$checkout_timeout",
    "out_dir": "$out",
    "command": os.environ["LM_BENCH_COMMAND_LINE"],
})
json.dump(meta, open(sys.argv[1], "w"), indent=2)
EOF

render=("$python" benches/lm_serving/report.py render --results "$results" --meta "$out/meta.json"
  --out-dir "$out")
if [ -n "${LM_BENCH_NO_REPORT:-}" ]; then
  "${render[@]}" --plot "$out/lm_serving.png"
else
  "${render[@]}" --plot docs/bench/lm_serving.png --benchmarks BENCHMARKS.md
fi
echo "lm-serving bench: ${elapsed} s; see $out/lm_serving.json$([ -z "${LM_BENCH_NO_REPORT:-}" ] && echo ' and BENCHMARKS.md')"
