#!/bin/sh
# Measures a cluster on this machine (scripts/cluster.sh):
#   1. calls/s through HAProxy with 1, 2 and 3 nodes (2 workers each): session calls
#      that change state (`bump`, journaled in Redis) over 64 sessions, and plain
#      `ping`s, 64 concurrent callers, DURATION each;
#   2. the cost of the Redis journal against the embedded SQLite one: one node, no
#      balancer, 8 sessions calling `bump`, rounds alternating between the two, with
#      the CPU time of the node and of Redis per call.
# All processes float over all cores (not pinned). Environment: DURATION (10s),
# ROUNDS (3).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
duration=${DURATION:-10s}
rounds=${ROUNDS:-3}
PATH="$PATH:/usr/sbin"
sh scripts/services.sh
cargo build --release --quiet
bin="$root/target/release/snakepool"
python=$(sh scripts/python-env.sh)
work=$(mktemp -d)
redis_pid=""
trap 'sh scripts/cluster.sh down "$work/cluster" 2>/dev/null; [ -n "${redis_pid:-}" ] && kill "$redis_pid" 2>/dev/null; rm -rf "$work"' EXIT

# Summarises a `snakepool bench --json` report: calls/s, latency, errors, and the CPU
# time per call of each watched process.
cat > "$work/summary.py" <<'PY'
import json, sys
r = json.load(sys.stdin)
lat = r["latency_us"]
line = "%.0f calls/s, p50 %s us, p99 %s us, %d errors" % (
    r["throughput_rps"], lat["p50"], lat["p99"], sum(r["errors"].values()))
watched = r["resources"]["watched"]
if watched:
    calls = r["ok"] or 1
    line += "; CPU per call: " + ", ".join(
        "%s %.0f us" % (name, w["cpu_s"] * 1e6 / calls) for name, w in sorted(watched.items()))
print(line)
PY
rate() {
  python3 "$work/summary.py"
}

if [ -z "${SKIP_CLUSTER:-}" ]; then
echo "== Through HAProxy (64 callers, $duration a run; 2 cores shared by everything)"
for nodes in 1 2 3; do
  SNAKEPOOL_BIN="$bin" SNAKEPOOL_PYTHON="$python" SNAKEPOOL_NODES=$nodes \
    SNAKEPOOL_NODE_ARGS="--python-path $root/benches/python --module session_handlers --session-idle 1h" \
    sh scripts/cluster.sh up "$work/cluster" > /dev/null
  url=$(. "$work/cluster/cluster.env" && echo "$BALANCER_URL")
  printf '%s node(s), bump in 64 sessions: ' "$nodes"
  "$bin" bench --url "$url" --sessions 64 --command bump --concurrency 64 --duration "$duration" --json | rate
  printf '%s node(s), plain ping:           ' "$nodes"
  "$bin" bench --url "$url" --command ping --concurrency 64 --duration "$duration" --json | rate
  sh scripts/cluster.sh down "$work/cluster"
  rm -rf "$work/cluster"
done
fi

echo "== Journal cost: one node, 8 sessions calling bump, Redis against SQLite"
redis_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$work/redis"
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$work/redis" --appendonly yes \
  --appendfsync always --save "" --loglevel warning > /dev/null 2>&1 &
redis_pid=$!
node() {
  "$bin" serve --listen 127.0.0.1:0 --workers 2 --python "$python" \
    --python-path "$root/benches/python" --module session_handlers --session-idle 1h "$@" \
    > "$work/node.out" 2>/dev/null &
  echo $! > "$work/node.pid"
  python3 - "$work/node.out" <<'PY'
import sys, time
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    lines = open(sys.argv[1]).read().splitlines()
    if any(l.startswith("pool ready") for l in lines):
        print(lines[0].removeprefix("listening on "))
        sys.exit(0)
    time.sleep(0.05)
sys.exit("the node did not start")
PY
}
round=1
while [ "$round" -le "$rounds" ]; do
  for journal in sqlite redis; do
    case $journal in
      sqlite) url=$(node --journal sqlite --data-dir "$work/data-$round") ;;
      redis) url=$(node --journal "redis://127.0.0.1:$redis_port/0" --node bench-$round) ;;
    esac
    node_pid=$(cat "$work/node.pid")
    printf 'round %s, %-7s ' "$round" "$journal:"
    "$bin" bench --url "$url" --sessions 8 --command bump --concurrency 8 --duration "$duration" \
      --watch "node=$node_pid" --watch "redis=$redis_pid" --json | rate
    kill "$node_pid"; wait "$node_pid" 2>/dev/null || true
  done
  round=$((round + 1))
done
